"""Eval-mode BatchNorm as `affine` with its hand-written VJP (jtransfer.models.batchnorm)
against Flax's nn.BatchNorm under autodiff, a numpy closed form and finite differences."""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models
from jtransfer.models import batchnorm


@contextlib.contextmanager
def eval_impl(impl):
  old, batchnorm.EVAL_IMPL = batchnorm.EVAL_IMPL, impl
  try:
    yield
  finally:
    batchnorm.EVAL_IMPL = old


def _bn_vars(c, seed=0):
  r = np.random.default_rng(seed)
  return ({"scale": jnp.asarray(r.uniform(0.5, 1.5, c), jnp.float32),
           "bias": jnp.asarray(r.normal(size=c), jnp.float32)},
          {"mean": jnp.asarray(r.normal(size=c), jnp.float32),
           "var": jnp.asarray(r.uniform(0.2, 2.0, c), jnp.float32)})


def test_affine_and_its_gradients_match_numpy_closed_form():
  r = np.random.default_rng(1)
  x = r.normal(size=(3, 4, 5, 6)).astype(np.float32)
  g = r.normal(size=x.shape).astype(np.float32)
  a = r.normal(size=6).astype(np.float32)
  c = r.normal(size=6).astype(np.float32)
  y, vjp = jax.vjp(batchnorm.affine, x, a, c)
  dx, da, dc = vjp(jnp.asarray(g))
  np.testing.assert_allclose(y, x * a + c, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dx, g * a, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(da, (g.astype(np.float64) * x).sum((0, 1, 2)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dc, g.astype(np.float64).sum((0, 1, 2)), rtol=1e-4, atol=1e-4)
  assert dx.shape == x.shape and da.shape == dc.shape == (6,)


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_eval_batchnorm_equals_flax_values_and_all_gradients(dtype):
  c = 8
  params, stats = _bn_vars(c)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5, c)) * 2 + 0.5
  cdt = None if dtype is None else jnp.dtype(dtype)
  x = x.astype(cdt) if cdt is not None else x
  g = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  ours = batchnorm.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=cdt)
  flax_bn = nn.BatchNorm(use_running_average=True, epsilon=1e-5, dtype=cdt)

  def loss(module, p, s, x):
    y = module.apply({"params": p, "batch_stats": s}, x)
    return jnp.sum(y.astype(jnp.float32) * g), y

  (l1, y1), g1 = jax.value_and_grad(lambda *a: loss(ours, *a), (0, 1, 2), has_aux=True)(
      params, stats, x)
  (l2, y2), g2 = jax.value_and_grad(lambda *a: loss(flax_bn, *a), (0, 1, 2), has_aux=True)(
      params, stats, x)
  assert y1.dtype == y2.dtype and y1.shape == y2.shape
  tol = 1e-5 if dtype is None else 2e-2
  np.testing.assert_allclose(np.asarray(y1, np.float32), np.asarray(y2, np.float32),
                             rtol=tol, atol=tol)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=10 * tol, atol=10 * tol)


def test_eval_batchnorm_gradient_matches_finite_differences():
  c = 3
  params, stats = _bn_vars(c, seed=2)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 3, 3, c), jnp.float32)
  bn = batchnorm.BatchNorm(use_running_average=True)
  f = lambda p, x: jnp.sum(jnp.sin(bn.apply({"params": p, "batch_stats": stats}, x)))
  gp, gx = jax.grad(f, (0, 1))(params, x)
  eps = 1e-3
  for name in ("scale", "bias"):
    for i in range(c):
      e = jnp.zeros(c).at[i].set(eps)
      up = f({**params, name: params[name] + e}, x)
      down = f({**params, name: params[name] - e}, x)
      np.testing.assert_allclose(gp[name][i], (up - down) / (2 * eps), rtol=2e-2, atol=2e-3)
  e = jnp.zeros(x.shape).at[1, 2, 0, 1].set(eps)
  np.testing.assert_allclose(gx[1, 2, 0, 1], (f(params, x + e) - f(params, x - e)) / (2 * eps),
                             rtol=2e-2, atol=2e-3)


def test_train_mode_is_flax_and_updates_running_stats():
  c = 4
  params, stats = _bn_vars(c)
  x = jax.random.normal(jax.random.PRNGKey(4), (6, 3, 3, c))
  out = []
  for module in (batchnorm.BatchNorm(use_running_average=False, momentum=0.9),
                 nn.BatchNorm(use_running_average=False, momentum=0.9)):
    out.append(module.apply({"params": params, "batch_stats": stats}, x,
                            mutable=["batch_stats"]))
  np.testing.assert_array_equal(out[0][0], out[1][0])
  for a, b in zip(jax.tree.leaves(out[0][1]), jax.tree.leaves(out[1][1])):
    np.testing.assert_array_equal(a, b)


def test_whole_model_loss_and_gradients_equal_flax_batchnorm():
  arch = "resnet_s"
  """The finetune loss (BN eval) and its gradient w.r.t. every param: affine vs Flax's BN."""
  model = models.get_model(arch, 5)
  v = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  stats = v.get("batch_stats", {})
  if stats:  # non-trivial running statistics
    stats = jax.tree.map(lambda s: s + 0.3 * jax.random.uniform(jax.random.PRNGKey(5), s.shape),
                         stats)
  x = jax.random.normal(jax.random.PRNGKey(6), (4, 28, 28, 1))
  labels = jnp.arange(4) % 5

  def loss(p):
    logits, _, _ = models.apply_model(model, p, stats, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

  results = {}
  for impl in ("flax", "affine"):
    with eval_impl(impl):
      results[impl] = jax.jit(jax.value_and_grad(loss))(v["params"])
  (l1, g1), (l2, g2) = results["affine"], results["flax"]
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * float(jnp.max(jnp.abs(b))) + 1e-7)


def test_bad_impl_name_raises():
  with eval_impl("fused"):
    with pytest.raises(ValueError, match="EVAL_IMPL"):
      batchnorm.BatchNorm(use_running_average=True).init(jax.random.PRNGKey(0), jnp.ones((1, 2)))


@pytest.mark.slow  # two resnet_s step compiles and two profiled runs (~30 s on 2 loaded cores)
def test_bench_rest_runs_tiny(tmp_path):
  from bench import bench_rest
  out = tmp_path / "rest.md"
  assert bench_rest.main(["--tiny", "--profile", "--out", str(out)]) == 0
  text = out.read_text()
  assert "| resnet_s | finetune |" in text and "| all ops |" in text
  assert "convolution" in text and "layout transpose" in text


@pytest.mark.parametrize("train", [False, True])
def test_an_interceptor_sees_one_batchnorm_call_per_unit(train):
  """Methods that rewrite a BN's output by module path (SSF, FiLM) must see it once, in both
  modes (train mode runs Flax's body without re-entering the wrapped __call__)."""
  c = 4
  params, stats = _bn_vars(c)
  x = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 3, c))
  seen = []

  def count(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      seen.append(context.module.path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(count):
    batchnorm.BatchNorm(use_running_average=not train).apply(
        {"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
  assert len(seen) == 1
