"""One transfer run from an initial state: a fixed number of steps, or until validation stops
improving (`budget.fit_converged`), then the strategy's `finalize` (WiSE-FT's interpolation).

The experiment grids (`experiments.fewshot.TargetRuns.run`) and the Python API
(`jtransfer.api.fit`) both train through `train_run`, so a run means the same thing in both.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np

from jtransfer.protocol.budget import Budget, fit_converged
from jtransfer.train import parallel
from jtransfer.train.loop import fit


@dataclasses.dataclass
class RunOutcome:
  """What `train_run` returns.

  Attributes:
    state: the kept TrainState (best validation state under a budget, else the last), with
      `finalize` applied to its params.
    info: {'steps' trained, 'best_step' kept, 'stopped' ('fixed', 'patience' or 'cap'),
      'curve' [[step, validation accuracy], ...] (empty for fixed runs)}.
    initial: the starting params on the host (numpy), when asked for or needed by `finalize`;
      else None.
  """
  state: Any
  info: dict
  initial: Optional[Any] = None


def train_run(state: Any, step_fn: Callable, batch_at: Callable[[int], Any], *, steps: int,
              budget: Optional[Budget] = None,
              val_acc: Optional[Callable[[Any], float]] = None,
              finalize: Optional[Callable] = None, keep_initial: bool = False) -> RunOutcome:
  """Trains one run.

  Args:
    state: the initial TrainState.
    step_fn: `(state, batch) -> (state, metrics)` (`train.make_train_step`); it may donate
      the state's buffers, so the starting params are copied to the host first when kept.
    batch_at: the batch of a step (a pure function of the step).
    steps: the run's length without a budget.
    budget: stop by validation patience and keep the best validation state; None (or no
      `val_acc`) trains exactly `steps` steps and keeps the last state.
    val_acc: state -> validation accuracy.
    finalize: `(trained params, initial params) -> params` (`Setup.finalize`), or None.
    keep_initial: return the starting params (e.g. to measure how far the filters moved).

  Raises:
    NonFiniteError: a step had a non-finite loss or gradient.
  """
  initial = (jax.tree.map(np.array, state.params)
             if finalize is not None or keep_initial else None)
  if budget is None or val_acc is None:
    state = fit(state, step_fn, batch_at, steps)
    info = dict(steps=steps, best_step=steps, stopped="fixed", curve=[])
  else:
    state, info = fit_converged(state, step_fn, batch_at, val_acc, budget)
  if parallel.is_multiprocess():  # replicated over every process: a local copy to read
    state = parallel.host_copy(state)
  if finalize is not None:  # e.g. WiSE-FT: the weights interpolated toward the start
    state = state.replace(params=finalize(state.params, initial))
  return RunOutcome(state, info, initial)
