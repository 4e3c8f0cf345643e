"""BatchNorm whose eval mode is one per-channel affine map with a hand-written VJP.

With running statistics, BatchNorm is y = x * a + c, with a = scale / sqrt(var + eps) and
c = bias - mean * a. Flax's `nn.BatchNorm` computes it as
`(x - mean) * (scale * rsqrt(var + eps)) + bias`; autodiff of that form saves `x - mean` as
one more activation-sized buffer per BN (the scale's gradient reads it), and XLA fuses the
subtraction and both products into every consumer of the BN output again (the forward, each
kernel gradient's layout transpose, each ReLU mask of the backward pass). `affine`'s VJP reads
only its input x, the convolution's output, which is in memory anyway:
d x = g a, d a = sum(g x), d c = sum(g) (sums over every axis but the channel's); the gradients
of scale, bias, mean and var follow from a and c, (C,) vectors, by autodiff. On resnet_s's
finetune step the step took 0.89-0.92x the CPU time (bench/REST.md, loaded machine).

Train mode (batch statistics, running averages updated) is Flax's code, unchanged, so
`finetune_bn` and pre-training keep `nn.BatchNorm`'s numerics. The variables are Flax's
(params `scale`, `bias`; batch_stats `mean`, `var`), so checkpoints, surgery, weight import and
every method that finds BN by path see no difference. `affine` is a custom VJP: reverse mode
(grad, vjp) only; set EVAL_IMPL = 'flax' for `jax.jvp` through an eval-mode BN.
"""
from __future__ import annotations

import inspect
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_F32 = jnp.float32

# 'affine' (the form above) or 'flax' (nn.BatchNorm's eval mode, the library's form before).
# A module-level switch, not a config field, as common.DEPTHWISE_IMPL: both compute the same
# function of the same variables, and tests and bench/bench_rest.py flip it to compare them.
EVAL_IMPL = "affine"


def use_affine() -> bool:
  """Whether eval-mode `BatchNorm` computes by `affine` (EVAL_IMPL)."""
  if EVAL_IMPL not in ("affine", "flax"):
    raise ValueError(f"EVAL_IMPL {EVAL_IMPL!r}: expected affine or flax")
  return EVAL_IMPL == "affine"


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
  # both channel sums read g and x once: XLA fuses them into one multi-output reduction
  return (g * a).astype(x.dtype), jnp.sum(g * x.astype(_F32), axis=axes), jnp.sum(g, axis=axes)


affine.defvjp(_affine_fwd, _affine_bwd)


_FLAX_CALL = inspect.unwrap(nn.BatchNorm.__call__)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` whose eval mode is `affine` (same fields, variables and output dtype).

  Only the default configuration (features last, scale and bias on, float32 reductions, no
  mask) takes the `affine` path; anything else, train mode, and EVAL_IMPL = 'flax' are
  `nn.BatchNorm.__call__`.
  """

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    eval_mode = nn.merge_param("use_running_average", self.use_running_average,
                               use_running_average)
    if not (eval_mode and use_affine() and mask is None and self.axis == -1
            and self.use_scale and self.use_bias and self.force_float32_reductions):
      # Flax's body, unwrapped: through the wrapped method, interceptors (SSF's, FiLM's by
      # module path) would see this module's __call__ twice and apply themselves twice
      return _FLAX_CALL(self, x, use_running_average=use_running_average, mask=mask)
    features = (x.shape[-1],)
    mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, _F32), features)
    var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, _F32), features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    a = scale.astype(_F32) * lax.rsqrt(var.value.astype(_F32) + self.epsilon)
    c = bias.astype(_F32) - mean.value.astype(_F32) * a
    # Flax's output dtype: the module's dtype, else x's promoted with the params'
    dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
    return affine(x, a, c).astype(dtype)
