"""The channel graph of structural pruning: which output channels must go together (`Group`),
per architecture, and the keep-mask of each group (`group_masks`).

The rules (residual groups, bottleneck multiples, concatenations) are described in
`jtransfer.methods.prune`, which applies them; architectures with their own couplings add
theirs in `prune_dense` and `prune_mobile`, both built on this module.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jtransfer.errors import InputError


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
