"""Inception-V3 (torchvision/models/inception.py, `Inception3`), widths as config data.

Module and unit names follow torchvision's, so a torchvision key `Mixed_6b.branch7x7_2.conv.weight`
lands in `Mixed_6b/branch7x7_2/conv/kernel`; every BasicConv2d (conv without bias, BN with eps
1e-3, ReLU) is a `ConvUnit(bn_eps=1e-3)`. Blocks concatenate their branches along channels in
torchvision's order. Block types and their widths (one tuple per block, in unit order):

  * A (Mixed_5b/c/d): branch1x1, branch5x5_1, branch5x5_2, branch3x3dbl_1, _2, _3, branch_pool
  * B (Mixed_6a):     branch3x3 (3x3/2), branch3x3dbl_1, _2, _3 (3x3/2); + 3x3/2 max pool of x
  * C (Mixed_6b..e):  branch1x1, branch7x7_1, _2 (1x7), _3 (7x1), branch7x7dbl_1.._5, branch_pool
  * D (Mixed_7a):     branch3x3_1, _2 (3x3/2), branch7x7x3_1, _2, _3, _4 (3x3/2); + max pool of x
  * E (Mixed_7b/c):   branch1x1, branch3x3_1, _2a (1x3), _2b (3x1), branch3x3dbl_1, _2, _3a,
                      _3b, branch_pool

B and D pass their input's channels through (max pool) into their output; A, C and E pool their
input (3x3/1 average, zero padding counted, torch's `count_include_pad=True`) before
branch_pool. Stem: Conv2d_1a_3x3 (3x3/2), Conv2d_2a_3x3, Conv2d_2b_3x3 (pad 1), [3x3/2 max pool],
Conv2d_3b_1x1, Conv2d_4a_3x3, [3x3/2 max pool]; the pools are `stem_pool`.

Input size: torchvision's network needs >= 75 px. `SMALL_CONFIG` (no stem pools, narrow
blocks) takes 28 px (Mixed_7 runs at 1x1) for the embedded digit / fashion data.

Auxiliary head (`aux_logits=True`): torchvision's default `Inception3` and its IMAGENET1K_V1
weights have `AuxLogits` (conv0 1x1 128, conv1 5x5 768, fc), 3,326,696 params that only feed
an auxiliary loss in train mode; eval returns the main logits only. Here the head's params
exist (so that state dict imports whole and the parameter count is torchvision's 27,161,264),
but it is never run: jtransfer's strategies use no auxiliary loss, and it needs >= 299 px
input. Its params are created at init on a 17x17 zero map (their shapes do not depend on the
input size). The default `aux_logits=False` drops it; import such state dicts into it with
`jtransfer.weights.torchvision_inception.drop_aux`. Transfer from an aux-free source: a target
built from an `aux_logits=True` source gets an aux `fc` of the target's class count, which the
source's (1000 classes) does not fill.

Methods: DELTA's default taps are the branch-final conv units of each stage's last block
(`default_taps`); pruning couples a unit's channels to every reader of the concatenations they
land in, at their offset (`channel_graph`, used by `jtransfer.methods.prune`).
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtransfer.models.common import (ConvUnit, check_truncation, compute_dtype, head, max_pool, tap,
                                     to_compute, truncated_head)

BN_EPS = 1e-3  # torchvision's BasicConv2d

# Unit names per block type, in the order of that type's widths tuple.
UNITS = {
    "A": ("branch1x1", "branch5x5_1", "branch5x5_2", "branch3x3dbl_1", "branch3x3dbl_2",
          "branch3x3dbl_3", "branch_pool"),
    "B": ("branch3x3", "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
    "C": ("branch1x1", "branch7x7_1", "branch7x7_2", "branch7x7_3", "branch7x7dbl_1",
          "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4", "branch7x7dbl_5", "branch_pool"),
    "D": ("branch3x3_1", "branch3x3_2", "branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3",
          "branch7x7x3_4"),
    "E": ("branch1x1", "branch3x3_1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_1",
          "branch3x3dbl_2", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
}

# Per block type: its branches as chains of unit names; a unit's input is the previous unit of
# its chain (the block input for the first; a 'pool' chain starts with the 3x3/1 average pool).
# A chain ending in a fork (E's 2a / 2b) lists the fork as a tuple: both read the previous
# unit and both outputs are concatenated. 'maxpool' is B / D's pass-through branch.
BRANCHES = {
    "A": (("branch1x1",), ("branch5x5_1", "branch5x5_2"),
          ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), ("pool", "branch_pool")),
    "B": (("branch3x3",), ("branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"), ("maxpool",)),
    "C": (("branch1x1",), ("branch7x7_1", "branch7x7_2", "branch7x7_3"),
          ("branch7x7dbl_1", "branch7x7dbl_2", "branch7x7dbl_3", "branch7x7dbl_4",
           "branch7x7dbl_5"), ("pool", "branch_pool")),
    "D": (("branch3x3_1", "branch3x3_2"),
          ("branch7x7x3_1", "branch7x7x3_2", "branch7x7x3_3", "branch7x7x3_4"), ("maxpool",)),
    "E": (("branch1x1",), ("branch3x3_1", ("branch3x3_2a", "branch3x3_2b")),
          ("branch3x3dbl_1", "branch3x3dbl_2", ("branch3x3dbl_3a", "branch3x3dbl_3b")),
          ("pool", "branch_pool")),
}

# (kernel, stride, padding) of every unit; kernels and paddings are (H, W) pairs where torch's are.
_GEOMETRY = {
    "A": {"branch1x1": (1, 1, 0), "branch5x5_1": (1, 1, 0), "branch5x5_2": (5, 1, 2),
          "branch3x3dbl_1": (1, 1, 0), "branch3x3dbl_2": (3, 1, 1),
          "branch3x3dbl_3": (3, 1, 1), "branch_pool": (1, 1, 0)},
    "B": {"branch3x3": (3, 2, 0), "branch3x3dbl_1": (1, 1, 0), "branch3x3dbl_2": (3, 1, 1),
          "branch3x3dbl_3": (3, 2, 0)},
    "C": {"branch1x1": (1, 1, 0), "branch7x7_1": (1, 1, 0),
          "branch7x7_2": ((1, 7), 1, (0, 3)), "branch7x7_3": ((7, 1), 1, (3, 0)),
          "branch7x7dbl_1": (1, 1, 0), "branch7x7dbl_2": ((7, 1), 1, (3, 0)),
          "branch7x7dbl_3": ((1, 7), 1, (0, 3)), "branch7x7dbl_4": ((7, 1), 1, (3, 0)),
          "branch7x7dbl_5": ((1, 7), 1, (0, 3)), "branch_pool": (1, 1, 0)},
    "D": {"branch3x3_1": (1, 1, 0), "branch3x3_2": (3, 2, 0), "branch7x7x3_1": (1, 1, 0),
          "branch7x7x3_2": ((1, 7), 1, (0, 3)), "branch7x7x3_3": ((7, 1), 1, (3, 0)),
          "branch7x7x3_4": (3, 2, 0)},
    "E": {"branch1x1": (1, 1, 0), "branch3x3_1": (1, 1, 0),
          "branch3x3_2a": ((1, 3), 1, (0, 1)), "branch3x3_2b": ((3, 1), 1, (1, 0)),
          "branch3x3dbl_1": (1, 1, 0), "branch3x3dbl_2": (3, 1, 1),
          "branch3x3dbl_3a": ((1, 3), 1, (0, 1)), "branch3x3dbl_3b": ((3, 1), 1, (1, 0)),
          "branch_pool": (1, 1, 0)},
}

STEM_UNITS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
              "Conv2d_4a_3x3")
_STEM_GEOMETRY = ((3, 2, 0), (3, 1, 0), (3, 1, 1), (1, 1, 0), (3, 1, 0))
AUX_UNITS = ("conv0", "conv1")
AUX_WIDTHS = (128, 768)

# The config fields holding block widths, their block type and torchvision's name stem.
STAGE_FIELDS = (("mixed_5", "A", "Mixed_5"), ("mixed_6a", "B", "Mixed_6"),
                ("mixed_6", "C", "Mixed_6"), ("mixed_7a", "D", "Mixed_7"),
                ("mixed_7", "E", "Mixed_7"))

# torchvision's `transform_input`: ImageNet-normalised channels re-normalised to (x - 0.5) / 0.5.
_TRANSFORM_SCALE = (0.229 / 0.5, 0.224 / 0.5, 0.225 / 0.5)
_TRANSFORM_SHIFT = ((0.485 - 0.5) / 0.5, (0.456 - 0.5) / 0.5, (0.406 - 0.5) / 0.5)


def avg_pool_3x3(x: jax.Array) -> jax.Array:
  """F.avg_pool2d(x, 3, stride=1, padding=1) on NHWC; the zero padding counts in the mean
  (torch's default count_include_pad=True), so border outputs are sums / 9."""
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return nn.avg_pool(xp, (3, 3), strides=(1, 1), padding="VALID")


def block_layout(config) -> list[tuple[str, str, tuple[int, ...]]]:
  """(block name, type, widths) of every Mixed block of a config (a dict or the module)."""
  return [(name, kind, widths) for name, kind, widths, _ in _layout(config)]


def _layout(config) -> list[tuple[str, str, tuple[int, ...], tuple]]:
  """`block_layout` plus where each block's widths live in the config: (field,) or (field, i)."""
  get = config.get if isinstance(config, dict) else functools.partial(getattr, config)
  out, letters = [], {}
  for field, kind, stem in STAGE_FIELDS:
    value = get(field)
    single = kind in ("B", "D")
    for b, widths in enumerate([value] if single else list(value)):
      # Mixed_5b..d, Mixed_6a then 6b..e, Mixed_7a then 7b, 7c: letters run on within a stage.
      index = letters.get(stem, 1 if stem == "Mixed_5" else 0)
      letters[stem] = index + 1
      out.append((f"{stem}{chr(ord('a') + index)}", kind, tuple(widths),
                  (field,) if single else (field, b)))
  return out


def _check_size(x: jax.Array, need: int, where: str) -> None:
  """InputError unless the map is at least `need` px each way before `where`."""
  if min(x.shape[1], x.shape[2]) < need:
    from jtransfer.errors import InputError
    raise InputError(f"inception_v3: the input is too small for this config, the map is "
                     f"{x.shape[1]}x{x.shape[2]} before {where}, which needs {need} px; "
                     "torchvision's layout needs >= 75 px, use inception.SMALL_CONFIG for "
                     "28-74 px")


class InceptionBlock(nn.Module):
  """One Mixed block of type A-E (see the module docstring); taps its output as `<block>`."""
  kind: str
  widths: tuple[int, ...]
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if len(self.widths) != len(UNITS[self.kind]):
      from jtransfer.errors import InputError
      raise InputError(f"Inception block {self.name} (type {self.kind}) needs "
                       f"{len(UNITS[self.kind])} widths ({', '.join(UNITS[self.kind])}), got "
                       f"{len(self.widths)}")
    widths = dict(zip(UNITS[self.kind], self.widths))
    if self.kind in ("B", "D"):
      _check_size(x, 3, f"{self.name} (its unpadded 3x3 stride-2 convs and max pool)")

    def unit(name, y):
      kernel, stride, padding = _GEOMETRY[self.kind][name]
      return ConvUnit(widths[name], kernel, stride, padding, use_bn=True, bn_eps=BN_EPS,
                      dtype=self.dtype, name=name)(y, train)

    outputs = []
    for chain in BRANCHES[self.kind]:
      y = x
      for step in chain:
        if step == "pool":
          y = avg_pool_3x3(y)
        elif step == "maxpool":
          y = max_pool(y, 3, 2)
        elif isinstance(step, tuple):  # a fork: both read y, both outputs are concatenated
          y = jnp.concatenate([unit(name, y) for name in step], axis=-1)
        else:
          y = unit(step, y)
      outputs.append(y)
    out = jnp.concatenate(outputs, axis=-1)
    tap(self, "out", out)
    return out


class InceptionAux(nn.Module):
  """torchvision's InceptionAux: 5x5/3 average pool, conv0 1x1, conv1 5x5, global pool, fc."""
  num_classes: int
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    unit = functools.partial(ConvUnit, use_bn=True, bn_eps=BN_EPS, dtype=self.dtype)
    x = nn.avg_pool(x, (5, 5), strides=(3, 3), padding="VALID")
    x = unit(AUX_WIDTHS[0], 1, 1, 0, name="conv0")(x, train)
    x = unit(AUX_WIDTHS[1], 5, 1, 0, name="conv1")(x, train)
    # 'fc' as torchvision names it: not 'head', which transfer code replaces by pattern.
    return nn.Dense(self.num_classes, dtype=compute_dtype(self.dtype), name="fc")(
        jnp.mean(x, axis=(1, 2))).astype(jnp.float32)


class Inception3(nn.Module):
  """Inception-V3 (torchvision/models/inception.py), eval-mode outputs: main logits only.

  Attributes:
    num_classes: units of the `head` layer (torchvision's `fc`).
    stem_widths: Conv2d_1a_3x3, 2a, 2b, 3b, 4a output channels.
    stem_pool: the two 3x3/2 max pools of the stem (off for small inputs).
    mixed_5: widths of each A block (Mixed_5b, 5c, 5d), see `UNITS['A']`.
    mixed_6a: widths of the B block.
    mixed_6: widths of each C block (Mixed_6b..6e).
    mixed_7a: widths of the D block.
    mixed_7: widths of each E block (Mixed_7b, 7c).
    transform_input: torchvision's `transform_input`: re-normalise ImageNet-normalised RGB
      input to (x - 0.5) / 0.5 per channel, as IMAGENET1K_V1's model does (default False, as
      torchvision's constructor).
    aux_logits: carry the AuxLogits head's params (never run; see the module docstring).
    dropout: rate before the head in train mode (torchvision: 0.5, which `inception_v3` sets).
    truncate_after: a stem unit or a Mixed block name; the network stops after it, global
      average pools that map and feeds it to the head.
    dtype: compute dtype name, see `common.compute_dtype`.
  """
  num_classes: int
  stem_widths: tuple[int, ...] = (32, 32, 64, 80, 192)
  stem_pool: bool = True
  mixed_5: tuple[tuple[int, ...], ...] = ((64, 48, 64, 64, 96, 96, 32),
                                          (64, 48, 64, 64, 96, 96, 64),
                                          (64, 48, 64, 64, 96, 96, 64))
  mixed_6a: tuple[int, ...] = (384, 64, 96, 96)
  mixed_6: tuple[tuple[int, ...], ...] = tuple(
      (192, c, c, 192, c, c, c, c, 192, 192) for c in (128, 160, 160, 192))
  mixed_7a: tuple[int, ...] = (192, 320, 192, 192, 192, 192)
  mixed_7: tuple[tuple[int, ...], ...] = ((320, 384, 384, 384, 448, 384, 384, 384, 192),) * 2
  transform_input: bool = False
  aux_logits: bool = False
  dropout: float = 0.0
  truncate_after: Optional[str] = None
  dtype: Optional[str] = None

  def unit_names(self) -> list[str]:
    """Truncation points: the stem conv units and every Mixed block."""
    return list(STEM_UNITS) + [name for name, _, _ in block_layout(self)]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_truncation(self.truncate_after, self.unit_names())
    if len(self.stem_widths) != len(STEM_UNITS):
      from jtransfer.errors import InputError
      raise InputError(f"stem_widths needs {len(STEM_UNITS)} widths ({', '.join(STEM_UNITS)}), "
                       f"got {len(self.stem_widths)}")
    if self.transform_input:
      if x.shape[-1] != 3:
        from jtransfer.errors import InputError
        raise InputError(f"transform_input re-normalises RGB input; got {x.shape[-1]} channels")
      x = x * jnp.asarray(_TRANSFORM_SCALE, x.dtype) + jnp.asarray(_TRANSFORM_SHIFT, x.dtype)
    x = to_compute(self, x)
    for i, (name, width, (k, s, p)) in enumerate(zip(STEM_UNITS, self.stem_widths,
                                                      _STEM_GEOMETRY)):
      if self.stem_pool and i == 3:
        _check_size(x, 3, "maxpool1")
        x = max_pool(x, 3, 2)  # maxpool1
      _check_size(x, k - 2 * p, name)
      x = ConvUnit(width, k, s, p, use_bn=True, bn_eps=BN_EPS, dtype=self.dtype,
                   name=name)(x, train)
      if self.truncate_after == name:
        return truncated_head(self, x)
    if self.stem_pool:
      _check_size(x, 3, "maxpool2")
      x = max_pool(x, 3, 2)  # maxpool2
    layout = block_layout(self)
    last_c = [name for name, kind, _ in layout if kind == "C"][-1:]  # torchvision: Mixed_6e
    for name, kind, widths in layout:
      x = InceptionBlock(kind, widths, dtype=self.dtype, name=name)(x, train)
      if self.aux_logits and [name] == last_c and self.is_initializing():
        # Creates the aux head's params only (shapes do not depend on the map size).
        InceptionAux(self.num_classes, dtype=self.dtype, name="AuxLogits")(
            jnp.zeros((1, 17, 17, x.shape[-1]), x.dtype), False)
      if self.truncate_after == name:
        return truncated_head(self, x)
    tap(self, "last_conv", x)
    x = jnp.mean(x, axis=(1, 2))  # torchvision: adaptive 1x1 average pool, then dropout
    tap(self, "features", x)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return head(self, x)


def inception_v3(num_classes: int = 1000, **overrides) -> Inception3:
  """torchvision Inception-V3: 23,834,568 params with 1000 classes without the aux head,
  27,161,264 with it (`aux_logits=True`, torchvision's default); needs >= 75 px input
  (`SMALL_CONFIG` below for less). Dropout 0.5 before the head, as torchvision."""
  return Inception3(num_classes=num_classes, **{"dropout": 0.5, **overrides})


# A narrow, shallow Inception-V3 for 28-64 px inputs: no stem pools (28 px -> Mixed_5 at 9x9,
# Mixed_6 at 4x4, Mixed_7 at 1x1), one block of each type (Mixed_5b, 6a, 6b, 7a, 7b), widths
# about 1/8 of torchvision's (78k params with 10 classes). Use as config overrides:
# get_model('inception_v3', n, **SMALL_CONFIG).
SMALL_CONFIG = {
    "stem_widths": (8, 8, 16, 16, 24),
    "stem_pool": False,
    "mixed_5": ((8, 6, 8, 8, 12, 12, 8),),
    "mixed_6a": (24, 8, 12, 12),
    "mixed_6": ((16, 8, 8, 16, 8, 8, 8, 8, 16, 16),),
    "mixed_7a": (16, 24, 16, 16, 16, 16),
    "mixed_7": ((24, 24, 24, 24, 28, 24, 24, 24, 16),),
}


# The final conv unit(s) of each branch: together their outputs are the block's output channels
# (B / D add their input's, passed through the max pool).
_BRANCH_FINALS = {
    kind: tuple(u for chain in chains if chain[-1] != "maxpool"
                for u in (chain[-1] if isinstance(chain[-1], tuple) else (chain[-1],)))
    for kind, chains in BRANCHES.items()
}


def default_taps(config) -> tuple[str, ...]:
  """DELTA's taps: every branch's final conv unit in the last block of Mixed_5, 6 and 7.

  The authors tap the last conv of each resolution stage; an Inception block's output is the
  concatenation of its branches, so the rule taken here is the conv units whose outputs make up
  the stage's last block output (Mixed_5d, 6e, 7c with torchvision's widths: 4 + 4 + 6 units),
  each getting its own channel attention. Units, not the concat, because DELTA's attention
  ablates a tap's channels through its `<tap>/conv/kernel`.
  """
  last = {}
  for name, kind, _ in block_layout(config):
    last[name[:len("Mixed_5")]] = (name, kind)
  return tuple(f"{name}/{u}" for name, kind in last.values() for u in _BRANCH_FINALS[kind])


# ----------------------------------------------------------------------------- pruning graph
def channel_graph(config) -> dict[str, tuple[tuple, list[tuple[str, str, int]]]]:
  """Who reads each conv unit's output channels, for structural pruning (`methods.prune`).

  Blocks concatenate their branches, so a map is a list of segments, one per unit that wrote
  it (B / D blocks append their input's segments, passed through the max pool; average pools
  are per channel too). Every layer reading a map reads each segment's channels at that
  segment's offset in the concatenation.

  Args:
    config: an Inception3 config (dict), without the aux head.

  Returns:
    {unit path: (config key of its width, [(kind, layer, offset), ...])}, kind 'conv' (the
    layer's kernel input axis) or 'gap' (the `head` Dense rows, after global average pooling).
  """
  graph, segments = {}, []

  def read(kind, layer, segs):
    offset = 0
    for unit, width in segs:
      graph[unit][1].append((kind, layer, offset))
      offset += width

  def write(unit, key, width, segs):
    graph[unit] = (key, [])
    read("conv", unit, segs)
    return [(unit, width)]

  cut = config.get("truncate_after")
  for i, (name, width) in enumerate(zip(STEM_UNITS, config["stem_widths"])):
    segments = write(name, ("stem_widths", i), width, segments)
    if cut == name:
      break
  else:
    for name, kind, widths, key in _layout(config):
      w = dict(zip(UNITS[kind], widths))
      index = {u: j for j, u in enumerate(UNITS[kind])}
      out = []
      for chain in BRANCHES[kind]:
        cur = segments
        for step in chain:
          if step in ("pool", "maxpool"):
            continue  # per-channel pools keep the segments
          names = step if isinstance(step, tuple) else (step,)
          cur = [seg for u in names
                 for seg in write(f"{name}/{u}", (*key, index[u]), w[u], cur)]
        out += cur
      segments = out
      if cut == name:
        break
  read("gap", "head", segments)
  return graph


def pruned_config(config, widths: dict[tuple, int]) -> dict:
  """`config` with the widths at the config keys of `channel_graph` replaced."""
  new = {k: v for k, v in config.items()}
  new["stem_widths"] = list(new["stem_widths"])
  for field, kind, _ in STAGE_FIELDS:
    new[field] = list(new[field]) if kind in ("B", "D") else [list(b) for b in new[field]]
  for key, n in widths.items():
    target = new[key[0]]
    for k in key[1:-1]:
      target = target[k]
    target[key[-1]] = int(n)
  return new
