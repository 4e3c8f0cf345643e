"""Training a classifier with the selection paper's SGD schedule: the zoo's members and the
ground-truth fine-tuning (`jtransfer.zoo.ground_truth`) both train through here.

SGD (momentum 0.9, coupled weight decay 5e-4, neither stated in the paper) with the paper's
step decay (x0.1 every 7 of 30 epochs) placed at fractions of a run of any length. Images are
normalised once in numpy (`prenormalize`) and compiled steps and forwards are cached per model
config (`Compiled`), so every member or fine-tune with one config reuses one compilation.

Why not `jtransfer.api.fit`: its 'finetune' strategy is the CWL paper's protocol (Adam, BN in
train mode, the strategy's own LR schedule), while the selection paper fine-tunes with this
SGD step decay and frozen BN statistics; the published model-selection folders were made with
this one. `jtransfer.protocol.fit_converged` (the same stopping rule as the tables' runs) is
shared.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models
from jtransfer.data import Batches
from jtransfer.methods import selection
from jtransfer.protocol import fit_converged
from jtransfer.train import (cross_entropy, fit, init_state, make_optimizer, make_train_step,
                             predict_logits, sgd)

# The paper's step decay (x0.1 every 7 of 30 epochs) as fractions of a run of any length.
PAPER_DECAY_AT = (7 / 30, 14 / 30, 21 / 30, 28 / 30)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How a classifier is trained: SGD with the paper's step decay compressed to the run.

  Attributes:
    lr: initial learning rate (paper: 0.01).
    momentum, weight_decay: SGD momentum and coupled L2 decay (not stated in the paper).
    batch_size: images per step.
    bn_train: BN uses batch statistics and updates its running averages.
    decay_at: fractions of the run where the lr is multiplied by `decay_factor`.
    decay_factor: paper: 0.1.
  """
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  batch_size: int = 64
  bn_train: bool = True
  decay_at: tuple[float, ...] = PAPER_DECAY_AT
  decay_factor: float = 0.1


class Compiled:
  """Compiled train steps and eval forwards, one per (model, train config), reused by runs.

  The inputs are float32 images already normalised with the source's statistics (see
  `prenormalize`), so nothing run-specific is baked into a compilation.
  """

  def __init__(self):
    self._steps: dict = {}
    self._forwards: dict = {}

  def step(self, model, params, config: TrainConfig):
    """(Optimizer, jitted step) for `model` (all params trained, lr injected at init)."""
    key = (model, config.momentum, config.weight_decay, config.bn_train)
    if key not in self._steps:
      opt = make_optimizer(params, [(".*", "all")],
                           {"all": sgd(1.0, config.momentum, config.weight_decay)},
                           injected_lr=True)
      self._steps[key] = (opt, make_train_step(_ce_loss(model, config.bn_train), opt))
    return self._steps[key]

  def forward(self, model, taps: tuple[str, ...] = ()) -> Callable:
    """Jitted eval forward: (params, stats, x) -> logits, or (logits, {tap: array}) with taps
    (any model tap, or `selection.LAST_CONV_OUTPUT`)."""
    key = (model, taps)
    if key not in self._forwards:
      if taps:
        fn = lambda p, s, x: _logits_taps(model, p, s, x, taps)
      else:
        fn = lambda p, s, x: models.apply_model(model, p, s, x)[0]
      self._forwards[key] = jax.jit(fn)
    return self._forwards[key]


def _logits_taps(model, params, stats, x, taps):
  # selection.apply_with_taps: models.apply_model's taps plus the last conv unit's output.
  return selection.apply_with_taps(model, params, stats, x, taps)


def _ce_loss(model, bn_train: bool) -> Callable:
  """CE loss_fn on pre-normalised float images."""

  def loss_fn(params, batch_stats, batch, rng):
    logits, new_stats, _ = models.apply_model(model, params, batch_stats, batch["image"],
                                              train=bn_train, rng=rng)
    ce = cross_entropy(logits, batch["label"])
    return ce, ({"ce": ce}, new_stats if bn_train else batch_stats)

  return loss_fn


def prenormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 images to float32 (x / 255 - mean) / std, once, outside every jitted function."""
  x = images.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _set_lr(state, lr: float):
  # The optimizer's injected scale lives in its state: changing it between steps changes the
  # lr without recompiling (see jtransfer.train.optim.make_optimizer(injected_lr=True)).
  state.opt_state[1].hyperparams["step_size"] = jnp.asarray(lr, jnp.float32)
  return state


def decay_steps(config: TrainConfig, length: int) -> list[int]:
  """The steps in (0, length) at which `config`'s lr decays (its fractions of the run)."""
  return [b for b in sorted({int(round(f * length)) for f in config.decay_at} - {0})
          if b < length]


def fit_step_decay(state, step: Callable, batch_at: Callable, num_steps: int,
                   config: TrainConfig):
  """Runs `step` to `num_steps` with lr = config.lr x factor^(decays passed).

  Args:
    state: a TrainState whose optimizer was built with `injected_lr=True`.
    step: the compiled step.
    batch_at: step -> batch.
    num_steps: length of the run.
    config: lr and its decay points (fractions of `num_steps`).

  Returns:
    The trained state.
  """
  bounds = decay_steps(config, num_steps) + [num_steps]
  lr = config.lr
  for end in bounds:
    state = fit(_set_lr(state, lr), step, batch_at, end)
    lr *= config.decay_factor
  return state


def train_classifier(model, variables: dict, x: np.ndarray, y: np.ndarray, num_steps: int,
                     config: TrainConfig, compiled: Compiled, seed: int = 0):
  """Trains every param of `model` from `variables` on pre-normalised images.

  Args:
    model: a Flax model from jtransfer.models.
    variables: {'params', maybe 'batch_stats'} to start from.
    x: (N, H, W, C) float32 pre-normalised images (see `prenormalize`).
    y: (N,) int labels.
    num_steps: optimiser steps.
    config: the schedule.
    compiled: where compiled steps are shared.
    seed: batch order and step rng.

  Returns:
    (params, batch_stats) after training.
  """
  params, stats = variables["params"], variables.get("batch_stats", {})
  opt, step = compiled.step(model, params, config)
  batches = Batches(x, np.asarray(y, np.int32), config.batch_size, seed)
  state = init_state(params, stats, opt, seed, config.lr)
  state = fit_step_decay(state, step, batches.at, num_steps, config)
  return state.params, state.batch_stats


def train_classifier_converged(model, variables: dict, x: np.ndarray, y: np.ndarray,
                               val: tuple[np.ndarray, np.ndarray], budget, config: TrainConfig,
                               compiled: Compiled, seed: int = 0, on_step=None):
  """`train_classifier` under the protocol's stopping rule: validation accuracy every
  `budget.eval_every` steps, stop after `budget.patience` steps without improvement (at most
  `budget.cap`), keep the best validation state. The step decay is placed at fractions of the
  cap, so a run that stops early ends inside its schedule (as the protocol's runs do).

  Args:
    val: (pre-normalised images, labels) of the validation set.
    budget: a `jtransfer.protocol.Budget`.
    on_step: (step, cap, val acc) after each step: a long run's progress hook
      (`jtransfer.protocol.progress.ticker`), or None.
    (the rest as `train_classifier`)

  Returns:
    (params, batch_stats, info) with info from `protocol.fit_converged` (steps, best_step,
    stopped; the curve dropped).
  """
  params, stats = variables["params"], variables.get("batch_stats", {})
  opt, step = compiled.step(model, params, config)
  batches = Batches(x, np.asarray(y, np.int32), config.batch_size, seed)
  bounds = decay_steps(config, budget.cap)

  def decayed_step(state, batch):
    passed = sum(int(state.step) >= b for b in bounds)
    return step(_set_lr(state, config.lr * config.decay_factor ** passed), batch)

  val_acc = lambda state: evaluate(model, state.params, state.batch_stats, val[0], val[1],
                                   compiled)
  state, info = fit_converged(init_state(params, stats, opt, seed, config.lr), decayed_step,
                              batches.at, val_acc, budget, on_step=on_step)
  info.pop("curve", None)
  return state.params, state.batch_stats, info


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Steps of one pass over `n` images, as `Batches` counts them (a partial batch is dropped)."""
  return max(1, n // max(1, min(batch_size, n)))


def evaluate(model, params, stats, x: np.ndarray, y: np.ndarray, compiled: Compiled) -> float:
  """Top-1 accuracy of `model` on pre-normalised images."""
  logits = predict_logits(compiled.forward(model), params, stats, x)
  return float(np.mean(np.argmax(logits, axis=-1) == y))
