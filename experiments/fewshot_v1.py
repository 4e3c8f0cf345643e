"""LEGACY: what experiments/sparse_transfer.py and bench/ (bench_grid.py, parity.py) still
import from the few-shot grid before the study runner, through `experiments.fewshot`; delete it
with them. The few-shot study is `experiments.fewshot` on `jtransfer.study` (its draws
`jtransfer.study.draws`, its tuning `jtransfer.study.grid`).

Kept: the version-1 run key (`KEY`, `record_key`), the budget of the flags (`budget_of`), the
test cap (`cap_per_class`), the draw seeds (`draw_seed`) and the tuned choice and evaluation
points of a version-1 grid (`choose`, `eval_points`), read off an argparse namespace as those
callers build it.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Mapping

import numpy as np

from jtransfer.data import ImageSet
from jtransfer.methods import transfer
from jtransfer.protocol import Budget, tuning

KEY = ("strategy", "arch", "target", "shots", "repeat", "lr", "hp", "fold")
# (records written before a field existed)
KEY_DEFAULTS = {"hp": "", "fold": -1}


def strategy_of(plan: Mapping, name: str) -> transfer.Strategy:
  """The registered strategy `name` with the plan's knob grids and defaults in place of its own
  (plan['knobs'], absent or empty: the registered ones)."""
  strategy = transfer.get_strategy(name)
  override = (plan.get("knobs") or {}).get(name)
  if override is None:
    return strategy
  grids, defaults = override
  return dataclasses.replace(strategy, knobs=dict(grids), knob_defaults=dict(defaults))


def budget_of(args: argparse.Namespace) -> Budget | None:
  """The run budget from the flags: None = fixed --steps, keep the last state."""
  return Budget.from_flags(args.steps, args.eval_every, args.patience)


def cap_per_class(s: ImageSet, n: int) -> ImageSet:
  """The first `n` images of each class (deterministic), or all when n == 0."""
  if n <= 0:
    return s
  keep = np.concatenate([np.flatnonzero(s.labels == c)[:n] for c in range(s.num_classes)])
  return s.take(np.sort(keep))


def record_key(r: dict) -> tuple:
  """A record's KEY tuple (older records get KEY_DEFAULTS)."""
  return tuple(r.get(k, KEY_DEFAULTS.get(k)) for k in KEY)


def draw_seed(args, shots: int, repeat: int) -> int:
  """The seed of a k-shot draw. Evaluation draws have repeat >= 0, tuning draws repeat < 0,
  so the two never share a draw."""
  return (args.seed * 1_000_003 + shots * 1009 + repeat) % (2 ** 31)


def cv_folds(args, name: str) -> int:
  """Cross-validation folds for a strategy's tuning: --cv-folds, or with 'auto' the folds its
  paper uses for its knobs (DELTA, L2-SP: 5) and 0 (the tuning draw's validation set) else."""
  if args.cv_folds == "auto":
    return transfer.get_strategy(name).cv_folds
  return int(args.cv_folds)


def tuning_keys(args, cell: tuple, lr: float, hp: str) -> list[tuple]:
  """The runs that score one point: each tuning draw, on each fold when cross-validating."""
  arch, spec, shots, name = cell
  folds = cv_folds(args, name)
  return [(name, arch, spec, shots, -1 - t, lr, hp, f) for t in range(args.tune_repeats)
          for f in (range(folds) if folds else (-1,))]


def choose(records: list[dict], plan: dict, args, run_missing=None,
           requested: set | None = None) -> dict:
  """The LR and knob values each (arch, target, shots, strategy) uses on its evaluation draws.

  Tuning (`--tune-repeats` > 0) scores each point of the strategy's grid (its LRs x its knobs'
  grids) by mean validation accuracy over the tuning draws (and their cross-validation folds,
  `--cv-folds`), extending an axis at an edge (`jtransfer.protocol.tuning`). A failed
  (non-finite) run scores 0. Only 'val_acc' is read: tuning records hold no test accuracy.
  From records alone (the report) or, with `run_missing(key) -> record`, training what is
  missing (the grid runner); both give the same choice for the same records.

  Returns:
    (arch, target, shots, strategy) -> Tuned.to_dict() plus 'hp', or {} without tuning draws.
  """
  if not args.tune_repeats:
    return {}
  by_key = {record_key(r): r for r in records}
  out = {}
  for arch in plan["archs"]:
    for spec in plan["targets"]:
      for shots in plan["shots"]:
        for name in plan["strategies"]:
          cell = (arch, spec, shots, name)
          strategy = strategy_of(plan, name)

          def keys_of(point, cell=cell):
            hp = transfer.hp_string({k: v for k, v in point.items() if k != "lr"})
            return tuning_keys(args, cell, point["lr"], hp)

          grid = {"lr": plan["lrs"][name], **strategy.knobs}
          found = tuning.tune_records(grid, keys_of, by_key, run_missing, args.tune_extend,
                                      requested, strategy.knob_bounds)
          if found is None:  # the report of an unfinished grid: that cell is not tuned yet
            continue
          t = found.to_dict()
          t["hp"] = transfer.hp_string({k: v for k, v in t["choice"].items() if k != "lr"})
          out[cell] = t
  return out


def eval_points(plan: dict, args, tuned: dict, cell: tuple) -> list[tuple[float, str]]:
  """(lr, hp) run on a cell's evaluation draws: the tuned point, plus under --paper-grid every
  LR of the grid at the paper's knob values."""
  name = cell[3]
  hp0 = transfer.hp_string(strategy_of(plan, name).knob_defaults)
  points = ([(lr, hp0) for lr in plan["lrs"][name]]
            if (args.paper_grid or not args.tune_repeats) else [])
  if cell in tuned and (tuned[cell]["choice"]["lr"], tuned[cell]["hp"]) not in points:
    points.append((tuned[cell]["choice"]["lr"], tuned[cell]["hp"]))
  return points
