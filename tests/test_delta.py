"""Tests for jtransfer.methods.delta against direct numpy computations and plain loops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import delta, transfer
from jtransfer.train import init_state, make_train_step
from delta_helpers import eval_setup, tiny_source, uint8_images


# ----------------------------------------------------------------------------- regularisers
def test_l2_is_half_sum_of_squares():
  tree = {"a": np.array([1.0, -2.0]), "b": {"c": np.array([[3.0]])}}
  assert float(delta.l2(tree)) == pytest.approx(0.5 * (1 + 4 + 9))


def test_l2sp_and_head_term_match_numpy_and_exclude_head_and_bn_stats():
  source = tiny_source()
  model = transfer.target_model(source, 2)
  params, stats = transfer.init_target(source, model, seed=1)
  w0 = delta.starting_point(source.variables["params"], params)
  # By construction: every target param but the head, BN scale/bias included, no BN stats.
  want = {p for p in surgery.paths(params) if not p.startswith("head/")}
  assert set(surgery.paths(w0)) == want
  assert any(p.endswith("bn/scale") for p in want) and any(p.endswith("bn/bias") for p in want)
  assert not any(p.endswith(("/mean", "/var")) for p in surgery.paths(w0))
  assert stats  # the BN stats exist, in batch_stats only
  rng = np.random.default_rng(0)
  moved = jax.tree.map(lambda v: v + rng.normal(size=v.shape).astype(np.float32), params)
  flat, ref = surgery.flatten(moved), surgery.flatten(source.variables["params"])
  expected = sum(0.5 * np.sum((np.float64(flat[p]) - ref[p]) ** 2) for p in want)
  l2sp = jax.jit(delta.l2sp)   # one compile instead of one per eager op
  np.testing.assert_allclose(float(l2sp(moved, w0)), expected, rtol=1e-5)
  # The head changes neither L2-SP, and is exactly what the beta term sees.
  other_head = dict(moved, head=jax.tree.map(lambda v: v + 5.0, moved["head"]))
  assert float(l2sp(other_head, w0)) == pytest.approx(float(l2sp(moved, w0)))
  head = 0.5 * (np.sum(np.float64(flat["head/kernel"]) ** 2) + np.sum(flat["head/bias"] ** 2))
  np.testing.assert_allclose(float(jax.jit(delta.private_l2)(moved, w0)), head, rtol=1e-6)


def test_feature_distance_matches_numpy_loop():
  rng = np.random.default_rng(1)
  t = {"a": rng.normal(size=(2, 3, 3, 4)), "b": rng.normal(size=(2, 2, 1, 5))}
  s = {k: rng.normal(size=v.shape) for k, v in t.items()}
  want = 0.0
  for k in t:
    for idx in np.ndindex(t[k].shape):
      want += 0.5 * (t[k][idx] - s[k][idx]) ** 2
  np.testing.assert_allclose(float(delta.feature_distance(t, s)), want, rtol=1e-5)


def test_attention_distance_hand_case():
  # One image, a 1x2 map, 2 channels; C=2, H*W=2, w=(0.25, 0.75).
  t = {"l": np.array([[[[1.0, 0.0], [3.0, 2.0]]]])}   # (1, 1, 2, 2): pixels (1,0), (3,2)
  s = {"l": np.zeros((1, 1, 2, 2))}
  w = {"l": np.array([0.25, 0.75])}
  # channel 0: ||(1, 3)||^2 = 10, channel 1: ||(0, 2)||^2 = 4
  want = 0.5 * (2 * 0.25 * 10 / 2 + 2 * 0.75 * 4 / 2)
  assert float(delta.attention_distance(t, s, w)) == pytest.approx(want)


def test_attention_distance_matches_numpy_loop():
  rng = np.random.default_rng(2)
  t = {"a": rng.normal(size=(3, 2, 4, 5)), "b": rng.normal(size=(3, 3, 3, 2))}
  s = {k: rng.normal(size=v.shape) for k, v in t.items()}
  w = {k: rng.dirichlet(np.ones(v.shape[-1])) for k, v in t.items()}
  want = 0.0
  for k, tk in t.items():
    n, h, wd, c = tk.shape
    for b in range(n):
      for ch in range(c):
        dist = np.sum((tk[b, :, :, ch] - s[k][b, :, :, ch]) ** 2)
        want += 0.5 * c * w[k][ch] * dist / (h * wd)
  np.testing.assert_allclose(float(delta.attention_distance(t, s, w)), want, rtol=1e-5)


def test_attention_distance_checks_shapes():
  t = {"a": np.zeros((1, 2, 2, 3))}
  with pytest.raises(InputError):
    delta.attention_distance(t, {"a": np.zeros((1, 2, 2, 4))}, {"a": np.ones(3) / 3})
  with pytest.raises(InputError):
    delta.attention_distance(t, t, {"a": np.ones(4) / 4})


def test_attention_from_losses_zscore_softmax():
  d = np.array([0.1, -0.2, 0.4, 0.0])
  z = (d - d.mean()) / np.sqrt(np.mean((d - d.mean()) ** 2))   # ddof=0
  e = np.exp(z / 5.0)
  np.testing.assert_allclose(delta.attention_from_losses(d), e / e.sum(), rtol=1e-6)
  np.testing.assert_allclose(delta.attention_from_losses(np.full(3, 0.7)), np.full(3, 1 / 3))


# ----------------------------------------------------------------------------- loss functions
@pytest.mark.parametrize("kind", ["l2sp", "fm", "att"])
def test_zero_regularisation_when_target_equals_source(kind):
  # BN in eval mode: the target then computes exactly the source's maps (with batch stats,
  # as the authors train, the maps differ from step 0 on).
  setup = eval_setup(kind)
  images, labels = uint8_images(6), np.array([0, 1, 0, 1, 0, 1])
  params, stats = setup.init(0, images, labels)
  loss_fn = jax.jit(setup.loss_fn)
  batch = {"image": images, "label": labels}
  _, (terms, _) = loss_fn(params, stats, batch, jax.random.PRNGKey(0))
  # Zero up to float rounding (the table's maps come from another compiled program) ...
  assert abs(float(terms["reg"])) < 1e-9
  assert float(terms["head"]) > 0.0
  # ... where a small move of the backbone gives a clearly positive value.
  moved = dict(params, **{k: jax.tree.map(lambda v: v * 1.01, v) for k, v in params.items()
                          if k not in ("head", "frozen")})
  assert float(loss_fn(moved, stats, batch, jax.random.PRNGKey(0))[1][0]["reg"]) > 1e-6


def test_regulariser_gradients_vanish_for_the_source_copy():
  source = tiny_source()
  model = transfer.target_model(source, 2)
  params, stats = transfer.init_target(source, model, seed=1)
  params = jax.tree.map(lambda v: v * 1.1, params)
  src_params, _ = transfer.init_target(source, model, seed=1)
  w0 = delta.starting_point(source.variables["params"], params)
  taps = delta.default_taps("resnet_s", source.config)
  x = normalize(uint8_images(3), source.mean, source.std)
  weights = {t: np.full(surgery.flatten(params)[f"{t}/conv/kernel"].shape[-1], 0.25)
             for t in taps}

  def reg(p, sp, w0_):
    _, _, t = models.apply_model(model, p, stats, x, train=True, taps=taps)
    s = delta.source_maps(model, sp, stats, x, taps)
    return (delta.attention_distance(t, s, weights) + delta.feature_distance(t, s)
            + delta.l2sp(p, w0_))

  g_target, g_source, g_w0 = jax.jit(jax.grad(reg, argnums=(0, 1, 2)))(params, src_params, w0)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves((g_source, g_w0)))
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_target)) > 0.0


@pytest.mark.parametrize("kind", ["fm", "att"])
def test_source_table_gives_live_numbers(kind):
  source = tiny_source()
  setup = eval_setup(kind)
  images, labels = uint8_images(6), np.array([0, 1, 0, 1, 0, 1])
  params, stats = setup.init(0, images, labels)
  assert params["frozen"]["source"]["maps"]
  # A moved backbone, so the regulariser is well above rounding.
  params = {k: v if k in ("head", "frozen") else jax.tree.map(lambda x: 1.05 * x, v)
            for k, v in params.items()}
  live = dict(params, frozen={k: v for k, v in params["frozen"].items() if k != "source"})
  loss_fn = jax.jit(setup.loss_fn)
  for batch_images in (images[[3, 1, 3]], uint8_images(3, seed=9)):  # in the table; not in it
    batch = {"image": batch_images, "label": np.array([0, 1, 0])}
    a = loss_fn(params, stats, batch, jax.random.PRNGKey(0))[1][0]["reg"]
    b = loss_fn(live, stats, batch, jax.random.PRNGKey(0))[1][0]["reg"]
    assert float(b) > 1e-3
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  p0, s0 = transfer.init_target(source, setup.model, 0)
  small = delta.SourceMaps(setup.model, source, p0, s0, ["stem"], budget_mb=1e-3)  # 4 images
  assert small.table(images[:1]) is not None and small.table(images) is None


def test_l2_step_is_sgd_on_weight_decayed_ce():
  source = tiny_source()
  setup = delta.build_setup(source, 2, 10, "l2")
  images, labels = uint8_images(4), np.array([0, 1, 0, 1])
  params, stats = setup.init(0, images, labels)
  batch = {"image": images, "label": labels}
  lr = 0.5

  def objective(p):
    ce, (_, new_stats) = setup.loss_fn(p, stats, batch, jax.random.PRNGKey(0))
    return ce + 1e-4 * delta.l2(p), new_stats

  grads, new_stats = jax.jit(jax.grad(objective, has_aux=True))(params)
  want = jax.tree.map(lambda p, g: p - lr * g, params, grads)  # first momentum step = grad
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state, _ = step(init_state(params, stats, setup.optimizer, 0, lr), batch)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # BN in train mode, as the authors: the running stats moved.
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
           zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(stats))]
  assert max(moved) > 0 and jax.tree.leaves(new_stats)


def test_l2fe_head_decay_is_the_beta_term():
  source = tiny_source()
  setup = transfer.get_strategy("l2fe").build(source, 2, 10, config=delta.Config(beta=0.3))
  images, labels = uint8_images(4), np.array([0, 1, 0, 1])
  params, stats = setup.init(0, images, labels)
  batch = {"image": images, "label": labels}
  lr = 0.5

  def objective(head):
    ce = setup.loss_fn(dict(params, head=head), stats, batch, None)[0]
    return ce + 0.3 * delta.l2(head)

  want = jax.tree.map(lambda p, g: p - lr * g, params["head"],
                      jax.jit(jax.grad(objective))(params["head"]))
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state, _ = step(init_state(params, stats, setup.optimizer, 0, lr), batch)
  for a, b in zip(jax.tree.leaves(state.params["head"]), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(state.params["stem"]["conv"]["kernel"],
                                params["stem"]["conv"]["kernel"])


def test_delta_attention_is_frozen_per_run_and_cached():
  setup = eval_setup("att")
  images, labels = uint8_images(6), np.array([0, 1] * 3)   # the shapes other tests compiled
  params, stats = setup.init(0, images, labels)
  att = params["frozen"]["attention"]
  assert all(abs(float(v.sum()) - 1.0) < 1e-5 for v in att.values())
  # Same images: the cache answers (same numbers, also for another seed's run).
  again, _ = setup.init(5, images, labels)
  for t in att:
    np.testing.assert_array_equal(again["frozen"]["attention"][t], att[t])
  # Only the run's own images count: another k-shot draw gives other weights.
  other, _ = setup.init(0, uint8_images(6, seed=4), labels)
  assert any(not np.allclose(other["frozen"]["attention"][t], att[t]) for t in att)
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state = init_state(params, stats, setup.optimizer, 0, 0.05)
  for _ in range(2):
    state, m = step(state, {"image": images, "label": labels})
  assert float(m["reg"]) > 0
  for t in att:
    np.testing.assert_array_equal(state.params["frozen"]["attention"][t], att[t])
  assert not np.allclose(state.params["head"]["kernel"], params["head"]["kernel"])


def test_schedules_and_config():
  config = delta.Config(schedule="exp", decay_fraction=0.5)
  s = delta.lr_schedule(config, 10)   # decay at int(0.5 * 10) + 1 = 6 epochs
  np.testing.assert_allclose(float(s(6)), 0.1, rtol=1e-5)
  np.testing.assert_allclose(float(s(3)), 0.1 ** 0.5, rtol=1e-5)
  s = delta.lr_schedule(delta.Config(schedule="step", decay_fraction=0.5), 10)
  assert float(s(5)) == 1.0 and float(s(6)) == pytest.approx(0.1)
  with pytest.raises(InputError):
    delta.Config(alpha=-1.0).validate()
  with pytest.raises(InputError):
    delta.Config(schedule="cosine").validate()
  with pytest.raises(InputError, match="schedule"):  # a bad config knob fails at build
    transfer.get_strategy("l2sp").build(tiny_source(), 2, 10, config=delta.Config(
        schedule="cosine"))
  for name in ("l2fe", "l2", "l2sp", "delta_noatt", "delta"):
    assert transfer.get_strategy(name).paper_lrs == (0.01,)


def test_config_knob_reaches_the_loss_and_no_module_state():
  """The config travels into `build` as a knob: beta changes the loss of one setup and not of
  another built before or after it (nothing is stored in the module)."""
  source = tiny_source()
  build = transfer.get_strategy("l2sp").build
  images, labels = uint8_images(4), np.array([0, 1, 0, 1])
  batch = {"image": images, "label": labels}

  def loss(setup):
    params, stats = setup.init(0, images, labels)
    return float(setup.loss_fn(params, stats, batch, jax.random.PRNGKey(0))[1][0]["head"]), \
        float(setup.loss_fn(params, stats, batch, jax.random.PRNGKey(0))[0])

  head0, total0 = loss(build(source, 2, 10, alpha=0.0))
  head1, total1 = loss(build(source, 2, 10, alpha=0.0, config=delta.Config(beta=1.0)))
  head2, total2 = loss(build(source, 2, 10, alpha=0.0))
  assert head0 == head1 == head2 and head0 > 0
  # beta 0.01 (default) vs 1.0 on the same head term; the CE is the same in all three
  np.testing.assert_allclose(total1 - total0, (1.0 - 0.01) * head0, rtol=1e-4)
  assert total2 == total0
  assert not hasattr(delta, "configure") and not hasattr(delta, "_CONFIG")
  assert transfer.get_strategy("l2fe").head_only


@pytest.mark.parametrize("kind,alpha", [("fm", 0.05), ("att", 0.2), ("l2sp", 0.2)])
def test_total_loss_is_ce_plus_alpha_reg_plus_beta_head(kind, alpha):
  source = tiny_source()
  config = delta.Config(alpha=0.2, alpha_noatt=0.05, beta=0.3, bn_train=False)
  setup = eval_setup(kind)   # its params (with the run's constants) fit any config
  images, labels = uint8_images(6), np.array([0, 1, 0, 1, 0, 1])
  params, stats = setup.init(0, images, labels)
  params = {k: v if k in ("head", "frozen") else jax.tree.map(lambda x: 1.05 * x, v)
            for k, v in params.items()}
  w0 = delta.starting_point(source.variables["params"], params)
  taps = delta.default_taps("resnet_s", source.config) if kind != "l2sp" else ()
  loss_fn = jax.jit(delta.make_loss_fn(setup.model, source, kind, w0, taps, config))
  loss, (terms, _) = loss_fn(params, stats, {"image": images, "label": labels}, None)
  assert float(terms["reg"]) > 1e-3
  np.testing.assert_allclose(
      float(loss), float(terms["ce"] + alpha * terms["reg"] + 0.3 * terms["head"]), rtol=1e-6)


