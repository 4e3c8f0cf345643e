"""Tests for jtransfer.methods.sparsity: magnitude masks, schedules, masking in the optimiser."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import surgery
from jtransfer.errors import InputError
from jtransfer.methods import sparsity
from jtransfer.train import adam, fit, init_state, make_optimizer, make_train_step, sgd


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"l1": {"kernel": rng.normal(size=(8, 16)).astype(np.float32),
                 "bias": rng.normal(size=(16,)).astype(np.float32)},
          "l2": {"kernel": rng.normal(size=(16, 3)).astype(np.float32),
                 "bias": np.zeros((3,), np.float32)},
          "stage1/block0": {"kernel": rng.normal(size=(3, 3, 2, 5)).astype(np.float32)}}


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(32, 8)).astype(np.float32),
          "y": rng.normal(size=(32, 3)).astype(np.float32),
          "z": rng.normal(size=(4, 3, 3, 2)).astype(np.float32)}


def _loss_fn(params, stats, batch, rng):
  h = jax.nn.tanh(batch["x"] @ params["l1"]["kernel"] + params["l1"]["bias"])
  out = h @ params["l2"]["kernel"] + params["l2"]["bias"]
  conv = jnp.einsum("nhwc,hwcd->nd", batch["z"], params["stage1/block0"]["kernel"])
  loss = jnp.mean((out - batch["y"]) ** 2) + jnp.mean((conv - 1.0) ** 2)
  # a pull on every entry, so every weight gets a gradient (the pruned ones too)
  loss += 1e-3 * sum(jnp.sum((w - 0.5) ** 2) for w in jax.tree.leaves(params))
  return loss, ({"mse": loss}, stats)


# ----------------------------------------------------------------------------- masks
@pytest.mark.parametrize("s", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_layer_masks_exact_sparsity_and_magnitude(s):
  params = _params()
  masks = sparsity.magnitude_masks(params, s, scope="layer")
  flat_m, flat_p = surgery.flatten(masks), surgery.flatten(params)
  assert set(flat_m) == {"l1/kernel", "l2/kernel", "stage1/block0/kernel"}  # biases unpruned
  for path, m in flat_m.items():
    w = np.abs(flat_p[path])
    assert m.shape == w.shape and m.dtype == bool
    assert (~m).sum() == round(s * w.size)
    if 0 < (~m).sum() < w.size:  # every kept entry is at least as large as every pruned one
      assert w[m].min() >= w[~m].max()
  assert sparsity.mask_sparsity(masks)["layers"]["l1/kernel"] == pytest.approx(
      round(s * 128) / 128)


@pytest.mark.parametrize("s", [0.25, 0.6, 0.9])
def test_global_masks_exact_total_and_one_threshold(s):
  params = _params(1)
  masks = sparsity.magnitude_masks(params, s, scope="global")
  flat_m, flat_p = surgery.flatten(masks), surgery.flatten(params)
  w = np.concatenate([np.abs(flat_p[p]).ravel() for p in flat_m])
  m = np.concatenate([flat_m[p].ravel() for p in flat_m])
  assert (~m).sum() == round(s * w.size)
  assert w[m].min() >= w[~m].max()
  assert sparsity.mask_sparsity(masks)["sparsity"] == pytest.approx(round(s * w.size) / w.size)
  # global rates differ by layer when magnitudes differ: scale one layer up, it is spared
  params["l2"]["kernel"] = np.sign(params["l2"]["kernel"]) * 50 + params["l2"]["kernel"]
  per = sparsity.mask_sparsity(sparsity.magnitude_masks(params, s))["layers"]
  k, n2 = round(s * w.size), 48  # l2 is pruned only once every other entry is
  assert per["l2/kernel"] == pytest.approx(max(0, k - (w.size - n2)) / n2)
  assert per["l1/kernel"] * 128 + per["stage1/block0/kernel"] * 90 == pytest.approx(
      min(k, w.size - n2))


def test_erk_allocation_formula():
  shapes = {"conv1": (3, 3, 1, 8), "conv2": (3, 3, 8, 16), "fc": (256, 64), "head": (64, 3)}
  rates = sparsity.erk_sparsities(shapes, 0.8)
  # by hand: sizes 72, 1152, 16384, 192 (17800); raw densities 15/72, 30/1152, 320/16384,
  # 67/192; eps = 0.2 * 17800 / (15 + 30 + 320 + 67) = 8.24 puts conv1 (1.72) and head (2.87)
  # above 1: both dense; then eps = (3560 - 72 - 192) / (30 + 320) for conv2 and fc
  assert rates["fc"] == pytest.approx(1 - 3296 / 350 * 320 / 16384)
  assert rates["conv2"] == pytest.approx(1 - 3296 / 350 * 30 / 1152)
  size = {p: int(np.prod(s)) for p, s in shapes.items()}
  raw = {p: sum(s) / size[p] for p, s in shapes.items()}
  kept = sum((1 - rates[p]) * size[p] for p in shapes)
  assert kept == pytest.approx(0.2 * sum(size.values()))
  sparse = [p for p in shapes if rates[p] > 0]
  eps = [(1 - rates[p]) / raw[p] for p in sparse]  # one eps for every non-dense layer
  assert max(eps) == pytest.approx(min(eps))
  for p in shapes:
    if rates[p] == 0:  # kept dense only because eps * raw would exceed 1
      assert eps[0] * raw[p] > 1
  assert rates["conv1"] == 0 and rates["fc"] > rates["conv2"] > 0
  masks = sparsity.magnitude_masks({p: {"kernel": np.random.default_rng(0).normal(size=s)}
                                    for p, s in shapes.items()}, 0.8, scope="erk")
  for p in shapes:
    assert (~masks[p]["kernel"]).sum() == round(rates[p] * size[p])
  assert sparsity.erk_sparsities(shapes, 0.0) == dict.fromkeys(shapes, 0.0)


def test_previous_masks_stay_pruned_even_when_large():
  params = _params(2)
  prev = {"l1": {"kernel": np.ones((8, 16), bool)}}
  big = np.unravel_index(np.argmax(np.abs(params["l1"]["kernel"])), (8, 16))
  prev["l1"]["kernel"][big] = False
  masks = sparsity.magnitude_masks(params, 0.5, patterns=["l1/kernel"], scope="layer",
                                   previous=prev)
  assert not masks["l1"]["kernel"][big] and (~masks["l1"]["kernel"]).sum() == 64


def test_apply_masks_and_report():
  params = _params()
  masks = sparsity.magnitude_masks(params, 0.5, scope="layer")
  pruned = sparsity.apply_masks(params, masks)
  np.testing.assert_array_equal(pruned["l1"]["bias"], params["l1"]["bias"])
  rep = sparsity.sparsity_report(pruned)
  assert rep["layers"]["l1/kernel"] == dict(size=128, zeros=64, sparsity=0.5)
  assert rep["zeros"] == 64 + 24 + 45 and rep["size"] == 128 + 48 + 90
  with pytest.raises(InputError, match="shape"):
    sparsity.apply_masks(params, {"l1": {"kernel": np.ones((2, 2), bool)}})
  with pytest.raises(InputError, match="sparsity"):
    sparsity.magnitude_masks(params, 1.5)
  with pytest.raises(InputError, match="scope"):
    sparsity.magnitude_masks(params, 0.5, scope="net")


# ----------------------------------------------------------------------------- schedules
def test_polynomial_schedule_formula():
  kw = dict(initial=0.1, final=0.9, begin_step=100, end_step=1100, frequency=100)
  f = lambda t: float(sparsity.polynomial_sparsity(t, **kw))
  assert f(0) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
  assert f(5000) == pytest.approx(0.9) and f(1100) == pytest.approx(0.9)
  # t = 600: halfway: 0.9 + (0.1 - 0.9) * 0.5^3 = 0.8
  assert f(600) == pytest.approx(0.8)
  # t = 650 is held at the last update step (600); t = 350 -> 300: 0.9 - 0.8 * 0.8^3
  assert f(650) == pytest.approx(0.8)
  assert f(350) == pytest.approx(0.9 - 0.8 * 0.8 ** 3)
  for t in range(100, 1101, 100):
    want = 0.9 + (0.1 - 0.9) * (1 - (t - 100) / 1000) ** 3
    assert f(t) == pytest.approx(want, abs=1e-6)
  with pytest.raises(InputError):
    sparsity.polynomial_sparsity(0, initial=0, final=0.5, begin_step=10, end_step=10)


def test_round_sparsities():
  assert sparsity.round_sparsities(0.8, 4, kind="linear") == pytest.approx([0.2, 0.4, 0.6, 0.8])
  poly = sparsity.round_sparsities(0.8, 4)
  assert poly == pytest.approx([0.8 - 0.8 * (1 - r / 4) ** 3 for r in range(1, 5)])
  geo = sparsity.round_sparsities(0.875, 3, kind="geometric")
  assert [1 - s for s in geo] == pytest.approx([0.5, 0.25, 0.125])
  with pytest.raises(InputError):
    sparsity.round_sparsities(0.5, 0)


# ----------------------------------------------------------------------------- training
def _opt(kind, params, injected):
  tx = {"sgd": sgd(1.0 if injected else 0.05, momentum=0.9, weight_decay=1e-2),
        "adam": adam(1.0 if injected else 0.01)}[kind]
  return make_optimizer(params, [(".*", "all")], {"all": tx}, injected_lr=injected)


@pytest.mark.parametrize("kind,injected", [("sgd", False), ("adam", False), ("adam", True)])
def test_pruned_weights_stay_exactly_zero(kind, injected):
  params = _params()
  masks = sparsity.magnitude_masks(params, 0.6, scope="global")
  opt = sparsity.with_masks(_opt(kind, params, injected), masks)
  step = make_train_step(_loss_fn, opt)
  batch = _batch()
  state = init_state(sparsity.apply_masks(params, masks), {}, opt, 0,
                     lr=(0.05 if kind == "sgd" else 0.01) if injected else None)
  state = fit(state, step, lambda i: batch, 60)
  flat_p, flat_m = surgery.flatten(state.params), surgery.flatten(masks)
  start = surgery.flatten(params)
  for path, m in flat_m.items():
    w = np.asarray(flat_p[path])
    assert np.all(w[~m] == 0.0), path  # exactly zero, not merely small
    assert np.all(w[m] != start[path][m]), path  # every kept weight trained
  assert not np.array_equal(np.asarray(state.params["l1"]["bias"]), params["l1"]["bias"])
  # the control: the same optimiser without masking moves the pruned entries
  plain = _opt(kind, params, injected)
  s2 = init_state(sparsity.apply_masks(params, masks), {}, plain, 0,
                  lr=(0.05 if kind == "sgd" else 0.01) if injected else None)
  s2 = fit(s2, make_train_step(_loss_fn, plain), lambda i: batch, 5)
  assert np.any(np.asarray(s2.params["l1"]["kernel"])[~masks["l1"]["kernel"]] != 0)


def test_replace_masks_reuses_compiled_step_and_keeps_zeros():
  params = _params()
  masks = sparsity.full_masks(params)
  assert all(m.all() for m in surgery.flatten(masks).values())
  opt = sparsity.with_masks(_opt("adam", params, False), masks)
  step = make_train_step(_loss_fn, opt)
  batch = _batch()
  state = fit(init_state(params, {}, opt, 0), step, lambda i: batch, 5)
  for s in (0.3, 0.7):
    new = sparsity.magnitude_masks(jax.tree.map(np.asarray, state.params), s,
                                   previous=sparsity.current_masks(state))
    state = sparsity.replace_masks(state, new)
    state = fit(state, step, lambda i: batch, int(state.step) + 20)
    rep = sparsity.sparsity_report(jax.tree.map(np.asarray, state.params))
    assert rep["sparsity"] == pytest.approx(round(s * rep["size"]) / rep["size"])
    got = sparsity.current_masks(state)
    for p, m in surgery.flatten(new).items():
      np.testing.assert_array_equal(surgery.flatten(got)[p], m)
  assert step._cache_size() == 1
  with pytest.raises(InputError, match="exactly the paths"):
    sparsity.replace_masks(state, {"l1": {"kernel": np.ones((8, 16), bool)}})


def test_masks_of_frozen_params_are_ignored_by_the_trained_subtree():
  params = _params()
  masks = sparsity.magnitude_masks(params, 0.5)
  opt = sparsity.with_masks(make_optimizer(params, [("l2/.*", "frozen"), (".*", "all")],
                                           {"all": adam(0.01)}), masks)
  state = init_state(sparsity.apply_masks(params, masks), {}, opt, 0)
  assert "l2" not in sparsity.current_masks(state)
  state = fit(state, make_train_step(_loss_fn, opt), lambda i: _batch(), 10)
  assert np.all(np.asarray(state.params["l1"]["kernel"])[~masks["l1"]["kernel"]] == 0)


def _masked_sgd_state():
  """(state, compiled step, three round targets to 80%) of a masked SGD run."""
  params = _params()
  opt = sparsity.with_masks(_opt("sgd", params, False), sparsity.full_masks(params))
  return (init_state(params, {}, opt, 0), make_train_step(_loss_fn, opt),
          sparsity.round_sparsities(0.8, 3))


def test_prune_retrain_rounds():
  state, step, targets = _masked_sgd_state()
  seen = []
  state, hist = sparsity.prune_retrain(state, step, lambda i: _batch(i % 3), targets, 7,
                                       scope="layer", evaluate=lambda p: 1.0,
                                       on_round=lambda r, s: seen.append(r.target))
  assert seen == targets and int(state.step) == 21
  for r, t in zip(hist, targets):
    assert r.sparsity == pytest.approx(t, abs=0.01) and r.metric_retrained == 1.0


def test_prune_retrain_with_a_converging_retrain():
  """`retrain` decides each round's training (up to the round's cap) and its step count; the
  masks hold through it: a best-state rollback keeps the round's pruning."""
  from jtransfer.protocol import Budget, fit_converged
  state, step, targets = _masked_sgd_state()
  calls = []
  # a validation score that peaks 2 steps into each round: patience 3 stops at +5, keeps +2
  val = lambda st: -abs(int(st.step) - (calls[-1] + 2))

  def retrain(st, cap):
    calls.append(int(st.step))
    start = int(st.step)
    st, info = fit_converged(st, step, lambda i: _batch(i % 3), val,
                             Budget(cap=cap, eval_every=1, patience=3))
    return st, info["steps"] - start

  state, hist = sparsity.prune_retrain(state, step, lambda i: _batch(i % 3), targets, 7,
                                       scope="layer", retrain=retrain)
  assert calls == [0, 2, 4] and int(state.step) == 6  # each round kept its step +2 state
  assert [r.steps for r in hist] == [5, 5, 5]
  for r, t in zip(hist, targets):
    assert r.sparsity == pytest.approx(t, abs=0.01)
