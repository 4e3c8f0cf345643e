"""Dense (groups = 1) convolutions whose kernel gradient is a patch-matrix GEMM.

A drop-in for `lax.conv_general_dilated` that nn.Conv takes as its `conv_general_dilated`
field, so the module, its params, its initialisers and every `isinstance(m, nn.Conv)`
interceptor (CWL, FiLM, DELTA) stay as they are. The forward is XLA's convolution, the input
gradient is autodiff's (XLA's transposed convolution); the kernel gradient is
`patches^T @ dy`, with the patch matrix built from kH x kW strided slices of the padded input
(im2col, as `lax.conv_general_dilated_patches` lays it out but in (kH, kW, C) order, which is
the HWIO kernel's) and a dot accumulating in float32.

Kernels larger than 1x1 take the patch matrix in chunks of `CHUNK` images (a scan), laid
out transposed, (kH * kW * C, chunk * OH * OW), so that each chunk's patches stay in the
last-level cache and the GEMM's long dimension is contiguous: the whole matrix is kH*kW times
the input (115 MB at 128x28x28x32) and writing it out cost 3-6x XLA's kernel gradient; the
chunked form costs 1.1-2x (docs/decisions.md, "Dense-conv filter gradients").

Where it pays is `AUTO_GEMM`, a table by kernel size and stride measured on this project's
CPU (2-core AMD EPYC, AVX2, jaxlib 0.10.2): XLA:CPU computes the kernel gradient of a 1x1
convolution as a generic backward-filter convolution, 1.5-3x slower than the plain dot it is;
for 3x3 kernels XLA's backward-filter convolution (a CHWN batch-as-feature convolution whose
patches Eigen packs on the fly) beat every patch-GEMM form measured (in CPU time; the
one-channel stems tie).

The 3x3 layers with 32+ channels get a faster kernel gradient from outside XLA's ops: the
native im2col + sgemm custom call of `ffi_conv`, built on first use; 'auto' routes those
layers through this module's hook (`conv_fn`), which picks per call, from the input's shape,
between the native kernel, the GEMM and XLA's (`kernel_gradient_impl`).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jtransfer.models import ffi_conv

# 'auto' (on the CPU backend, the native kernel gradient where `takes_native` says so and it
# is built and jax sees one device, the GEMM where AUTO_GEMM says so, XLA's convolution
# otherwise), 'gemm' (the GEMM on every dense conv), 'ffi' (the native kernel on every dense
# conv where 'auto' could take it at all, else as 'auto') or 'xla' (never). A module-level switch, not a config field, because all give the
# same function of the same params (as common.DEPTHWISE_IMPL); the environment variable
# JTRANSFER_CONV_IMPL, when set, overrides it.
CONV_IMPL = "auto"
IMPLS = ("auto", "gemm", "ffi", "xla")
_NHWC = ("NHWC", "HWIO", "NHWC")
# Images per chunk of the patch matrix for kernels > 1x1: 16 x 28x28 x 9 x 32 floats = 14 MB,
# inside the 32 MB last-level cache. Of 16/32/64, 16 took the least CPU time on 6 of the 10
# 3x3 layers of vgg_s / resnet_s and was within 35% of the best on the others (loaded).
CHUNK = 16


def conv_impl() -> str:
  """The implementation in force: $JTRANSFER_CONV_IMPL if set, else CONV_IMPL."""
  impl = os.environ.get("JTRANSFER_CONV_IMPL") or CONV_IMPL
  if impl not in IMPLS:
    raise ValueError(f"conv implementation {impl!r}: expected one of {', '.join(IMPLS)}")
  return impl


# 'auto's choice on the CPU backend, by (kernel, stride): True where the patch GEMM's kernel
# gradient measured faster than XLA's backward-filter convolution on the layers of vgg_s /
# resnet_s with that kernel and stride (batch 128, the two interleaved in one process, on a
# loaded 2-core machine, so ratios only; bench/CONVS.md and docs/decisions.md, "Dense-conv
# filter gradients"). GEMM / XLA time:
#   1x1, strides 1 and 2 (14x14x32->64, 7x7x64->128, 14x14x64->128):  0.3-0.7 wall
#   3x3 stride 1, 32-128 channels (28x28 .. 4x4):   1.14-1.77 wall, 1.2-2.0 CPU time
#   3x3 stride 2, 32-64 channels (14x14, 7x7):      0.85-1.22 wall, 1.27-1.29 CPU time
#   3x3 one-channel stems (28x28x1, strides 1, 2):  0.68-3.2 wall, 0.97-0.99 CPU time: even
# so every 3x3 layer keeps XLA's. A (kernel, stride) not listed (7x7 stems, unequal strides)
# keeps XLA's too. Off the CPU backend 'auto' never takes the GEMM (XLA's GPU/TPU
# convolutions have their own backward-filter kernels).
AUTO_GEMM = {((1, 1), 1): True, ((1, 1), 2): True,
             ((3, 3), 1): False, ((3, 3), 2): False}


def use_gemm_conv(kernel_size: Sequence[int], strides: Sequence[int] = (1, 1)) -> bool:
  """Whether a dense conv with this kernel size and stride computes its kernel gradient as a
  GEMM: 'gemm' always, 'xla' never, 'auto' where `AUTO_GEMM` says so on the CPU backend."""
  impl = conv_impl()
  if impl in ("auto", "ffi"):
    strides = tuple(int(v) for v in strides)
    key = (tuple(int(v) for v in kernel_size), strides[0] if len(set(strides)) == 1 else strides)
    return AUTO_GEMM.get(key, False) and jax.default_backend() == "cpu"
  return impl == "gemm"


# 'auto' takes the native kernel gradient (ffi_conv) for 3x3 kernels with at least
# NATIVE_MIN_CHANNELS input channels and NATIVE_MIN_POSITIONS output positions per image:
# there it took 0.65-0.87x XLA's CPU time on every such layer of vgg_s / resnet_s (28x28 ..
# 7x7 outputs, strides 1 and 2), and 1.02-1.16x on the two 4x4-output layers and 1.6x on
# the one-channel stems (bench/FFI_FILTER.md, loaded; docs/decisions.md, "Dense-conv filter
# gradients").
NATIVE_MIN_CHANNELS = 32
NATIVE_MIN_POSITIONS = 49


def takes_native(kernel_hw: Sequence[int], in_channels: int, out_hw: Sequence[int]) -> bool:
  """Whether 'auto' computes this conv's kernel gradient natively (when the kernel is built):
  a 3x3 kernel, `NATIVE_MIN_CHANNELS`+ input channels, `NATIVE_MIN_POSITIONS`+ output
  positions per image."""
  return (tuple(kernel_hw) == (3, 3) and in_channels >= NATIVE_MIN_CHANNELS
          and out_hw[0] * out_hw[1] >= NATIVE_MIN_POSITIONS)


def _native_possible() -> bool:
  # One device only: the custom call has no partitioning rule, so under a sharded step XLA
  # would gather the batch onto every device and repeat the whole kernel gradient there.
  return jax.default_backend() == "cpu" and jax.device_count() == 1 and ffi_conv.available()


def kernel_gradient_impl(x_shape: Sequence[int], kernel_shape: Sequence[int],
                         strides: Sequence[int], padding) -> str:
  """'native', 'gemm' or 'xla': how the conv hook (`conv_general_dilated`) computes the kernel
  gradient of an NHWC x HWIO conv of these shapes, strides and ((top, bottom), (left, right))
  padding under the implementation in force."""
  out_hw = [(x_shape[1 + a] + sum(padding[a]) - kernel_shape[a]) // strides[a] + 1
            for a in (0, 1)]
  impl = conv_impl()
  if impl == "xla":
    return "xla"
  if impl == "gemm":
    return "gemm"
  if _native_possible() and (impl == "ffi" or takes_native(kernel_shape[:2], x_shape[-1],
                                                            out_hw)):
    return "native"
  return "gemm" if use_gemm_conv(kernel_shape[:2], strides) else "xla"


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with the patch-GEMM kernel gradient (`dense_conv`) for 2-D
  NHWC/HWIO convolutions without dilation or groups; any other call goes to lax unchanged."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and preferred_element_type is None
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
           == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  strides, pads = _normalise(lhs, rhs, window_strides, padding)
  # a crop (negative padding) is lax's own business, as is XLA's kernel gradient
  how = "xla" if min(min(p) for p in pads) < 0 else kernel_gradient_impl(
      lhs.shape, rhs.shape, strides, pads)
  if how == "xla":
    return _forward(lhs, rhs, strides, pads, precision)
  return _dense(lhs, rhs, strides, pads, precision, how)


def _normalise(x, kernel, strides, padding):
  """(strides, ((top, bottom), (left, right))) as int tuples."""
  strides = tuple(int(s) for s in strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  return strides, tuple((int(lo), int(hi)) for lo, hi in padding)


def dense_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
               padding, precision=None, kernel_grad: str = "gemm") -> jax.Array:
  """An NHWC x HWIO convolution, equal to `lax.conv_general_dilated` in value and gradients.

  Args:
    x: (N, H, W, C) input.
    kernel: (kH, kW, C, O).
    strides: (sH, sW).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)) (non-negative).
    precision: passed to XLA's convolution (forward and input gradient) and to the dot.
    kernel_grad: how the kernel gradient is computed: 'gemm' (`kernel_gradient`), 'native'
      (`ffi_conv.kernel_gradient`; requires `ffi_conv.available()`) or 'xla' (autodiff of
      XLA's convolution).

  Returns:
    (N, OH, OW, O) in x's dtype. The kernel gradient accumulates in float32 (XLA's
    convolution of bfloat16 operands rounds it to bfloat16), then is cast to the kernel's
    dtype. A custom VJP: reverse mode only, gradients of gradients included (set
    CONV_IMPL = 'xla', or JTRANSFER_CONV_IMPL=xla, for jvp / jacfwd).
  """
  if kernel_grad not in ("gemm", "native", "xla"):
    raise ValueError(f"dense_conv: kernel_grad {kernel_grad!r}: expected gemm, native or xla")
  strides, padding = _normalise(x, kernel, strides, padding)
  if min(min(p) for p in padding) < 0:
    raise ValueError(f"dense_conv: negative padding {padding}")
  return _dense(x, kernel, strides, padding, precision, kernel_grad)


def _forward(x, kernel, strides, padding, precision):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_NHWC,
                                  precision=precision)


def patch_matrix(x: jax.Array, kernel_hw: tuple[int, int], strides: Sequence[int],
                 padding) -> jax.Array:
  """(N * OH * OW, kH * kW * C) im2col matrix, columns in (kH, kW, C) order (HWIO's rows)."""
  (kh, kw), (sh, sw) = kernel_hw, strides
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))) if any(padding[0] + padding[1]) else x
  oh = (xp.shape[1] - kh) // sh + 1
  ow = (xp.shape[2] - kw) // sw + 1
  taps = [xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  return patches.reshape(-1, patches.shape[-1])


def _dense_primal(x, kernel, strides, padding, precision, kernel_grad):
  del kernel_grad  # how the backward pass runs, not what the forward computes
  return _forward(x, kernel, strides, padding, precision)


def _dense_fwd(x, kernel, strides, padding, precision, kernel_grad):
  return _forward(x, kernel, strides, padding, precision), (x, kernel)


def _dense_bwd(strides, padding, precision, kernel_grad, res, g):
  x, kernel = res
  if kernel_grad == "xla":
    _, conv_vjp = jax.vjp(lambda v, k: _forward(v, k, strides, padding, precision), x, kernel)
    return conv_vjp(g)
  _, conv_vjp = jax.vjp(lambda v: _forward(v, kernel, strides, padding, precision), x)
  (dx,) = conv_vjp(g)
  if kernel_grad == "native":
    dk = ffi_conv.kernel_gradient(x, g, kernel.shape[:2], strides, padding)
  else:
    dk = kernel_gradient(x, g, kernel.shape[:2], strides, padding, precision)
  return dx, dk.astype(kernel.dtype)


def kernel_gradient(x: jax.Array, dy: jax.Array, kernel_hw: tuple[int, int],
                    strides: Sequence[int], padding, precision=None,
                    chunk: Optional[int] = None) -> jax.Array:
  """(kH, kW, C, O) float32 gradient of an NHWC x HWIO convolution's kernel, given its input
  `x` and output cotangent `dy`: dk[i, j, c, o] = sum over n, h, w of
  x_pad[n, s*h + i, s*w + j, c] * dy[n, h, w, o].

  A 1x1 kernel is one dot (its patch matrix is the strided input itself). A larger one sums
  `patches_T @ dy` over chunks of `chunk` images (default `CHUNK`; the batch is zero-padded
  to a multiple, which adds nothing), `patches_T` being the chunk's (kH * kW * C, chunk * OH *
  OW) transposed patch matrix: a chunk's patches stay in cache instead of 9x the input going
  through memory. Products accumulate in float32 (bfloat16 inputs included).
  """
  (kh, kw), padding = kernel_hw, tuple(tuple(p) for p in padding)
  o = dy.shape[-1]
  dims = (((1,), (0,)), ((), ()))
  if (kh, kw) == (1, 1) or chunk == 0:
    patches = patch_matrix(x, (kh, kw), strides, padding)
    return lax.dot_general(patches, dy.reshape(-1, o), (((0,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32
                           ).reshape(kh, kw, x.shape[-1], o)
  n, oh, ow = dy.shape[:3]
  chunk = min(chunk or CHUNK, n)
  m = -(-n // chunk)
  (pt, pb), (pl, pr) = padding
  xp = jnp.pad(x, ((0, m * chunk - n), (pt, pb), (pl, pr), (0, 0)))
  dyp = jnp.pad(dy, ((0, m * chunk - n), (0, 0), (0, 0), (0, 0)))
  # (m, C, chunk, Hp, Wp): one transpose up front, so each chunk's taps are plain slices.
  xs = xp.reshape(m, chunk, *xp.shape[1:]).transpose(0, 4, 1, 2, 3)
  dys = dyp.reshape(m, chunk * oh * ow, o)
  (sh, sw) = strides

  def one_chunk(acc, args):
    xc, dyc = args
    taps = [xc[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
    patches_t = jnp.stack(taps).reshape(kh * kw * xc.shape[0], -1)  # rows in HWIO's order
    return acc + lax.dot_general(patches_t, dyc, dims, precision=precision,
                                 preferred_element_type=jnp.float32), None

  acc = jnp.zeros((kh * kw * x.shape[-1], o), jnp.float32)
  if m == 1:
    acc, _ = one_chunk(acc, (xs[0], dys[0]))
  else:
    acc, _ = lax.scan(one_chunk, acc, (xs, dys))
  return acc.reshape(kh, kw, x.shape[-1], o)


_dense = jax.custom_vjp(_dense_primal, nondiff_argnums=(2, 3, 4, 5))
_dense.defvjp(_dense_fwd, _dense_bwd)


def conv_fn(kernel_size: Sequence[int], strides: Sequence[int] = (1, 1)) -> Optional[object]:
  """The `conv_general_dilated` for an nn.Conv of this kernel size and stride: this module's
  when `use_gemm_conv` or when the native kernel gradient may apply (decided per call, from
  the input's shape, by `kernel_gradient_impl`), else None (nn.Conv's default, lax's)."""
  impl = conv_impl()
  native = (impl == "ffi" or (impl == "auto" and tuple(int(k) for k in kernel_size) == (3, 3)))
  if use_gemm_conv(kernel_size, strides) or (native and _native_possible()):
    return conv_general_dilated
  return None
