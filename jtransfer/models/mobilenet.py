"""Inverted-residual networks: MobileNetV2, MobileNetV3 (large, small) and EfficientNet-B0.

torchvision/models/mobilenetv2.py, mobilenetv3.py and efficientnet.py share one structure,
built here by one module from data: a strided `stem` conv unit, inverted-residual blocks
`block1..blockN`, a 1x1 `top` conv unit, global average pooling, an optional hidden Dense
`fc1` (MobileNetV3's classifier: Linear + Hardswish + Dropout) and the `head`.

Each block is a tuple `(kernel, stride, expand, out, se, residual, act)`:
  * `expand`: width of the 1x1 `expand` unit, 0 for none (the depthwise conv then runs on the
    block's input, as torchvision does when the expansion ratio is 1);
  * `dw`: the kernel x kernel depthwise unit (groups = its width), strided;
  * `se`: squeeze width of the squeeze-excitation `se` (units `se/fc1`, `se/fc2`: 1x1 convs
    with bias, no BN), 0 for none;
  * `project`: the 1x1 unit to `out` channels, no activation;
  * `residual`: 1 adds the block input (torchvision: stride 1 and equal widths). Stored, not
    derived, so a pruned config whose widths happen to become equal keeps its structure
    (likewise `expand` is stored rather than derived from the expansion ratio);
  * `act`: the expand / depthwise activation (ReLU6, ReLU, Hardswish, SiLU).

Every width is explicit, so a width-reduced variant for 28-64 px inputs is a config override
(e.g. `stem_stride=1` and fewer, narrower blocks) and pruning shrinks the tuples in place.
EfficientNet's stochastic depth is the identity in eval mode; in train mode it is left off
(no residual branch is dropped; torchvision drops B0's with probability up to 0.2): a
regulariser for training from scratch, little use when fine-tuning at few-shot scale, and
it would need its own rng stream in every train step.

MobileNetV3's hidden classifier layer `fc1` is a pretrained layer: transfer targets keep it
(`transfer.target_model` drops only VGG-style `dense_widths`), and the `features` tap is the
head's input, as for VGG (fc1's activation; the pooled map is the tap `pooled`).
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtransfer.errors import InputError
from jtransfer.models.common import (ACTIVATIONS, ConvUnit, activation, check_truncation,
                                     compute_dtype, hard_sigmoid, head, tap, to_compute,
                                     truncated_head)

# Block tuple fields, in order.
KERNEL, STRIDE, EXPAND, OUT, SE, RESIDUAL, ACT = range(7)

_GATES = {"hardsigmoid": hard_sigmoid, "sigmoid": nn.sigmoid}


def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
  """torchvision's `_make_divisible`: round to a multiple of `divisor`, never below 90%."""
  min_value = min_value or divisor
  new = max(min_value, int(v + divisor / 2) // divisor * divisor)
  return new + divisor if new < 0.9 * v else new


class SqueezeExcitation(nn.Module):
  """torchvision.ops.SqueezeExcitation: pool, 1x1 conv `fc1`, act, 1x1 conv `fc2`, gate.

  Both 1x1 convs are ConvUnits (with bias, no BN), so CWL scales them like any conv: a scale
  on `fc1` is a per-unit gain before its activation, one on `fc2` scales the gate's input.
  """
  squeeze: int
  act: str = "relu"
  gate: str = "hardsigmoid"
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    unit = functools.partial(ConvUnit, kernel=1, padding=0, dtype=self.dtype)
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = unit(self.squeeze, act=self.act, name="fc1")(s)
    s = unit(x.shape[-1], relu=False, name="fc2")(s)
    return x * _GATES[self.gate](s)


class InvertedResidual(nn.Module):
  """expand 1x1 (optional) -> depthwise kxk -> SE (optional) -> project 1x1 (+ input)."""
  block: tuple
  se_act: str = "relu"
  se_gate: str = "hardsigmoid"
  bn_eps: float = 1e-5
  bn_momentum: float = 0.9
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    k, stride, expand, out, se, residual, act = self.block
    unit = functools.partial(ConvUnit, use_bn=True, dtype=self.dtype, act=act,
                             bn_eps=self.bn_eps, bn_momentum=self.bn_momentum)
    y = x
    if expand:
      y = unit(expand, 1, 1, 0, name="expand")(y, train)
    width = y.shape[-1]
    y = unit(width, k, stride, (k - 1) // 2, groups=width, name="dw")(y, train)
    if se:
      y = SqueezeExcitation(se, self.se_act, self.se_gate, self.dtype, name="se")(y)
    y = unit(out, 1, 1, 0, relu=False, name="project")(y, train)
    if residual:
      if stride != 1 or x.shape[-1] != out:
        raise InputError(f"{self.name}: a residual block needs stride 1 and equal widths, got "
                         f"stride {stride}, {x.shape[-1]} -> {out} channels")
      y = x + y  # stochastic depth (EfficientNet) is the identity here, see the module doc
    tap(self, "out", y)
    return y


class MobileNet(nn.Module):
  """The inverted-residual family (see the module docstring for the block tuples).

  Attributes:
    num_classes: units of the `head` layer.
    blocks: one tuple per block, `(kernel, stride, expand, out, se, residual, act)`.
    stem_width, stem_stride: the 3x3 `stem` unit (torchvision: stride 2).
    top_width: the 1x1 `top` unit's width (0: none, the last block feeds the pool).
    hidden_width: MobileNetV3's hidden classifier Dense `fc1` (0: none); the pooled map is
      then the tap `pooled` and `features` (the head's input) is fc1's activation.
    act: activation of the stem, `top` and `fc1`.
    se_act, se_gate: the SE's inner activation and gate ('hardsigmoid' or 'sigmoid').
    bn_eps, bn_momentum: BatchNorm epsilon and Flax momentum (1 - torch's momentum).
    dropout: before the head (torchvision: 0.2).
    truncate_after: 'stem' or a block name: pool that block's output into the head.
    dtype: compute dtype name (see `common.compute_dtype`).
  """
  num_classes: int
  blocks: tuple = ((3, 1, 0, 8, 0, 0, "relu6"), (3, 2, 24, 16, 0, 0, "relu6"),
                   (3, 1, 48, 16, 0, 1, "relu6"))
  stem_width: int = 8
  stem_stride: int = 2
  top_width: int = 64
  hidden_width: int = 0
  act: str = "relu6"
  se_act: str = "relu"
  se_gate: str = "hardsigmoid"
  bn_eps: float = 1e-5
  bn_momentum: float = 0.9
  dropout: float = 0.2
  truncate_after: Optional[str] = None
  dtype: Optional[str] = None

  def unit_names(self) -> list[str]:
    """Truncation points: the stem and every block (a cut inside one would drop its skip)."""
    return ["stem"] + [f"block{i}" for i in range(1, len(self.blocks) + 1)]

  def check(self) -> None:
    """Raises InputError for a malformed block tuple, activation or SE gate."""
    if self.se_gate not in _GATES:
      raise InputError(f"se_gate {self.se_gate!r}: expected one of {', '.join(_GATES)}")
    for name in (self.act, self.se_act):
      if name not in ACTIVATIONS:
        raise InputError(f"activation {name!r}: expected one of {', '.join(ACTIVATIONS)}")
    for i, b in enumerate(self.blocks, start=1):
      ok = (isinstance(b, (tuple, list)) and len(b) == 7 and b[ACT] in ACTIVATIONS
            and all(isinstance(v, int) for v in b[:6]) and b[KERNEL] >= 1
            and b[STRIDE] >= 1 and b[EXPAND] >= 0 and b[OUT] >= 1 and b[SE] >= 0
            and b[RESIDUAL] in (0, 1))
      if not ok:
        raise InputError(f"block{i} is {b!r}; expected (kernel, stride, expand >= 0, out >= 1, "
                         f"se >= 0, residual 0/1, act in {', '.join(ACTIVATIONS)})")

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_truncation(self.truncate_after, self.unit_names())
    self.check()
    bn = dict(use_bn=True, dtype=self.dtype, act=self.act, bn_eps=self.bn_eps,
              bn_momentum=self.bn_momentum)
    x = ConvUnit(self.stem_width, 3, self.stem_stride, 1, name="stem", **bn)(
        to_compute(self, x), train)
    if self.truncate_after == "stem":
      return truncated_head(self, x)
    for i, block in enumerate(self.blocks, start=1):
      x = InvertedResidual(tuple(block), self.se_act, self.se_gate, self.bn_eps,
                           self.bn_momentum, self.dtype, name=f"block{i}")(x, train)
      if self.truncate_after == f"block{i}":
        return truncated_head(self, x)
    if self.top_width:
      x = ConvUnit(self.top_width, 1, 1, 0, name="top", **bn)(x, train)
    tap(self, "last_conv", x)
    x = jnp.mean(x, axis=(1, 2))
    if self.hidden_width:
      tap(self, "pooled", x)
      x = nn.Dense(self.hidden_width, dtype=compute_dtype(self.dtype), name="fc1")(x)
      x = activation(self.act)(x)
    # `features` is the head's input (as VGG's after its fc layers): cached-feature strategies
    # train a new head on it
    tap(self, "features", x)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return head(self, x)


# ----------------------------------------------------------------------------- torchvision
def _blocks(setting, act_of=lambda _: "relu6") -> tuple:
  """Block tuples from (kernel, in, expanded, out, se, act, stride) rows (widths final)."""
  out = []
  for k, inp, expanded, width, se, act, stride in setting:
    residual = int(stride == 1 and inp == width)
    out.append((k, stride, 0 if expanded == inp else expanded, width, se, residual, act))
  return tuple(out)


def v2_blocks(width_mult: float = 1.0, setting=None) -> tuple:
  """MobileNetV2's blocks from torchvision's (t, c, n, s) rows and width multiplier."""
  setting = setting or ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
  inp, rows = make_divisible(32 * width_mult), []
  for t, c, n, s in setting:
    width = make_divisible(c * width_mult)
    for i in range(n):
      rows.append((3, inp, int(round(inp * t)), width, 0, "relu6", s if i == 0 else 1))
      inp = width
  return _blocks(rows)


def mobilenet_v2(num_classes: int = 1000, **overrides) -> MobileNet:
  """torchvision MobileNetV2 (3,504,872 params with 1000 classes)."""
  config = dict(blocks=v2_blocks(), stem_width=32, top_width=1280, act="relu6")
  config.update(overrides)
  return MobileNet(num_classes=num_classes, **config)


# torchvision's bneck_conf rows: (in, kernel, expanded, out, use_se, 'RE'/'HS', stride).
_V3_LARGE = ((16, 3, 16, 16, 0, "RE", 1), (16, 3, 64, 24, 0, "RE", 2),
             (24, 3, 72, 24, 0, "RE", 1), (24, 5, 72, 40, 1, "RE", 2),
             (40, 5, 120, 40, 1, "RE", 1), (40, 5, 120, 40, 1, "RE", 1),
             (40, 3, 240, 80, 0, "HS", 2), (80, 3, 200, 80, 0, "HS", 1),
             (80, 3, 184, 80, 0, "HS", 1), (80, 3, 184, 80, 0, "HS", 1),
             (80, 3, 480, 112, 1, "HS", 1), (112, 3, 672, 112, 1, "HS", 1),
             (112, 5, 672, 160, 1, "HS", 2), (160, 5, 960, 160, 1, "HS", 1),
             (160, 5, 960, 160, 1, "HS", 1))
_V3_SMALL = ((16, 3, 16, 16, 1, "RE", 2), (16, 3, 72, 24, 0, "RE", 2),
             (24, 3, 88, 24, 0, "RE", 1), (24, 5, 96, 40, 1, "HS", 2),
             (40, 5, 240, 40, 1, "HS", 1), (40, 5, 240, 40, 1, "HS", 1),
             (40, 5, 120, 48, 1, "HS", 1), (48, 5, 144, 48, 1, "HS", 1),
             (48, 5, 288, 96, 1, "HS", 2), (96, 5, 576, 96, 1, "HS", 1),
             (96, 5, 576, 96, 1, "HS", 1))


def v3_blocks(rows) -> tuple:
  """MobileNetV3 blocks from bneck_conf rows (width_mult 1; SE squeeze = expanded/4 to 8s)."""
  acts = {"RE": "relu", "HS": "hardswish"}
  return _blocks([(k, inp, e, out, make_divisible(e // 4) if se else 0, acts[a], s)
                  for inp, k, e, out, se, a, s in rows])


def _v3(rows, hidden, num_classes, overrides) -> MobileNet:
  blocks = v3_blocks(rows)
  config = dict(blocks=blocks, stem_width=16, top_width=6 * blocks[-1][OUT],
                hidden_width=hidden, act="hardswish", se_act="relu", se_gate="hardsigmoid",
                bn_eps=1e-3, bn_momentum=0.99)
  config.update(overrides)
  return MobileNet(num_classes=num_classes, **config)


def mobilenet_v3_large(num_classes: int = 1000, **overrides) -> MobileNet:
  """torchvision MobileNetV3-Large (5,483,032 params with 1000 classes)."""
  return _v3(_V3_LARGE, 1280, num_classes, overrides)


def mobilenet_v3_small(num_classes: int = 1000, **overrides) -> MobileNet:
  """torchvision MobileNetV3-Small (2,542,856 params with 1000 classes)."""
  return _v3(_V3_SMALL, 1024, num_classes, overrides)


# EfficientNet-B0 (width and depth multipliers 1): (expand ratio, kernel, stride, in, out, n).
_B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
       (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


def b0_blocks() -> tuple:
  """EfficientNet-B0's MBConv blocks; the SE squeezes to max(1, block input / 4)."""
  rows = []
  for ratio, k, s, inp, out, n in _B0:
    for i in range(n):
      width_in = inp if i == 0 else out
      rows.append((k, width_in, make_divisible(width_in * ratio), out, max(1, width_in // 4),
                   "silu", s if i == 0 else 1))
  return _blocks(rows)


def efficientnet_b0(num_classes: int = 1000, **overrides) -> MobileNet:
  """torchvision EfficientNet-B0 (5,288,548 params with 1000 classes)."""
  config = dict(blocks=b0_blocks(), stem_width=32, top_width=1280, act="silu", se_act="silu",
                se_gate="sigmoid")
  config.update(overrides)
  return MobileNet(num_classes=num_classes, **config)


def is_config(config) -> bool:
  """Whether a model config (`models.model_config`) is one of this module's."""
  return "blocks" in config and "se_gate" in config


def stage_ends(config) -> list[str]:
  """The conv unit ending each resolution stage: the unit before each stride-2 block (the
  stem or a block's `project`), then `top` (or the last block's project without one)."""
  blocks = config["blocks"]
  ends = []
  for i, b in enumerate(blocks, start=1):
    if b[STRIDE] != 1:
      ends.append("stem" if i == 1 else f"block{i - 1}/project")
  ends.append("top" if config.get("top_width", 0) else f"block{len(blocks)}/project")
  return ends
