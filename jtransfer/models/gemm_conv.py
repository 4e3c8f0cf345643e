"""Dense (groups = 1) convolutions whose kernel gradient is one patch-matrix GEMM.

A drop-in for `lax.conv_general_dilated` that nn.Conv takes as its `conv_general_dilated`
field, so the module, its params, its initialisers and every `isinstance(m, nn.Conv)`
interceptor (CWL, FiLM, DELTA) stay as they are. The forward is XLA's convolution, the input
gradient is autodiff's (XLA's transposed convolution); the kernel gradient is
`patches^T @ dy`, with the patch matrix built from kH x kW strided slices of the padded input
(im2col, as `lax.conv_general_dilated_patches` lays it out but in (kH, kW, C) order, which is
the HWIO kernel's) and one dot accumulating in float32.

Where it pays (bench/CONVS.md, bench/bench_convs.py --conv-impl): XLA:CPU computes the kernel
gradient of a 1x1 convolution as a generic backward-filter convolution, 1.5-3x slower than
the plain dot it is. For kernels larger than 1x1 the patch matrix is kH*kW times the input,
and building it costs more than the GEMM saves: 3x3 layers at 28x28 measured 3-6x slower, at
7x7 and 4x4 about even. So 'auto' uses it for 1x1 kernels on the CPU backend only.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

# 'auto' (the GEMM kernel gradient for 1x1 kernels on the CPU backend, XLA's convolution
# otherwise), 'gemm' (every dense conv) or 'xla' (never). A module-level switch, not a config
# field, because all give the same function of the same params (as common.DEPTHWISE_IMPL);
# the environment variable JTRANSFER_CONV_IMPL, when set, overrides it.
CONV_IMPL = "auto"
IMPLS = ("auto", "gemm", "xla")
_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_impl() -> str:
  """The implementation in force: $JTRANSFER_CONV_IMPL if set, else CONV_IMPL."""
  impl = os.environ.get("JTRANSFER_CONV_IMPL") or CONV_IMPL
  if impl not in IMPLS:
    raise ValueError(f"conv implementation {impl!r}: expected one of {', '.join(IMPLS)}")
  return impl


def use_gemm_conv(kernel_size: Sequence[int]) -> bool:
  """Whether a dense conv with this kernel size computes its kernel gradient as a GEMM."""
  impl = conv_impl()
  if impl == "auto":
    return tuple(kernel_size) == (1, 1) and jax.default_backend() == "cpu"
  return impl == "gemm"


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
  return dense_conv(lhs, rhs, window_strides, padding, precision)


def dense_conv(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
               padding, precision=None) -> jax.Array:
  """An NHWC x HWIO convolution, equal to `lax.conv_general_dilated` in value and gradients.

  Args:
    x: (N, H, W, C) input.
    kernel: (kH, kW, C, O).
    strides: (sH, sW).
    padding: 'SAME', 'VALID' or ((top, bottom), (left, right)) (non-negative).
    precision: passed to XLA's convolution (forward and input gradient) and to the dot.

  Returns:
    (N, OH, OW, O) in x's dtype. The kernel gradient accumulates in float32 (XLA's
    convolution of bfloat16 operands rounds it to bfloat16), then is cast to the kernel's
    dtype. A custom VJP: reverse mode only (set CONV_IMPL = 'xla' for jvp / jacfwd).
  """
  strides = tuple(int(s) for s in strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  if min(min(p) for p in padding) < 0:
    raise ValueError(f"dense_conv: negative padding {padding}")
  return _dense(x, kernel, strides, padding, precision)


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


def _dense_fwd(x, kernel, strides, padding, precision):
  return _forward(x, kernel, strides, padding, precision), (x, kernel)


def _dense_bwd(strides, padding, precision, res, g):
  x, kernel = res
  kh, kw, c, o = kernel.shape
  _, conv_vjp = jax.vjp(lambda v: _forward(v, kernel, strides, padding, precision), x)
  (dx,) = conv_vjp(g)
  patches = patch_matrix(x, (kh, kw), strides, padding)
  dk = lax.dot_general(patches, g.reshape(-1, o), (((0,), (0,)), ((), ())),
                       precision=precision, preferred_element_type=jnp.float32)
  return dx, dk.reshape(kh, kw, c, o).astype(kernel.dtype)


_dense = jax.custom_vjp(_forward, nondiff_argnums=(2, 3, 4))
_dense.defvjp(_dense_fwd, _dense_bwd)


def conv_fn(kernel_size: Sequence[int]) -> Optional[object]:
  """The `conv_general_dilated` for an nn.Conv of this kernel size: this module's when
  `use_gemm_conv`, else None (nn.Conv's default, lax's)."""
  return conv_general_dilated if use_gemm_conv(kernel_size) else None
