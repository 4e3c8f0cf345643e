"""Tests for jtransfer.methods.hybrid: partial forwards, the knowledge term, neuron slicing."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import random_variables

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import hybrid, sparsity, transfer

SHAPE = (16, 16, 1)
CFG = dict(conv_widths=((4, 4), (6, 6), (8, 8)), dense_widths=(12, 10))
MEAN, STD = (0.4,), (0.3,)


def _variables(model, seed=0):
  return random_variables(model, SHAPE, seed, gain=1.5)


@pytest.fixture(scope="module")
def source():
  model = models.get_model("vgg_s", 5, **CFG)
  return transfer.Source("vgg_s", models.model_config(model), _variables(model),
                         SHAPE, MEAN, STD)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(3).integers(0, 256, size=(6, *SHAPE), dtype=np.uint8)


def _x(images):
  return (images.astype(np.float32) / 255.0 - MEAN[0]) / STD[0]


def _build(source, variant, seed=1, **kw):
  sparse = sparsity.magnitude_masks(source.variables["params"], 0.5)
  sparse_params = sparsity.apply_masks(source.variables["params"], sparse)
  return hybrid.init_hybrid(source, 3, hybrid.variant_config(variant, **kw), seed,
                            sparse_params=sparse_params, sparse_masks=sparse), sparse


# ----------------------------------------------------------------------------- forward
def test_run_layers_matches_apply_model(source, images):
  model, params = source.model, source.variables["params"]
  x = _x(images)
  want, _, taps = models.apply_model(model, params, {}, x, taps=("fc6_act", "fc7_act"))
  plan = hybrid.layer_plan(source.config)
  assert [n for n, _ in plan] == ["conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1",
                                  "conv3_2", "fc6", "fc7", "head"]
  np.testing.assert_allclose(hybrid.run_layers(params, x, plan), want, rtol=1e-5, atol=1e-5)
  for cut in range(1, len(plan)):  # any split point gives the same result
    h = hybrid.run_layers(params, x, plan[:cut])
    np.testing.assert_allclose(hybrid.run_layers(params, h, plan[cut:]), want, rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_allclose(hybrid.run_layers(params, x, plan[:7]), taps["fc6_act"],
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(InputError, match="pool"):
    hybrid.layer_plan(dict(source.config, pool="avg"))


# ----------------------------------------------------------------------------- init
def test_variants_structure(source):
  (hy, params, masks), sparse = _build(source, "hybrid")
  ref = source.variables["params"]
  assert hy.reinit == ["fc7", "head"] and hy.extra_layers == ["fc7", "head"]
  assert set(params) == {"main", "extra", "reference"}
  assert params["main"]["head"]["kernel"].shape == (10, 3)
  assert params["extra"]["head"]["kernel"].shape == (10, 5)  # source classes
  np.testing.assert_array_equal(params["extra"]["fc7"]["kernel"], ref["fc7"]["kernel"])
  assert not np.allclose(params["main"]["fc7"]["kernel"], ref["fc7"]["kernel"])  # re-init
  m = surgery.flatten(masks["main"])
  assert set(m) == {p for p in surgery.paths(params["main"]) if p.endswith("kernel")}
  assert m["fc7/kernel"].all() and m["head/kernel"].all()  # dense, re-initialised
  np.testing.assert_array_equal(m["fc6/kernel"], sparse["fc6"]["kernel"])  # inherited
  assert np.all(params["main"]["fc6"]["kernel"][~m["fc6/kernel"]] == 0)
  (_, p_std, m_std), _ = _build(source, "standard")
  assert set(p_std) == {"main"} and all(v.all() for v in surgery.flatten(m_std).values())
  np.testing.assert_array_equal(p_std["main"]["fc6"]["kernel"], ref["fc6"]["kernel"])
  with pytest.raises(InputError, match="variant"):
    hybrid.variant_config("S+K+")
  with pytest.raises(InputError, match="n_e"):
    _build(source, "hybrid", n_e=9)


# ----------------------------------------------------------------------------- loss
def _np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def test_soft_cross_entropy_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 5)) * 3
  want = np.mean([-sum(_np_softmax(b[i] / 4)[c] * np.log(_np_softmax(a[i] / 4)[c])
                       for c in range(5)) for i in range(7)])
  assert float(hybrid.soft_cross_entropy(a, b, 4.0)) == pytest.approx(want, rel=1e-5)


def test_total_loss_against_numpy(source, images):
  (hy, params, _), _ = _build(source, "hybrid", lam=0.7, tau=3.0)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  fn = jax.jit(hybrid.loss_fn(hy))
  loss, (terms, _) = fn(params, {}, {"image": images, "label": labels}, None)
  x = _x(images)
  main_logits, _, taps = models.apply_model(hy.main_model(), params["main"], {}, x,
                                            taps=("fc6_act",))
  main_logits, h = np.asarray(main_logits, np.float64), np.asarray(taps["fc6_act"], np.float64)
  e = params["extra"]
  a_extra = (np.maximum(h @ e["fc7"]["kernel"] + e["fc7"]["bias"], 0) @ e["head"]["kernel"]
             + e["head"]["bias"])
  a_ref = np.asarray(models.apply_model(source.model, source.variables["params"], {}, x)[0],
                     np.float64)
  p_main = _np_softmax(main_logits)
  ce = -np.mean(np.log(p_main[np.arange(6), labels]))
  q, p = _np_softmax(a_ref / 3.0), _np_softmax(a_extra / 3.0)
  kd = -np.mean(np.sum(q * np.log(p), axis=1))
  assert float(terms["ce"]) == pytest.approx(ce, rel=1e-4)
  assert float(terms["kd"]) == pytest.approx(kd, rel=1e-4)
  assert float(loss) == pytest.approx(ce + 0.7 * kd, rel=1e-4)
  # cached reference logits give the same loss
  cached = hybrid.reference_logits(hy, params["reference"], images)
  loss2, _ = fn(params, {}, {"image": images, "label": labels,
                                             "ref_logits": cached}, None)
  assert float(loss2) == pytest.approx(float(loss), rel=1e-5)
  # a K- model (main only) gives the CE alone
  ce_only, (t, _) = fn(hybrid.drop_knowledge(params), {}, {"image": images, "label": labels},
                       None)
  assert set(t) == {"ce"} and float(ce_only) == pytest.approx(ce, rel=1e-4)


def test_knowledge_gradient_flows_into_main_not_reference(source, images):
  (hy, params, _), _ = _build(source, "hybrid")
  labels = np.zeros(6, np.int32)
  fn = hybrid.loss_fn(hy)

  def kd(p):
    return fn(p, {}, {"image": images, "label": labels}, None)[1][0]["kd"]

  g = surgery.flatten(jax.jit(jax.grad(kd))(jax.tree.map(jnp.asarray, params)))
  norm = lambda path: float(jnp.sum(jnp.abs(g[path])))
  # the extra branch reads the main branch's fc6 activations: every layer up to fc6 learns
  for layer in ("conv1_1/conv/kernel", "conv3_2/conv/kernel", "fc6/kernel", "fc6/bias"):
    assert norm(f"main/{layer}") > 0, layer
  for layer in ("fc7/kernel", "head/kernel"):  # above the attachment point: no knowledge term
    assert norm(f"main/{layer}") == 0, layer
  assert norm("extra/fc7/kernel") > 0 and norm("extra/head/kernel") > 0
  assert all(norm(p) == 0 for p in g if p.startswith("reference/"))


# ----------------------------------------------------------------------------- neurons
def test_neuron_slicing_equals_zeroed_neurons(source, images):
  (hy, params, masks), _ = _build(source, "hybrid")
  params = jax.tree.map(np.asarray, params)
  keep = {"fc6": np.array([0, 2, 3, 5, 7, 8, 11]), "fc7": np.array([1, 4, 5, 9])}
  zeroed = jax.tree.map(np.copy, params)
  for layer, idx in keep.items():
    drop = np.setdiff1d(np.arange(params["main"][layer]["bias"].size), idx)
    zeroed["main"][layer]["kernel"][:, drop] = 0  # a removed neuron outputs relu(0) = 0
    zeroed["main"][layer]["bias"][drop] = 0
  small, sliced, smasks = hybrid.prune_neurons(hy, params, masks, keep)
  assert small.config["dense_widths"] == [7, 4]
  assert sliced["main"]["fc7"]["kernel"].shape == (7, 4)
  assert sliced["main"]["head"]["kernel"].shape == (4, 3)
  assert sliced["extra"]["fc7"]["kernel"].shape == (7, 10)  # extra reads fc6
  assert sliced["extra"]["head"]["kernel"].shape == (10, 5)
  for p, m in surgery.flatten(smasks["main"]).items():
    assert m.shape == surgery.flatten(sliced["main"])[p].shape
  x = _x(images)
  for a, b in zip(hybrid.branch_outputs(small, sliced, x), hybrid.branch_outputs(hy, zeroed, x)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  # the shrunk config builds a model that runs the sliced params
  got = models.apply_model(small.main_model(), sliced["main"], {}, x)[0]
  np.testing.assert_allclose(got, hybrid.branch_outputs(hy, zeroed, x)[0], rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(InputError, match="increasing"):
    hybrid.prune_neurons(hy, params, masks, {"fc6": np.array([3, 1])})
  with pytest.raises(InputError, match="hidden dense"):
    hybrid.prune_neurons(hy, params, masks, {"head": np.array([0])})
  table = hybrid.fc_table(params, sliced, ["fc6", "fc7", "head"])
  assert table["fc6"]["neurons"] == (12, 7) and table["total"]["neurons"] == (25, 14)
  assert table["head"]["weights"][1] == np.count_nonzero(sliced["main"]["head"]["kernel"])


def test_neuron_activations_and_lowest(source, images):
  (hy, params, _), _ = _build(source, "hybrid")
  acts = hybrid.neuron_activations(hy, params, images)
  x = _x(images)
  plan = hy.plan
  h6 = np.asarray(hybrid.run_layers(params["main"], x, plan[:7]))
  h7 = np.asarray(hybrid.run_layers(params["main"], h6, plan[7:8]))
  np.testing.assert_allclose(acts["fc6"], h6.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(acts["fc7"], h7.mean(0), rtol=1e-5, atol=1e-6)
  a = np.array([0.5, 0.0, 2.0, 0.0, 1.0])
  np.testing.assert_array_equal(hybrid.lowest_neurons(a, 2), [0, 2, 4])
  np.testing.assert_array_equal(hybrid.lowest_neurons(a, 9), [2])  # keeps one


def test_training_keeps_main_sparse_and_reference_fixed(source, images):
  from jtransfer.train import adam, fit
  (hy, params, masks), _ = _build(source, "hybrid")
  tr = hybrid.make_trainer(hy, params, masks, adam(1e-2))
  state = tr.state(params, masks, 0)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  state = fit(state, tr.step, hybrid.knowledge_batches(images, labels, None, 4, 0), 5)
  got = surgery.flatten(jax.tree.map(np.asarray, state.params))
  start, m = surgery.flatten(params), surgery.flatten(masks)
  for path, mask in m.items():
    assert np.all(got[path][~mask] == 0), path  # pruned connections stay exactly zero
    assert np.any(got[path][mask] != start[path][mask]), path
  for path in start:
    if path.startswith("reference/"):
      np.testing.assert_array_equal(got[path], start[path])
  assert np.any(got["extra/fc7/kernel"] != start["extra/fc7/kernel"])
