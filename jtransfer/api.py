"""The Python API: fine-tune a source on your own arrays, tune it on validation, score sources,
prune by CWL scales. Every experiment table runs the same pieces underneath.

  from jtransfer import api
  source = api.random_source("resnet_s", (28, 28, 1))          # or transfer.load_source(DIR)
  result = api.fit(source, "l2sp", (x, y), (x_val, y_val), lr=0.01, knobs={"alpha": 0.01},
                   budget=api.Converged(cap=500, patience=100, eval_every=10))
  api.evaluate(result, x_test, y_test)                          # top-1 accuracy in [0, 1]
  best = api.tune(source, "freeze", (x, y), (x_val, y_val), lrs=(1e-3, 1e-2))
  api.score_sources({"a": source, "b": other}, x, y, metrics=("logme", "transrate"))

* `fit` builds the strategy's `Setup` (`methods.transfer`), trains through
  `protocol.run.train_run` (fixed steps, or validation patience keeping the best state, as the
  tables' runs) and applies the strategy's `finalize` (WiSE-FT's interpolation).
* `tune` chooses the LR and the strategy's knobs by `protocol.tuning.tune`, the tables' code:
  the best mean validation accuracy, a grid edge extended when it wins.
* Images: the data layer's rule (`data.validate_images`), uint8 (N, H, W, C) at the source's
  input shape; float images in [0, 1] are accepted and rounded to uint8 (`as_images`).

BatchNorm: `bn='train'` by default (batch statistics while training, running averages updated
and used at evaluation, PyTorch's `model.train()`; +1.3 points over frozen statistics in
published/bn_mode), `bn='frozen'` keeps the source's running statistics; only the strategies
that update the backbone's kernels follow it, the others always keep the source's statistics
(`jtransfer.methods.bn_rule`; `FitResult.bn` says which mode a run trained in).

Frozen-backbone strategies train their head on the full forward here (the grids cache backbone
features instead, `experiments.fewshot`); augmentation is the grids' (`--augment`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import jax
import numpy as np

from jtransfer.data import Batches, validate_images
from jtransfer.errors import InputError
# (re-exported: the API is one import)
from jtransfer.inputs import as_images, random_source, source_from_model  # noqa: F401
from jtransfer.methods import bn_rule, transfer
from jtransfer.protocol import tuning
from jtransfer.protocol.budget import Budget
from jtransfer.protocol.run import train_run
from jtransfer.scoring import METRICS, prune_cwl, score_sources  # noqa: F401
from jtransfer.train import accuracy, init_state, make_train_step, predict_logits

ArrayPair = tuple[np.ndarray, np.ndarray]


# ----------------------------------------------------------------------------- budgets
@dataclasses.dataclass(frozen=True)
class FixedSteps:
  """Train exactly `steps` steps and keep the last state."""
  steps: int = 100

  def __post_init__(self):
    if not isinstance(self.steps, int) or self.steps < 1:
      raise InputError(f"FixedSteps.steps must be an integer >= 1, got {self.steps!r}")


@dataclasses.dataclass(frozen=True)
class Converged:
  """Evaluate validation accuracy every `eval_every` steps, stop after `patience` steps without
  improvement or at `cap`, keep the best validation state (`protocol.budget`)."""
  cap: int = 500
  patience: int = 100
  eval_every: int = 10

  def budget(self) -> Budget:
    """The protocol's `Budget` (eval_every clipped to the cap, as the experiment flags)."""
    return Budget(cap=self.cap, eval_every=min(self.eval_every, self.cap),
                  patience=self.patience)


def _pair(data, source: transfer.Source, num_classes: int, what: str) -> ArrayPair:
  try:
    images, labels = data
  except (TypeError, ValueError):
    raise InputError(f"{what}: expected a pair (images, labels)") from None
  images, labels = as_images(images, what), np.asarray(labels)
  validate_images(images, labels, num_classes, what)
  transfer.validate_source_input(source, images.shape[1:], what)
  return images, labels.astype(np.int32)


# ----------------------------------------------------------------------------- fit
@dataclasses.dataclass
class FitResult:
  """A trained target model.

  Attributes:
    strategy, lr, knobs: what trained it.
    model: the target Flax module; `variables` its {'params', 'batch_stats'} (numpy, finalize
      applied).
    history: {'steps', 'best_step', 'stopped', 'curve' [[step, validation accuracy], ...]
      (Converged), 'val_acc' (of the kept state; None without val)}.
    source: the source it started from; num_classes: the target's class count.
    forward: (params, batch_stats, uint8 images) -> logits, eval mode.
    bn: the BatchNorm mode it trained in ('train' or 'frozen', `jtransfer.methods.bn_rule`).
  """
  strategy: str
  lr: float
  knobs: dict
  model: Any
  variables: dict
  history: dict
  source: transfer.Source
  num_classes: int
  forward: Any = dataclasses.field(repr=False, default=None)
  bn: str = bn_rule.FROZEN


class _Trainers:
  """Setups and compiled steps per (strategy, knobs), reused across runs (the LR is injected)."""

  def __init__(self, source: transfer.Source, num_classes: int, steps: int, bn: str):
    self.source, self.num_classes, self.steps = source, num_classes, steps
    self.bn = bn_rule.check(bn)
    self._built: dict = {}

  def get(self, strategy: str, knobs: Mapping[str, Any]):
    key = (strategy, transfer.hp_string({k: v for k, v in knobs.items()
                                         if isinstance(v, (int, float))}),
           repr(sorted((k, v) for k, v in knobs.items() if not isinstance(v, (int, float)))))
    if key not in self._built:
      s = transfer.get_strategy(strategy)
      unknown = sorted(set(knobs) - set(s.knobs) - {"config"})
      if unknown:
        raise InputError(f"strategy {strategy!r} has no knob(s) {unknown}; its knobs are "
                         f"{sorted(s.knobs) or 'none'}")
      setup = s.build(self.source, self.num_classes, self.steps, bn=self.bn, **dict(knobs))
      self._built[key] = (setup, make_train_step(setup.loss_fn, setup.optimizer))
    return self._built[key]


def _steps_of(budget: Union[FixedSteps, Converged]) -> int:
  if isinstance(budget, FixedSteps):
    return budget.steps
  if isinstance(budget, Converged):
    return budget.cap
  raise InputError(f"budget must be FixedSteps(n) or Converged(cap, patience, eval_every), "
                   f"got {budget!r}")


def _num_classes(train, val, num_classes: Optional[int]) -> int:
  if num_classes is not None:
    return int(num_classes)
  labels = [np.asarray(train[1])] + ([np.asarray(val[1])] if val is not None else [])
  return int(max(int(np.max(v)) for v in labels if v.size)) + 1


def _fit(trainers: _Trainers, strategy: str, train: ArrayPair, val: Optional[ArrayPair],
         lr: float, knobs: Mapping[str, Any], budget, seed: int, batch_size: int) -> FitResult:
  if not (np.isfinite(lr) and lr > 0):
    raise InputError(f"lr must be a finite number > 0, got {lr!r}")
  setup, step = trainers.get(strategy, knobs)
  params, stats = setup.init(seed, *train)
  state = init_state(params, stats, setup.optimizer, seed, float(lr))
  batches = Batches(*train, batch_size, seed)
  val_acc = None
  if val is not None and isinstance(budget, Converged):
    val_acc = lambda st: accuracy(predict_logits(setup.forward, st.params, st.batch_stats,
                                                 val[0]), val[1])
  out = train_run(state, step, batches.at, steps=_steps_of(budget),
                  budget=budget.budget() if isinstance(budget, Converged) else None,
                  val_acc=val_acc, finalize=setup.finalize)
  variables = {"params": jax.tree.map(np.asarray, out.state.params),
               "batch_stats": jax.tree.map(np.asarray, out.state.batch_stats)}
  history = dict(out.info, val_acc=None)
  if val is not None:  # of the kept (finalized) state: what `evaluate` on val returns
    history["val_acc"] = accuracy(predict_logits(setup.forward, variables["params"],
                                                 variables["batch_stats"], val[0]), val[1])
  return FitResult(strategy, float(lr), dict(knobs), setup.model, variables, history,
                   trainers.source, trainers.num_classes, setup.forward,
                   transfer.get_strategy(strategy).bn_mode(trainers.bn))


def fit(source: transfer.Source, strategy: str, train, val=None, *, lr: float,
        knobs: Optional[Mapping[str, Any]] = None,
        budget: Union[FixedSteps, Converged] = FixedSteps(100), seed: int = 0,
        batch_size: int = 32, num_classes: Optional[int] = None,
        bn: str = bn_rule.TRAIN) -> FitResult:
  """Transfers `source` to (images, labels) with a registered strategy.

  Args:
    source: the pretrained model (`transfer.load_source(DIR)`, `source_from_model`).
    strategy: a registered strategy name (`transfer.get_strategy`), e.g. 'freeze', 'l2sp',
      'freeze_cwl', 'delta', 'wise_ft'.
    train, val: (images, labels) pairs; images (N, H, W, C) at the source's input shape,
      uint8 or float in [0, 1]; labels integers in [0, num_classes). `val` is needed by
      `Converged` (without it a Converged run trains to its cap).
    lr: the learning rate.
    knobs: the strategy's own hyper-parameters (`Strategy.knobs`, e.g. {'alpha': 0.01}; DELTA
      strategies also take `config`, a `delta.Config`); missing ones take the paper's values.
    budget: `FixedSteps(n)` or `Converged(cap, patience, eval_every)`.
    seed: seeds the new head and the batch order.
    batch_size: images per step (a smaller training set is one batch).
    num_classes: the target's class count; default: the largest label + 1.
    bn: BatchNorm while training, 'train' (default: batch statistics, running averages
      updated, PyTorch's model.train()) or 'frozen' (the source's running statistics); a
      strategy that keeps every source kernel fixed keeps the source's statistics whatever
      this says (`jtransfer.methods.bn_rule`). No effect on models without BN.

  Returns:
    A `FitResult`; `evaluate(result, images, labels)` scores it.

  Raises:
    InputError: bad data, an unknown strategy or knob, a bad lr or budget.
    NonFiniteError: a step had a non-finite loss or gradient.
  """
  k = _num_classes(train, val, num_classes)
  train = _pair(train, source, k, "train")
  val = _pair(val, source, k, "val") if val is not None else None
  trainers = _Trainers(source, k, _steps_of(budget), bn)
  return _fit(trainers, strategy, train, val, lr, dict(knobs or {}), budget, seed, batch_size)


def predict(result: FitResult, images, batch_size: int = 256) -> np.ndarray:
  """Logits (N, num_classes) of the trained model on `images` (eval mode)."""
  images = as_images(images)
  transfer.validate_source_input(result.source, images.shape[1:], "predict")
  v = result.variables
  return predict_logits(result.forward, v["params"], v.get("batch_stats", {}), images,
                        batch_size)


def evaluate(result: FitResult, images, labels, batch_size: int = 256) -> float:
  """Top-1 accuracy in [0, 1] of the trained model on (images, labels)."""
  images, labels = _pair((images, labels), result.source, result.num_classes, "evaluate")
  return accuracy(predict(result, images, batch_size), labels)


# ----------------------------------------------------------------------------- tune
@dataclasses.dataclass
class TuneResult:
  """What `tune` returns.

  Attributes:
    lr, knobs: the chosen point.
    val_acc: its validation accuracy (None when the grid had one point).
    table: one row per point scored: {'lr', knob..., 'val_acc'}, in the order scored.
    edges: axes whose choice is still on a grid edge after extending ('lr:high', ...).
  """
  lr: float
  knobs: dict
  val_acc: Optional[float]
  table: list
  edges: list


def tune(source: transfer.Source, strategy: str, train, val, *,
         lrs: Optional[Sequence[float]] = None,
         knob_grid: Optional[Mapping[str, Sequence[float]]] = None,
         budget: Union[FixedSteps, Converged] = FixedSteps(100), seed: int = 0,
         batch_size: int = 32, max_extend: int = 2, fixed_knobs: Optional[Mapping] = None,
         num_classes: Optional[int] = None, bn: str = bn_rule.TRAIN) -> TuneResult:
  """Chooses the LR and the strategy's knobs on validation data, as the tables do.

  Every point of lrs x knob_grid is trained on `train` and scored by its validation accuracy
  (`protocol.tuning.tune`: the best wins, ties to the smaller values, a winning edge of a
  geometric axis is extended up to `max_extend` times within the strategy's `knob_bounds`).

  Args:
    source, strategy, train, val, budget, seed, batch_size, num_classes, bn: as `fit`.
    lrs: the LR grid; default the strategy's paper grid.
    knob_grid: knob -> values; default the strategy's own grids (`Strategy.knobs`).
    max_extend: extensions per side of each axis.
    fixed_knobs: knobs passed unchanged to every run (e.g. DELTA's `config`).

  Returns:
    A `TuneResult`; `fit(..., lr=r.lr, knobs=r.knobs)` trains the chosen point.
  """
  s = transfer.get_strategy(strategy)
  k = _num_classes(train, val, num_classes)
  train, val = _pair(train, source, k, "train"), _pair(val, source, k, "val")
  grid = {"lr": tuple(lrs) if lrs is not None else s.paper_lrs,
          **{n: tuple(v) for n, v in (knob_grid if knob_grid is not None else s.knobs).items()}}
  trainers = _Trainers(source, k, _steps_of(budget), bn)
  table: list = []

  def score(point):
    knobs = {**dict(fixed_knobs or {}), **{n: v for n, v in point.items() if n != "lr"}}
    r = _fit(trainers, strategy, train, val, point["lr"], knobs, budget, seed, batch_size)
    acc = r.history["val_acc"]
    table.append(dict(point, val_acc=acc))
    return acc

  found = tuning.tune(grid, score, max_extend, s.knob_bounds)
  choice = dict(found.choice)
  lr = choice.pop("lr")
  return TuneResult(lr, {**dict(fixed_knobs or {}), **choice}, found.score, table,
                    list(found.edges))
