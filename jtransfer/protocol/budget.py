"""Run budgets by convergence: train until validation accuracy stops improving.

A run evaluates its validation accuracy every `eval_every` steps and stops once it has not
improved for `patience` steps, or at `cap` steps; it returns the state of its best validation
step. Protocol rule 1 (docs/protocol.md): the budget study (1x, 2x, 4x the cap and patience)
shows the rule, not the cap, decides.

`stopping_point` is the rule alone, on a recorded curve, so it can be tested on synthetic
curves; `fit_converged` applies the same rule while training.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax

from jtransfer.errors import InputError
from jtransfer.train.loop import nonfinite_error


@dataclasses.dataclass(frozen=True)
class Budget:
  """When a run stops.

  Attributes:
    cap: the most train steps a run takes.
    eval_every: steps between validation evaluations.
    patience: a run stops after this many steps without a validation improvement.
    min_delta: an improvement must exceed the best accuracy so far by more than this.
  """
  cap: int = 1000
  eval_every: int = 10
  patience: int = 100
  min_delta: float = 0.0

  def __post_init__(self):
    for name in ("cap", "eval_every", "patience"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1:
        raise InputError(f"budget {name} must be an integer >= 1, got {v!r}")
    if not self.min_delta >= 0:
      raise InputError(f"budget min_delta must be >= 0, got {self.min_delta!r}")

  @classmethod
  def from_flags(cls, cap: int, eval_every: int, patience: int) -> Optional["Budget"]:
    """The budget of the experiment flags --steps (cap), --eval-every, --patience; None when
    patience is 0 (train exactly `cap` steps, keep the last state). eval_every is clipped to
    the cap so a short run is evaluated at least once."""
    if patience == 0:
      return None
    return cls(cap=cap, eval_every=min(eval_every, cap), patience=patience)

  def scaled(self, factor: int) -> "Budget":
    """The same rule with cap and patience times `factor` (the budget study's 2x, 4x)."""
    return dataclasses.replace(self, cap=self.cap * factor, patience=self.patience * factor)

  def eval_steps(self) -> list[int]:
    """The steps at which validation accuracy is measured (the cap always among them)."""
    steps = list(range(self.eval_every, self.cap + 1, self.eval_every))
    return steps if steps and steps[-1] == self.cap else steps + [self.cap]


def stopping_point(curve: Sequence[tuple[int, float]], budget: Budget) -> tuple[int, int]:
  """Where the rule stops on a validation curve.

  Args:
    curve: (step, validation accuracy) at the budget's evaluation steps, in order.
    budget: the rule.

  Returns:
    (best_step, stop_step): the step whose state the run keeps (the first to reach the best
    accuracy, step 0 meaning the initial state, accuracy -inf) and the step it stops at.
  """
  best_step, best = 0, -float("inf")
  for step, acc in curve:
    if acc > best + budget.min_delta:
      best_step, best = step, acc
    if step - best_step >= budget.patience or step >= budget.cap:
      return best_step, step
  return best_step, curve[-1][0] if curve else 0


def _snapshot(state: Any) -> Any:
  # The train step donates its input state's buffers, so the best state must be a copy.
  return jax.tree.map(lambda x: x.copy() if isinstance(x, jax.Array) else x, state)


def fit_converged(state: Any, step_fn: Callable, batch_at: Callable[[int], Any],
                  val_acc: Optional[Callable[[Any], float]], budget: Budget
                  ) -> tuple[Any, dict]:
  """Trains until `stopping_point` says stop; returns the best validation state.

  Args:
    state: the initial TrainState.
    step_fn: `(state, batch) -> (state, metrics)`, from `make_train_step`.
    batch_at: the batch of a step (a pure function of the step).
    val_acc: state -> validation accuracy; None (no validation data) trains to the cap and
      keeps the last state.
    budget: the stopping rule.

  Returns:
    (state, info) where info = {'steps': steps trained, 'best_step': step of the kept state,
    'stopped': 'patience' or 'cap', 'curve': [[step, val_acc], ...]}.

  Raises:
    NonFiniteError: a step had a non-finite loss or gradient.
  """
  start = int(state.step)
  curve: list[list[float]] = []
  best_state, best_step, best = state, start, -float("inf")
  evals = set(budget.eval_steps())
  step = start
  for step in range(start + 1, budget.cap + 1):
    state, m = step_fn(state, batch_at(step - 1))
    if not bool(m["finite"]):
      raise nonfinite_error(step - 1, m)
    if val_acc is None or step not in evals:
      continue
    acc = float(val_acc(state))
    curve.append([step, acc])
    if acc > best + budget.min_delta:
      best_state, best_step, best = _snapshot(state), step, acc
    if step - best_step >= budget.patience:
      return best_state, dict(steps=step, best_step=best_step, stopped="patience", curve=curve)
  if val_acc is None:
    return state, dict(steps=step, best_step=step, stopped="cap", curve=curve)
  return best_state, dict(steps=step, best_step=best_step, stopped="cap", curve=curve)
