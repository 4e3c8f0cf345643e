"""Tests for jtransfer.methods.delta against direct numpy computations and plain loops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import delta, transfer
from jtransfer.train import init_state, make_train_step

SHAPE = (8, 8, 1)


@functools.lru_cache(maxsize=None)
def _tiny_source(arch="resnet_s", classes=2, seed=0) -> transfer.Source:
  """A tiny random source with non-trivial BN running stats (so eval and train modes differ).

  Variables are drawn in numpy from the init's shapes: compiling Flax's random init costs
  seconds. With 2 classes and no hidden dense layer the source is the same Flax model as its
  2-class target, so `init_target` compiles one init per arch.
  """
  config = (dict(stage_sizes=(1, 1), stage_widths=(4, 8), stem_width=4) if arch == "resnet_s"
            else dict(conv_widths=((4, 4), (8,)), dense_widths=()))
  model = models.get_model(arch, classes, **config)
  shapes = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0), SHAPE))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    n = rng.normal(size=leaf.shape)
    if path.endswith("kernel"):
      return n * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    if path.endswith(("scale", "var")):
      return 1.0 + 0.3 * np.abs(n)
    return 0.1 * n

  variables = {k: surgery.map_with_path(lambda p, v: draw(p, v).astype(np.float32), v)
               for k, v in shapes.items()}
  return transfer.Source(arch, models.model_config(model), variables, SHAPE, (0.4,), (0.3,))


EVAL_BN = delta.Config(bn_train=False, att_head_min_steps=20)


@functools.lru_cache(maxsize=None)
def _eval_setup(kind):
  """Setups with BN in eval mode, shared by tests (each build compiles)."""
  return delta.build_setup(_tiny_source(), 2, 10, kind, config=EVAL_BN)


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)


# ----------------------------------------------------------------------------- regularisers
def test_l2_is_half_sum_of_squares():
  tree = {"a": np.array([1.0, -2.0]), "b": {"c": np.array([[3.0]])}}
  assert float(delta.l2(tree)) == pytest.approx(0.5 * (1 + 4 + 9))


def test_l2sp_and_head_term_match_numpy_and_exclude_head_and_bn_stats():
  source = _tiny_source()
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


# ----------------------------------------------------------------------------- attention
def _loop_attention(model, params, stats, batches, taps, temperature=5.0):
  """One plain forward per (tap, channel, batch), numpy CE, numpy z-score and softmax."""
  out = {}
  forward = jax.jit(lambda p, x: models.apply_model(model, p, stats, x)[0])
  for tap in taps:
    path = f"{tap}/conv/kernel"
    channels = surgery.flatten(params)[path].shape[-1]

    def ce(p, x, y, w):
      logits = np.asarray(forward(p, x), np.float64)
      logp = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1,
                                    keepdims=True)) - logits.max(1, keepdims=True)
      return np.sum(-logp[np.arange(len(y)), y] * w) / np.sum(w)

    inc = np.zeros(channels)
    for x, y, w in batches:
      base = ce(params, x, y, w)
      for j in range(channels):
        def zero(p, v, j=j):
          if p != path:
            return v
          v = np.array(v)
          v[..., j] = 0.0
          return v
        inc[j] += (ce(surgery.map_with_path(zero, params), x, y, w) - base) / len(batches)
    z = (inc - inc.mean()) / inc.std()
    e = np.exp(z / temperature)
    out[tap] = e / e.sum()
  return out


@pytest.mark.parametrize("arch", ["resnet_s", "vgg_s"])
def test_attention_weights_match_plain_loop(arch):
  source = _tiny_source(arch)
  model = source.model   # the 2-class target model; the source variables hold its params
  params, stats = source.variables["params"], source.variables.get("batch_stats", {})
  taps = delta.default_taps(arch, source.config)
  images, labels = _images(7), np.array([0, 1, 1, 0, 1, 0, 0])
  config = delta.Config(att_batch_size=4, att_batches=2, att_max_images=12)  # a padded batch
  batches = delta._attention_batches(images, labels, source.mean, source.std, config)
  assert [float(w.sum()) for _, _, w in batches] == [4.0, 3.0]
  got = delta.attention_weights(model, params, stats, batches, taps, max_images=12)
  want = _loop_attention(model, params, stats, batches, taps)
  assert set(got) == set(taps)
  for tap in taps:
    np.testing.assert_allclose(got[tap], want[tap], rtol=2e-4, atol=1e-6, err_msg=tap)


def test_default_taps():
  assert delta.default_taps("resnet_s", models.model_config(models.get_model("resnet_s", 5))) \
      == ("stage1/block1/conv2", "stage2/block1/conv2", "stage3/block1/conv2")
  assert delta.default_taps("vgg_s", models.model_config(models.get_model("vgg_s", 5))) \
      == ("conv1_2", "conv2_2", "conv3_2")
  assert delta.default_taps("resnet50", models.model_config(models.get_model("resnet50", 5))) \
      == ("stage1/block2/conv3", "stage2/block3/conv3", "stage3/block5/conv3",
          "stage4/block2/conv3")
  with pytest.raises(InputError):
    delta.default_taps("alexnet", {"widths": [1]})


def test_configured_taps_are_checked():
  source = _tiny_source()
  config = delta.Config(taps={"resnet_s": ("stage2/block0/conv1",)})
  setup = delta.build_setup(source, 2, 10, "fm", config)
  p, _ = setup.init(0, _images(4), np.array([0, 1, 0, 1]))
  assert list(p["frozen"]["source"]["maps"]) == ["stage2/block0/conv1"]
  config = delta.Config(taps={"resnet_s": ("stage9/block0/conv1",)})
  with pytest.raises(InputError, match="stage9"):
    delta.build_setup(source, 2, 10, "fm", config)


# ----------------------------------------------------------------------------- loss functions
@pytest.mark.parametrize("kind", ["l2sp", "fm", "att"])
def test_zero_regularisation_when_target_equals_source(kind):
  # BN in eval mode: the target then computes exactly the source's maps (with batch stats,
  # as the authors train, the maps differ from step 0 on).
  setup = _eval_setup(kind)
  images, labels = _images(6), np.array([0, 1, 0, 1, 0, 1])
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
  source = _tiny_source()
  model = transfer.target_model(source, 2)
  params, stats = transfer.init_target(source, model, seed=1)
  params = jax.tree.map(lambda v: v * 1.1, params)
  src_params, _ = transfer.init_target(source, model, seed=1)
  w0 = delta.starting_point(source.variables["params"], params)
  taps = delta.default_taps("resnet_s", source.config)
  x = normalize(_images(3), source.mean, source.std)
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
  source = _tiny_source()
  setup = _eval_setup(kind)
  images, labels = _images(6), np.array([0, 1, 0, 1, 0, 1])
  params, stats = setup.init(0, images, labels)
  assert params["frozen"]["source"]["maps"]
  # A moved backbone, so the regulariser is well above rounding.
  params = {k: v if k in ("head", "frozen") else jax.tree.map(lambda x: 1.05 * x, v)
            for k, v in params.items()}
  live = dict(params, frozen={k: v for k, v in params["frozen"].items() if k != "source"})
  loss_fn = jax.jit(setup.loss_fn)
  for batch_images in (images[[3, 1, 3]], _images(3, seed=9)):  # in the table; not in it
    batch = {"image": batch_images, "label": np.array([0, 1, 0])}
    a = loss_fn(params, stats, batch, jax.random.PRNGKey(0))[1][0]["reg"]
    b = loss_fn(live, stats, batch, jax.random.PRNGKey(0))[1][0]["reg"]
    assert float(b) > 1e-3
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)
  p0, s0 = transfer.init_target(source, setup.model, 0)
  small = delta.SourceMaps(setup.model, source, p0, s0, ["stem"], budget_mb=1e-3)  # 4 images
  assert small.table(images[:1]) is not None and small.table(images) is None


def test_l2_step_is_sgd_on_weight_decayed_ce():
  source = _tiny_source()
  setup = delta.build_setup(source, 2, 10, "l2")
  images, labels = _images(4), np.array([0, 1, 0, 1])
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
  source = _tiny_source()
  setup = transfer.get_strategy("l2fe").build(source, 2, 10, config=delta.Config(beta=0.3))
  images, labels = _images(4), np.array([0, 1, 0, 1])
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
  setup = _eval_setup("att")
  images, labels = _images(6), np.array([0, 1] * 3)   # the shapes other tests compiled
  params, stats = setup.init(0, images, labels)
  att = params["frozen"]["attention"]
  assert all(abs(float(v.sum()) - 1.0) < 1e-5 for v in att.values())
  # Same images: the cache answers (same numbers, also for another seed's run).
  again, _ = setup.init(5, images, labels)
  for t in att:
    np.testing.assert_array_equal(again["frozen"]["attention"][t], att[t])
  # Only the run's own images count: another k-shot draw gives other weights.
  other, _ = setup.init(0, _images(6, seed=4), labels)
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
    transfer.get_strategy("l2sp").build(_tiny_source(), 2, 10, config=delta.Config(
        schedule="cosine"))
  for name in ("l2fe", "l2", "l2sp", "delta_noatt", "delta"):
    assert transfer.get_strategy(name).paper_lrs == (0.01,)


def test_config_knob_reaches_the_loss_and_no_module_state():
  """The config travels into `build` as a knob: beta changes the loss of one setup and not of
  another built before or after it (nothing is stored in the module)."""
  source = _tiny_source()
  build = transfer.get_strategy("l2sp").build
  images, labels = _images(4), np.array([0, 1, 0, 1])
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
  source = _tiny_source()
  config = delta.Config(alpha=0.2, alpha_noatt=0.05, beta=0.3, bn_train=False)
  setup = _eval_setup(kind)   # its params (with the run's constants) fit any config
  images, labels = _images(6), np.array([0, 1, 0, 1, 0, 1])
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


# ----------------------------------------------------------------------------- attention BN mode
def _loop_attention_batch_stats(model, params, stats, batches, taps, temperature=5.0):
  """`_loop_attention` with every forward (base and ablated) in train mode: BN normalises with
  the batch's own statistics."""
  out = {}
  forward = jax.jit(lambda p, x: models.apply_model(model, p, stats, x, train=True)[0])
  for tap in taps:
    path = f"{tap}/conv/kernel"
    channels = surgery.flatten(params)[path].shape[-1]

    def ce(p, x, y):
      logp = np.asarray(jax.nn.log_softmax(forward(p, x)), np.float64)
      return -np.mean(logp[np.arange(len(y)), y])

    inc = np.zeros(channels)
    for x, y, _ in batches:
      base = ce(params, x, y)
      for j in range(channels):
        kernel = np.array(surgery.flatten(params)[path])
        kernel[..., j] = 0.0
        ablated = surgery.map_with_path(lambda q, v: kernel if q == path else v, params)
        inc[j] += (ce(ablated, x, y) - base) / len(batches)
    z = (inc - inc.mean()) / inc.std()
    e = np.exp(z / temperature)
    out[tap] = e / e.sum()
  return out


def _attention(mode, images, labels, **changes):
  source = _tiny_source()
  model = transfer.target_model(source, 2)
  config = delta.Config(att_bn=mode, att_batch_size=4, att_batches=2, att_head_min_steps=5,
                        att_max_images=16, **changes)
  return delta.AttentionComputer(source, model, delta.default_taps("resnet_s", source.config),
                                 config)(images, labels)


def test_attention_bn_mode_is_honoured():
  import dataclasses
  from jtransfer.train import evaluate
  images, labels = _images(7, seed=3), np.array([0, 1, 1, 0, 1, 0, 0])
  source = _tiny_source()
  model = transfer.target_model(source, 2)
  taps = delta.default_taps("resnet_s", source.config)
  config = delta.Config(att_bn="train", att_batch_size=4, att_batches=2, att_head_min_steps=5,
                        att_max_images=16)
  got = {mode: _attention(mode, images, labels) for mode in delta.ATT_BN_MODES}
  for a, b in (("eval", "train"), ("eval", "authors"), ("authors", "train")):
    assert any(not np.allclose(got[a][t], got[b][t], rtol=1e-3) for t in taps), (a, b)
  # 'train': the probe in train mode, then every ablation forward with batch statistics, on
  # unpadded batches (4 + 3 images): a plain loop over channels gives the same weights.
  params, stats = transfer.init_target(source, model, 0)
  head, probe_stats = delta.train_probe_bn_train(model, params, stats, images, labels,
                                                 source.mean, source.std, config)
  batches = delta._attention_batches(images, labels, source.mean, source.std, config, pad=False)
  assert [len(y) for _, y, _ in batches] == [4, 3]
  want = _loop_attention_batch_stats(model, dict(params, head=head), stats, batches, taps)
  for t in taps:
    np.testing.assert_allclose(got["train"][t], want[t], rtol=2e-4, atol=1e-6, err_msg=t)
  # 'authors': the same probe, then eval-mode ablation with the running statistics the probe's
  # train-mode forwards left (padded batches: eval mode ignores the zero-weight copies).
  padded = delta._attention_batches(images, labels, source.mean, source.std, config)
  want = _loop_attention(model, dict(params, head=head), probe_stats, padded, taps)
  for t in taps:
    np.testing.assert_allclose(got["authors"][t], want[t], rtol=2e-4, atol=1e-6, err_msg=t)
  # 'eval': the source's running statistics, as before the option existed.
  feats = evaluate.predict_logits(delta._features_fn(model, source.mean, source.std), params,
                                  stats, images)
  eval_head = delta.train_probe(params["head"], feats, labels,
                                dataclasses.replace(config, att_bn="eval"))
  want = _loop_attention(model, dict(params, head=eval_head), stats, padded, taps)
  for t in taps:
    np.testing.assert_allclose(got["eval"][t], want[t], rtol=2e-4, atol=1e-6, err_msg=t)
  with pytest.raises(InputError, match="att_bn"):
    delta.Config(att_bn="running").validate()


def test_authors_probe_moves_running_stats_by_torch_momentum():
  # One probe step over all 6 images: the stem's running mean becomes 0.9 * source mean + 0.1 *
  # the batch mean of the stem's raw conv output (torch momentum 0.1), which the ablation then
  # uses in eval mode.
  source = _tiny_source()
  model = transfer.target_model(source, 2)
  params, stats = transfer.init_target(source, model, 0)
  images, labels = _images(6, seed=4), np.array([0, 1, 0, 1, 0, 1])
  config = delta.Config(att_batch_size=6, att_head_epochs=1, att_head_min_steps=1)
  _, new_stats = delta.train_probe_bn_train(model, params, stats, images, labels, source.mean,
                                            source.std, config)
  _, _, taps = models.apply_model(model, params, stats,
                                  normalize(images, source.mean, source.std), taps=("stem",))
  raw = np.asarray(taps["stem"], np.float64)
  want = 0.9 * np.asarray(stats["stem"]["bn"]["mean"]) + 0.1 * raw.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(new_stats["stem"]["bn"]["mean"], want, rtol=1e-5, atol=1e-6)
  want_var = 0.9 * np.asarray(stats["stem"]["bn"]["var"]) + 0.1 * raw.var(axis=(0, 1, 2))
  np.testing.assert_allclose(new_stats["stem"]["bn"]["var"], want_var, rtol=1e-4, atol=1e-6)


def test_authors_probe_closed_form_equals_the_step_loop():
  # Every probe batch holds all 6 images: 40 identical steps; the closed form (2 forwards)
  # must give the loop's head and running statistics.
  import dataclasses
  source = _tiny_source()
  model = transfer.target_model(source, 2)
  params, stats = transfer.init_target(source, model, 0)
  images, labels = _images(6, seed=5), np.array([0, 1, 0, 1, 0, 1])
  config = delta.Config(att_batch_size=8, att_head_epochs=1, att_head_min_steps=40)
  got = delta.train_probe_bn_train(model, params, stats, images, labels, source.mean,
                                   source.std, config)
  want = delta.train_probe_bn_train(model, params, stats, images, labels, source.mean,
                                    source.std, dataclasses.replace(config, att_probe_loop=True))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
  # The statistics did move (40 steps of momentum 0.9: within 1.5% of the batch statistics).
  assert not np.allclose(got[1]["stem"]["bn"]["mean"], stats["stem"]["bn"]["mean"])


def test_channel_chunks_are_even_and_bounded():
  assert delta.channel_chunk(256, 20, 4096) == 128      # room for 204: two calls of 128
  assert delta.channel_chunk(64, 20, 4096) == 64
  assert delta.channel_chunk(512, 20, 4096) == 171      # 3 calls, 1 padded row
  assert delta.channel_chunk(10, 1000, 100) == 1        # at least one channel per call
  # the memory bound: 4 images of a 3.2 MB map (resnet50's stage1 tap at 224 px) in 512 MB
  # leave room for 160 images, 40 channels per call
  assert delta.channel_chunk(256, 4, 4096, 56 * 56 * 256 * 4, 512.0) == 37  # 7 calls of 37
  assert delta.channel_chunk(256, 4, 4096, 56 * 56 * 256 * 4, 1e9) == 256
  for c, b, m in [(960, 32, 4096), (7, 3, 10), (2048, 64, 4096)]:
    k = delta.channel_chunk(c, b, m)
    assert k * b <= max(m, b) and -(-c // k) * k - c < k
