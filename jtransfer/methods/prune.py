"""Structural channel pruning by widths (cwl-weighting-convolution, sec. IV-C, Table IV).

Removing output channel k of a conv unit slices its kernel/bias (and BN scale, bias, running
mean and var), the matching input channels of every conv that reads the map, and the matching
rows of the first dense layer after the convs: after flatten (VGG, AlexNet; NHWC order, so the
input row of channel c at spatial position p is p*C + c) or after global average pooling
(ResNet, truncated nets; row c). The config's widths shrink to match, so `models.from_config`
builds the smaller model with the same code; no scales are needed at run time. DenseNet,
ConvNeXt and grouped ResNets (ResNeXt) add their own couplings in `prune_dense`.

Channel groups. Channels that are summed by a residual connection must be removed together:
in a ResNet every block's last conv, every downsample of the stage and (when stage 1's first
block has no downsample) the stem write into the same stage-wide channels. Rule, with
`residual='group'` (default): a stage channel is kept if ANY unit of its group keeps it, i.e. it
is removed only when every coupled unit drops it (for `prune_by_sigma`: all their |sigma| < tau).
With `residual='keep'` the residual groups are left whole and only the free units (VGG convs,
ResNet convs inside blocks, a stem followed by a downsample) are pruned. Bottleneck stages are
4x their `stage_widths` entry, so a group keeps a multiple of 4 channels (rounded up by
restoring the removed channels with the largest score). Every group keeps at least one channel.

Concatenations (Inception-V3): each conv unit is its own group, and a layer reading a block's
concatenated output reads the unit's channels at the unit's offset in it (B / D blocks also pass
their input's channels through); `Group.concat` lists those readers, sliced by `_slice_concat`.

A pruned channel whose map was zero in the masked model (its sigma set to 0) contributes
nothing downstream, so the pruned model computes exactly what the masked unpruned model does.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from jtransfer import surgery
from jtransfer.errors import InputError
from jtransfer.methods import cwl, prune_dense, prune_heads, prune_mobile
# The graph and slicing halves, re-exported: callers keep importing them from here.
from jtransfer.methods.prune_graph import (  # noqa: F401
    RESIDUAL_MODES, Group, _alexnet_groups, _chain_groups, _group_score, _inception_groups,
    _keep_downsample, _resnet_groups, _round_up, _vgg_groups, _width, group_masks)
from jtransfer.methods.prune_slice import (  # noqa: F401
    _new_config, _rebuild, _resnet_inner, _slice_concat, _slice_flat, _to_flat_numpy)
from jtransfer.models import attention, mobilenet


def channel_groups(params: Mapping[str, Any], config: Mapping[str, Any]) -> list[Group]:
  """The prunable channel groups of a vgg / resnet / alexnet / inception_v3 / mobile-family
  params tree and its config (densenet, convnext and grouped ResNets: the rules of
  `prune_dense`).

  Raises:
    InputError: for a config of another architecture, or params that do not match it.
  """
  attention.refuse_transformer(config, None, "channel pruning")
  flat = surgery.flatten({k: v for k, v in params.items() if k != cwl.CWL_KEY})
  config = dict(config)
  family = _family(config)
  if family is not None:
    groups = family.groups(flat, config)
  elif "stage_widths" in config:
    groups = _resnet_groups(flat, config)
  elif mobilenet.is_config(config):
    groups = prune_mobile.groups(flat, config)
  elif "conv_widths" in config and config["conv_widths"] and \
      isinstance(config["conv_widths"][0], (list, tuple)):
    groups = _vgg_groups(flat, config)
  elif "conv_widths" in config:
    groups = _alexnet_groups(flat, config)
  elif "mixed_5" in config:
    groups = _inception_groups(config)
  else:
    raise InputError(f"pruning supports vgg, resnet, alexnet and mobilenet/efficientnet configs; "
                     f"got keys {sorted(config)}")
  units = set(surgery.conv_units({k: v for k, v in params.items() if k != cwl.CWL_KEY}))
  grouped = [u for g in groups for u in g.units]
  if set(grouped) != units or len(grouped) != len(units):
    raise InputError(f"params do not match the config: conv units {sorted(units)} vs the "
                     f"config's {sorted(grouped)}")
  return groups


def prune_channels(params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None,
                   config: Mapping[str, Any], keep: Mapping[str, Any],
                   residual: str = "group") -> tuple[dict, dict, dict]:
  """Removes the output channels whose keep-mask is False, and their downstream inputs.

  Args:
    params: the model's params (a 'cwl' entry is refused: fold it first, see `prune_by_sigma`).
    batch_stats: BN running stats ({} or None for nets without BN).
    config: the model config (`models.model_config`), vgg, resnet or alexnet.
    keep: {unit_path: bool (C,)} per conv unit; units left out keep every channel. Residual
      groups keep a channel if any of their units keeps it (see the module docstring).
    residual: 'group' (prune residual groups by that rule) or 'keep' (never prune them).

  Returns:
    (params, batch_stats, config) of the smaller model, numpy arrays; build it with
    `models.from_config(arch, config)`.

  Raises:
    InputError: a 'cwl' entry, unknown units, wrong mask shapes, or a group left empty.
  """
  return _prune(params, batch_stats, config, keep, None, residual)[:3]


def _family(config: Mapping[str, Any]):
  """Pruning rules of an architecture with its own couplings (`prune_dense`), or None."""
  return prune_dense.family_of(config)


def _prune(params, batch_stats, config, keep, scores, residual, multiple=1):
  if cwl.CWL_KEY in params:
    raise InputError("params still hold CWL scales under 'cwl'; fold them with "
                     "cwl.apply_cwl (prune_by_sigma does) before pruning")
  groups = channel_groups(params, config)
  family = _family(config)
  flat, stats = _to_flat_numpy(params), _to_flat_numpy(batch_stats)
  masks = group_masks(groups, flat, keep, scores, residual, multiple)
  if family is not None:
    masks = family.fix_masks(groups, flat, masks, scores)
  (family.slice_flat if family is not None else _slice_flat)(flat, stats, groups, masks)
  new_params = _rebuild(params, flat)
  new_stats = _rebuild(batch_stats, stats)
  unit_masks = {u: masks[g.name] for g in groups for u in g.units}
  new_config = (family.new_config if family is not None else _new_config)(config, groups, masks)
  return new_params, new_stats, new_config, unit_masks


class PruneResult(NamedTuple):
  """What `prune_by_sigma` returns.

  Attributes:
    params, batch_stats, config: the pruned model (scales folded in, no 'cwl' entry).
    kept: {unit: (kept, total)} output channels per conv unit.
    masks: {unit: bool (C,)} the channels kept, after the group rules.
    params_kept, params_total: parameter counts after and before (model params, no scales).
  """
  params: dict
  batch_stats: dict
  config: dict
  kept: dict
  masks: dict
  params_kept: int
  params_total: int

  @property
  def feature_maps_kept(self) -> tuple[int, int]:
    """(kept, total) conv output channels over all units."""
    return (sum(k for k, _ in self.kept.values()), sum(t for _, t in self.kept.values()))


def prune_by_sigma(params: Mapping[str, Any], batch_stats: Mapping[str, Any] | None,
                   config: Mapping[str, Any], scales: Mapping[str, Any] | None, tau: float,
                   residual: str = "group", multiple: int = 1) -> PruneResult:
  """Folds the CWL scales into the params, then removes channels with |sigma| < tau.

  Args:
    params: model params, with or without a 'cwl' entry.
    batch_stats: BN running stats.
    config: the model config.
    scales: {unit: sigma}; None takes them from params['cwl'].
    tau: threshold on |sigma| (0 removes nothing).
    residual: 'group' or 'keep', see `prune_channels`. Empty groups keep their largest
      |sigma|, bottleneck stages round up to multiples of 4 by |sigma|.
    multiple: round every kept channel count up to a multiple of this (restoring the largest
      |sigma| first); 8 or 16 keeps convolutions on SIMD-friendly widths, which is what makes
      pruning pay in latency on CPU (bench/bench_pruning.py). 1 = the paper's rule.

  Returns:
    A `PruneResult`; the pruned model needs no scales. For a ViT or Swin config the scales are
    `cwl_linear`'s and whole attention heads and MLP hidden units go (`prune_heads`; `kept`
    and `masks` are then keyed '<block>/attn' and '<block>/mlp'; `residual` does not apply).
  """
  if not np.isfinite(tau) or tau < 0:
    raise InputError(f"tau must be a finite number >= 0, got {tau}")
  if scales is None:
    scales, params = cwl.split_cwl(params)
  else:
    params = {k: v for k, v in params.items() if k != cwl.CWL_KEY}
  if attention.is_config(config):  # heads and MLP hidden units (`prune_heads`)
    new_params, new_config, kept, masks = prune_heads.prune_by_sigma(params, config, scales,
                                                                     tau, multiple)
    return PruneResult(new_params, dict(batch_stats or {}), new_config, kept, masks,
                       surgery.count(new_params), surgery.count(params))
  folded = cwl.apply_cwl(params, scales)
  scores = {u: np.abs(np.asarray(s, np.float64)) for u, s in scales.items()}
  keep = {u: s >= tau for u, s in scores.items()}
  new_params, new_stats, new_config, masks = _prune(folded, batch_stats, config, keep, scores,
                                                    residual, multiple)
  kept = {u: (int(m.sum()), int(m.size)) for u, m in masks.items()}
  return PruneResult(new_params, new_stats, new_config, kept, masks, surgery.count(new_params),
                     surgery.count(params))
