"""Channel pruning rules for DenseNet, ConvNeXt and grouped ResNets (ResNeXt); see `prune`.

`prune` calls these through `family_of(config)`: each family gives its channel groups, a
mask fix-up, the slicing and the new config. Pruned equals masked (removed channels' unit
outputs set to zero, e.g. by a CWL sigma of 0) in eval mode:

* DenseNet. Each layer's `conv2` (growth channels), the stem and each transition conv are
  groups read at an offset of the concatenation by every later layer of the block (`norm1`
  and `conv1`), by the next transition (`norm`, `conv`) or by `norm5` and the head. A removed
  channel is a zero in the masked net's concatenation, which the reader's BatchNorm turns into
  a constant relu(bias - mean * scale / sqrt(var + eps)), not a zero: its contribution through
  the reader's 1x1 conv is folded into what follows (conv1's BN running mean; for a transition
  the running means of the next block's pre-norms, which read its pooled output unchanged,
  or the head bias of a net truncated after it; for norm5 the head bias). Each layer's `conv1`
  is free (read by its `conv2` only).
* ConvNeXt. The residual stream of a stage (stem / downsample and every block's `pwconv2`) and
  each block's `dwconv` (depthwise, then a LayerNorm over channels) are fixed: removing a
  channel that enters a LayerNorm changes the other channels' normalisation, so it is not
  equal to masking. Each block's hidden width (`pwconv1`, read by `pwconv2` through GELU,
  GELU(0) = 0) is free.
* Grouped ResNets (`groups` > 1). The grouped 3x3 `conv2` needs the same number of channels
  kept in each of its groups, on its input (conv1's outputs) and its output: each group's
  count is raised to the largest one by restoring the best-scored removed channels (without
  scores, unequal counts raise). `multiple` is applied before this equalisation.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Optional

import numpy as np

from jtransfer.errors import InputError
from jtransfer.methods import prune_graph, prune_slice
from jtransfer.methods.prune_graph import Group
from jtransfer.models import convnext, densenet

_BN_EPS = 1e-5  # DenseNet's BatchNorms (torch default)
_UNIT_LEAVES = ("conv/kernel", "conv/bias", "bn/scale", "bn/bias", "norm/scale", "norm/bias")


def family_of(config: Mapping[str, Any]):
  """The rules for `config`'s architecture, or None (the generic rules of `prune` apply)."""
  if densenet.is_config(config):
    return DenseNetRules
  if convnext.is_config(config):
    return ConvNeXtRules
  if "stage_widths" in config and int(config.get("groups", 1)) != 1:
    return GroupedResNetRules
  return None


def _has(flat: dict, unit: str) -> bool:
  return f"{unit}/conv/kernel" in flat


def _slice_units(flat: dict, stats: dict, g: Group, idx: np.ndarray) -> None:
  for u in g.units:
    for leaf in _UNIT_LEAVES:
      if f"{u}/{leaf}" in flat:
        flat[f"{u}/{leaf}"] = np.take(flat[f"{u}/{leaf}"], idx, axis=-1)
    for leaf in ("bn/mean", "bn/var"):
      if f"{u}/{leaf}" in stats:
        stats[f"{u}/{leaf}"] = np.take(stats[f"{u}/{leaf}"], idx, axis=-1)


# ----------------------------------------------------------------------------- DenseNet
_READS = ("dense_in", "transition_in", "final", "gap")  # readers of a concatenation


def _pre_norm(kind: str, path: str) -> str:
  return {"dense_in": f"{path}/norm1", "transition_in": f"{path}/norm", "final": "norm5"}[kind]


def _reader_conv(kind: str, path: str) -> str:
  """The 1x1 conv unit after a reader's pre-norm."""
  return f"{path}/conv1" if kind == "dense_in" else f"{path}/conv"


class DenseNetRules:
  """Dense-concatenation coupling (see the module docstring)."""

  @staticmethod
  def groups(flat: dict, config: Mapping[str, Any]) -> list[Group]:
    # Consumers ('dense_in' | 'transition_in' | 'final' | 'gap', path): a reader of the
    # concatenation; each group is appended to its readers in concatenation order.
    stem = Group("stem", ["stem"], [], ("num_init_features",))
    groups, segments = [stem], [stem]
    n_blocks = len(config["block_config"])
    for b, n in enumerate(config["block_config"], start=1):
      if not _has(flat, f"denseblock{b}/layer1/conv1"):
        break
      for i in range(1, n + 1):
        layer = f"denseblock{b}/layer{i}"
        for g in segments:
          g.consumers.append(("dense_in", layer))
        conv1 = Group(f"{layer}/conv1", [f"{layer}/conv1"], [("conv", f"{layer}/conv2")],
                      ("layer_widths", b - 1, i - 1, 0))
        conv2 = Group(f"{layer}/conv2", [f"{layer}/conv2"], [], ("layer_widths", b - 1, i - 1, 1))
        groups += [conv1, conv2]
        segments.append(conv2)
      t = f"transition{b}"
      if b == n_blocks or not _has(flat, f"{t}/conv"):
        break
      for g in segments:
        g.consumers.append(("transition_in", t))
      trans = Group(f"{t}/conv", [f"{t}/conv"], [], ("transition_widths", b - 1))
      groups.append(trans)
      segments = [trans]
    reader = ("final", "head") if "norm5/scale" in flat else ("gap", "head")
    for g in segments:
      g.consumers.append(reader)
    return groups

  @staticmethod
  def fix_masks(groups, flat, masks, scores):
    del groups, flat, scores
    return masks

  @staticmethod
  def slice_flat(flat: dict, stats: dict, groups: list[Group], masks: dict) -> None:
    readers: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
      for c in g.consumers:
        if c[0] in _READS:
          readers.setdefault(c, []).append(g)
    # 1. Fold the removed channels' constants (computed on the unsliced, float64 arrays).
    for (kind, path), segments in readers.items():
      keep = np.concatenate([masks[g.name] for g in segments])
      if kind == "gap" or keep.all():
        continue  # a GAP head reads raw maps: removed channels are zeros there
      norm = _pre_norm(kind, path)
      scale, bias = (np.asarray(flat[f"{norm}/{k}"], np.float64) for k in ("scale", "bias"))
      mean, var = (np.asarray(stats[f"{norm}/{k}"], np.float64) for k in ("mean", "var"))
      const = np.where(keep, 0.0, np.maximum(bias - mean * scale / np.sqrt(var + _BN_EPS), 0.0))
      if kind == "final":
        head = np.asarray(flat["head/kernel"], np.float64)
        flat["head/bias"] = (flat["head/bias"] + const @ head).astype(np.float32)
        continue
      conv = _reader_conv(kind, path)
      shift = const @ np.asarray(flat[f"{conv}/conv/kernel"], np.float64)[0, 0]
      if kind == "dense_in":
        stats[f"{conv}/bn/mean"] = (stats[f"{conv}/bn/mean"] - shift).astype(np.float32)
        continue
      # A transition: its (average-pooled) output is shifted by `shift` on kept channels; the
      # next block's pre-norms read it at offset 0, so their running means absorb it.
      out_group = next(g for g in groups if g.units == [conv])
      shift = shift * masks[out_group.name]
      for (kind2, path2), segs2 in readers.items():
        if segs2[0] is not out_group:
          continue
        if kind2 == "gap":  # a head truncated after the transition pools it directly
          head = np.asarray(flat["head/kernel"], np.float64)[:shift.size]
          flat["head/bias"] = (flat["head/bias"] + shift @ head).astype(np.float32)
        else:
          key = f"{_pre_norm(kind2, path2)}/mean"
          mean = np.array(stats[key], np.float64)
          mean[:shift.size] -= shift
          stats[key] = mean.astype(np.float32)
    # 2. Slice units, their plain conv consumers, and every reader at its offsets.
    for g in groups:
      idx = np.flatnonzero(masks[g.name])
      if idx.size == masks[g.name].size:
        continue
      _slice_units(flat, stats, g, idx)
      for kind, layer in g.consumers:
        if kind == "conv":
          flat[f"{layer}/conv/kernel"] = np.take(flat[f"{layer}/conv/kernel"], idx, axis=2)
    for (kind, path), segments in readers.items():
      keep = np.concatenate([masks[g.name] for g in segments])
      if keep.all():
        continue
      idx = np.flatnonzero(keep)
      if kind in ("final", "gap"):
        flat["head/kernel"] = np.asarray(flat["head/kernel"])[idx]
      else:
        path_k = f"{_reader_conv(kind, path)}/conv/kernel"
        flat[path_k] = np.take(flat[path_k], idx, axis=2)
      if kind != "gap":
        norm = _pre_norm(kind, path)
        for k in ("scale", "bias"):
          flat[f"{norm}/{k}"] = np.take(flat[f"{norm}/{k}"], idx, axis=-1)
        for k in ("mean", "var"):
          stats[f"{norm}/{k}"] = np.take(stats[f"{norm}/{k}"], idx, axis=-1)

  @staticmethod
  def new_config(config: Mapping[str, Any], groups: list[Group], masks: dict) -> dict:
    new = copy.deepcopy(dict(config))
    growth, bn_size = int(config["growth_rate"]), int(config["bn_size"])
    if config.get("layer_widths") is not None:
      layers = [[list(w) for w in block] for block in config["layer_widths"]]
    else:
      layers = [[[bn_size * growth, growth] for _ in range(n)] for n in config["block_config"]]
    if config.get("transition_widths") is not None:
      transitions = list(config["transition_widths"])
    else:  # the model's default: half of the concatenation
      transitions, width = [], int(config["num_init_features"])
      for block in layers[:-1]:
        width = (width + sum(w[1] for w in block)) // 2
        transitions.append(width)
    for g in groups:
      n, key = int(masks[g.name].sum()), g.config_key
      if key[0] == "num_init_features":
        new["num_init_features"] = n
      elif key[0] == "layer_widths":
        layers[key[1]][key[2]][key[3]] = n
      else:
        transitions[key[1]] = n
    new["layer_widths"], new["transition_widths"] = layers, transitions
    return new


# ----------------------------------------------------------------------------- ConvNeXt
class ConvNeXtRules:
  """Only the hidden (pwconv1) widths are pruned (see the module docstring)."""

  @staticmethod
  def groups(flat: dict, config: Mapping[str, Any]) -> list[Group]:
    groups = []
    for s, size in enumerate(config["stage_sizes"], start=1):
      first = "stem" if s == 1 else f"stage{s}/downsample"
      if not _has(flat, first):
        break
      res = Group(f"stage{s}", [first], [], ("stage_widths", s - 1), residual=True, fixed=True)
      groups.append(res)
      for b in range(size):
        block = f"stage{s}/block{b}"
        if not _has(flat, f"{block}/dwconv"):
          break
        groups.append(Group(f"{block}/dwconv", [f"{block}/dwconv"],
                            [("conv", f"{block}/pwconv1")], ("fixed",), fixed=True))
        groups.append(Group(f"{block}/pwconv1", [f"{block}/pwconv1"],
                            [("conv", f"{block}/pwconv2")], ("hidden_widths", s - 1, b)))
        res.units.append(f"{block}/pwconv2")
    return groups

  @staticmethod
  def fix_masks(groups, flat, masks, scores):
    del groups, flat, scores
    return masks

  slice_flat = staticmethod(prune_slice._slice_flat)  # fixed groups keep every channel: no-ops

  @staticmethod
  def new_config(config: Mapping[str, Any], groups: list[Group], masks: dict) -> dict:
    new = copy.deepcopy(dict(config))
    if config.get("hidden_widths") is not None:
      hidden = [list(stage) for stage in config["hidden_widths"]]
    else:
      hidden = [[4 * int(w)] * int(n) for n, w in zip(config["stage_sizes"],
                                                      config["stage_widths"])]
    for g in groups:
      if g.config_key[0] == "hidden_widths":
        hidden[g.config_key[1]][g.config_key[2]] = int(masks[g.name].sum())
    new["hidden_widths"] = hidden
    return new


# ----------------------------------------------------------------------------- ResNeXt
def _is_grouped_inner(g: Group) -> bool:
  return g.config_key[0] == "inner_widths"  # bottleneck conv1 (j=0) and conv2 (j=1)


class GroupedResNetRules:
  """ResNet rules plus equal per-group counts around the grouped 3x3 conv."""

  @staticmethod
  def groups(flat: dict, config: Mapping[str, Any]) -> list[Group]:
    if config.get("block", "basic") != "bottleneck":
      raise InputError("groups > 1 needs bottleneck blocks")
    return prune_graph._resnet_groups(flat, config)

  @staticmethod
  def fix_masks(groups, flat, masks, scores: Optional[Mapping[str, Any]]):
    # Called with the config's groups only through `prune._prune`, whose config we re-read
    # from the kernels: conv2's kernel is (3, 3, in / G, out), so G = in / kernel in-axis.
    masks = dict(masks)
    for g in groups:
      if not _is_grouped_inner(g):
        continue
      block = g.units[0].rsplit("/", 1)[0]
      kernel = np.shape(flat[f"{block}/conv2/conv/kernel"])
      n_groups = int(np.shape(flat[f"{block}/conv1/conv/kernel"])[-1]) // int(kernel[2])
      mask = masks[g.name].reshape(n_groups, -1)
      want = max(int(mask.sum(axis=1).max()), 1)
      if (mask.sum(axis=1) == want).all():
        continue
      if scores is None:
        raise InputError(f"{g.name}: the grouped 3x3 conv of {block} needs the same number of "
                         f"channels kept in each of its {n_groups} groups; kept "
                         f"{mask.sum(axis=1).tolist()}")
      score = prune_graph._group_score(g, flat, scores).reshape(n_groups, -1)
      rows = [prune_graph._round_up(row, 1, s, g.name, at_least=want)
              for row, s in zip(mask, score)]
      masks[g.name] = np.concatenate(rows)
    return masks

  @staticmethod
  def slice_flat(flat: dict, stats: dict, groups: list[Group], masks: dict) -> None:
    # conv1's channels are conv2's inputs, counted per group of conv2: slice each output
    # group's kernel block with its own input indices, before conv2's outputs are sliced.
    for g in groups:
      if g.config_key[:1] == ("inner_widths",) and g.config_key[3] == 0:
        block = g.units[0].rsplit("/", 1)[0]
        path = f"{block}/conv2/conv/kernel"
        k = np.asarray(flat[path])
        n_groups = masks[g.name].size // k.shape[2]
        rows = masks[g.name].reshape(n_groups, -1)
        blocks = k.reshape(*k.shape[:3], n_groups, k.shape[3] // n_groups)
        flat[path] = np.concatenate([blocks[:, :, np.flatnonzero(rows[i]), i]
                                     for i in range(n_groups)], axis=-1)
    plain = [Group(g.name, g.units, [c for c in g.consumers
                                     if not (g.config_key[:1] == ("inner_widths",)
                                             and g.config_key[3] == 0)],
                   g.config_key, g.residual, g.multiple, fixed=g.fixed) for g in groups]
    prune_slice._slice_flat(flat, stats, plain, masks)

  new_config = staticmethod(prune_slice._new_config)
