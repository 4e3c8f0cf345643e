"""Building blocks shared by every model: conv units, torch-style padding and pooling, taps.

Naming is the contract the rest of the library relies on:
  * every convolution lives in a `ConvUnit` submodule with children `conv` (and `bn` when the
    unit has batch norm), so parameter paths read `<unit>/conv/kernel`, `<unit>/bn/scale`;
  * CWL, pruning and weight import find conv units by those paths, never by module classes;
  * each unit sows its raw conv output (before BN and activation) as the tap `<unit>`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtransfer.models import gemm_conv
from jtransfer.models.batchnorm import BatchNorm

# torchvision initialises convs with kaiming_normal(mode='fan_out', nonlinearity='relu').
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def compute_dtype(name: Optional[str]):
  """The jnp dtype for a model's `dtype` config field (None: float32 throughout).

  Mixed precision: params stay float32 (Flax's param_dtype); convolutions, BN and Dense layers
  compute in this dtype (BN statistics reduce in float32, as Flax does); logits come back as
  float32. Kept as a name in the config so saved configs stay JSON.
  """
  if name is None:
    return None
  if name not in COMPUTE_DTYPES:
    from jtransfer.errors import InputError
    raise InputError(f"dtype {name!r}: expected one of {', '.join(COMPUTE_DTYPES)} or None")
  return jnp.dtype(name)


def to_compute(module: nn.Module, x: jax.Array) -> jax.Array:
  """Casts the model input to the module's compute dtype (a no-op without one)."""
  dtype = compute_dtype(module.dtype)
  return x if dtype is None else x.astype(dtype)


def tap(module: nn.Module, name: str, value: jax.Array) -> None:
  """Records `value` as the feature tap `name` (no-op unless 'intermediates' is mutable)."""
  # Overwrite rather than append, so a module called once gives a single array, not a tuple.
  module.sow("intermediates", name, value, reduce_fn=lambda _, x: x, init_fn=lambda: None)


def check_truncation(name, valid: Sequence[str]) -> None:
  """Raises InputError unless `name` is None or one of the model's truncation points."""
  if name is not None and name not in valid:
    from jtransfer.errors import InputError
    raise InputError(f"truncate_after {name!r} is not a layer of this model; expected one of "
                     f"{', '.join(valid)}")


def truncated_head(module: nn.Module, x: jax.Array) -> jax.Array:
  """Global average pool of a truncated network's last map, then the `head` Dense layer."""
  tap(module, "last_conv", x)
  x = jnp.mean(x, axis=(1, 2))
  tap(module, "features", x)
  return head(module, x)


def check_spatial(x: jax.Array, arch: str, where: str) -> None:
  """Raises InputError when a downsampling left an empty map (the input is too small)."""
  if x.shape[1] < 1 or x.shape[2] < 1:
    from jtransfer.errors import InputError
    raise InputError(f"{arch}: the input is too small, the map after {where} is "
                     f"{x.shape[1]}x{x.shape[2]}; use larger images or a config with fewer "
                     "stages (e.g. a shorter block_config / stage_sizes)")


def head(module: nn.Module, x: jax.Array) -> jax.Array:
  """The `head` Dense layer, in the module's compute dtype, returning float32 logits."""
  return nn.Dense(module.num_classes, dtype=compute_dtype(module.dtype), name="head")(x).astype(
      jnp.float32)


def _pair(v) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def torch_padding(kernel, padding) -> tuple[tuple[int, int], tuple[int, int]]:
  """Explicit symmetric padding, as torch applies it (SAME pads asymmetrically at stride 2).

  `padding` is an int or an (H, W) pair (Inception's 1x7 / 7x1 convs pad (0, 3) / (3, 0)).
  """
  del kernel
  ph, pw = _pair(padding)
  return ((ph, ph), (pw, pw))


def hard_sigmoid(x: jax.Array) -> jax.Array:
  """torch.nn.Hardsigmoid: relu6(x + 3) / 6 (jax.nn.hard_sigmoid is the same function)."""
  return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


# torch activation -> function. 'hardswish' is x * relu6(x + 3) / 6 (torch.nn.Hardswish).
ACTIVATIONS = {
    "relu": nn.relu,
    "relu6": lambda x: jnp.clip(x, 0.0, 6.0),
    "hardswish": lambda x: x * hard_sigmoid(x),
    "silu": nn.silu,
    "gelu": lambda x: nn.gelu(x, approximate=False),  # torch.nn.GELU() is the exact erf form
}


def activation(name: str):
  """The function registered as `name` in `ACTIVATIONS`."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# How depthwise convolutions are computed: 'auto' (shifted sums on the CPU backend, XLA's grouped
# convolution elsewhere), 'shift' or 'conv'. A module-level switch, not a config field, because
# both give the same function of the same params: tests and benches flip it to compare them.
DEPTHWISE_IMPL = "auto"


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int,
                   padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
  """A depthwise convolution (torch `groups` = channels) as kH x kW shifted, scaled sums.

  Args:
    x: (N, H, W, C) input.
    kernel: (kH, kW, 1, C), Flax's grouped-kernel layout.
    stride: square stride.
    padding: ((top, bottom), (left, right)) zero padding.

  Returns:
    (N, OH, OW, C), accumulated in float32 and cast back to the input's dtype.

  Equal to `lax.conv_general_dilated(..., feature_group_count=C)` up to the order of the
  sums, and so are its gradients (a custom VJP: the input's is the same shifted sum over the
  zero-dilated output gradient with the flipped kernel; the kernel's is accumulated one output
  row at a time, `_kernel_grad`). XLA:CPU runs grouped convolutions through a slow generic
  path: this form, which XLA fuses into one loop over the output, was 8-30x faster forward and
  6-20x faster for both gradients on 2 CPU cores (MobileNet/ConvNeXt shapes,
  bench/DEPTHWISE.md).

  Being a custom VJP, it supports reverse-mode differentiation (grad, vjp, grad of grad)
  but not forward mode (jvp, jacfwd, linearize): set DEPTHWISE_IMPL = 'conv' for those.
  """
  return _depthwise(x, kernel, int(stride), tuple(tuple(int(v) for v in p) for p in padding))


def _shifted_sum(x, kernel, stride, padding):
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  oh = (xp.shape[1] - kh) // stride + 1
  ow = (xp.shape[2] - kw) // stride + 1
  k = kernel.astype(jnp.float32)
  out = None
  for i in range(kh):
    for j in range(kw):
      window = xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
      term = window * k[i, j, 0]
      out = term if out is None else out + term
  return out


def _depthwise_fwd(x, kernel, stride, padding):
  return _shifted_sum(x, kernel, stride, padding).astype(x.dtype), (x, kernel)


def _kernel_grad(x, g, kh, kw, stride, padding):
  """d(sum(out * g)) / d kernel, (kH, kW, 1, C) in float32, one output row per scan step:
  each step reads kH input rows and one row of g for all kH x kW taps (autodiff's form, a
  full-size product and reduction per tap, was 2-3x slower)."""
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  g = g.astype(jnp.float32)
  ow = g.shape[2]

  def row(acc, r):
    rows = jax.lax.dynamic_slice_in_dim(xp, r * stride, kh, axis=1)
    g_row = jax.lax.dynamic_index_in_dim(g, r, axis=1, keepdims=False)
    taps = [jnp.sum(rows[:, i, j:j + stride * (ow - 1) + 1:stride, :] * g_row, axis=(0, 1))
            for i in range(kh) for j in range(kw)]
    return acc + jnp.stack(taps), None

  acc, _ = jax.lax.scan(row, jnp.zeros((kh * kw, g.shape[-1]), jnp.float32),
                        jnp.arange(g.shape[1]))
  return acc.reshape(kh, kw, 1, g.shape[-1])


def _depthwise_bwd(stride, padding, res, g):
  x, kernel = res
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  h, w = x.shape[1:3]
  # d input: scatter g back through each tap = a stride-1 shifted sum of g dilated by the
  # stride, with the kernel flipped, over the padded input's extent; then crop the padding.
  zero = jnp.zeros((), jnp.float32)
  gd = jax.lax.pad(g.astype(jnp.float32), zero,
                   ((0, 0, 0), (0, 0, stride - 1), (0, 0, stride - 1), (0, 0, 0)))
  hp, wp = h + pt + pb, w + pl + pr
  full = ((kh - 1, hp - gd.shape[1]), (kw - 1, wp - gd.shape[2]))
  dxp = _shifted_sum(gd, kernel[::-1, ::-1], 1, full)
  dx = dxp[:, pt:pt + h, pl:pl + w, :]
  dk = _kernel_grad(x, g, kh, kw, stride, padding)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_depthwise = jax.custom_vjp(lambda x, kernel, stride, padding: _depthwise_fwd(
    x, kernel, stride, padding)[0], nondiff_argnums=(2, 3))
_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def use_shifted_depthwise() -> bool:
  """Whether depthwise units compute by `depthwise_conv` (see DEPTHWISE_IMPL)."""
  if DEPTHWISE_IMPL not in ("auto", "shift", "conv"):
    raise ValueError(f"DEPTHWISE_IMPL {DEPTHWISE_IMPL!r}: expected auto, shift or conv")
  return DEPTHWISE_IMPL == "shift" or (DEPTHWISE_IMPL == "auto" and
                                       jax.default_backend() == "cpu")


class DepthwiseConv(nn.Module):
  """nn.Conv with feature_group_count = features = input channels, computed by
  `depthwise_conv`: the same params ('kernel' (kH, kW, 1, C), 'bias'), initialisers and
  dtype handling, so checkpoints, CWL, pruning and weight import see no difference."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = conv_init
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.features:
      raise ValueError(f"depthwise conv: {x.shape[-1]} input channels, {self.features} outputs")
    if self.strides[0] != self.strides[1]:
      raise ValueError(f"depthwise conv: square strides only, got {self.strides}")
    kernel = self.param("kernel", self.kernel_init, (*self.kernel_size, 1, self.features),
                        jnp.float32)
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = depthwise_conv(x, kernel, self.strides[0], self.padding)
    return y if bias is None else y + bias


def conv_layer(x: jax.Array, features: int, kernel, stride: int, padding, use_bias: bool,
               groups: int = 1, dtype: Optional[str] = None, name: str = "conv") -> jax.Array:
  """The conv of a unit applied to `x`: nn.Conv, or `DepthwiseConv` for a depthwise conv
  (groups = input channels = features) when `use_shifted_depthwise()`. A dense conv's
  nn.Conv takes `gemm_conv`'s kernel gradient where `gemm_conv.use_gemm_conv` says so."""
  kernel, strides = _pair(kernel), (int(stride), int(stride))
  pads = torch_padding(kernel, padding)
  if groups > 1 and groups == features == x.shape[-1] and use_shifted_depthwise():
    return DepthwiseConv(features, kernel, strides, pads, use_bias=use_bias,
                         dtype=compute_dtype(dtype), name=name)(x)
  return nn.Conv(features, kernel, strides=strides, padding=pads, use_bias=use_bias,
                 feature_group_count=groups, kernel_init=conv_init,
                 dtype=compute_dtype(dtype), name=name,
                 conv_general_dilated=(gemm_conv.conv_fn(kernel, strides) if groups == 1
                                       else None))(x)


class ConvUnit(nn.Module):
  """Conv, optional BatchNorm, optional activation; taps the raw conv output.

  Attributes:
    features: output channels.
    kernel: kernel size, an int (square) or an (H, W) pair.
    stride: square stride.
    padding: symmetric zero padding on each side (torch convention), int or (H, W) pair.
    use_bn: add BatchNorm after the conv (then the conv has no bias, as in torchvision).
    relu: apply the activation `act` at the end (the name predates other activations).
    dtype: compute dtype name (see `compute_dtype`); None = float32.
    groups: torch's `groups` (feature_group_count): `groups == in channels` is a depthwise
      conv. The kernel is (kH, kW, in / groups, features), as Flax stores grouped kernels.
    act: the activation applied when `relu` is set, a name in `ACTIVATIONS`.
    bn_eps, bn_momentum: BatchNorm epsilon and Flax momentum (= 1 - torch's momentum);
      torchvision's MobileNetV3 / EfficientNet use eps 1e-3, Inception-V3 eps 1e-3.
    use_bias: the conv's bias; None (default) = without BN. DenseNet's convs are followed by
      the next layer's pre-norm, not their own BN, and have no bias.
  """
  features: int
  kernel: int | tuple[int, int] = 3
  stride: int = 1
  padding: int | tuple[int, int] = 1
  use_bn: bool = False
  relu: bool = True
  dtype: Optional[str] = None
  groups: int = 1
  act: str = "relu"
  bn_eps: float = 1e-5
  bn_momentum: float = 0.9
  use_bias: Optional[bool] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = conv_layer(x, self.features, self.kernel, self.stride, self.padding,
                   (not self.use_bn) if self.use_bias is None else self.use_bias,
                   self.groups, self.dtype)
    tap(self, "out", y)
    if self.use_bn:
      y = BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                    epsilon=self.bn_eps, dtype=compute_dtype(self.dtype), name="bn")(y)
    return activation(self.act)(y) if self.relu else y


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
  """Max pooling on NHWC with torch's symmetric -inf padding (floor output size).

  Same values and gradients as `nn.max_pool` (the gradient of each window goes to its first
  maximum in row-major order, as XLA's select_and_scatter and torch do), but the backward
  pass is kernel^2 strided compares and pads that XLA fuses, instead of select_and_scatter:
  on the CPU backend that op took 40 ms for one 128x28x28x32 pool, more than the conv before
  it (docs/decisions.md, "Performance").
  """
  if x.ndim != 4:
    raise ValueError(f"max_pool expects NHWC input, got shape {x.shape}")
  if min(x.shape[1], x.shape[2]) + 2 * padding < kernel:
    raise ValueError(f"max_pool: kernel {kernel} larger than the padded input "
                     f"{tuple(d + 2 * padding for d in x.shape[1:3])}")
  return _max_pool(x, int(kernel), int(stride), int(padding))


def _pool_windows(x, kernel, stride, padding):
  """Each window offset's strided slice of the -inf-padded input, offsets in row-major order."""
  xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
               constant_values=-jnp.inf)
  oh = (xp.shape[1] - kernel) // stride + 1
  ow = (xp.shape[2] - kernel) // stride + 1
  return [xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
          for i in range(kernel) for j in range(kernel)]


def _max_pool_argmax(x, kernel, stride, padding):
  """Pooled values and, per output, the offset index of its window's first maximum."""
  slices = _pool_windows(x, kernel, stride, padding)
  out, index = slices[0], jnp.zeros(slices[0].shape, jnp.int32)
  for k, s in enumerate(slices[1:], start=1):
    better = s > out  # strict: ties keep the earlier offset
    out = jnp.where(better, s, out)
    index = jnp.where(better, k, index)
  return out, index


def max_pool_reduce_window(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
  """`max_pool` through Flax's `nn.max_pool` (XLA reduce_window; its gradient is XLA's
  select_and_scatter). `max_pool`'s undifferentiated forward (frozen features, evaluation),
  where reduce_window is the fastest; bench/bench_pool.py times the two gradients."""
  pads = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (kernel, kernel), strides=(stride, stride), padding=pads)


def _max_pool_fwd(x, kernel, stride, padding):
  out, index = _max_pool_argmax(x, kernel, stride, padding)
  # The winner's index is the residual, not x: re-deriving it in the backward pass by comparing
  # x with the output would break wherever XLA recomputes x with different rounding.
  # (the input's height and width ride along as a zero-size array: residuals must be arrays)
  return out, (index, jnp.zeros((x.shape[1], x.shape[2], 0), jnp.int8))


def _max_pool_bwd(kernel, stride, padding, res, g):
  index, hw = res
  (n, oh, ow, c), (h, w) = g.shape, hw.shape[:2]
  hp, wp = h + 2 * padding, w + 2 * padding
  zero = jnp.zeros((), g.dtype)
  dxp = jnp.zeros((n, hp, wp, c), g.dtype)
  for k in range(kernel * kernel):
    i, j = divmod(k, kernel)
    # scatter g to this offset's strided positions: a pad with (stride - 1) interior zeros
    rows = (i, hp - i - stride * (oh - 1) - 1, stride - 1)
    cols = (j, wp - j - stride * (ow - 1) - 1, stride - 1)
    contrib = jnp.where(index == k, g, zero)
    dxp = dxp + jax.lax.pad(contrib, zero, ((0, 0, 0), rows, cols, (0, 0, 0)))
  return (dxp[:, padding:padding + h, padding:padding + w, :],)


_max_pool = jax.custom_vjp(max_pool_reduce_window, nondiff_argnums=(1, 2, 3))
_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def adaptive_avg_pool(x: jax.Array, output_size: Sequence[int]) -> jax.Array:
  """torch.nn.AdaptiveAvgPool2d on NHWC: cell i spans [floor(i*H/o), ceil((i+1)*H/o))."""
  h, w = x.shape[1], x.shape[2]
  oh, ow = output_size
  if (h, w) == (oh, ow):
    return x
  if h % oh == 0 and w % ow == 0:  # equal cells: one reshape, no gather
    n, c = x.shape[0], x.shape[3]
    return x.reshape(n, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))
  rows = []
  for i in range(oh):
    r0, r1 = (i * h) // oh, -(-((i + 1) * h) // oh)
    cols = []
    for j in range(ow):
      c0, c1 = (j * w) // ow, -(-((j + 1) * w) // ow)
      cols.append(x[:, r0:r1, c0:c1, :].mean(axis=(1, 2)))
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)
