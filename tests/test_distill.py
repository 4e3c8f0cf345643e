"""Tests for jtransfer.methods.distill: the joint loss, augmentation, the closed-over teacher."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models
from jtransfer.data import Batches, augment
from jtransfer.errors import InputError
from jtransfer.methods import distill, transfer
from jtransfer.train import adam, evaluate, init_state, make_optimizer, make_train_step

SHAPE = (8, 8, 1)
MEAN, STD = [0.4], [0.3]


# ----------------------------------------------------------------------------- numpy reference
def _np_softmax(z):
  z = z - z.max()
  e = np.exp(z)
  return e / e.sum()


def _np_loss(s, t, y, temp, lam):
  """(1 - lam) CE + lam T^2 KL(p_t^T || p_s^T), one image at a time, float64."""
  total = 0.0
  for si, ti, yi in zip(s.astype(np.float64), t.astype(np.float64), y):
    ce = -np.log(_np_softmax(si)[yi])
    pt, ps = _np_softmax(ti / temp), _np_softmax(si / temp)
    kl = sum(pt[k] * (np.log(pt[k]) - np.log(ps[k])) for k in range(len(pt)))
    total += (1 - lam) * ce + lam * temp ** 2 * kl
  return total / len(y)


def _logits(n=6, k=5, seed=0):
  g = np.random.default_rng(seed)
  return (3 * g.normal(size=(n, k))).astype(np.float32), \
      (3 * g.normal(size=(n, k))).astype(np.float32), g.integers(0, k, n).astype(np.int32)


@pytest.mark.parametrize("temp,lam", [(1.0, 0.5), (4.0, 0.7), (2.5, 1.0), (0.5, 0.2)])
def test_loss_matches_numpy(temp, lam):
  s, t, y = _logits()
  loss, terms = distill.distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temp, lam)
  np.testing.assert_allclose(float(loss), _np_loss(s, t, y, temp, lam), rtol=1e-5)
  np.testing.assert_allclose(float(terms["ce"]), _np_loss(s, t, y, temp, 0.0), rtol=1e-5)
  np.testing.assert_allclose(float(terms["kd"]), _np_loss(s, t, y, temp, 1.0), rtol=1e-5)


def test_gradient_matches_hand_derivation():
  """d/ds = [(1 - lam)(p_s - onehot) + lam T (p_s^T - p_t^T)] / N; no gradient to the teacher."""
  s, t, y = _logits(4, 3, seed=1)
  temp, lam = 3.0, 0.6
  f = lambda s_, t_: distill.distill_loss(s_, t_, jnp.asarray(y), temp, lam)[0]
  gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
  want = np.stack([(1 - lam) * (_np_softmax(si) - np.eye(3)[yi]) +
                   lam * temp * (_np_softmax(si / temp) - _np_softmax(ti / temp))
                   for si, ti, yi in zip(s.astype(np.float64), t.astype(np.float64), y)]) / 4
  np.testing.assert_allclose(np.asarray(gs), want, rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(gt) == 0)  # teacher logits are under stop_gradient


def test_lambda_zero_is_plain_cross_entropy():
  s, t, y = _logits(seed=2)
  ce = evaluate.cross_entropy(jnp.asarray(s), jnp.asarray(y))
  for temp in (1.0, 5.0):
    loss, terms = distill.distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temp, 0.0)
    assert float(loss) == float(ce) and set(terms) == {"ce"}
  # lambda = 0 needs no teacher at all
  assert float(distill.distill_loss(jnp.asarray(s), None, jnp.asarray(y), 1.0, 0.0)[0]) == \
      float(ce)
  # T = 1, lambda = 1 is KL(p_t || p_s) = CE against the soft targets minus their entropy
  pt = np.stack([_np_softmax(r) for r in t.astype(np.float64)])
  ps = np.stack([_np_softmax(r) for r in s.astype(np.float64)])
  kl = np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), axis=1))
  np.testing.assert_allclose(float(distill.distill_loss(jnp.asarray(s), jnp.asarray(t),
                                                        jnp.asarray(y), 1.0, 1.0)[0]), kl,
                             rtol=1e-5)


def test_bad_hyperparameters():
  s, t, y = _logits()
  for temp, lam in ((0.0, 0.5), (-1.0, 0.5), (float("nan"), 0.5), (2.0, 1.5), (2.0, -0.1)):
    with pytest.raises(InputError):
      distill.distill_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temp, lam)
  with pytest.raises(InputError, match="teacher logits"):
    distill.distill_loss(jnp.asarray(s), None, jnp.asarray(y), 2.0, 0.5)
  with pytest.raises(InputError, match="shape"):
    distill.distill_loss(jnp.asarray(s), jnp.asarray(t[:, :3]), jnp.asarray(y), 2.0, 0.5)
  with pytest.raises(InputError, match="--augment"):
    distill.distill_loss_fn(None, MEAN, STD, None, recipe="rotate")
  with pytest.raises(InputError, match="needs a teacher"):
    distill.distill_loss_fn(None, MEAN, STD, None, lam=0.5, recipe="pad2")
  with pytest.raises(InputError, match="compact config"):
    distill.compact_config("resnet18")


# ----------------------------------------------------------------------------- with models
@functools.lru_cache(maxsize=1)
def _nets():
  """A 'large' teacher and a narrower student with distinct param shapes (built once)."""
  teacher = models.get_model("vgg_s", 3, conv_widths=((12,), (24,)), dense_widths=())
  student = distill.student_model("vgg_s", 3, {"conv_widths": [[4], [8]],
                                               "dense_widths": [16]})
  return teacher, student, _numpy_init(teacher, 0), _numpy_init(student, 1)


def _numpy_init(model, seed):
  # Shapes from eval_shape, values from numpy: Flax's own init (eager or jitted) spends
  # seconds compiling its random initialisers, and these tests need no particular values.
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE))))
  g = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.3 * g.normal(size=a.shape)).astype(np.float32),
                      shapes["params"])


def _batch(n=8, seed=0):
  g = np.random.default_rng(seed)
  return {"image": g.integers(0, 255, (n, *SHAPE)).astype(np.uint8),
          "label": g.integers(0, 3, n).astype(np.int32)}


def test_student_model_drops_dense_and_shrinks():
  _, student, _, sp = _nets()
  assert student.dense_widths == () and "fc6" not in sp
  big = models.get_model("resnet_s", 5)
  small = distill.student_model("resnet_s", 5, distill.compact_config("resnet_s"))
  count = lambda m: sum(np.size(x) for x in jax.tree.leaves(
      models.abstract_variables(m, (28, 28, 1))["params"]))
  assert count(small) < count(big) / 3


def test_teacher_untouched_by_student_training():
  """Bitwise: the train step (which donates its state) never writes the closed-over teacher."""
  teacher, student, tp, sp = _nets()
  before = jax.tree.map(lambda x: np.array(x, copy=True), tp)
  t_fn = distill.teacher_fn(transfer.eval_forward(teacher, MEAN, STD), tp, {})
  loss_fn = distill.distill_loss_fn(student, MEAN, STD, t_fn, temperature=3.0, lam=0.5,
                                    recipe="pad2+flip")
  opt = make_optimizer(sp, [(".*", "all")], {"all": adam(1e-2)})
  state = init_state(sp, {}, opt, 0)
  step = make_train_step(loss_fn, opt)
  for i in range(3):
    state, m = step(state, _batch(seed=i))
    assert float(m["kd"]) > 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), tp, before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                         state.params, sp)
  assert all(jax.tree.leaves(changed))  # the student did train


def _out_shapes(jaxpr):
  """Shapes of every equation output, recursing into sub-jaxprs (pjit, custom_jvp, ...)."""
  j = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in j.eqns:
    for v in eqn.outvars:
      yield tuple(v.aval.shape)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from _out_shapes(sub)


def test_teacher_not_in_differentiated_tree():
  """Structural: the gradient computation has the student's params as its only inputs, the
  teacher's are constants, and nothing shaped like a teacher-only param is ever computed (a
  teacher gradient would be)."""
  teacher, student, tp, sp = _nets()
  forward = transfer.eval_forward(teacher, MEAN, STD)
  loss_fn = distill.distill_loss_fn(student, MEAN, STD, distill.teacher_fn(forward, tp, {}),
                                    temperature=2.0, lam=0.5, recipe="pad2")
  batch, rng = _batch(), jax.random.PRNGKey(0)
  grad_fn = lambda p: jax.value_and_grad(loss_fn, has_aux=True)(p, {}, batch, rng)
  jaxpr = jax.make_jaxpr(grad_fn)(sp)
  t_only = ({tuple(x.shape) for x in jax.tree.leaves(tp)}
            - {tuple(x.shape) for x in jax.tree.leaves(sp)})
  assert len(t_only) >= 4
  assert [tuple(v.aval.shape) for v in jaxpr.jaxpr.invars] == \
      [tuple(x.shape) for x in jax.tree.leaves(sp)]
  assert t_only <= {tuple(np.shape(c)) for c in jaxpr.consts}
  assert not t_only & set(_out_shapes(jaxpr))
  # Control: with the teacher's params differentiated too, teacher-shaped outputs do appear.
  def both(p, t):
    fn = distill.distill_loss_fn(student, MEAN, STD, lambda im: forward(t, {}, im),
                                 temperature=2.0, lam=0.5, recipe="pad2")
    return fn(p, {}, batch, rng)[0]
  control = jax.make_jaxpr(jax.grad(both, argnums=(0, 1)))(sp, tp)
  assert t_only <= set(_out_shapes(control))


def test_teacher_sees_the_augmented_batch():
  """A teacher identical to the student gives KL = 0 only if both see the same crops."""
  _, student, _, sp = _nets()
  forward = transfer.eval_forward(student, MEAN, STD)
  t_fn = distill.teacher_fn(forward, sp, {})
  batch, rng = _batch(16), jax.random.PRNGKey(5)
  loss_fn = distill.distill_loss_fn(student, MEAN, STD, t_fn, temperature=2.0, lam=0.5,
                                    recipe="pad2+flip")
  _, (terms, _) = jax.jit(loss_fn)(sp, {}, batch, rng)
  assert abs(float(terms["kd"])) < 1e-6
  # Control: the teacher on the un-augmented batch disagrees with the student on the crops.
  aug_rng, _ = jax.random.split(rng)
  crops = augment.augment(jnp.asarray(batch["image"]), aug_rng, augment.parse("pad2+flip"))
  kd = distill.soft_kl(forward(sp, {}, crops), forward(sp, {}, batch["image"]), 2.0)
  assert float(kd) > 1e-4


def test_cached_logits_equal_closed_over_teacher():
  """Without augmentation, cached teacher logits in the batch give the same loss and gradient
  as running the closed-over teacher in the loss; batches come in `Batches` order."""
  teacher, student, tp, sp = _nets()
  t_fn = distill.teacher_fn(transfer.eval_forward(teacher, MEAN, STD), tp, {})
  data = _batch(20, seed=7)
  logits = distill.cached_teacher_logits(t_fn, data["image"], batch_size=8)
  at = distill.cached_batches(data["image"], data["label"], logits, 6, seed=3)
  ref = Batches(data["image"], data["label"], 6, 3)
  kw = dict(temperature=4.0, lam=0.7)
  cached_fn = distill.distill_loss_fn(student, MEAN, STD, **kw)
  live_fn = distill.distill_loss_fn(student, MEAN, STD, t_fn, **kw)
  grad = lambda fn: jax.jit(jax.grad(lambda p, b: fn(p, {}, b, jax.random.PRNGKey(0))[0]))
  cached_grad, live_grad = grad(cached_fn), grad(live_fn)
  for step in (0, 4):
    b = at(step)
    np.testing.assert_array_equal(b["image"], ref.at(step)["image"])
    g1 = cached_grad(sp, b)
    g2 = live_grad(sp, {k: b[k] for k in ("image", "label")})
    # The teacher ran on batches of 8 (cached) and of 6 (live): float32 rounding of the two
    # shapes differs by ~1e-7 on gradient entries near zero (measured 1.2e-7 on this CPU).
    jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6), g1, g2)
  with pytest.raises(InputError, match="teacher"):
    cached_fn(sp, {}, _batch(), jax.random.PRNGKey(0))
  with pytest.raises(InputError, match="differ in number"):
    distill.cached_batches(data["image"], data["label"], logits[:3], 6, 0)


def test_lambda_zero_trains_like_the_ce_strategy():
  """T = 1, lambda = 0: the distillation step is the plain CE step (same params after 3 steps)."""
  _, student, _, sp = _nets()
  opt = make_optimizer(sp, [(".*", "all")], {"all": adam(1e-2)})
  runs = []
  for loss_fn in (distill.distill_loss_fn(student, MEAN, STD, temperature=1.0, lam=0.0),
                  transfer.ce_loss_fn(student, MEAN, STD)):
    state = init_state(sp, {}, opt, 0)
    step = make_train_step(loss_fn, opt)
    for i in range(3):
      state, _ = step(state, _batch(seed=i))
    runs.append(state.params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *runs)


def test_teacher_fn_from_model_equals_from_forward():
  teacher, _, tp, _ = _nets()
  x = _batch(4)["image"]
  from_model = jax.jit(distill.teacher_fn(teacher, tp, {}, MEAN, STD))(x)
  from_forward = distill.teacher_fn(transfer.eval_forward(teacher, MEAN, STD), tp, {})(x)
  np.testing.assert_allclose(from_model, from_forward, rtol=1e-6, atol=1e-6)
  with pytest.raises(InputError, match="mean and std"):
    distill.teacher_fn(teacher, tp, {})
