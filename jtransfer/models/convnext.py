"""ConvNeXt (torchvision/models/convnext.py): patchify stem, inverted-bottleneck CNBlocks.

Naming (torchvision key -> jtransfer module):
  * `stem` (features.0): a `LNConvUnit`, 4x4/4 conv with bias, then its LayerNorm `norm`;
  * `stage{s}/block{b}` (features.{2s-1}.{b}): a CNBlock with
      `dwconv` (7x7 depthwise conv with bias, then LayerNorm `norm` over channels: a
      `LNConvUnit`), `pwconv1` (the Linear to 4x width, a 1x1 `ConvUnit` with GELU),
      `pwconv2` (the Linear back, a 1x1 `ConvUnit`), `layer_scale` (per channel), and the
      residual add (stochastic depth: identity in eval mode);
  * `stage{s}/downsample_norm` + `stage{s}/downsample` (features.{2s-2}, s >= 2): the
    LayerNorm before the 2x2/2 conv and the conv unit (no norm after it);
  * `head_norm` (classifier.0, LayerNorm of the pooled vector) and `head` (classifier.2).

The Linear layers are 1x1 conv units so that CWL and pruning see them: a CWL scale on
`dwconv` sits after its LayerNorm (folded into `norm/scale` and `norm/bias`), on `pwconv1` /
`pwconv2` / `downsample` into the kernel and bias, all exact. LayerNorm eps is 1e-6.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtransfer.models.common import (ConvUnit, activation, check_spatial, check_truncation,
                                     compute_dtype, conv_layer, head, tap, to_compute,
                                     truncated_head)

LN_EPS = 1e-6


def _ln(module: nn.Module, name: str) -> nn.LayerNorm:
  # Two-pass variance, as torch's layer_norm (E[x^2] - E[x]^2 loses digits on large means).
  return nn.LayerNorm(epsilon=LN_EPS, dtype=compute_dtype(module.dtype),
                      use_fast_variance=False, name=name)


class LNConvUnit(nn.Module):
  """Conv with bias, then a LayerNorm over channels named `norm`, optional activation.

  The same contract as `ConvUnit` (children `conv` and `norm`, raw conv output tapped as the
  unit), for convs followed by a LayerNorm instead of a BatchNorm.
  """
  features: int
  kernel: int = 3
  stride: int = 1
  padding: int = 1
  groups: int = 1
  act: Optional[str] = None
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # LayerNorm has no running statistics
    y = conv_layer(x, self.features, self.kernel, self.stride, self.padding, True,
                   self.groups, self.dtype)
    tap(self, "out", y)
    y = _ln(self, "norm")(y)
    return activation(self.act)(y) if self.act else y


class CNBlock(nn.Module):
  """dwconv 7x7 -> LN -> 1x1 (hidden) -> GELU -> 1x1 -> layer scale -> (drop path) + input."""
  hidden: int
  drop_prob: float = 0.0
  layer_scale_init: float = 1e-6
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    y = LNConvUnit(dim, 7, 1, 3, groups=dim, dtype=self.dtype, name="dwconv")(x)
    y = ConvUnit(self.hidden, 1, 1, 0, act="gelu", dtype=self.dtype, name="pwconv1")(y)
    y = ConvUnit(dim, 1, 1, 0, relu=False, dtype=self.dtype, name="pwconv2")(y)
    gamma = self.param("layer_scale", nn.initializers.constant(self.layer_scale_init), (dim,))
    y = y * gamma.astype(y.dtype)
    if train and self.drop_prob > 0:
      # torchvision's StochasticDepth(mode='row'): drop the whole branch per sample.
      survive = 1.0 - self.drop_prob
      keep = jax.random.bernoulli(self.make_rng("dropout"), survive, (y.shape[0], 1, 1, 1))
      y = y * keep.astype(y.dtype) / survive
    out = x + y
    tap(self, "out", out)
    return out


class ConvNeXt(nn.Module):
  """ConvNeXt, torchvision-compatible structure.

  Attributes:
    num_classes: units of the `head` layer.
    stage_sizes: blocks per stage.
    stage_widths: channels of each stage's residual stream (the stem has stage 1's).
    hidden_widths: optional per-block hidden (pwconv1) widths, a tuple per stage of an int per
      block (pruned models); default 4x the stage width.
    stochastic_depth_prob: torchvision's drop-path rate, linear over blocks (0.1 for
      convnext_tiny's ImageNet training); only active with train=True and a 'dropout' rng.
      Default 0, so fine-tuning without an rng stays deterministic.
    layer_scale: initial layer-scale value (torchvision 1e-6).
    truncate_after: 'stem' or a block name ('stage2/block0'): GAP of that map, then head
      (no head_norm).
  """
  num_classes: int
  stage_sizes: tuple[int, ...] = (3, 3, 9, 3)
  stage_widths: tuple[int, ...] = (96, 192, 384, 768)
  hidden_widths: Optional[tuple[tuple[int, ...], ...]] = None
  stochastic_depth_prob: float = 0.0
  layer_scale: float = 1e-6
  truncate_after: Optional[str] = None
  dtype: Optional[str] = None

  def unit_names(self) -> list[str]:
    """Truncation points: the stem and every block."""
    return ["stem"] + [f"stage{s + 1}/block{b}" for s, size in enumerate(self.stage_sizes)
                       for b in range(size)]

  def block_hidden(self, stage: int, index: int) -> int:
    if self.hidden_widths is not None:
      return int(self.hidden_widths[stage][index])
    return 4 * self.stage_widths[stage]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_truncation(self.truncate_after, self.unit_names())
    x = LNConvUnit(self.stage_widths[0], 4, 4, 0, dtype=self.dtype, name="stem")(
        to_compute(self, x))
    check_spatial(x, "ConvNeXt", "the 4x4/4 stem")
    if self.truncate_after == "stem":
      return truncated_head(self, x)
    total, index = sum(self.stage_sizes), 0
    for s, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      if s > 0:
        x = _ln(self, f"stage{s + 1}/downsample_norm")(x)
        x = ConvUnit(width, 2, 2, 0, relu=False, dtype=self.dtype,
                     name=f"stage{s + 1}/downsample")(x)
        check_spatial(x, "ConvNeXt", f"stage{s + 1}/downsample")
      for b in range(size):
        drop = self.stochastic_depth_prob * index / max(total - 1.0, 1.0)
        x = CNBlock(self.block_hidden(s, b), drop, self.layer_scale, dtype=self.dtype,
                    name=f"stage{s + 1}/block{b}")(x, train)
        index += 1
        if self.truncate_after == f"stage{s + 1}/block{b}":
          return truncated_head(self, x)
    tap(self, "last_conv", x)
    x = _ln(self, "head_norm")(jnp.mean(x, axis=(1, 2)))
    tap(self, "features", x)
    return head(self, x)


def convnext_tiny(num_classes: int = 1000, **overrides) -> ConvNeXt:
  """torchvision ConvNeXt-Tiny (28,589,128 params with 1000 classes)."""
  config = dict(stage_sizes=(3, 3, 9, 3), stage_widths=(96, 192, 384, 768))
  config.update(overrides)
  return ConvNeXt(num_classes=num_classes, **config)


def is_config(config) -> bool:
  """Whether a model config (`models.model_config`) is a ConvNeXt's."""
  return "stage_sizes" in config and "layer_scale" in config


def delta_taps(config) -> tuple[str, ...]:
  """DELTA's default taps, the last conv of each stage: its last block's `pwconv2`
  (convnext_tiny: stage{1..4}/block{2,2,8,2}/pwconv2)."""
  return tuple(f"stage{s}/block{n - 1}/pwconv2"
               for s, n in enumerate(config["stage_sizes"], start=1))
