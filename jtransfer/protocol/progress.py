"""Progress lines for grids of runs and for long runs: a plan before the first run, done/total
with an ETA after each, and a long run's step and validation accuracy every few seconds.

Lines go to an `emit(line)` callable (the CLI passes a stderr print, or None under --quiet);
the clock is injectable so tests can check the rate limit and the ETA without waiting.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Mapping


def duration(seconds: float) -> str:
  """'45s', '3m05s', '2h07m': a short human duration."""
  s = int(round(max(seconds, 0.0)))
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def draw_label(repeat: int, tune_repeats: int, repeats: int, fold: int = -1,
               folds: int = 0) -> str:
  """Names a run's k-shot draw: evaluation draws have repeat >= 0; tuning draws, which only
  choose hyper-parameters and are never tested, have repeat -1, -2, ... (`fewshot.draw_seed`).

  >>> draw_label(-1, 3, 5, fold=0, folds=5)
  'tuning draw 1/3 CV fold 1/5'
  """
  text = (f"tuning draw {-repeat}/{tune_repeats}" if repeat < 0
          else f"eval draw {repeat + 1}/{repeats}")
  if fold >= 0:
    text += f" CV fold {fold + 1}/{folds or '?'}"
  return text


@dataclasses.dataclass
class GridProgress:
  """Counts a grid's runs and prints its plan, then done/total and an ETA after each run.

  Attributes:
    planned: kind ('tuning runs', 'eval runs', ...) -> how many runs this invocation plans,
      already-saved runs included. Tuning may extend a grid at an edge; the total then grows
      and the line says so.
    saved: runs already saved (a resume skips them).
    emit: where lines go; None = silent.
    clock: seconds (monotonic).
  """
  planned: Mapping[str, int]
  saved: int = 0
  emit: Callable[[str], None] | None = None
  clock: Callable[[], float] = time.monotonic

  def __post_init__(self):
    self.total = sum(self.planned.values())
    self.done = self.saved
    self.ran = 0
    self.t0 = self.clock()

  def announce(self, unit: str = "grid") -> str:
    """The plan line (emitted): runs by kind, and how many a resume skips."""
    kinds = ", ".join(f"{n} {k}" for k, n in self.planned.items() if n)
    line = f"{unit}: {self.total} runs planned ({kinds or 'none'})"
    if self.saved:
      line += f"; {self.saved} already saved, skipped"
    if self.emit is not None:
      self.emit(line)
    return line

  def finished(self, what: str) -> str:
    """The line of a finished run (emitted): '[done/total, ETA ...] what'."""
    self.done += 1
    self.ran += 1
    grown = ""
    if self.done > self.total:  # a tuning grid extended at an edge
      self.total = self.done
      grown = " (grid extended)"
    left = self.total - self.done
    per_run = (self.clock() - self.t0) / self.ran
    eta = f"ETA {duration(per_run * left)}" if left else "last run"
    line = f"[{self.done}/{self.total}{grown}, {eta}] {what}"
    if self.emit is not None:
      self.emit(line)
    return line


@dataclasses.dataclass
class StepTicker:
  """A long run's heartbeat: `tick(step, cap, val_acc)` after each training step emits
  'label: step S/CAP, val acc A, T elapsed' at most every `every_s` seconds.

  Pass `tick` as `on_step` to `jtransfer.train.loop.fit` or
  `jtransfer.protocol.budget.fit_converged`.
  """
  label: str
  emit: Callable[[str], None]
  every_s: float = 5.0
  clock: Callable[[], float] = time.monotonic

  def __post_init__(self):
    self.t0 = self.last = self.clock()

  def tick(self, step: int, cap: int, val_acc: float | None = None) -> None:
    """Called after each step; emits when `every_s` has passed since the last line."""
    now = self.clock()
    if now - self.last < self.every_s:
      return
    self.last = now
    val = "" if val_acc is None else f", val acc {val_acc:.4f}"
    self.emit(f"  {self.label}: step {step}/{cap}{val}, {duration(now - self.t0)} elapsed")


def ticker(label: str, emit: Callable[[str], None] | None, every_s: float = 5.0
           ) -> Callable[[int, int, float | None], None] | None:
  """A `StepTicker(label, emit).tick`, or None when `emit` is None (--quiet)."""
  return None if emit is None else StepTicker(label, emit, every_s).tick


def plan_counts(kinds: Mapping[str, int]) -> dict[str, int]:
  """The non-zero kinds, in order (for `GridProgress.planned`)."""
  return {k: int(n) for k, n in kinds.items() if n}
