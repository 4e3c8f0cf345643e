"""Dense convolutions with the patch-GEMM kernel gradient (models.gemm_conv): the same value
and gradients as XLA's convolution, the same params and models, and 'auto's choice."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models
from jtransfer.models import common, gemm_conv
from conv_helpers import (CASES, check_equal_to_xla, loss_and_grads, numpy_kernel_gradient,
                          value_and_grads, xla_conv)


_xla, _value_and_grads = xla_conv, value_and_grads


@pytest.mark.parametrize("k,stride,padding,shape", CASES)
def test_equal_to_xla_in_value_and_both_gradients(k, stride, padding, shape):
  check_equal_to_xla(gemm_conv.dense_conv, k, stride, padding, shape)


def test_kernel_gradient_against_numpy():
  """The im2col formula itself, in float64: dk[i, j, c, o] = sum x_pad[n, s*h+i, s*w+j, c] *
  dy[n, h, w, o]."""
  x, dy, want = numpy_kernel_gradient(2, 5, seed=3)
  kernel = jnp.zeros((3, 3, 3, 5))
  _, vjp = jax.vjp(lambda k: gemm_conv.dense_conv(jnp.asarray(x, jnp.float32), k, (2, 2),
                                                  ((1, 1), (1, 1))), kernel)
  np.testing.assert_allclose(vjp(jnp.asarray(dy, jnp.float32))[0], want, rtol=1e-5, atol=1e-5)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _kernel_grads(x, dy, kernel_hw, strides, padding, chunks):
  """([gemm_conv.kernel_gradient for each chunk size], XLA's kernel gradient), one compile."""
  pads = jax.lax.padtype_to_pads(x.shape[1:3], kernel_hw, strides, padding)
  got = [gemm_conv.kernel_gradient(x, dy, kernel_hw, strides, pads, chunk=c) for c in chunks]
  kernel = jnp.zeros((*kernel_hw, x.shape[-1], dy.shape[-1]), x.dtype)
  want = jax.vjp(lambda k: _xla(x, k, strides, padding), kernel)[1](dy)[0]
  return got, want


@pytest.mark.parametrize("k,stride,padding", [
    (1, 1, "VALID"), (1, 2, "SAME"), (3, 1, "SAME"), (3, 2, "SAME"), (3, 2, "VALID"),
    (7, 2, "SAME"), (7, 1, "VALID")])
def test_chunked_kernel_gradient_equals_xla(k, stride, padding):
  """Chunks of 2 over a batch of 5 (three chunks, the last zero-padded), one chunk and the
  unchunked patch matrix (chunk 0) all give XLA's kernel gradient to float32 rounding."""
  g = np.random.default_rng(k + stride)
  x = jnp.asarray(g.normal(size=(5, 11, 10, 3)), jnp.float32)
  oh, ow = jax.eval_shape(lambda a: _xla(a, jnp.zeros((k, k, 3, 4)), (stride, stride),
                                         padding), x).shape[1:3]
  dy = jnp.asarray(g.normal(size=(5, oh, ow, 4)), jnp.float32)
  gots, want = _kernel_grads(x, dy, (k, k), (stride, stride), padding, (2, 5, 0))
  for got in gots:
    assert got.shape == want.shape == (k, k, 3, 4) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_bfloat16_kernel_gradient_accumulates_in_float32():
  g = np.random.default_rng(0)
  x = jnp.asarray(g.normal(size=(4, 12, 12, 16)), jnp.bfloat16)
  kernel = jnp.asarray(g.normal(size=(3, 3, 16, 8)), jnp.bfloat16)
  cot = jnp.asarray(g.normal(size=(4, 12, 12, 8)), jnp.bfloat16)
  # bfloat16 operands, float32 products and sums, over chunks too
  f32 = lambda a: a.astype(jnp.float32)
  chunked = gemm_conv.kernel_gradient(x, cot, (3, 3), (1, 1), ((1, 1), (1, 1)), chunk=3)
  exact32 = gemm_conv.kernel_gradient(f32(x), f32(cot), (3, 3), (1, 1), ((1, 1), (1, 1)))
  assert chunked.dtype == jnp.float32
  np.testing.assert_allclose(chunked, exact32, rtol=1e-5, atol=1e-4)
  got = _value_and_grads(gemm_conv.dense_conv, x, kernel, (1, 1), "SAME", cot)
  assert [a.dtype for a in got] == [jnp.bfloat16] * 3
  exact = _value_and_grads(_xla, f32(x), f32(kernel), (1, 1), "SAME", f32(cot))
  # float32 accumulation: within bfloat16's rounding of the exact sum (2^-8 relative)
  np.testing.assert_allclose(f32(got[2]), exact[2], rtol=2 ** -8, atol=1e-3)
  np.testing.assert_allclose(f32(got[0]), exact[0], rtol=2e-2, atol=0.2)


def test_other_convolutions_go_to_lax_unchanged():
  g = np.random.default_rng(1)
  x = jnp.asarray(g.normal(size=(2, 8, 8, 4)), jnp.float32)
  kernel = jnp.asarray(g.normal(size=(3, 3, 2, 6)), jnp.float32)
  kwargs = dict(window_strides=(1, 1), padding="SAME", feature_group_count=2,
                rhs_dilation=(2, 2), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_array_equal(gemm_conv.conv_general_dilated(x, kernel, **kwargs),
                                jax.lax.conv_general_dilated(x, kernel, **kwargs))


def _conv_fns(model, shape):
  """{module path: its conv_general_dilated} of every nn.Conv the model applies."""
  found = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      found["/".join(context.module.path)] = (context.module.kernel_size,
                                               context.module.conv_general_dilated)
    return next_fun(*args, **kwargs)

  # model.init itself, not models.init_model: that one reuses a jitted init cached per
  # (model, shape), which another test in the same worker may have traced already, and a
  # cached trace calls no module for the interceptor to see.
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape)),
                                      train=False))
  return found


def test_auto_follows_its_table_on_cpu(monkeypatch):
  """'auto' takes the GEMM where AUTO_GEMM says it measured faster (1x1 kernels), XLA's
  convolution elsewhere (3x3, and any (kernel, stride) not in the table, e.g. 7x7). The native
  kernel gradient is off here (its own choices: tests/test_ffi_conv.py)."""
  monkeypatch.delenv("JTRANSFER_CONV_IMPL", raising=False)
  monkeypatch.setenv("JTRANSFER_NATIVE", "0")
  monkeypatch.setattr(gemm_conv, "CONV_IMPL", "auto")
  fns = _conv_fns(models.get_model("resnet_s", 5), (28, 28, 1))
  on_cpu = jax.default_backend() == "cpu"
  assert any(k == (1, 1) for k, _ in fns.values())
  for kernel, fn in fns.values():
    assert (fn is gemm_conv.conv_general_dilated) == (kernel == (1, 1) and on_cpu)
  assert not gemm_conv.use_gemm_conv((7, 7), (2, 2))
  assert not gemm_conv.use_gemm_conv((1, 1), (1, 2))  # unequal strides: not in the table
  monkeypatch.setitem(gemm_conv.AUTO_GEMM, ((3, 3), 2), True)
  assert gemm_conv.use_gemm_conv((3, 3), (2, 2)) == on_cpu
  assert not gemm_conv.use_gemm_conv((3, 3), (1, 1))
  monkeypatch.setenv("JTRANSFER_CONV_IMPL", "xla")  # the environment overrides the switch
  assert all(fn is None for _, fn in _conv_fns(models.get_model("resnet_s", 5),
                                               (28, 28, 1)).values())
  monkeypatch.setenv("JTRANSFER_CONV_IMPL", "fast")
  with pytest.raises(ValueError, match="JTRANSFER_CONV_IMPL|conv implementation"):
    gemm_conv.conv_impl()


class _Units(nn.Module):
  """A 3x3 stride-2 unit with BN, then a 1x1 unit with bias: what conv_layer builds."""

  @nn.compact
  def __call__(self, x, train=True):
    x = common.ConvUnit(6, 3, 2, 1, use_bn=True, name="a")(x, train)
    return common.ConvUnit(4, 1, 1, 0, relu=False, name="b")(x, train).mean(axis=(1, 2))


def test_conv_units_equal_under_both_implementations(monkeypatch):
  """Same params, loss and gradients with every dense conv through the GEMM or none."""
  loss_and_grads(_Units(), (9, 9, 2), monkeypatch)


@pytest.mark.slow  # two resnet_s compiles: ~30 s idle, minutes on the shared cores
def test_resnet_s_equal_under_both_implementations(monkeypatch):
  loss_and_grads(models.get_model("resnet_s", 5), (16, 16, 1), monkeypatch)
