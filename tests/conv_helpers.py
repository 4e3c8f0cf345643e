"""Shared by the convolution-implementation tests (test_gemm_conv, test_ffi_conv)."""
import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models
from jtransfer.models import gemm_conv


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
