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

import copy
import dataclasses
import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from jtransfer import surgery
from jtransfer.errors import InputError
from jtransfer.methods import cwl, prune_mobile
from jtransfer.models import attention, mobilenet

RESIDUAL_MODES = ("group", "keep")


@dataclasses.dataclass
class Group:
  """Output channels shared by `units`, read by `consumers`.

  Attributes:
    name: the first unit's path (or 'stageN' for a residual group).
    units: conv unit paths whose outputs are these channels.
    consumers: (kind, layer path) with kind 'conv' (kernel input axis), 'flatten' (dense rows
      p*C + c) or 'gap' (dense rows c).
    config_key: where the width lives in the config (see `_new_config`).
    residual: True for a residual (stage) group.
    multiple: the kept count must be a multiple of this (4 for bottleneck stages).
    concat: (kind, layer, offset) consumers that read these channels inside a concatenated
      map (Inception), at that offset of the unpruned map; see `_slice_concat`.
    fixed: never pruned (channels that enter a LayerNorm or a depthwise conv, see
      `prune_dense`).
  """
  name: str
  units: list[str]
  consumers: list[tuple[str, str]]
  config_key: tuple
  residual: bool = False
  multiple: int = 1
  concat: list = dataclasses.field(default_factory=list)
  fixed: bool = False


# ----------------------------------------------------------------------------- graph
def _chain_groups(flat: dict, names: list[str], keys: list[tuple], config: dict) -> list[Group]:
  """Groups of a plain conv chain (VGG, AlexNet): unit i feeds unit i+1, the last the dense."""
  present = [(n, k) for n, k in zip(names, keys) if f"{n}/conv/kernel" in flat]
  dense = "fc6" if config.get("dense_widths") and "fc6/kernel" in flat else "head"
  pooled = config.get("truncate_after") is not None or config.get("pool") == "avg"
  groups = []
  for i, (name, key) in enumerate(present):
    if i + 1 < len(present):
      consumers = [("conv", present[i + 1][0])]
    else:
      consumers = [("gap" if pooled else "flatten", dense)]
    groups.append(Group(name, [name], consumers, key))
  return groups


def _vgg_groups(flat: dict, config: dict) -> list[Group]:
  names, keys = [], []
  for s, stage in enumerate(config["conv_widths"]):
    for i in range(len(stage)):
      names.append(f"conv{s + 1}_{i + 1}")
      keys.append(("conv_widths", s, i))
      if config.get("truncate_after") == names[-1]:
        return _chain_groups(flat, names, keys, config)
  return _chain_groups(flat, names, keys, config)


def _alexnet_groups(flat: dict, config: dict) -> list[Group]:
  n = len(config["conv_widths"])
  return _chain_groups(flat, [f"conv{i + 1}" for i in range(n)],
                       [("conv_widths", i) for i in range(n)], config)


def _resnet_groups(flat: dict, config: dict) -> list[Group]:
  bottleneck = config.get("block", "basic") == "bottleneck"
  inner = ("conv1", "conv2") if bottleneck else ("conv1",)
  last = "conv3" if bottleneck else "conv2"
  has = lambda unit: f"{unit}/conv/kernel" in flat
  blocks = [[f"stage{s + 1}/block{b}" for b in range(size) if has(f"stage{s + 1}/block{b}/conv1")]
            for s, size in enumerate(config["stage_sizes"])]
  blocks = [bs for bs in blocks if bs]
  groups: list[Group] = []
  stem = Group("stem", ["stem"], [], ("stem_width",))
  prev = stem  # the group whose channels the next block reads
  for s, stage_blocks in enumerate(blocks):
    res = Group(f"stage{s + 1}", [], [], ("stage_widths", s), residual=True,
                multiple=4 if bottleneck else 1)
    for b, block in enumerate(stage_blocks):
      reader = prev if b == 0 else res
      reader.consumers.append(("conv", f"{block}/conv1"))
      if has(f"{block}/downsample"):
        reader.consumers.append(("conv", f"{block}/downsample"))
        res.units.append(f"{block}/downsample")
      elif b == 0 and s == 0:
        # Identity shortcut from the stem: the stem writes into the stage's channels.
        res.units.insert(0, "stem")
        res.consumers.extend(stem.consumers)
        stem = None
      for j, name in enumerate(inner):
        nxt = inner[j + 1] if j + 1 < len(inner) else last
        groups.append(Group(f"{block}/{name}", [f"{block}/{name}"], [("conv", f"{block}/{nxt}")],
                            ("inner_widths", s, b, j)))
      res.units.append(f"{block}/{last}")
    groups.append(res)
    prev = res
  prev.consumers.append(("gap", "head"))
  return ([stem] if stem is not None else []) + groups


def _inception_groups(config: dict) -> list[Group]:
  """Inception-V3: every conv unit is free (no sums); concatenated maps couple by offset."""
  from jtransfer.models import inception
  if config.get("aux_logits"):
    raise InputError("pruning inception_v3 needs aux_logits=False: the aux head's params are "
                     "not part of the channel graph (import with drop_aux)")
  return [Group(unit, [unit], [], key, concat=readers)
          for unit, (key, readers) in inception.channel_graph(config).items()]


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


# ----------------------------------------------------------------------------- masks
def _width(flat: dict, unit: str) -> int:
  return int(np.shape(flat[f"{unit}/conv/kernel"])[-1])


def group_masks(groups: Sequence[Group], flat: dict, keep: Mapping[str, Any],
                scores: Optional[Mapping[str, Any]] = None,
                residual: str = "group", multiple: int = 1) -> dict[str, np.ndarray]:
  """One boolean keep-mask per group from per-unit masks.

  A group keeps a channel if any of its units keeps it (units missing from `keep` keep all).
  With `scores` ({unit: per-channel importance, e.g. |sigma|}) an empty group keeps its best
  channel and a bottleneck stage is rounded up to a multiple of 4 (of lcm(4, `multiple`)),
  every other group to a multiple of `multiple`, restoring the best-scored removed channels;
  without scores a count that needs rounding raises.

  Raises:
    InputError: unknown residual mode, a mask of the wrong shape, an empty group or a bad
      multiple without scores.
  """
  if residual not in RESIDUAL_MODES:
    raise InputError(f"residual={residual!r}: expected one of {RESIDUAL_MODES}")
  if not (isinstance(multiple, int) and multiple >= 1):
    raise InputError(f"multiple must be an int >= 1, got {multiple!r}")
  known = {u for g in groups for u in g.units}
  unknown = sorted(set(keep) - known)
  if unknown:
    raise InputError(f"keep-masks name unknown conv unit(s) {unknown}")
  out = {}
  for g in groups:
    c = _width(flat, g.units[0])
    mask = np.zeros(c, bool)
    for u in g.units:
      m = np.ones(c, bool) if u not in keep else np.asarray(keep[u], bool)
      if m.shape != (c,):
        raise InputError(f"keep-mask of {u!r} has shape {m.shape}; the unit has {c} channels")
      mask |= m
    if g.fixed or (g.residual and residual == "keep"):
      mask[:] = True
    out[g.name] = _round_up(mask, math.lcm(g.multiple, multiple), _group_score(g, flat, scores),
                            g.name)
  _keep_downsample(groups, flat, out, scores)
  return out


def _round_up(mask: np.ndarray, multiple: int, score, name: str,
              at_least: int = 1) -> np.ndarray:
  """At least `at_least` channels, a multiple of `multiple`, restoring the best-scored removed
  channels (ties: lower index)."""
  n = int(mask.sum())
  want = max(at_least, n, 1)
  want = min(-(-want // multiple) * multiple, mask.size)
  if want == n:
    return mask
  if score is None:
    raise InputError(f"group {name!r} would keep {n} channel(s); it needs at least "
                     f"{max(at_least, 1)} and a multiple of {multiple}")
  mask = mask.copy()
  removed = np.flatnonzero(~mask)
  order = removed[np.argsort(-score[removed], kind="stable")]
  mask[order[:want - n]] = True
  return mask


def _group_score(g: Group, flat: dict, scores: Optional[Mapping[str, Any]]) -> Optional[np.ndarray]:
  """Per-channel importance of a group: the max over its units (unscored units count as inf)."""
  if scores is None:
    return None
  c = _width(flat, g.units[0])
  return np.max([np.abs(np.asarray(scores[u], np.float64)) if u in scores else np.full(c, np.inf)
                 for u in g.units], axis=0)


def _keep_downsample(groups: Sequence[Group], flat: dict, masks: dict, scores) -> None:
  """Keeps stage 1's first downsample in the pruned model (edits `masks` in place).

  Blocks after the first of a stage share its width, and later first blocks are strided, so
  only a stride-1 first block with a downsample (e.g. ResNet-50's, stem 64 -> 256) can lose it:
  the model builds one only when input and output widths differ. While they are equal the
  input (stem) group gets its best removed channel back, else the stage `multiple` more.
  """
  ds = "stage1/block0/downsample"
  out_group = next((g for g in groups if ds in g.units), None)
  if out_group is None:
    return
  in_group = next(g for g in groups if ("conv", ds) in g.consumers)
  while masks[in_group.name].sum() == masks[out_group.name].sum():
    if scores is None:
      raise InputError("these masks give stage1/block0 equal input and output widths, so the "
                       "pruned model would have no downsample there; keep one more channel")
    src = in_group if (~masks[in_group.name]).any() else out_group
    if masks[src.name].all():
      raise InputError("stage1/block0 has equal input and output widths in the unpruned model "
                       "yet a downsample; this config cannot be pruned")
    n = int(masks[src.name].sum()) + src.multiple
    masks[src.name] = _round_up(masks[src.name], src.multiple, _group_score(src, flat, scores),
                                src.name, at_least=n)


# ----------------------------------------------------------------------------- slicing
def _slice_flat(flat: dict, stats: dict, groups: Sequence[Group], masks: dict) -> None:
  """Slices arrays in place (dicts of path -> array) for every group's mask."""
  for g in groups:
    idx = np.flatnonzero(masks[g.name])
    c = masks[g.name].size
    if idx.size == c:
      continue
    for u in g.units:
      for leaf in ("conv/kernel", "conv/bias", "bn/scale", "bn/bias"):
        if f"{u}/{leaf}" in flat:
          flat[f"{u}/{leaf}"] = np.take(flat[f"{u}/{leaf}"], idx, axis=-1)
      for leaf in ("bn/mean", "bn/var"):
        if f"{u}/{leaf}" in stats:
          stats[f"{u}/{leaf}"] = np.take(stats[f"{u}/{leaf}"], idx, axis=-1)
    for kind, layer in g.consumers:
      if kind == "conv":
        path = f"{layer}/conv/kernel"
        flat[path] = np.take(flat[path], idx, axis=2)
      else:
        path = f"{layer}/kernel"
        w = flat[path]
        if kind == "gap":
          flat[path] = w[idx]
        else:  # flatten in NHWC order: row p*C + c
          if w.shape[0] % c:
            raise InputError(f"{path} has {w.shape[0]} inputs, not a multiple of the {c} "
                             "channels it flattens")
          flat[path] = w.reshape(w.shape[0] // c, c, w.shape[1])[:, idx].reshape(-1, w.shape[1])
  _slice_concat(flat, groups, masks)


def _slice_concat(flat: dict, groups: Sequence[Group], masks: dict) -> None:
  """Slices the layers reading concatenated maps: one input mask per layer, filled at each
  writer's offset in the unpruned map, applied once (so no offset shifts under another's cut)."""
  keep = {}
  for g in groups:
    for kind, layer, offset in g.concat:
      path, axis = (f"{layer}/conv/kernel", 2) if kind == "conv" else (f"{layer}/kernel", 0)
      mask = keep.setdefault((path, axis), np.ones(np.shape(flat[path])[axis], bool))
      mask[offset:offset + masks[g.name].size] = masks[g.name]
  for (path, axis), mask in keep.items():
    if not mask.all():
      flat[path] = np.take(flat[path], np.flatnonzero(mask), axis=axis)


def _resnet_inner(config: dict) -> list:
  """inner_widths as nested lists, filled with the defaults when the config has none."""
  if config.get("inner_widths") is not None:
    return [[list(b) for b in stage] for stage in config["inner_widths"]]
  n = 2 if config.get("block", "basic") == "bottleneck" else 1
  if n == 2:  # ResNeXt / Wide ResNet: the model's inner-width rule (`ResNet.block_inner`)
    groups, per_group = int(config.get("groups", 1)), int(config.get("width_per_group", 64))
    if (groups, per_group) != (1, 64):
      return [[[int(w * (per_group / 64.0)) * groups] * n for _ in range(size)]
              for size, w in zip(config["stage_sizes"], config["stage_widths"])]
  return [[[w] * n for _ in range(size)]
          for size, w in zip(config["stage_sizes"], config["stage_widths"])]


def _new_config(config: Mapping[str, Any], groups: Sequence[Group], masks: dict) -> dict:
  if "mixed_5" in config:
    from jtransfer.models import inception
    return inception.pruned_config(copy.deepcopy(dict(config)),
                                   {g.config_key: int(masks[g.name].sum()) for g in groups})
  new = copy.deepcopy(dict(config))
  if "stage_widths" in new:
    new["inner_widths"] = _resnet_inner(new)
    new["stage_widths"] = list(new["stage_widths"])
  if "conv_widths" in new:
    new["conv_widths"] = [list(w) if isinstance(w, (list, tuple)) else w
                          for w in new["conv_widths"]]
  for g in groups:
    n = int(masks[g.name].sum())
    key = g.config_key
    if key[0] == "stage_widths":
      new["stage_widths"][key[1]] = n // g.multiple
      if "stem" in g.units:
        new["stem_width"] = n
    elif key[0] == "paths":
      prune_mobile.set_width(new, key, n)
    elif key[0] == "stem_width":
      new["stem_width"] = n
    elif key[0] == "inner_widths":
      new["inner_widths"][key[1]][key[2]][key[3]] = n
    elif len(key) == 3:
      new["conv_widths"][key[1]][key[2]] = n
    else:
      new["conv_widths"][key[1]] = n
  return new


def _to_flat_numpy(tree) -> dict:
  return {p: np.asarray(v) for p, v in surgery.flatten(tree or {}).items()}


def _rebuild(template, flat: dict) -> dict:
  return surgery.map_with_path(lambda p, _: flat[p], template) if template else {}


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
  from jtransfer.methods import prune_dense  # it builds on this module's Group and helpers
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
    A `PruneResult`; the pruned model needs no scales.
  """
  if not np.isfinite(tau) or tau < 0:
    raise InputError(f"tau must be a finite number >= 0, got {tau}")
  if scales is None:
    scales, params = cwl.split_cwl(params)
  else:
    params = {k: v for k, v in params.items() if k != cwl.CWL_KEY}
  folded = cwl.apply_cwl(params, scales)
  scores = {u: np.abs(np.asarray(s, np.float64)) for u, s in scales.items()}
  keep = {u: s >= tau for u, s in scores.items()}
  new_params, new_stats, new_config, masks = _prune(folded, batch_stats, config, keep, scores,
                                                    residual, multiple)
  kept = {u: (int(m.sum()), int(m.size)) for u, m in masks.items()}
  return PruneResult(new_params, new_stats, new_config, kept, masks, surgery.count(new_params),
                     surgery.count(params))
