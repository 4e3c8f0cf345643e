"""The native kernel gradient (models.ffi_conv): built here, equal to XLA's convolution in
value and both gradients, the shapes 'auto' gives it, and the fallback where it cannot be built.

Skipped only where no C++ compiler is installed; with one, a failed build is a failure.
"""
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conv_helpers import (CASES, check_equal_to_xla, loss_and_grads, numpy_kernel_gradient,
                          value_and_grads, xla_conv)
from jtransfer.models import ffi_conv, gemm_conv

pytestmark = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None or jax.default_backend() != "cpu",
    reason="no C++ compiler to build the native kernel, or not on the CPU backend")


@pytest.fixture(autouse=True)
def _native_on(monkeypatch):
  monkeypatch.delenv("JTRANSFER_NATIVE", raising=False)
  monkeypatch.delenv("JTRANSFER_CONV_IMPL", raising=False)


_xla, _value_and_grads = xla_conv, value_and_grads


def _native(x, kernel, strides, padding):
  return gemm_conv.dense_conv(x, kernel, strides, padding, kernel_grad="native")


def test_builds_and_registers():
  assert ffi_conv.available()
  assert os.path.isfile(ffi_conv.build())


@pytest.mark.parametrize("k,stride,padding,shape", CASES)
def test_equal_to_xla_in_value_and_both_gradients(k, stride, padding, shape):
  check_equal_to_xla(_native, k, stride, padding, shape)


def test_kernel_gradient_against_numpy():
  """The formula in float64: dk[i, j, c, o] = sum x_pad[n, s*h+i, s*w+j, c] * dy[n, h, w, o],
  with more images than threads (each thread's accumulator summed)."""
  x, dy, want = numpy_kernel_gradient(5, 2, seed=4)
  got = jax.jit(lambda a, b: ffi_conv.kernel_gradient(a, b, (3, 3), (2, 2), ((1, 1), (1, 1))))(
      jnp.asarray(x, jnp.float32), jnp.asarray(dy, jnp.float32))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_accumulates_in_float32():
  """bfloat16 operands: the kernel gradient is the float32 sum rounded once to bfloat16."""
  g = np.random.default_rng(5)
  x = jnp.asarray(g.normal(size=(4, 8, 8, 32)), jnp.bfloat16)
  kernel = jnp.asarray(g.normal(size=(3, 3, 32, 8)) * 0.1, jnp.bfloat16)
  cot = jnp.asarray(g.normal(size=(4, 8, 8, 8)), jnp.bfloat16)
  got = _value_and_grads(_native, x, kernel, (1, 1), "SAME", cot)[2]
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  exact = _value_and_grads(_xla, f32(x), f32(kernel), (1, 1), "SAME", f32(cot))[2]
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(f32(got), exact, rtol=2 ** -8, atol=1e-3)


_P0, _P1 = ((0, 0), (0, 0)), ((1, 1), (1, 1))  # 1x1 and 3x3 'same' padding


def test_auto_takes_it_where_measured_faster(monkeypatch):
  """'auto': native for 3x3 kernels with 32+ input channels and 49+ output positions, the
  GEMM for 1x1, XLA's elsewhere; 'ffi' everywhere; off under JTRANSFER_NATIVE=0 or 'xla'."""
  impl = gemm_conv.kernel_gradient_impl
  monkeypatch.setattr(gemm_conv, "CONV_IMPL", "auto")
  assert impl((8, 28, 28, 32), (3, 3, 32, 32), (1, 1), _P1) == "native"
  assert impl((8, 14, 14, 32), (3, 3, 32, 64), (2, 2), _P1) == "native"
  assert impl((8, 28, 28, 1), (3, 3, 1, 32), (1, 1), _P1) == "xla"  # the stem
  assert impl((8, 7, 7, 64), (3, 3, 64, 128), (2, 2), _P1) == "xla"  # 16 positions
  assert impl((8, 14, 14, 32), (1, 1, 32, 64), (2, 2), _P0) == "gemm"
  monkeypatch.setattr(gemm_conv, "CONV_IMPL", "ffi")
  assert impl((8, 7, 7, 64), (3, 3, 64, 128), (2, 2), _P1) == "native"
  assert impl((8, 14, 14, 32), (1, 1, 32, 64), (2, 2), _P0) == "native"
  monkeypatch.setenv("JTRANSFER_NATIVE", "0")
  assert not ffi_conv.available()
  assert impl((8, 28, 28, 32), (3, 3, 32, 32), (1, 1), _P1) == "xla"
  assert impl((8, 14, 14, 32), (1, 1, 32, 64), (2, 2), _P0) == "gemm"  # 'ffi' falls back
  monkeypatch.delenv("JTRANSFER_NATIVE")
  # several devices: no partitioning rule for the custom call, so never in a sharded step
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  assert impl((8, 28, 28, 32), (3, 3, 32, 32), (1, 1), _P1) == "xla"
  monkeypatch.undo()
  monkeypatch.delenv("JTRANSFER_CONV_IMPL", raising=False)
  monkeypatch.setattr(gemm_conv, "CONV_IMPL", "xla")
  assert impl((8, 28, 28, 32), (3, 3, 32, 32), (1, 1), _P1) == "xla"
  assert gemm_conv.conv_fn((3, 3)) is None


def test_the_train_step_calls_it():
  """A model's 3x3 conv with 32 channels at 8x8 lowers to the custom call under 'auto'."""
  conv = nn.Conv(32, (3, 3), padding=((1, 1), (1, 1)),
                 conv_general_dilated=gemm_conv.conv_fn((3, 3)))
  x = jnp.ones((2, 8, 8, 32))
  params = conv.init(jax.random.PRNGKey(0), x)
  grad = jax.grad(lambda p: conv.apply(p, x).sum())
  assert ffi_conv.TARGET in jax.jit(grad).lower(params).as_text()
  # A frozen kernel (Freeze+CWL's backbone) needs no kernel gradient: the compiled program
  # drops the unused custom call.
  grad_x = jax.grad(lambda v: conv.apply(params, v).sum())
  assert ffi_conv.TARGET not in jax.jit(grad_x).lower(x).compile().as_text()


def test_gradient_of_the_gradient():
  """Second order through the native kernel gradient equals XLA's (its own VJP is the conv's
  input gradient and forward with the cotangent as kernel)."""
  g = np.random.default_rng(7)
  x = jnp.asarray(g.normal(size=(2, 7, 6, 3)), jnp.float32)
  kernel = jnp.asarray(g.normal(size=(3, 3, 3, 4)), jnp.float32)

  def second(conv):
    def loss(k, v):
      return jnp.sum(jnp.tanh(conv(v, k, (2, 1), ((1, 0), (2, 1)))))
    return jax.jit(jax.grad(lambda v: jnp.sum(jax.grad(loss)(kernel, v) ** 2)))(x)

  np.testing.assert_allclose(second(_native), second(_xla), rtol=1e-4, atol=1e-4)


def test_empty_output_and_negative_padding():
  x = jnp.ones((1, 2, 2, 4))
  kernel = jnp.ones((3, 3, 4, 6))
  got = _value_and_grads(_native, x, kernel, (1, 1), "VALID", jnp.ones((1, 0, 0, 6)))
  assert got[0].shape == (1, 0, 0, 6) and not np.any(got[2])
  crop = ((-1, 0), (0, 0))  # lax crops; the hook hands it over instead of refusing
  np.testing.assert_array_equal(
      gemm_conv.conv_general_dilated(jnp.ones((1, 6, 6, 4)), kernel, (1, 1), crop,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")),
      _xla(jnp.ones((1, 6, 6, 4)), kernel, (1, 1), crop))


def test_leaves_the_callers_blas_threads_alone():
  """The kernel sets OpenBLAS to one thread for its own work and puts the calling thread's
  setting back (XLA may run the custom call on Python's thread: numpy's next matmul there
  would otherwise run single-threaded)."""
  import ctypes
  lib = ctypes.CDLL(ffi_conv._blas())
  get = lib.scipy_openblas_get_num_threads64_
  before = get()
  x, dy = jnp.ones((1, 8, 8, 32)), jnp.ones((1, 8, 8, 4))
  jax.block_until_ready(jax.jit(lambda a, b: ffi_conv.kernel_gradient(
      a, b, (3, 3), (1, 1), ((1, 1), (1, 1))))(x, dy))
  assert get() == before


def test_under_vmap():
  """train.batched vmaps whole runs: the custom call then runs once per member."""
  g = np.random.default_rng(6)
  x = jnp.asarray(g.normal(size=(3, 2, 8, 8, 32)), jnp.float32)
  dy = jnp.asarray(g.normal(size=(3, 2, 8, 8, 4)), jnp.float32)
  pads = ((1, 1), (1, 1))
  got = jax.jit(jax.vmap(lambda a, b: ffi_conv.kernel_gradient(a, b, (3, 3), (1, 1), pads)))(
      x, dy)
  for i in range(3):
    kernel = jnp.zeros((3, 3, 32, 4))
    want = jax.vjp(lambda k: _xla(x[i], k, (1, 1), pads), kernel)[1](dy[i])[0]
    np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-4)


class _Net(nn.Module):
  """A stem, a 3x3 layer that 'auto' gives the native kernel gradient, a 1x1 with BN."""

  @nn.compact
  def __call__(self, x, train=True):
    from jtransfer.models import common
    x = common.ConvUnit(32, 3, 1, 1, use_bn=True, name="stem")(x, train)
    x = common.ConvUnit(32, 3, 1, 1, use_bn=True, name="mid")(x, train)
    return common.ConvUnit(4, 1, 1, 0, relu=False, name="out")(x, train).mean(axis=(1, 2))


def test_model_equal_under_native_and_xla(monkeypatch):
  """Same params, loss and gradients with the native kernel gradient as with XLA's."""
  loss_and_grads(_Net(), (8, 8, 1), monkeypatch, impls=("xla", "auto", "ffi"))


def test_a_failed_build_says_why(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", "no-such-compiler-jtransfer")
  with pytest.raises(RuntimeError, match="no C.. compiler"):
    ffi_conv.build(str(tmp_path))
  bad = tmp_path / "bad.cc"
  bad.write_text("this is not C++\n")
  monkeypatch.delenv("CXX")
  monkeypatch.setattr(ffi_conv, "SOURCE", str(bad))
  with pytest.raises(RuntimeError, match="could not build"):
    ffi_conv.build(str(tmp_path))
  assert not list(tmp_path.rglob("*.so"))  # no half-written library left behind
