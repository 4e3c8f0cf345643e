"""Eval-mode BatchNorm and ReLU with hand-written VJPs that save what PyTorch's save.

With running statistics, BatchNorm is the per-channel affine map y = x * a + c, with
a = scale / sqrt(var + eps) and c = bias - mean * a. Flax's `nn.BatchNorm` computes it as
`(x - mean) * (scale * rsqrt(var + eps)) + bias`, and autodiff of that (and of `nn.relu`,
whose gradient is a select on its input) leaves XLA an elementwise chain per residual stage
(stem BN, ReLU, each block's BN, add, ReLU) that its fusion pass duplicates into every consumer:
the forward, each kernel gradient's layout transpose, each ReLU mask in the backward pass, and
a saved `x - mean` per BN (bench/REST.md has the compiled step's per-op profile before and
after). Here:

  * `BatchNorm` (a `nn.BatchNorm`: same fields, params `scale`/`bias`, statistics
    `mean`/`var`) computes eval mode as `affine`, whose VJP reads only its input x:
    d x = g a, d a = sum(g x), d c = sum(g) (sums over all but the channel axis); the
    gradients of scale, bias, mean and var follow from a and c by autodiff. Train mode
    (batch statistics, running averages updated) is Flax's, unchanged.
  * `relu` is max(x, 0) whose VJP reads its output y (torch's `threshold_backward(g, y, 0)`):
    g where y > 0, else 0, the same as `nn.relu`'s gradient (0 at x = 0 and for NaN). y is
    the next layer's input, in memory anyway, so the backward pass needs nothing recomputed.

Both are custom VJPs: reverse mode (grad, vjp) only; `jax.jvp` through them raises.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32


# 'vjp' (the forms above) or 'autodiff' (nn.BatchNorm's eval mode and nn.relu, as before).
# A module-level switch, not a config field, as common.DEPTHWISE_IMPL: both compute the same
# function of the same variables, and tests and bench/bench_rest.py flip it to compare them.
EPILOGUE_IMPL = "vjp"


def use_vjp() -> bool:
  """Whether BatchNorm's eval mode and `relu` take the hand-written VJPs (EPILOGUE_IMPL)."""
  if EPILOGUE_IMPL not in ("vjp", "autodiff"):
    raise ValueError(f"EPILOGUE_IMPL {EPILOGUE_IMPL!r}: expected vjp or autodiff")
  return EPILOGUE_IMPL == "vjp"


def relu(x: jax.Array) -> jax.Array:
  """max(x, 0); its gradient is computed from the output (see the module docstring)."""
  return _relu(x) if use_vjp() else nn.relu(x)


@jax.custom_vjp
def _relu(x):
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _relu_fwd(x):
  y = _relu(x)
  return y, y


def _relu_bwd(y, g):
  return (jnp.where(y > 0, g, jnp.zeros((), g.dtype)),)


_relu.defvjp(_relu_fwd, _relu_bwd)


@jax.custom_vjp
def affine(x: jax.Array, a: jax.Array, c: jax.Array) -> jax.Array:
  """`x * a + c` over the last (channel) axis, computed and returned in float32.

  Args:
    x: (..., C) activations, any float dtype.
    a, c: (C,) float32 scale and shift.
  """
  return x.astype(_F32) * a + c


def _affine_fwd(x, a, c):
  return affine(x, a, c), (x, a)


def _affine_bwd(res, g):
  x, a = res
  g = g.astype(_F32)
  axes = tuple(range(g.ndim - 1))
  # one pass over g and x for both channel sums (XLA fuses them into one reduction)
  return (g * a).astype(x.dtype), jnp.sum(g * x.astype(_F32), axis=axes), jnp.sum(g, axis=axes)


affine.defvjp(_affine_fwd, _affine_bwd)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` whose eval mode is `affine` (same fields, variables and output dtype).

  Only the default configuration (features last, scale and bias on, no mask) takes the
  `affine` path; anything else, train mode, and EPILOGUE_IMPL = 'autodiff' are
  `nn.BatchNorm.__call__`.
  """

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    eval_mode = nn.merge_param("use_running_average", self.use_running_average,
                               use_running_average)
    if not (eval_mode and use_vjp() and mask is None and self.axis == -1 and self.use_scale
            and self.use_bias and self.force_float32_reductions):
      return super().__call__(x, use_running_average=use_running_average, mask=mask)
    features = (x.shape[-1],)
    mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, _F32), features)
    var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, _F32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    # (C,) vectors: autodiff carries d a and d c back to scale, bias, mean and var
    a = scale.astype(_F32) * lax.rsqrt(var.value.astype(_F32) + self.epsilon)
    c = bias.astype(_F32) - mean.value.astype(_F32) * a
    # Flax's output dtype: the module's dtype, else x's promoted with the params'
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    return affine(x, a, c).astype(dtype)
