"""ResNets with batch norm: the small `resnet_s` and torchvision's ResNet-18/50/101.

One module covers both: the stem (kernel, stride, max pool) and the block type are config.
Widths are data. `stage_widths` are the residual ("planes") widths of each stage; they are
coupled across every block of a stage through the identity shortcuts, so pruning must treat a
stage width as one group. `inner_widths` are the widths of the convs inside each block (basic:
conv1; bottleneck: conv1 and conv2), which can be pruned freely.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtransfer.models.common import (ConvUnit, check_truncation, head, max_pool, tap,
                                     to_compute, truncated_head)


class BasicBlock(nn.Module):
  """Two 3x3 conv units and a shortcut (torchvision's BasicBlock)."""
  width: int
  inner: tuple[int, ...]
  stride: int = 1
  dtype: Optional[str] = None
  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvUnit, use_bn=True, dtype=self.dtype)
    y = unit(self.inner[0], 3, self.stride, 1, name="conv1")(x, train)
    y = unit(self.width, 3, 1, 1, relu=False, name="conv2")(y, train)
    return _merge_shortcut(self, x, y, train)


class Bottleneck(nn.Module):
  """1x1, 3x3 (strided, as torchvision v1.5; grouped in ResNeXt), 1x1 x4 expansion, shortcut."""
  width: int
  inner: tuple[int, ...]
  stride: int = 1
  dtype: Optional[str] = None
  groups: int = 1
  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvUnit, use_bn=True, dtype=self.dtype)
    y = unit(self.inner[0], 1, 1, 0, name="conv1")(x, train)
    y = unit(self.inner[1], 3, self.stride, 1, groups=self.groups, name="conv2")(y, train)
    y = unit(self.width * 4, 1, 1, 0, relu=False, name="conv3")(y, train)
    return _merge_shortcut(self, x, y, train)


def _merge_shortcut(block: nn.Module, x: jax.Array, y: jax.Array, train: bool) -> jax.Array:
  out_width = y.shape[-1]
  if block.stride != 1 or x.shape[-1] != out_width:
    x = ConvUnit(out_width, 1, block.stride, 0, use_bn=True, relu=False, dtype=block.dtype,
                 parent=block, name="downsample")(x, train)
  out = nn.relu(x + y)
  tap(block, "out", out)
  return out


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
  """ResNet v1.5 (stride in the 3x3 conv), torchvision-compatible structure and padding.

  Attributes:
    num_classes: units of the `head` layer.
    stage_sizes: blocks per stage; stages are named `stage1..`, blocks `block0..`.
    stage_widths: planes per stage (bottleneck outputs are 4x this).
    block: 'basic' or 'bottleneck'.
    stem_width, stem_kernel, stem_stride, stem_pool: the `stem` conv unit and optional 3x3/2
      max pool (torchvision: 64, 7, 2, True).
    inner_widths: optional per-block inner widths, a tuple per stage of a tuple per block
      (basic: (w1,), bottleneck: (w1, w2)); defaults to the stage width.
    truncate_after: 'stem' or a block name ('stage2/block0'): the network stops after it,
      global average pools that map and feeds it to the head (base-model selection, App. A.2;
      blocks are the unit, since cutting inside one would drop its shortcut).
    groups, width_per_group: torchvision's ResNeXt / Wide ResNet knobs (bottleneck only): the
      3x3 conv has `groups` groups and the default inner width is
      int(planes * width_per_group / 64) * groups (ResNet: 1, 64; ResNeXt-50 32x4d: 32, 4;
      Wide ResNet-50-2: 1, 128).
  """
  num_classes: int
  stage_sizes: tuple[int, ...] = (2, 2, 2)
  stage_widths: tuple[int, ...] = (32, 64, 128)
  block: str = "basic"
  stem_width: int = 32
  stem_kernel: int = 3
  stem_stride: int = 2
  stem_pool: bool = False
  inner_widths: Optional[tuple[tuple[tuple[int, ...], ...], ...]] = None
  truncate_after: Optional[str] = None
  dtype: Optional[str] = None
  groups: int = 1
  width_per_group: int = 64

  def unit_names(self) -> list[str]:
    """Truncation points: the stem and every block."""
    return ["stem"] + [f"stage{s + 1}/block{b}" for s, size in enumerate(self.stage_sizes)
                       for b in range(size)]

  def block_inner(self, stage: int, index: int) -> tuple[int, ...]:
    if self.inner_widths is not None:
      return tuple(self.inner_widths[stage][index])
    if self.block == "basic":
      return (self.stage_widths[stage],)
    width = self.stage_widths[stage]
    if (self.groups, self.width_per_group) != (1, 64):  # torchvision's Bottleneck width rule
      width = int(width * (self.width_per_group / 64.0)) * self.groups
    return (width, width)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_truncation(self.truncate_after, self.unit_names())
    x = ConvUnit(self.stem_width, self.stem_kernel, self.stem_stride, self.stem_kernel // 2,
                 use_bn=True, dtype=self.dtype, name="stem")(to_compute(self, x), train)
    if self.truncate_after == "stem":
      return truncated_head(self, x)
    if self.stem_pool:
      x = max_pool(x, 3, 2, 1)
    block_cls = BLOCKS[self.block]
    if self.groups != 1 or self.width_per_group != 64:
      if self.block != "bottleneck":
        from jtransfer.errors import InputError
        raise InputError("groups and width_per_group need block='bottleneck' (torchvision's "
                         "BasicBlock supports only groups=1, width_per_group=64)")
      block_cls = functools.partial(block_cls, groups=self.groups)
    for s, (size, width) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      for b in range(size):
        stride = 2 if (b == 0 and s > 0) else 1
        x = block_cls(width, self.block_inner(s, b), stride, dtype=self.dtype,
                      name=f"stage{s + 1}/block{b}")(x, train)
        if self.truncate_after == f"stage{s + 1}/block{b}":
          return truncated_head(self, x)
    tap(self, "last_conv", x)
    x = jnp.mean(x, axis=(1, 2))
    tap(self, "features", x)
    return head(self, x)


def resnet_s(num_classes: int, **overrides) -> ResNet:
  """Small ResNet with BN for 28-64 px (3 stages x 2 basic blocks, 32/64/128; ~0.7M params).

  The 3x3 stem has stride 2 (28 px -> 4x4 last map): 3.7x faster to train on 2 CPU cores than
  stride 1 (482 vs 131 images/s at batch 128), which is what makes the CPU grids affordable.
  """
  return ResNet(num_classes=num_classes, **overrides)


def _torchvision(sizes, block, num_classes, overrides) -> ResNet:
  config = dict(stage_sizes=sizes, stage_widths=(64, 128, 256, 512), block=block,
                stem_width=64, stem_kernel=7, stem_stride=2, stem_pool=True)
  config.update(overrides)
  return ResNet(num_classes=num_classes, **config)


def resnet18(num_classes: int = 1000, **overrides) -> ResNet:
  """torchvision ResNet-18 (11,689,512 params with 1000 classes)."""
  return _torchvision((2, 2, 2, 2), "basic", num_classes, overrides)


def resnet50(num_classes: int = 1000, **overrides) -> ResNet:
  """torchvision ResNet-50 (25,557,032 params with 1000 classes)."""
  return _torchvision((3, 4, 6, 3), "bottleneck", num_classes, overrides)


def resnet101(num_classes: int = 1000, **overrides) -> ResNet:
  """torchvision ResNet-101 (44,549,160 params with 1000 classes)."""
  return _torchvision((3, 4, 23, 3), "bottleneck", num_classes, overrides)


def resnext50_32x4d(num_classes: int = 1000, **overrides) -> ResNet:
  """torchvision ResNeXt-50 32x4d (25,028,904 params with 1000 classes).

  torchvision/models/resnet.py: ResNet-50 with 32 groups of width 4 per 64 planes in the 3x3.
  """
  return _torchvision((3, 4, 6, 3), "bottleneck", num_classes,
                      {"groups": 32, "width_per_group": 4, **overrides})


def wide_resnet50_2(num_classes: int = 1000, **overrides) -> ResNet:
  """torchvision Wide ResNet-50-2 (68,883,240 params with 1000 classes).

  torchvision/models/resnet.py: ResNet-50 with the bottleneck's inner width doubled.
  """
  return _torchvision((3, 4, 6, 3), "bottleneck", num_classes,
                      {"width_per_group": 128, **overrides})
