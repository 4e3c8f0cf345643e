"""The training loop: steps, checkpoints, resume, progress bar, JSON-lines metrics, NaN guard."""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Optional

import numpy as np

from jtransfer.errors import NonFiniteError
from jtransfer.train.checkpoint import RunCheckpointer
from jtransfer.train.state import TrainState


class MetricsWriter:
  """Appends one JSON object per line; flushed per write so a killed run keeps what it logged."""

  def __init__(self, path: Optional[str]):
    self.path = path
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write(self, record: dict[str, Any]) -> None:
    if not self.path:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, sort_keys=True) + "\n")


def _progress(total: int, initial: int, desc: str, enabled: bool):
  if not enabled:
    return None
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, desc=desc, leave=False, file=sys.stderr,
              mininterval=1.0)


def _nonfinite_terms(m: dict) -> list[str]:
  """Names the culprit: the loss terms that are non-finite, else 'loss', else 'gradient'."""
  terms = [k for k, v in m.items() if k not in ("loss", "finite", "grads_finite")
           and not np.all(np.isfinite(np.asarray(v)))]
  if terms:
    return terms
  return ["loss"] if not np.isfinite(float(m["loss"])) else ["gradient"]


def nonfinite_error(step: int, metrics: dict) -> NonFiniteError:
  """The error for a step whose metrics say it was not finite, naming the offending terms."""
  bad = _nonfinite_terms(metrics)
  return NonFiniteError(step, bad, f"non-finite {', '.join(bad)} at step {step}; the run "
                        "stopped and kept the last good state")


def fit(state: TrainState, step_fn: Callable, batch_at: Callable[[int], Any], num_steps: int, *,
        checkpointer: Optional[RunCheckpointer] = None, metrics: Optional[MetricsWriter] = None,
        log_every: int = 50, progress: bool = False, desc: str = "train",
        on_step: Optional[Callable[[int, int, Optional[float]], None]] = None) -> TrainState:
  """Runs `step_fn` until `state.step == num_steps`, resuming from a checkpoint if there is one.

  Args:
    state: the initial state (also the structure a checkpoint is restored into).
    step_fn: `(state, batch) -> (state, metrics)`, usually from `make_train_step`.
    batch_at: batch for a given step: a pure function of the step, so a resumed run sees the
      same batches as an uninterrupted one.
    num_steps: total steps of the run.
    checkpointer: saves every `checkpointer.every` steps and at the end; resumes from its latest.
    metrics: JSON-lines writer, a record every `log_every` steps.
    log_every: metrics period.
    progress: show a progress bar on stderr.
    desc: progress bar label.
    on_step: called (step, num_steps, None) after every step: a rate-limited progress line
      (`jtransfer.protocol.progress.StepTicker.tick`) where a bar would flood a log.

  Raises:
    NonFiniteError: a step had a non-finite loss or gradient; the state of the last good step
      was saved (when checkpointing) and the error names the step and the offending terms.
  """
  if checkpointer is not None and checkpointer.latest_step() is not None:
    state = checkpointer.restore(state)
  start = int(state.step)
  bar = _progress(num_steps, start, desc, progress)
  try:
    for step in range(start, num_steps):
      state, m = step_fn(state, batch_at(step))
      if not bool(m["finite"]):
        if checkpointer is not None:
          checkpointer.maybe_save(step, state, force=True)
        raise nonfinite_error(step, m)
      if metrics is not None and ((step + 1) % log_every == 0 or step + 1 == num_steps):
        metrics.write({"step": step + 1, **{k: float(v) for k, v in m.items()
                                            if np.ndim(v) == 0}})
      if checkpointer is not None:
        checkpointer.maybe_save(step + 1, state, force=step + 1 == num_steps)
      if bar is not None:
        bar.update(1)
      if on_step is not None:
        on_step(step + 1, num_steps, None)
  finally:
    if bar is not None:
      bar.close()
  return state
