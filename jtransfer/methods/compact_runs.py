"""The runs of compact transfer: a teacher on a draw, and each compact variant learning from it.

`CompactTrainer` holds what the runs of one experiment share (the sources, compiled train
steps, eval forwards, FLOP counts and timed forwards, each built once per shape); `run_teacher`
and `run_variant` train one run on one `Draw` and return its outcome (the fields a record
holds). Which variants exist and how the teacher is pruned: `jtransfer.methods.compact`.

Every run trains by the protocol's rule (`jtransfer.protocol.run.train_run`: validation
patience keeping the best validation state, or exactly the cap); students use Adam, BN with
batch statistics, and the joint loss of `jtransfer.methods.distill` (lambda 0 for the
labels-only variants). A draw without a test split (a tuning draw) is scored on validation
only: nothing of the test split is read.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from jtransfer import models, surgery
from jtransfer.data import Batches, augment
from jtransfer.errors import InputError
from jtransfer.methods import compact, distill, transfer
from jtransfer.protocol.budget import Budget
from jtransfer.protocol.run import train_run
from jtransfer.train import (accuracy, adam, init_state, make_optimizer, make_train_step,
                             predict_logits)
from jtransfer.train.evaluate import forward_calls, interleaved_latency_ms


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """How the runs of one compact-transfer experiment train and are measured.

  Attributes:
    arch: the teacher's architecture (its source's).
    student_arch: the compact student's architecture.
    strategy: the teacher's transfer strategy (`transfer.get_strategy`).
    teacher_steps, student_steps: step caps of a teacher and a student run.
    eval_every, patience: the stopping rule (`Budget.from_flags`; patience 0 = the cap).
    batch_size: training batch size.
    augment: the students' training augmentation (`jtransfer.data.augment` recipe).
    prune_keep, prune_residual: the pruned variants' kept fraction and residual rule.
    latency_batches, latency_runs: batch sizes timed, and timed calls per batch size.
  """
  arch: str = "resnet_s"
  student_arch: str = "resnet_s"
  strategy: str = "finetune"
  teacher_steps: int = 500
  student_steps: int = 1000
  eval_every: int = 10
  patience: int = 100
  batch_size: int = 64
  augment: str = "none"
  prune_keep: float = 0.5
  prune_residual: str = "group"
  latency_batches: tuple[int, ...] = (1, 128)
  latency_runs: int = 20


@dataclasses.dataclass
class Draw:
  """One k-shot draw of a target: training and validation images, and the test split on an
  evaluation draw (None on a tuning draw, which never sees it)."""
  seed: int
  images: np.ndarray
  labels: np.ndarray
  val: tuple[np.ndarray, np.ndarray]
  test: Optional[Any] = None  # a dataset with .images, .labels

  @property
  def role(self) -> str:
    """'eval' with a test split, else 'tune'."""
    return "tune" if self.test is None else "eval"


@dataclasses.dataclass
class Teacher:
  """A teacher trained on a draw: its variables and setup, `fn` (images -> logits under
  stop_gradient), its cached training logits (None when augmenting) and test predictions
  (None on a tuning draw)."""
  params: Any
  stats: Any
  setup: transfer.Setup
  fn: Callable
  logits: Optional[np.ndarray] = None
  pred: Optional[np.ndarray] = None


def _logits(forward, params, stats, images):
  return predict_logits(forward, params, stats, images)


class CompactTrainer:
  """Compiled steps, forwards and costs shared by the runs of one experiment."""

  def __init__(self, settings: RunSettings, source: transfer.Source,
               student_src: Optional[transfer.Source] = None,
               student_config: Optional[Mapping[str, Any]] = None):
    """`student_config` overrides the default compact widths (ignored with a compact source,
    whose own config the student takes)."""
    self.settings, self.source, self.student_src = settings, source, student_src
    self.config = compact.student_config(settings.student_arch, student_config, student_src)
    stats_from = student_src or source
    self.s_mean, self.s_std = stats_from.mean, stats_from.std
    self.shape = tuple(source.input_shape)
    # Augmented batches: the teacher runs inside the loss (no cached logits).
    self.augmenting = augment.parse(settings.augment).active
    self._setups: dict = {}
    self._steps: dict = {}
    self._forwards: dict = {}
    self._costs: dict = {}
    self._calls: dict = {}

  def converge(self, state, step, batch_at: Callable, forward, val, cap: int, on_step=None):
    """Trains one run by the protocol's rule (validation patience, best validation state
    kept), or exactly `cap` steps under patience 0; `on_step` (step, cap, val acc) is a long
    run's progress hook (`jtransfer.protocol.progress.ticker`).

    Returns:
      (state, {'steps', 'best_step', 'stopped'}).
    """
    s = self.settings
    images, labels = val
    val_acc = lambda st: accuracy(_logits(forward, st.params, st.batch_stats, images), labels)
    out = train_run(state, step, batch_at, steps=cap,
                    budget=Budget.from_flags(cap, s.eval_every, s.patience), val_acc=val_acc,
                    on_step=on_step)
    info = dict(out.info)
    info.pop("curve", None)
    return out.state, info

  # -- teacher
  def teacher_setup(self, k: int, hp: str):
    """(Setup, compiled step) of the teacher strategy at knobs `hp`, built once."""
    if (k, hp) not in self._setups:
      setup = transfer.get_strategy(self.settings.strategy).build(
          self.source, k, self.settings.teacher_steps, **transfer.parse_hp(hp))
      self._setups[(k, hp)] = (setup, make_train_step(setup.loss_fn, setup.optimizer))
    return self._setups[(k, hp)]

  def train_teacher(self, k, images, labels, val, seed, lr, hp, on_step=None):
    """(params, batch_stats, setup, info) of the teacher trained at (lr, hp)."""
    setup, step = self.teacher_setup(k, hp)
    params, stats = setup.init(seed, images, labels)
    state = init_state(params, stats, setup.optimizer, seed, lr)
    state, info = self.converge(state, step,
                                Batches(images, labels, self.settings.batch_size, seed).at,
                                setup.forward, val, self.settings.teacher_steps, on_step)
    return (jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.batch_stats),
            setup, info)

  # -- students
  def student(self, k: int):
    """The compact student with a `k`-class head."""
    return distill.student_model(self.settings.student_arch, k, self.config)

  def student_init(self, k: int, seed: int, pretrained: bool):
    """(params, batch_stats) of a student: from the compact source, or random."""
    model = self.student(k)
    if pretrained:
      if self.student_src is None:
        raise InputError("a student from pretrained weights needs a compact source")
      if models.model_config(transfer.target_model(self.student_src, k)) != \
          models.model_config(model):
        raise InputError("the compact source does not match the student config")
      return transfer.init_target(self.student_src, model, seed)
    v = models.init_model(model, jax.random.PRNGKey(seed), self.shape)
    return v["params"], v.get("batch_stats", {})

  def step_for(self, model, mean, std, temperature: float, lam: float, teacher,
               key) -> tuple[Callable, Any]:
    """(compiled step, optimizer) for a student, cached under `key` + (T, lambda) (key None:
    not cached). lam == 0 is the plain cross-entropy of the labels-only students."""
    # With augmentation the teacher is closed over (so it sees the augmented batch), which
    # makes the step specific to that teacher: not cached.
    closed = teacher if (lam > 0 and self.augmenting) else None
    full = None if (key is None or closed is not None) else (*key, temperature, lam)
    if full is not None and full in self._steps:
      return self._steps[full]
    loss_fn = distill.distill_loss_fn(model, mean, std, closed, temperature=temperature,
                                      lam=lam, recipe=self.settings.augment, bn_train=True)
    params = models.abstract_variables(model, self.shape)["params"]
    # The LR is injected per run (init_state), so one compiled step serves the whole grid.
    opt = make_optimizer(params, [(".*", "all")], {"all": adam(1.0)}, injected_lr=True)
    out = (make_train_step(loss_fn, opt), opt)
    if full is not None:
      self._steps[full] = out
    return out

  def forward(self, model, mean, std, key):
    """The jitted eval forward of `model`, built once per `key` (None: not cached)."""
    if key is None:
      return transfer.eval_forward(model, mean, std)
    if key not in self._forwards:
      self._forwards[key] = transfer.eval_forward(model, mean, std)
    return self._forwards[key]

  def measure(self, forward, params, stats, key) -> dict:
    """{'flops', 'latency_ms'} of the model under `key`, compiled once per key. Its latency
    is None until `retime` times it together with the other models of its draw."""
    if key not in self._costs:
      flops, self._calls[key] = forward_calls(forward, params, stats, self.shape,
                                              self.settings.latency_batches)
      self._costs[key] = {"flops": flops, "latency_ms": None}
    return self._costs[key]

  def retime(self, keys) -> None:
    """Times the forwards of `keys` (every batch size) together, round-robin, so a load
    change on a shared machine hits the teacher and its students alike; sets their
    'latency_ms'."""
    keys = list(dict.fromkeys(keys))
    calls = {(key, b): call for key in keys for b, call in self._calls[key].items()}
    ms = interleaved_latency_ms(calls, runs=self.settings.latency_runs)
    for key in keys:
      self._costs[key]["latency_ms"] = {str(b): ms[(key, b)] for b in self._calls[key]}

  def measured(self, key) -> bool:
    """Whether the model under `key` has been measured (its forward is ready to time)."""
    return key in self._calls

  def latency(self, key) -> dict:
    """{batch: ms} of the model under `key` as `retime` last measured it."""
    return dict(self._costs[key]["latency_ms"])

  def train_student(self, model, params, stats, lr, mean, std, temperature, lam, teacher,
                    data, val, seed, step_key, forward, on_step=None):
    """(params, batch_stats, info) of a student trained with the joint loss at (T, lambda);
    `data` = (images, labels, the teacher's cached logits or None)."""
    images, labels, logits = data
    step, opt = self.step_for(model, mean, std, temperature, lam, teacher, step_key)
    s = self.settings
    if lam > 0 and not self.augmenting:
      batch_at = distill.cached_batches(images, labels, logits, s.batch_size, seed)
    else:
      batch_at = Batches(images, labels, s.batch_size, seed).at
    state = init_state(params, stats, opt, seed, lr)
    state, info = self.converge(state, step, batch_at, forward, val, s.student_steps, on_step)
    return state.params, state.batch_stats, info


# ----------------------------------------------------------------------------- one run
def run_teacher(trainer: CompactTrainer, k: int, draw: Draw, lr: float, hp: str,
                on_step=None, measure: bool = True) -> tuple[Teacher, dict, Optional[tuple]]:
  """Trains the teacher on `draw` at (lr, hp); `measure` False skips its costs (a teacher
  that only teaches is not reported).

  Returns:
    (the Teacher, its outcome {'val_acc', 'test_acc' (None on a tuning draw), 'steps',
    'best_step', 'stopped', and on an evaluation draw 'params', 'flops', 'config'}, the cost
    key to time it under (None on a tuning draw)).

  Raises:
    NonFiniteError: the run diverged.
  """
  params, stats, setup, info = trainer.train_teacher(k, draw.images, draw.labels, draw.val,
                                                     draw.seed, lr, hp, on_step)
  fn = distill.teacher_fn(setup.forward, params, stats)
  teacher = Teacher(params, stats, setup, fn)
  if not trainer.augmenting:
    teacher.logits = distill.cached_teacher_logits(fn, draw.images)
  out = dict(val_acc=accuracy(_logits(setup.forward, params, stats, draw.val[0]), draw.val[1]),
             test_acc=None)
  if draw.test is None:
    return teacher, dict(out, **info), None
  out.update(info)
  test_logits = _logits(setup.forward, params, stats, draw.test.images)
  out["test_acc"] = accuracy(test_logits, draw.test.labels)
  teacher.pred = np.argmax(test_logits, -1)
  if not measure:
    return teacher, out, None
  key = ("teacher", k)
  c = trainer.measure(setup.forward, params, stats, key)
  out.update(params=surgery.count(params), flops=c["flops"],
             config=models.model_config(setup.model))
  return teacher, out, key


def run_variant(trainer: CompactTrainer, variant: str, k: int, draw: Draw, lr: float,
                knobs: Mapping[str, float], teacher: Optional[Teacher],
                on_step=None) -> tuple[dict, Optional[tuple]]:
  """Trains the compact `variant` (anything but 'teacher') on `draw`.

  Args:
    knobs: T and lam for the distilled variants (`compact.KD`), else empty.
    teacher: the teacher trained on this draw (variants in `compact.NEEDS_TEACHER`), else
      None.

  Returns:
    (outcome {'val_acc', 'test_acc', 'steps', 'best_step', 'stopped', and on an evaluation
    draw 'agreement' with the teacher's test predictions (when there is a teacher),
    'acc_before_ft' (pruned variants), 'params', 'flops', 'config'}, the cost key to time it
    under, None on a tuning draw).

  Raises:
    NonFiniteError: the run diverged.
  """
  s = trainer.settings
  if variant in compact.NEEDS_TEACHER and teacher is None:
    raise InputError(f"the {variant} variant needs the teacher trained on its draw")
  kd = variant in compact.KD
  temperature, lam = (knobs["T"], knobs["lam"]) if kd else (1.0, 0.0)
  extra: dict = {}
  if variant in compact.PRUNED:
    p, st, cfg = compact.prune_teacher(teacher.params, teacher.stats,
                                       models.model_config(teacher.setup.model), s.prune_keep,
                                       s.prune_residual)
    model = models.from_config(s.arch, cfg)
    mean, std = trainer.source.mean, trainer.source.std
    key = ("pruned", k, json.dumps(cfg, sort_keys=True))
    fwd = trainer.forward(model, mean, std, key)
    if draw.test is not None:
      extra["acc_before_ft"] = accuracy(_logits(fwd, p, st, draw.test.images), draw.test.labels)
  else:
    model = trainer.student(k)
    cfg = models.model_config(model)
    mean, std = trainer.s_mean, trainer.s_std
    p, st = trainer.student_init(k, draw.seed, variant in compact.NEEDS_COMPACT_SOURCE)
    key = ("student", k)
    fwd = trainer.forward(model, mean, std, key)
  data = (draw.images, draw.labels, teacher.logits if kd else None)
  p, st, info = trainer.train_student(model, p, st, lr, mean, std, temperature, lam,
                                      teacher.fn if kd else None, data, draw.val, draw.seed,
                                      key, fwd, on_step)
  p, st = jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, st)
  out = dict(val_acc=accuracy(_logits(fwd, p, st, draw.val[0]), draw.val[1]), test_acc=None,
             **info)
  if draw.test is None:
    return out, None
  logits = _logits(fwd, p, st, draw.test.images)
  out["test_acc"] = accuracy(logits, draw.test.labels)
  if teacher is not None:
    out["agreement"] = float(np.mean(np.argmax(logits, -1) == teacher.pred))
  c = trainer.measure(fwd, p, st, key)
  out.update(extra, params=surgery.count(p), flops=c["flops"], config=cfg)
  return out, key
