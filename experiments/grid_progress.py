"""Progress of a few-shot grid (experiments.fewshot.run_grid and the modules built on it): the
plan by kind of run before the first run, done/total with an ETA after each, and the label of
each run's draw (tuning draws are never tested; their repeat index is negative).

Kept apart from fewshot.py, which is the grid itself; the counting and line formats live in
`jtransfer.protocol.progress`.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Sequence

from jtransfer.methods import transfer
from jtransfer.protocol import progress


def stderr_or_quiet(args: argparse.Namespace) -> Callable[[str], None] | None:
  """A stderr line printer, or None under --quiet."""
  if args.quiet:  # (every caller's parser has add_results_flags' --quiet)
    return None
  return lambda line: print(line, file=sys.stderr, flush=True)


def planned_runs(plan: dict, args: argparse.Namespace, cells: Sequence[tuple],
                 folds_of: Callable[[str], int]) -> dict[str, int]:
  """Runs a grid plans, by kind, before tuning has chosen anything.

  Tuning runs: each point of a strategy's grid (its LRs x its knobs' values; a one-point grid
  is not tuned) on each tuning draw ('tuning-draw runs'), or on each CV fold of each tuning
  draw when cross-validating ('CV-fold tuning runs'). Paper-grid runs:
  every LR at the paper's knob values on every evaluation draw (--paper-grid, or no tuning).
  Tuned-point runs: one point per evaluation draw when it is not one of the paper-grid runs
  (a strategy with knobs). Extensions at a grid's edge add runs later (`GridProgress` says so).
  """
  tuning = folded = paper = tuned = 0
  for _ in cells:
    for name in plan["strategies"]:
      strategy = transfer.get_strategy(name)
      points = len(plan["lrs"][name]) * math.prod(len(v) for v in strategy.knobs.values())
      if args.tune_repeats and points > 1:
        folds = folds_of(name)
        if folds:
          folded += points * args.tune_repeats * folds
        else:
          tuning += points * args.tune_repeats
      if args.paper_grid or not args.tune_repeats:
        paper += len(plan["lrs"][name]) * args.repeats
      if args.tune_repeats and (not args.paper_grid or strategy.knobs):
        tuned += args.repeats
  return progress.plan_counts({"tuning-draw runs": tuning, "CV-fold tuning runs": folded,
                               "paper-grid eval runs": paper, "tuned-point eval runs": tuned})


def run_line(key: tuple, args: argparse.Namespace, folds: int, record: dict) -> str:
  """What one finished run was and scored: its cell, its draw (named, not r=-1), strategy,
  LR, knobs, the accuracy it reports (validation for tuning runs, test else), steps, time."""
  name, arch, spec, shots, repeat, lr, hp, fold = key
  acc = record["val_acc" if repeat < 0 else "test_acc"]
  what = "val" if repeat < 0 else "test"
  draw = progress.draw_label(repeat, args.tune_repeats, args.repeats, fold, folds)
  return (f"{arch} {spec} k={shots} {draw} {name} lr={lr:g} {hp} "
          f"{what}={'failed' if acc is None else f'{acc:.4f}'} "
          f"steps={record.get('steps', '-')} ({record['seconds']:.1f}s)").replace("  ", " ")
