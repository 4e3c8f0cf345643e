"""The generic step: trainable-only gradients, frozen params untouched, injected LR, NaN guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jtransfer import models, surgery
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.train import (adam, evaluate, fit, init_state, make_optimizer, make_train_step,
                             schedules, sgd, train_step_fn)


def _setup(arch="resnet_s"):
  model = models.get_model(arch, 3)
  v = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 28, 28, 1))
  y = jnp.arange(8) % 3

  def loss_fn(params, stats, batch, rng):
    logits, new_stats, _ = models.apply_model(model, params, stats, batch["image"], train=True)
    ce = evaluate.cross_entropy(logits, batch["label"])
    return ce, ({"ce": ce}, new_stats)

  return model, v, {"image": x, "label": y}, loss_fn


def test_frozen_params_bit_identical_after_steps():
  _, v, batch, loss_fn = _setup()
  opt = make_optimizer(v["params"], [("head/.*", "head"), ("stage3/.*", "top"), (".*", "frozen")],
                       {"head": sgd(0.1), "top": sgd(0.01)})
  state = init_state(v["params"], v["batch_stats"], opt, 0)
  before = surgery.flatten(jax.tree.map(np.array, state.params))
  step = make_train_step(loss_fn, opt)
  for _ in range(3):
    state, m = step(state, batch)
  after = surgery.flatten(state.params)
  for path, value in before.items():
    if path.startswith(("head/", "stage3/")):
      assert not np.array_equal(value, after[path]), path
    else:
      np.testing.assert_array_equal(value, after[path], err_msg=path)


def test_optimizer_state_covers_only_trainable():
  _, v, _, _ = _setup()
  opt = make_optimizer(v["params"], [("head/.*", "head"), (".*", "frozen")],
                       {"head": optax.adam(1e-3)})
  state = opt.init(v["params"])
  n_state = sum(np.size(x) for x in jax.tree.leaves(state))
  head = surgery.count(v["params"]["head"])
  assert head * 2 <= n_state <= head * 2 + 8  # Adam mu, nu + counters


def test_trainable_gradient_equals_full_gradient_restricted():
  _, v, batch, loss_fn = _setup()
  params, stats = v["params"], v["batch_stats"]
  # jitted: run op by op, the two backward passes compile every op on its own (about 20 s)
  full = jax.jit(jax.grad(lambda p: loss_fn(p, stats, batch, None)[0]))(params)
  opt = make_optimizer(params, [("head/.*", "h"), ("stage2/.*", "h"), (".*", "frozen")],
                       {"h": optax.sgd(1.0)})
  trainable, frozen = surgery.split(params, opt.trainable)
  part = jax.jit(jax.grad(lambda t: loss_fn(surgery.combine(t, frozen), stats, batch, None)[0]))(
      trainable)
  full_flat, part_flat = surgery.flatten(full), surgery.flatten(part)
  assert set(part_flat) == {p for p in full_flat if p.startswith(("head/", "stage2/"))}
  for path, g in part_flat.items():
    # two compiled programs fuse differently: float32 rounding, never a missing term
    np.testing.assert_allclose(g, full_flat[path], rtol=2e-5, atol=1e-6, err_msg=path)


def test_step_jaxpr_has_no_frozen_gradient():
  # Structural, not left to XLA: the traced step only differentiates the head.
  _, v, batch, loss_fn = _setup("vgg_s")
  v = {"params": v["params"]} if "batch_stats" not in v else v
  opt = make_optimizer(v["params"], [("head/.*", "h"), (".*", "frozen")], {"h": optax.sgd(0.1)})
  shapes = [tuple(x.shape) for x in jax.tree.leaves(opt.init(v["params"]))]
  conv_shape = tuple(v["params"]["conv3_2"]["conv"]["kernel"].shape)
  assert conv_shape not in shapes


def test_injected_lr_equals_baked_lr():
  _, v, batch, loss_fn = _setup()
  rules = [(".*", "all")]
  baked = make_optimizer(v["params"], rules, {"all": sgd(0.05, weight_decay=1e-3)})
  injected = make_optimizer(v["params"], rules, {"all": sgd(1.0, weight_decay=1e-3)},
                            injected_lr=True)
  s1 = init_state(v["params"], v["batch_stats"], baked, 0)
  s2 = init_state(v["params"], v["batch_stats"], injected, 0, lr=0.05)
  f1, f2 = make_train_step(loss_fn, baked), make_train_step(loss_fn, injected)
  for _ in range(3):
    s1, _ = f1(s1, batch)
    s2, _ = f2(s2, batch)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  with pytest.raises(InputError, match="pass lr="):
    injected.init(v["params"])


def test_nonfinite_loss_stops_with_step_and_term_and_keeps_state():
  _, v, batch, loss_fn = _setup()

  def bad_loss(params, stats, b, rng):
    loss, (terms, st) = loss_fn(params, stats, b, rng)
    reg = jnp.where(b["poison"], jnp.nan, 0.0)
    return loss + reg, ({**terms, "reg": reg}, st)

  opt = make_optimizer(v["params"], [(".*", "all")], {"all": adam(1e-3)})
  state = init_state(v["params"], v["batch_stats"], opt, 0)
  step = make_train_step(bad_loss, opt, donate=False)
  batches = lambda i: {**batch, "poison": jnp.asarray(i == 2)}
  with pytest.raises(NonFiniteError) as e:
    fit(state, step, batches, 5)
  assert e.value.step == 2 and e.value.terms == ["reg"]
  assert "non-finite reg at step 2" in str(e.value)
  # The guarded step leaves the state unchanged.
  s2, m = jax.jit(train_step_fn(bad_loss, opt))(state, batches(2))
  assert not bool(m["finite"]) and int(s2.step) == int(state.step)


def test_optimizer_rule_errors():
  _, v, _, _ = _setup()
  with pytest.raises(InputError, match="no transform"):
    make_optimizer(v["params"], [(".*", "x")], {})
  with pytest.raises(InputError, match="nothing would train"):
    make_optimizer(v["params"], [(".*", "frozen")], {})


def test_schedules():
  s = schedules.step_decay(0.01, steps_per_epoch=10, every_epochs=7)
  assert s(69) == pytest.approx(0.01) and s(70) == pytest.approx(0.001)
  e = schedules.exponential_per_epoch(0.01, steps_per_epoch=5, decay_epochs=10)
  assert float(e(4)) == pytest.approx(0.01) and float(e(50)) == pytest.approx(0.001, rel=1e-4)
  m = schedules.milestones(0.01, [6000])
  assert float(m(5999)) == pytest.approx(0.01) and float(m(6000)) == pytest.approx(0.001)


def test_interleaved_latency_times_calls_round_robin():
  from jtransfer.train.evaluate import interleaved_latency_ms
  order = []
  calls = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
  ms = interleaved_latency_ms(calls, runs=3, warmup=1)
  assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]  # warm-ups, rotating rounds
  assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
  import time
  slow = interleaved_latency_ms({"sleep": lambda: time.sleep(0.01)}, runs=3, warmup=0)
  assert 9 <= slow["sleep"] < 100
  with pytest.raises(ValueError, match="runs"):
    interleaved_latency_ms(calls, runs=0)
  assert interleaved_latency_ms({}, runs=2) == {}
