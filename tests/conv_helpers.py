"""Shared by the convolution-implementation tests (test_gemm_conv, test_ffi_conv)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models
from jtransfer.models import gemm_conv

# (kernel, stride, padding, input shape): strides 1/2, kernels 1/3/7, padding same/valid/explicit
CASES = [
    (1, 1, "VALID", (2, 6, 6, 4)), (1, 2, "SAME", (3, 7, 9, 5)),
    (1, 2, ((0, 0), (0, 0)), (1, 5, 5, 3)),
    (3, 1, "SAME", (2, 9, 8, 3)), (3, 2, "SAME", (1, 9, 7, 4)), (3, 2, "VALID", (2, 8, 9, 3)),
    (3, 2, ((1, 1), (1, 1)), (3, 7, 7, 5)), (3, 1, ((0, 1), (1, 0)), (1, 6, 5, 2)),
    (3, 1, "SAME", (5, 8, 8, 40)),
    (7, 2, ((3, 3), (3, 3)), (2, 11, 9, 3)), (7, 1, "VALID", (1, 9, 10, 2)),
]


def xla_conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.jit, static_argnums=(0, 3, 4))  # one compile, not one per op
def value_and_grads(conv, x, kernel, strides, padding, cot):
  y, vjp = jax.vjp(lambda a, b: conv(a, b, strides, padding), x, kernel)
  return (y, *vjp(cot))


def check_equal_to_xla(conv, k, stride, padding, shape):
  """`conv` (x, kernel, strides, padding) has XLA's value and input gradient exactly (both are
  XLA's convolution) and its kernel gradient to float32 rounding."""
  g = np.random.default_rng(k * 10 + stride)
  x = jnp.asarray(g.normal(size=shape), jnp.float32)
  kernel = jnp.asarray(g.normal(size=(k, k, shape[-1], 6)), jnp.float32)
  want_y = xla_conv(x, kernel, (stride, stride), padding)
  cot = jnp.asarray(g.normal(size=want_y.shape), jnp.float32)
  want = value_and_grads(xla_conv, x, kernel, (stride, stride), padding, cot)
  got = value_and_grads(conv, x, kernel, (stride, stride), padding, cot)
  for a, b in zip(got, want):
    assert a.shape == b.shape and a.dtype == b.dtype
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-4)


def loss_and_grads(model, shape, monkeypatch, impls=("xla", "gemm")):
  """Checks that `model` has the same params, loss and gradients under each CONV_IMPL of
  `impls` as under the first."""
  monkeypatch.delenv("JTRANSFER_CONV_IMPL", raising=False)
  g = np.random.default_rng(2)
  x = jnp.asarray(g.normal(size=(3, *shape)), jnp.float32)
  y = jnp.asarray([0, 3, 1])
  out = {}
  for impl in impls:
    monkeypatch.setattr(gemm_conv, "CONV_IMPL", impl)
    v = jax.jit(lambda: models.init_model(model, jax.random.PRNGKey(0), shape))()

    def loss(params):
      logits = models.apply_model(model, params, v["batch_stats"], x, train=True)[0]
      return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(3), y])

    out[impl] = (v["params"], *jax.jit(jax.value_and_grad(loss))(v["params"]))
  base = out[impls[0]]
  for impl in impls[1:]:
    jax.tree.map(np.testing.assert_array_equal, base[0], out[impl][0])
    np.testing.assert_allclose(out[impl][1], base[1], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 out[impl][2], base[2])


def numpy_kernel_gradient(n: int, out_channels: int, seed: int):
  """(x, dy, dk) in float64 for a 3x3 kernel, stride 2, padding 1 on a 7x6x3 input: the
  im2col formula dk[i, j, c, o] = sum x_pad[n, 2h+i, 2w+j, c] * dy[n, h, w, o], by einsum."""
  g = np.random.default_rng(seed)
  x, dy = g.normal(size=(n, 7, 6, 3)), g.normal(size=(n, 4, 3, out_channels))
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  want = np.zeros((3, 3, 3, out_channels))
  for i in range(3):
    for j in range(3):
      want[i, j] = np.einsum("nhwc,nhwo->co", xp[:, i:i + 7:2, j:j + 5:2], dy)
  return x, dy, want
