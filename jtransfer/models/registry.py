"""Models by name, and their configs as plain data (what checkpoints store instead of classes)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from jtransfer.errors import InputError
from jtransfer.models import (alexnet, convnext, densenet, inception, mobilenet, resnet, swin, vgg,
                              vit)
from jtransfer.models.common import compute_dtype

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "vgg_s": vgg.vgg_s,
    "resnet_s": resnet.resnet_s,
    "vgg16": vgg.vgg16,
    "resnet18": resnet.resnet18,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
    "alexnet": alexnet.alexnet,
    "mobilenet_v2": mobilenet.mobilenet_v2,
    "mobilenet_v3_large": mobilenet.mobilenet_v3_large,
    "mobilenet_v3_small": mobilenet.mobilenet_v3_small,
    "efficientnet_b0": mobilenet.efficientnet_b0,
    "inception_v3": inception.inception_v3,
    "resnext50_32x4d": resnet.resnext50_32x4d,
    "wide_resnet50_2": resnet.wide_resnet50_2,
    "densenet121": densenet.densenet121,
    "convnext_tiny": convnext.convnext_tiny,
    "vit_s28": vit.vit_s28,
    "vit_ti16": vit.vit_ti16,
    "vit_s16": vit.vit_s16,
    "vit_b16": vit.vit_b16,
    "vit_b_16": vit.vit_b16,  # the same graph; torchvision's weight layout
    "dinov2_vits14": vit.dinov2_vits14,
    "dinov2_vitb14": vit.dinov2_vitb14,
    "clip_vit_b16": vit.clip_vit_b16,
    "swin_t": swin.swin_t,
}

SMALL_ARCHS = ("vgg_s", "resnet_s")


def names() -> tuple[str, ...]:
  """Registered architecture names."""
  return tuple(_BUILDERS)


def get_model(arch: str, num_classes: int, **overrides) -> nn.Module:
  """Builds a registered architecture.

  Args:
    arch: a name from `names()`.
    num_classes: output units of the `head` layer.
    **overrides: config fields (widths, pooling, ...) replacing the architecture's defaults.

  Raises:
    InputError: unknown architecture, or an override the architecture does not have.
  """
  if arch not in _BUILDERS:
    raise InputError(f"unknown arch {arch!r}; expected one of {', '.join(_BUILDERS)}")
  if num_classes < 1:
    raise InputError(f"num_classes must be >= 1, got {num_classes}")
  compute_dtype(overrides.get("dtype"))  # a bad compute dtype is named here, not at trace time
  try:
    return _BUILDERS[arch](num_classes=num_classes, **_as_tuples(overrides))
  except TypeError as e:
    raise InputError(f"arch {arch!r} does not take config {sorted(overrides)}: {e}") from None


def model_config(model: nn.Module) -> dict[str, Any]:
  """The model's config fields as JSON-able data (tuples become lists)."""
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.name not in ("parent", "name")}
  return _as_lists(fields)


def from_config(arch: str, config: dict[str, Any]) -> nn.Module:
  """Inverse of `model_config`: rebuilds the module from stored data."""
  config = dict(config)
  num_classes = config.pop("num_classes")
  return get_model(arch, num_classes, **config)


def _as_tuples(x):
  if isinstance(x, dict):
    return {k: _as_tuples(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return tuple(_as_tuples(v) for v in x)
  return x


def _as_lists(x):
  if isinstance(x, dict):
    return {k: _as_lists(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_as_lists(v) for v in x]
  return x
