"""torchvision state dicts -> jtransfer variables, through explicit name maps.

Each architecture has a function listing, for every torchvision key, the jtransfer path it fills
and how its array is laid out (`Entry`). Conventions:
- conv `weight` (O, I, kH, kW) -> `<unit>/conv/kernel` (kH, kW, I, O); conv `bias` -> `conv/bias`;
- Linear `weight` (out, in) -> Dense `kernel` (in, out);
- BatchNorm `weight`, `bias` -> params `<unit>/bn/scale`, `bn/bias`; `running_mean`,
  `running_var` -> batch_stats `<unit>/bn/mean`, `bn/var`; `num_batches_tracked` is ignored;
- VGG-16 / AlexNet fc6: torch flattens the pooled map as (C, H, W), jtransfer as NHWC's (H, W, C),
  so the kernel's input rows are permuted.
- transformers (jtransfer/weights/timm_vit.py, torchvision_vit.py, open_clip.py): LayerNorm
  `weight`, `bias` -> `scale`, `bias`; tokens and embeddings copied ('vec'), or given their
  leading unit axes ('lead1', 'lead2': open_clip's (tokens, dim) and (dim,)); buffers the model
  recomputes (Swin's `relative_position_index`) are 'derived': accepted, not imported.
timm's ResNets use torchvision's key names (`conv1`, `bn1`, `layer1.0.conv1`, `downsample.0`,
`fc`), so their state dicts import with the same maps.

Every key must be used: missing, unused and shape-mismatched keys are listed together in one
`InputError`, in the style of `surgery.merge_params`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import numpy as np
from flax import traverse_util

from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.weights import (open_clip, timm_vit, torchvision_dense, torchvision_mobile,
                               torchvision_vit)
# (re-exported: the maps below and callers use them from here)
from jtransfer.weights.torchvision_entries import Entry, _conv_unit, _dense  # noqa: F401
from jtransfer.weights.torchvision_inception import inception_map

_BN_STATS = ("running_mean", "running_var")
_ABSTRACT_SHAPE = (224, 224)  # parameter shapes do not depend on it (adaptive pools)


def resnet_map(model) -> list[Entry]:
  """torchvision/timm ResNet keys for a jtransfer `ResNet` (any stage sizes and widths)."""
  entries = _conv_unit("conv1", "bn1", ("stem",))
  basic = model.block == "basic"
  in_width = model.stem_width
  for s, (size, width) in enumerate(zip(model.stage_sizes, model.stage_widths), start=1):
    out_width = width * (1 if basic else 4)
    for b in range(size):
      pre, block = f"layer{s}.{b}", f"stage{s}/block{b}"
      for i in range(1, 3 if basic else 4):
        entries += _conv_unit(f"{pre}.conv{i}", f"{pre}.bn{i}", (block, f"conv{i}"))
      # Same rule as the model: a projection shortcut when the shape changes.
      if (b == 0 and s > 1) or in_width != out_width:
        entries += _conv_unit(f"{pre}.downsample.0", f"{pre}.downsample.1", (block, "downsample"))
      in_width = out_width
  return entries + _dense("fc", "head")


def _classifier(indices: list[int], chw: tuple[int, int, int]) -> list[Entry]:
  """torchvision's `classifier`: its Linear layers at `indices` are fc6, fc7, ..., then head.

  The first one reads the flattened (C, H, W) map, so its rows are permuted.
  """
  names = [f"fc{6 + i}" for i in range(len(indices) - 1)] + ["head"]
  entries = []
  for i, (index, name) in enumerate(zip(indices, names)):
    entries += _dense(f"classifier.{index}", name, "dense_chw" if i == 0 else "dense",
                      chw if i == 0 else None)
  return entries


def vgg_map(model) -> list[Entry]:
  """torchvision VGG (no BN) keys: `features.N` convs (ReLU and pool layers take indices)."""
  if model.adaptive_pool is None or model.pool != "flatten":
    raise InputError("torchvision VGG weights need the torchvision layout (adaptive_pool set, "
                     "pool='flatten'), as in jtransfer's vgg16")
  entries, index = [], 0
  for s, stage in enumerate(model.conv_widths, start=1):
    for i in range(1, len(stage) + 1):
      entries += _conv_unit(f"features.{index}", None, (f"conv{s}_{i}",))
      index += 2  # conv, ReLU
    index += 1  # max pool
  chw = (model.conv_widths[-1][-1], *model.adaptive_pool)
  # Linear, ReLU, Dropout per hidden layer: Linear layers at 0, 3, 6.
  n = len(model.dense_widths)
  return entries + _classifier([3 * i for i in range(n + 1)], chw)


_ALEXNET_FEATURES = (0, 3, 6, 8, 10)


def alexnet_map(model) -> list[Entry]:
  """torchvision AlexNet keys: convs at features.0/3/6/8/10, Linear at classifier.1/4/6."""
  entries = []
  for i, index in enumerate(_ALEXNET_FEATURES, start=1):
    entries += _conv_unit(f"features.{index}", None, (f"conv{i}",))
  # Dropout, Linear, ReLU per hidden layer, then the head Linear: at 1, 4, 6.
  n = len(model.dense_widths)
  indices = [1 + 3 * i for i in range(n)] + [3 * n]
  return entries + _classifier(indices, (model.conv_widths[-1], 6, 6))


# arch -> function(model) -> entries. A new architecture adds its map here (its own module
# when the map is long), and its name is then importable.
MAPS = {
    "vgg16": vgg_map,
    "resnet18": resnet_map,
    "resnet50": resnet_map,
    "resnet101": resnet_map,
    "alexnet": alexnet_map,
    "mobilenet_v2": torchvision_mobile.mobilenet_v2_map,
    "mobilenet_v3_large": torchvision_mobile.mobilenet_v3_map,
    "mobilenet_v3_small": torchvision_mobile.mobilenet_v3_map,
    "efficientnet_b0": torchvision_mobile.efficientnet_map,
    "inception_v3": inception_map,
    "resnext50_32x4d": resnet_map,
    "wide_resnet50_2": resnet_map,
    "densenet121": torchvision_dense.densenet_map,
    "convnext_tiny": torchvision_dense.convnext_map,
    "vit_s28": timm_vit.vit_map,
    "vit_ti16": timm_vit.vit_map,
    "vit_s16": timm_vit.vit_map,
    "vit_b16": timm_vit.vit_map,
    "vit_b_16": torchvision_vit.vit_map,
    "dinov2_vits14": timm_vit.vit_map,
    "dinov2_vitb14": timm_vit.vit_map,
    "clip_vit_b16": open_clip.clip_map,
    "swin_t": torchvision_vit.swin_map,
}
# Checkpoints that nest the mapped keys under a prefix beside other weights (a whole CLIP
# model: the image tower under `visual.`, the text tower dropped).
KEY_PREFIXES = {"clip_vit_b16": open_clip.PREFIX}
ARCHS = tuple(MAPS)

# Keys a does-not-fit error lists before it only counts the rest.
MAX_LISTED = 10


def name_map(arch: str, model) -> list[Entry]:
  """The explicit torchvision -> jtransfer map of `model` (built for `arch`)."""
  if arch not in MAPS:
    raise InputError(f"no torchvision weight map for arch {arch!r}; expected one of "
                     f"{', '.join(MAPS)}")
  return MAPS[arch](model)


# ----------------------------------------------------------------------------- layouts
def to_jtransfer(entry: Entry, value: np.ndarray) -> np.ndarray:
  """A torch array in the layout of `entry`'s jtransfer leaf."""
  if entry.kind == "conv":
    return np.transpose(value, (2, 3, 1, 0))
  if entry.kind == "dense":
    return value.T
  if entry.kind == "dense_chw":
    c, h, w = entry.chw
    return value.reshape(-1, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, -1)
  if entry.kind == "dense_1x1":
    return value.T[None, None]
  if entry.kind == "channel":
    return value.reshape(-1)
  if entry.kind == "lead1":
    return value[None]
  if entry.kind == "lead2":
    return value[None, None]
  return value


def torch_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape that maps to a jtransfer leaf of `shape`."""
  if entry.kind == "conv":
    h, w, i, o = shape
    return (o, i, h, w)
  if entry.kind in ("dense", "dense_chw"):
    return tuple(reversed(shape))
  if entry.kind == "dense_1x1":
    return (shape[3], shape[2])
  if entry.kind == "channel":
    return (shape[0], 1, 1)
  if entry.kind == "lead1":
    return tuple(shape[1:])
  if entry.kind == "lead2":
    return tuple(shape[2:])
  return tuple(shape)


# ----------------------------------------------------------------------------- import
def head_key(arch: str, config: Optional[Mapping[str, Any]] = None) -> str:
  """The torchvision prefix of the classification layer ('fc', 'classifier.6')."""
  entries = name_map(arch, models.get_model(arch, 1, **dict(config or {})))
  return next(e.key for e in entries if e.path == ("head", "kernel"))[:-len(".weight")]


def torch_param_count(state_dict: Mapping[str, np.ndarray]) -> int:
  """torchvision's `sum(p.numel() for p in model.parameters())`: BN running stats excluded."""
  return int(sum(np.size(v) for k, v in state_dict.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked",
                                    "relative_position_index"))))


def _abstract_variables(model, channels: int) -> dict[tuple[str, ...], tuple[int, ...]]:
  shape = (*_ABSTRACT_SHAPE, channels)
  tree = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0), shape))
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def _input_channels(entries: list[Entry], state_dict: Mapping[str, np.ndarray]) -> int:
  first = state_dict.get(entries[0].key)
  return int(first.shape[1]) if first is not None and np.ndim(first) == 4 else 3


def _resolve_head(arch, state_dict, num_classes, keep_head, config) -> tuple[int, bool]:
  key = head_key(arch, config) + ".weight"
  has = key in state_dict and np.ndim(state_dict[key]) == 2
  ckpt_classes = int(state_dict[key].shape[0]) if has else None
  if keep_head:
    if not has:
      raise InputError(f"state dict has no classification layer {key!r} to keep; pass "
                       "keep_head=False (--drop-head) to initialise a new head")
    if num_classes is not None and num_classes != ckpt_classes:
      raise InputError(f"state dict head {key!r} has {ckpt_classes} classes but num_classes is "
                       f"{num_classes}; pass keep_head=False (--drop-head) to drop it")
    return ckpt_classes, True
  return num_classes or ckpt_classes or 1000, False


def import_torchvision(arch: str, state_dict: Mapping[str, np.ndarray],
                       num_classes: Optional[int] = None, keep_head: bool = True,
                       config: Optional[Mapping[str, Any]] = None,
                       what: str = "state dict") -> dict[str, dict]:
  """Converts a torchvision (or timm ResNet) state dict to jtransfer variables.

  Args:
    arch: one of `ARCHS`.
    state_dict: {torchvision key: array} (see `load_state_dict`).
    num_classes: classes of the model's head; default: the checkpoint's.
    keep_head: import the classification layer (`fc` / `classifier.6`); its class count must
      then equal `num_classes`. With False its keys are accepted and left out of the result,
      whose params then have no 'head' (fill it from a fresh init, e.g. `surgery.merge_params`
      with `dont_load=('head/.*',)`).
    config: model config overrides (widths) when the checkpoint is not the standard size.
    what: the checkpoint's name in error messages.

  Returns:
    {'params': tree, 'batch_stats': tree (ResNets only)}, float32 numpy leaves, for
    `models.get_model(arch, num_classes, **config)`.

  Raises:
    InputError: unknown arch, head mismatch, or a state dict that does not fit: every missing,
      unused and shape-mismatched key is listed.
  """
  config = dict(config or {})
  state_dict = select_prefix(arch, state_dict)
  num_classes, keep_head = _resolve_head(arch, state_dict, num_classes, keep_head, config)
  model = models.get_model(arch, num_classes, **config)
  entries = name_map(arch, model)
  shapes = _abstract_variables(model, _input_channels(entries, state_dict))
  ignored = {e.key for e in entries if e.kind == "derived"}
  entries = [e for e in entries if e.kind != "derived"]
  if not keep_head:
    ignored |= {e.key for e in entries if e.path[0] == "head"}
    entries = [e for e in entries if e.path[0] != "head"]
  _check_coverage(arch, entries, shapes, keep_head)
  _check_fit(arch, entries, shapes, state_dict, ignored, what)
  flat = {(e.collection, *e.path): to_jtransfer(e, np.asarray(state_dict[e.key], np.float32))
          for e in entries}
  out = traverse_util.unflatten_dict(flat)
  return {k: out[k] for k in ("params", "batch_stats") if k in out}


def select_prefix(arch: str, state_dict: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
  """The keys under `KEY_PREFIXES[arch]`, prefix removed, when the checkpoint has any."""
  prefix = KEY_PREFIXES.get(arch)
  if prefix is None or not any(k.startswith(prefix) for k in state_dict):
    return state_dict
  return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _check_coverage(arch, entries, shapes, keep_head) -> None:
  # A bug guard: the map and the model must agree on every leaf.
  mapped = {(e.collection, *e.path) for e in entries}
  model_paths = {k for k in shapes if keep_head or k[1] != "head"}
  if mapped != model_paths:
    raise RuntimeError(f"{arch} weight map out of sync with the model: only in map "
                       f"{sorted(mapped - model_paths)[:5]}, only in model "
                       f"{sorted(model_paths - mapped)[:5]}")


def _check_fit(arch, entries, shapes, state_dict, ignored, what) -> None:
  used = {e.key for e in entries} | ignored
  bn_prefixes = {e.key[:-len(".running_mean")] for e in entries
                 if e.key.endswith(".running_mean")}
  missing, mismatched = [], []
  for e in entries:
    want = torch_shape(e, shapes[(e.collection, *e.path)])
    if e.key not in state_dict:
      missing.append(f"  missing in {what}: {e.key} {want} (for {e.path_str})")
    elif tuple(np.shape(state_dict[e.key])) != want:
      mismatched.append(f"  shape: {e.key} {what} {tuple(np.shape(state_dict[e.key]))} vs model "
                        f"{want} (for {e.path_str})")
  unused = [f"  not used by {arch}: {k} {tuple(np.shape(v))}" for k, v in state_dict.items()
            if k not in used and not (k.endswith(".num_batches_tracked")
                                      and k[:-len(".num_batches_tracked")] in bn_prefixes)]
  if missing or unused or mismatched:
    # Mismatches first (the likeliest clue), then missing, then unused keys; a checkpoint of
    # another architecture mismatches hundreds of keys, so only the first ones are listed.
    problems = mismatched + missing + unused
    head = (f"{what} does not fit torchvision {arch} ({len(missing)} missing, {len(unused)} "
            f"unused, {len(mismatched)} mismatched keys; was it saved from another "
            f"architecture or width?), first {min(len(problems), MAX_LISTED)}:")
    more = ([f"  ... and {len(problems) - MAX_LISTED} more"]
            if len(problems) > MAX_LISTED else [])
    raise InputError("\n".join([head] + problems[:MAX_LISTED] + more))
