"""DenseNet-BC (torchvision/models/densenet.py): pre-activation layers, dense concatenation.

Naming. DenseNet's batch norms come *before* the convs they feed and normalise the whole
concatenation, while jtransfer's `ConvUnit` puts its BN *after* its conv. The mapping keeps
every conv in a unit (`<unit>/conv/kernel`) and names each pre-norm beside the unit it feeds:

  * `stem`: conv0 + norm0 (+ ReLU), a post-norm unit as in ResNet, then the 3x3/2 max pool;
  * `denseblock{b}/layer{l}` (torch `denseblock{b}.denselayer{l}`):
      `norm1` (BatchNorm of the concatenation, torch norm1), ReLU,
      `conv1` (1x1 unit whose `bn` is torch's norm2, + ReLU),
      `conv2` (3x3 unit, no BN, no bias: its output is read by later layers' pre-norms);
  * `transition{b}`: `norm` (pre-norm), ReLU, `conv` (1x1 unit, no BN, no bias), 2x2/2 avg pool;
  * `norm5` (final BatchNorm), ReLU, global average pool, `head`.

So `conv1`'s CWL folds into its BN (torch norm2), and `conv2` / transition convs' CWL into
their kernels (no BN follows them), both exact. Each layer taps its new `growth` channels as
`denseblock{b}/layer{l}`, each block its concatenated output as `denseblock{b}`, each
transition its pooled output as `transition{b}`.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtransfer.models.common import (ConvUnit, check_spatial, check_truncation, compute_dtype,
                                     head, max_pool, tap, to_compute, truncated_head)


def _bn(module: nn.Module, name: str, train: bool) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=compute_dtype(module.dtype), name=name)


class DenseLayer(nn.Module):
  """norm1 -> ReLU -> conv1 (1x1) -> BN -> ReLU -> conv2 (3x3): `growth` new channels."""
  inner: int
  growth: int
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.relu(_bn(self, "norm1", train)(x))
    y = ConvUnit(self.inner, 1, 1, 0, use_bn=True, dtype=self.dtype, name="conv1")(y, train)
    y = ConvUnit(self.growth, 3, 1, 1, relu=False, use_bias=False, dtype=self.dtype,
                 name="conv2")(y, train)
    tap(self, "out", y)
    return y


class Transition(nn.Module):
  """norm -> ReLU -> 1x1 conv -> 2x2/2 average pool (floor, as torch's AvgPool2d)."""
  features: int
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = nn.relu(_bn(self, "norm", train)(x))
    y = ConvUnit(self.features, 1, 1, 0, relu=False, use_bias=False, dtype=self.dtype,
                 name="conv")(y, train)
    y = nn.avg_pool(y, (2, 2), strides=(2, 2), padding="VALID")
    tap(self, "out", y)
    return y


class DenseNet(nn.Module):
  """DenseNet-BC, torchvision-compatible structure and padding.

  Attributes:
    num_classes: units of the `head` layer.
    growth_rate: channels each layer adds (torch `growth_rate`).
    block_config: layers per dense block.
    num_init_features: the stem's channels.
    bn_size: the bottleneck (conv1) width is bn_size * growth_rate.
    layer_widths: optional per-layer (conv1, conv2) widths, a tuple per block of a pair per
      layer (pruned models); default (bn_size * growth_rate, growth_rate).
    transition_widths: optional output widths of the transitions; default half their input.
    truncate_after: 'stem', 'denseblock{b}' or 'transition{b}': GAP of that map, then head.
  """
  num_classes: int
  growth_rate: int = 32
  block_config: tuple[int, ...] = (6, 12, 24, 16)
  num_init_features: int = 64
  bn_size: int = 4
  layer_widths: Optional[tuple[tuple[tuple[int, int], ...], ...]] = None
  transition_widths: Optional[tuple[int, ...]] = None
  truncate_after: Optional[str] = None
  dtype: Optional[str] = None

  def unit_names(self) -> list[str]:
    """Truncation points: the stem, every dense block and every transition."""
    names = ["stem"]
    for b in range(1, len(self.block_config) + 1):
      names.append(f"denseblock{b}")
      if b < len(self.block_config):
        names.append(f"transition{b}")
    return names

  def layer_width(self, block: int, layer: int) -> tuple[int, int]:
    """(conv1, conv2) widths of layer `layer` (0-based) of block `block` (0-based)."""
    if self.layer_widths is not None:
      return tuple(self.layer_widths[block][layer])
    return (self.bn_size * self.growth_rate, self.growth_rate)

  def transition_width(self, block: int, in_width: int) -> int:
    if self.transition_widths is not None:
      return int(self.transition_widths[block])
    return in_width // 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_truncation(self.truncate_after, self.unit_names())
    x = ConvUnit(self.num_init_features, 7, 2, 3, use_bn=True, dtype=self.dtype,
                 name="stem")(to_compute(self, x), train)
    if self.truncate_after == "stem":
      return truncated_head(self, x)
    x = max_pool(x, 3, 2, 1)
    for b, n in enumerate(self.block_config):
      for i in range(n):
        y = DenseLayer(*self.layer_width(b, i), dtype=self.dtype,
                       name=f"denseblock{b + 1}/layer{i + 1}")(x, train)
        x = jnp.concatenate([x, y], axis=-1)
      tap(self, f"denseblock{b + 1}", x)
      if self.truncate_after == f"denseblock{b + 1}":
        return truncated_head(self, x)
      if b + 1 < len(self.block_config):
        x = Transition(self.transition_width(b, x.shape[-1]), dtype=self.dtype,
                       name=f"transition{b + 1}")(x, train)
        check_spatial(x, "DenseNet", f"transition{b + 1}")
        if self.truncate_after == f"transition{b + 1}":
          return truncated_head(self, x)
    x = nn.relu(_bn(self, "norm5", train)(x))
    tap(self, "last_conv", x)
    x = jnp.mean(x, axis=(1, 2))
    tap(self, "features", x)
    return head(self, x)


def densenet121(num_classes: int = 1000, **overrides) -> DenseNet:
  """torchvision DenseNet-121 (7,978,856 params with 1000 classes)."""
  config = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4)
  config.update(overrides)
  return DenseNet(num_classes=num_classes, **config)



def is_config(config) -> bool:
  """Whether a model config (`models.model_config`) is a DenseNet's."""
  return "growth_rate" in config and "block_config" in config


def delta_taps(config) -> tuple[str, ...]:
  """DELTA's default taps, the last conv of each stage: transitions 1..n-1 and the last block's
  last conv2 (densenet121: transition{1,2,3}/conv, denseblock4/layer16/conv2)."""
  blocks = list(config["block_config"])
  return tuple([f"transition{b}/conv" for b in range(1, len(blocks))]
               + [f"denseblock{len(blocks)}/layer{blocks[-1]}/conv2"])
