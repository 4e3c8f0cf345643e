"""Slicing a model by its group keep-masks: params, BN statistics and the config's widths.

The arrays of every pruned channel (and the downstream inputs that read it) are removed in
place; `_new_config` gives the config whose widths build the smaller model. The channel graph
is `prune_graph`'s; `prune` applies both.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np

from jtransfer import surgery
from jtransfer.errors import InputError
from jtransfer.methods import prune_mobile
from jtransfer.methods.prune_graph import Group


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
