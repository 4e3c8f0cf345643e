"""The ground truth a selection score is ranked against: the base model fine-tuned on the target.

Every layer is trained with a new head (`transfer.target_model`, which drops the source's hidden
dense layers) by SGD with the paper's step decay and frozen BN statistics
(`jtransfer.zoo.training`). Under the protocol (docs/protocol.md) each run stops by validation
patience and keeps its best validation state, and the LR is chosen on validation accuracy by
`jtransfer.protocol.tuning.tune` (the tables' code, a winning grid edge extended when asked);
with `val_per_class == 0` it is the paper's fixed number of steps at one LR.

  protocol = FineTuneProtocol(steps=1000, lrs=(0.003, 0.01, 0.03), val_per_class=20)
  task = targets.load_target("digits", (28, 28, 1), 50, 200, val_per_class=20)
  run = ground_truth(source, task, protocol, training.Compiled())   # {'test_acc', 'lr', ...}
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from jtransfer.errors import InputError, NonFiniteError
from jtransfer.methods import transfer
from jtransfer.protocol import Budget, tuning
from jtransfer.zoo.targets import TargetTask
from jtransfer.zoo.training import (Compiled, TrainConfig, evaluate, prenormalize,
                                    train_classifier, train_classifier_converged)


@dataclasses.dataclass(frozen=True)
class FineTuneProtocol:
  """How the ground truth is fine-tuned.

  Attributes:
    steps: SGD steps of a fixed run, the cap of a converged one.
    lr: the LR of a fixed run (`val_per_class == 0`).
    lrs: the LR grid a converged run's LR is chosen from by validation accuracy.
    batch_size: images per SGD step.
    train_per_class, test_per_class: target images per class for training and test (0: the
      whole test split).
    val_per_class: validation images per class; 0 = the paper's fixed `steps` at `lr`.
    patience, eval_every: the stopping rule of a converged run.
    tune_extend: LRs the grid may grow by past a winning edge (0: none).
    seed: head init and batch order (the target draw's seed too).
  """
  steps: int = 1000
  lr: float = 0.01
  lrs: tuple[float, ...] = (0.003, 0.01, 0.03)
  batch_size: int = 50
  train_per_class: int = 50
  test_per_class: int = 200
  val_per_class: int = 20
  patience: int = 100
  eval_every: int = 10
  tune_extend: int = 0
  seed: int = 0

  def __post_init__(self):
    if self.train_per_class < 2 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
      raise InputError("--train-per-class must be >= 2 and --steps, --ft-batch-size, --ft-lr "
                       "> 0")
    for flag, value, least in (("--val-per-class", self.val_per_class, 0),
                               ("--tune-extend", self.tune_extend, 0),
                               ("--patience", self.patience, 1),
                               ("--eval-every", self.eval_every, 1)):
      if value < least:
        raise InputError(f"{flag} must be >= {least}, got {value}")
    if not self.lrs or any(not lr > 0 for lr in self.lrs):
      raise InputError(f"--ft-lrs {self.lrs_text}: expected positive numbers")
    if self.tune_extend and (not self.val_per_class or len(set(self.lrs)) < 2):
      raise InputError(f"--tune-extend {self.tune_extend} extends an LR grid chosen on "
                       "validation: it needs --val-per-class >= 1 and at least two --ft-lrs")

  @property
  def converged(self) -> bool:
    """Whether runs stop by validation (the protocol) rather than at a fixed step count."""
    return self.val_per_class > 0

  @property
  def lrs_text(self) -> str:
    """The LR grid as the flag spells it (for reports)."""
    return ",".join(f"{lr:g}" for lr in self.lrs)

  def train_config(self, lr: float | None = None) -> TrainConfig:
    """The SGD schedule of one run (BN statistics frozen)."""
    return TrainConfig(lr=self.lr if lr is None else lr, batch_size=self.batch_size,
                       bn_train=False)

  def budget(self) -> Budget:
    """The stopping rule of a converged run (eval_every clipped to the cap)."""
    return Budget(cap=self.steps, eval_every=min(self.eval_every, self.steps),
                  patience=self.patience)


def finetune(source: transfer.Source, task: TargetTask, steps: int, config: TrainConfig,
             compiled: Compiled, seed: int = 0, **overrides) -> float:
  """Test accuracy after fine-tuning every layer of `source` with a new head on `task`.

  Args:
    source: the base model.
    task: target data.
    steps: SGD steps.
    config: schedule (BN mode included).
    compiled: shared compilations (one per target model config).
    seed: head init, batch order.
    **overrides: target model config overrides, e.g. truncate_after='stage2/block0' (source
      params the truncated model lacks are dropped).

  Returns:
    Top-1 accuracy on `task.test`.
  """
  model = transfer.target_model(source, task.num_classes, **overrides)
  params, stats = transfer.init_target(source, model, seed)
  norm = lambda images: prenormalize(images, source.mean, source.std)
  params, stats = train_classifier(model, {"params": params, "batch_stats": stats},
                                   norm(task.train.images), task.train.labels, steps, config,
                                   compiled, seed)
  return evaluate(model, params, stats, norm(task.test.images), task.test.labels, compiled)


def finetune_converged(source: transfer.Source, task: TargetTask, budget: Budget,
                       config: TrainConfig, compiled: Compiled, seed: int = 0, on_step=None,
                       **overrides) -> dict:
  """`finetune` under the protocol: the run stops by `task.val` accuracy (`budget`) and keeps
  its best validation state (`training.train_classifier_converged`); `on_step` is a long run's
  progress hook (`jtransfer.protocol.progress.ticker`).

  Returns:
    {'test_acc', 'val_acc', 'steps', 'best_step', 'stopped'}.
  """
  if task.val is None:
    raise InputError("converged fine-tuning needs validation images (val_per_class > 0)")
  model = transfer.target_model(source, task.num_classes, **overrides)
  params, stats = transfer.init_target(source, model, seed)
  norm = lambda images: prenormalize(images, source.mean, source.std)
  xval = norm(task.val.images)
  params, stats, info = train_classifier_converged(
      model, {"params": params, "batch_stats": stats}, norm(task.train.images),
      task.train.labels, (xval, task.val.labels), budget, config, compiled, seed, on_step)
  return dict(info, val_acc=evaluate(model, params, stats, xval, task.val.labels, compiled),
              test_acc=evaluate(model, params, stats, norm(task.test.images), task.test.labels,
                                compiled))


def finetune_tuned(source: transfer.Source, task: TargetTask, protocol: FineTuneProtocol,
                   compiled: Compiled, ticker: Callable | None = None, *,
                   run: Callable | None = None, **overrides) -> dict:
  """The ground-truth fine-tuning under the protocol: a converged run at each LR of
  `protocol.lrs`; the LR with the best validation accuracy (ties: the smaller) is kept. With
  `protocol.tune_extend` N a grid whose best LR is its first or last grows by up to N LRs on
  that side (`jtransfer.protocol.tuning.tune`, the grid's own ratio). `ticker(lr)` gives each
  LR's run its progress hook (or None); `run` replaces `finetune_converged` (tests).

  Returns:
    The kept run: {'test_acc', 'val_acc', 'lr', 'steps', 'best_step', 'stopped', 'n_val',
    'lr_val': {lr: validation accuracy, None where the run diverged}}, plus 'edges' (['lr:low']
    or ['lr:high'] when the choice is still on an edge) and 'tune_extend' when the grid may
    grow; the other LRs' test accuracies are dropped unread.

  Raises:
    NonFiniteError: every LR tried diverged.
  """
  run = run or finetune_converged
  budget = protocol.budget()
  runs, diverged = {}, []

  def val_acc(point: dict) -> float:
    lr = point["lr"]
    try:
      runs[lr] = run(source, task, budget, protocol.train_config(lr), compiled, protocol.seed,
                     on_step=ticker and ticker(lr), **overrides)
    except NonFiniteError as e:  # this LR diverged: out of the choice, as validation would say
      runs[lr] = None
      diverged.append(e)
      return -1.0
    return runs[lr]["val_acc"]

  grid = sorted(set(protocol.lrs))
  if len(grid) == 1:  # tune() scores nothing on one point; the ground truth needs its run
    val_acc({"lr": grid[0]})
    tuned = None        # (FineTuneProtocol refuses tune_extend with one LR)
  else:
    tuned = tuning.tune({"lr": grid}, val_acc, protocol.tune_extend)
  if all(r is None for r in runs.values()):
    raise diverged[-1]
  best = grid[0] if tuned is None else tuned.choice["lr"]
  out = dict(runs[best], lr=best, n_val=len(task.val),
             lr_val={f"{lr:g}": None if r is None else r["val_acc"]
                     for lr, r in sorted(runs.items())})
  if protocol.tune_extend:
    out.update(edges=tuned.edges, tune_extend=protocol.tune_extend)
  return out


def ground_truth(source: transfer.Source, task: TargetTask, protocol: FineTuneProtocol,
                 compiled: Compiled, ticker: Callable | None = None, **overrides) -> dict:
  """The accuracy a score is ranked against: `finetune_tuned` under the protocol (`ticker(lr)`
  -> progress hook of that LR's run), or with `val_per_class == 0` one fixed run of
  `protocol.steps` at `protocol.lr` ({'test_acc', 'steps'})."""
  if protocol.converged:
    return finetune_tuned(source, task, protocol, compiled, ticker, **overrides)
  return dict(test_acc=finetune(source, task, protocol.steps, protocol.train_config(),
                                compiled, protocol.seed, **overrides), steps=protocol.steps)


def ground_truth_kind(protocol: FineTuneProtocol) -> str:
  """How a grid's runs are named in its plan line: each scores a model on a target and
  fine-tunes it for the ground truth (an LR grid under the protocol, one fixed run else)."""
  if protocol.converged:
    lrs = len(set(protocol.lrs))
    return f"ground-truth fine-tunings ({lrs} LR{'s' * (lrs > 1)} each, converged)"
  return "ground-truth fine-tunings (fixed steps)"


def finetune_text(protocol: FineTuneProtocol, chosen_per: str = "run") -> str:
  """How the ground truth was fine-tuned (for reports); `chosen_per` names what each LR choice
  covers."""
  p = protocol
  if not p.converged:
    return (f"{p.steps} SGD steps of {p.batch_size} on {p.train_per_class} images/class, lr "
            f"{p.lr:g} x0.1 at 7/30..28/30 of the run, momentum 0.9, weight decay 5e-4, BN "
            "stats frozen (the paper's 30-epoch schedule, shortened).")
  extend = (f" (extended by up to {p.tune_extend} LR{'s' if p.tune_extend > 1 else ''} past an "
            "edge that wins, at the grid's ratio)") if p.tune_extend else ""
  return (f"SGD (momentum 0.9, weight decay 5e-4, batch {p.batch_size}) on "
          f"{p.train_per_class} images/class until validation accuracy "
          f"({p.val_per_class}/class, disjoint from training and test) has not improved for "
          f"{p.patience} steps (checked every {p.eval_every}), at most {p.steps} "
          f"steps, keeping the best validation state; the LR chosen per {chosen_per} from "
          f"{{{p.lrs_text}}}{extend} by validation accuracy (ties: the smaller); "
          "lr x0.1 at 7/30..28/30 of the cap; BN stats frozen. The test split reaches no "
          "choice.")


def check_resume(records: Sequence[dict], tune_extend: int) -> None:
  """Refuses to add runs to `records` whose LR grids were (or were not) extended otherwise.

  Raises:
    InputError: the folder's tuned runs used extension and `tune_extend` does not, or the
      reverse.
  """
  used = {bool(r.get("tune_extend", "edges" in r)) for r in records if "lr_val" in r}
  if used - {bool(tune_extend)}:
    was = "with" if True in used else "without"
    raise InputError(f"--out holds runs tuned {was} LR-grid extension, not --tune-extend "
                     f"{tune_extend}: use the same flag or --overwrite")
