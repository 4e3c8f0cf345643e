"""VGG-style networks: the small `vgg_s` for 28-64 px, and torchvision's VGG-16.

Widths are data: `conv_widths` lists the channels of each conv, stage by stage (a 2x2 max pool
ends each stage), `dense_widths` the hidden units of the classifier. Pruning shrinks these
tuples and slices the arrays; the same code then builds the smaller model.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtransfer.models.common import (ConvUnit, adaptive_avg_pool, check_truncation,
                                     compute_dtype, head, max_pool, tap, to_compute,
                                     truncated_head)


class VGG(nn.Module):
  """VGG without batch norm.

  Attributes:
    num_classes: units of the `head` layer.
    conv_widths: channels per conv, one tuple per stage; units are named `conv{stage}_{i}`
      (1-based, as in the VGG paper).
    dense_widths: hidden Dense layers `fc{6+i}` (torchvision's fc6, fc7) before the head;
      empty means conv features go straight to the head (the transfer setting of the CWL paper).
    pool: how the last conv map becomes a vector: 'flatten' (in NHWC order) or 'avg'
      (global average).
    adaptive_pool: torch's AdaptiveAvgPool2d output size before flattening (VGG-16: 7x7).
    dropout: dropout rate before each hidden Dense layer's successor (torchvision: 0.5).
    truncate_after: a conv unit name (e.g. 'conv2_1'): the network stops there, global
      average pools that map and feeds it to the head (base-model selection, App. A.2).
  """
  num_classes: int
  conv_widths: tuple[tuple[int, ...], ...] = ((32, 32), (64, 64), (128, 128))
  dense_widths: tuple[int, ...] = (256, 256)
  pool: str = "flatten"
  adaptive_pool: Optional[tuple[int, int]] = None
  dropout: float = 0.0
  truncate_after: Optional[str] = None
  dtype: Optional[str] = None

  def unit_names(self) -> list[str]:
    return [f"conv{s}_{i}" for s, stage in enumerate(self.conv_widths, start=1)
            for i in range(1, len(stage) + 1)]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_truncation(self.truncate_after, self.unit_names())
    x = to_compute(self, x)
    for s, stage in enumerate(self.conv_widths, start=1):
      for i, width in enumerate(stage, start=1):
        x = ConvUnit(width, dtype=self.dtype, name=f"conv{s}_{i}")(x, train)
        if self.truncate_after == f"conv{s}_{i}":
          return truncated_head(self, x)
      x = max_pool(x, 2, 2)
    tap(self, "last_conv", x)
    if self.pool == "avg":
      x = jnp.mean(x, axis=(1, 2))
    else:
      if self.adaptive_pool is not None:
        x = adaptive_avg_pool(x, self.adaptive_pool)
      x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.dense_widths):
      x = nn.relu(nn.Dense(width, dtype=compute_dtype(self.dtype), name=f"fc{6 + i}")(x))
      tap(self, f"fc{6 + i}_act", x)
      if self.dropout:
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
    tap(self, "features", x)
    return head(self, x)


def vgg_s(num_classes: int, **overrides) -> VGG:
  """Small VGG for 28-64 px inputs (~0.65M params at 28x28x1 with 10 classes)."""
  return VGG(num_classes=num_classes, **overrides)


def vgg16(num_classes: int = 1000, **overrides) -> VGG:
  """torchvision's VGG-16 (138,357,544 params with 1000 classes)."""
  config = dict(conv_widths=((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
                dense_widths=(4096, 4096), adaptive_pool=(7, 7), dropout=0.5)
  config.update(overrides)
  return VGG(num_classes=num_classes, **config)
