"""A study's grid: per cell and arm, tuning over the arm's knob grid, the evaluation points,
and the set of run keys a complete grid holds.

`plan(study, config)` resolves the arms once (each one's LR grid from --lrs, its knob grids
and defaults, the `build` options of a DELTA-family strategy from the environment the CLI edge
read). `choose` tunes an arm in a cell from records (the report, the publish check) or training
what is missing (the runner): both give the same choice for the same records
(`jtransfer.protocol.tuning.tune_records`). `grid_keys` lists every run the grid holds given its
records, tuning runs included (edge extensions follow the records' scores).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import types
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.protocol import tuning
from jtransfer.study import draws as draws_lib
from jtransfer.study import records as rec
from jtransfer.study.config import Config
from jtransfer.study.declare import Arm, Study

# 'reduced' LR grids: two per family (the few-shot default).
REDUCED_LRS = types.MappingProxyType({"freeze": (1e-2, 5e-2), "finetune": (1e-4, 1e-3)})


def default_reduced(name: str) -> tuple[float, ...]:
  """`--lrs reduced`: freeze and finetune's two LRs, else every other paper LR."""
  strategy = transfer.get_strategy(name)
  return tuple(REDUCED_LRS.get(name, strategy.paper_lrs[1::2] or strategy.paper_lrs))


@dataclasses.dataclass(frozen=True)
class ArmPlan:
  """A resolved arm: its declaration, strategy (knob grids and defaults in place), LR grid
  and the extra keyword arguments its strategy's `build` takes."""
  arm: Arm
  strategy: Optional[transfer.Strategy]
  lrs: tuple[float, ...]
  knobs: Mapping[str, tuple[float, ...]]
  defaults: Mapping[str, float]
  options: Mapping[str, Any]
  folds: int

  @property
  def name(self) -> str:
    return self.arm.name

  @property
  def grid(self) -> dict:
    """The tuning grid: 'lr' (unless a run function's arm has none) then each knob."""
    lr = {"lr": tuple(self.lrs)} if self.lrs else {}
    return {**lr, **{k: tuple(v) for k, v in self.knobs.items()}}

  def default_point(self, lr: float) -> dict:
    """The point at `lr` and the paper's knob values."""
    return {"lr": float(lr), **{k: float(v) for k, v in self.defaults.items()}}


@dataclasses.dataclass(frozen=True)
class Plan:
  """The resolved grid of one invocation: its config, arms and cells (this shard's)."""
  study: Study
  config: Config
  arms: tuple[ArmPlan, ...]
  cells: tuple[dict, ...]   # every cell of the grid, in order
  mine: tuple[dict, ...]    # those this invocation (its --shard) runs

  def arm(self, name: str) -> ArmPlan:
    return next(a for a in self.arms if a.name == name)


def budgeted(name: str, lrs: Sequence[float], knobs: Mapping[str, Sequence[float]],
             budget: int) -> tuple[float, ...]:
  """The LR grid that gives arm `name` exactly `budget` tuning points (`Study.tune_budget`).

  Its knob grid (K points) is kept; the LR axis gets budget / K values spaced geometrically
  over [min(lrs), max(lrs)] (one LR: a decade either side of it), 3 significant digits. With
  12: an LR-only method gets 12 LRs, a 3-valued knob 4 LRs, a 4-valued knob 3.

  Raises:
    InputError: the budget is not a multiple of the knob grid's size.
  """
  k = math.prod(len(v) for v in knobs.values())
  if budget % k:
    raise InputError(f"the tuning budget of {budget} points is not a multiple of {name}'s "
                     f"knob grid ({k} points); choose a budget divisible by every arm's")
  n = budget // k
  lo, hi = min(lrs), max(lrs)
  if lo == hi and n > 1:
    lo, hi = lo / 10, hi * 10
  values = np.geomspace(lo, hi, n) if n > 1 else [math.sqrt(lo * hi)]
  return tuple(float(f"{v:.3g}") for v in values)


def budget_points(arm: "ArmPlan") -> int:
  """Points of the arm's tuning grid (what `Study.tune_budget` equalises)."""
  return math.prod(len(v) for v in arm.grid.values())


def _resolve(study: Study, config: Config, name: str, delta_config) -> ArmPlan:
  arm = study.arm(name)
  p = config.protocol
  strategy = transfer.get_strategy(arm.strategy_name) if arm.strategy_name else None
  knobs = dict(strategy.knobs) if strategy else {}
  defaults = dict(strategy.knob_defaults) if strategy else {}
  options: dict = {}
  if strategy is not None and delta_config is not None and \
      strategy.name in _delta().CONFIG_STRATEGIES:
    options["config"] = delta_config
    # The environment's alpha is the default alpha of its paper rows.
    if "alpha" in p.delta_env and "alpha" in defaults and strategy.name != "delta_noatt":
      defaults["alpha"] = p.delta_env["alpha"]
  grid = dict((arm.grid(config) if callable(arm.grid) else arm.grid) or {})
  if "lr" in grid:
    lrs = tuple(float(v) for v in grid.pop("lr"))
  elif strategy is None:  # a run function's arm without an LR axis
    lrs = ()
  elif p.lrs == "reduced":
    lrs = tuple((study.reduced_lrs or default_reduced)(strategy.name))
  else:
    lrs = tuple(transfer.lr_grid(strategy, p.lrs))
  knobs.update({k: tuple(v) for k, v in grid.items()})
  if strategy is None:  # a run function's knobs: a single value is its fixed default
    defaults.update({k: float(v[0]) for k, v in knobs.items() if len(v) == 1})
  if study.tune_budget and strategy is not None and arm.tuned:
    lrs = budgeted(name, lrs, knobs, study.tune_budget)
  folds = draws_lib.cv_folds(p.cv_folds, strategy.cv_folds if strategy else 0)
  if strategy is not None:
    strategy = dataclasses.replace(strategy, knobs=knobs, knob_defaults=defaults)
  return ArmPlan(arm, strategy, lrs, knobs, defaults, options, folds)


def _delta():
  from jtransfer.methods import delta
  return delta


def plan(study: Study, config: Config) -> Plan:
  """The resolved grid (arms in --strategies order; cells arch x target x shots x axes).

  Raises:
    InputError: an unknown arm, a bad --lrs.
  """
  p = config.protocol
  delta_config = None
  if any(n in _delta().CONFIG_STRATEGIES for n in config.cells.arms):
    # DELTA's BN mode is --bn's (its strategies' build also takes it as `bn`).
    delta_config = _delta().Config(**dict(p.delta_env), bn_train=p.bn == "train").validate()
  c = config.cells
  if "cells" not in study.groups:  # not a grid of (arch, target, shots) cells
    return Plan(study, config, (), (), ())
  arms = tuple(_resolve(study, config, n, delta_config) for n in c.arms)
  if study.arm_plan is not None:
    arms = tuple(study.arm_plan(config, a) for a in arms)
  base = [dict(zip(("arch", "target", "shots"), v))
          for v in itertools.product(c.archs, c.targets, c.shots)]
  axes = dict(study.axes(config)) if study.axes else {}
  expand = lambda cells: [dict(cell, **dict(zip(axes, v))) for cell in cells
                          for v in itertools.product(*axes.values())]
  # Shards split the (arch, target, shots) cells: a cell's draws depend on nothing outside it.
  shard = config.output.shard
  mine = base if not shard else [cell for j, cell in enumerate(base) if j % shard[1] == shard[0]]
  return Plan(study, config, arms, tuple(expand(base)), tuple(expand(mine)))


def cell_key(plan_: Plan, cell: Mapping) -> tuple:
  """The cell's values in `study.cell_fields` order (the report's and summary's cell)."""
  return tuple(cell[f] for f in plan_.study.cell_fields)


def tuning_keys(arm: ArmPlan, cell: Mapping, point: Mapping, tune_draws: int,
                draw: Optional[int] = None) -> list[tuple]:
  """The keys of the runs that score one point: each tuning draw (and CV fold), or with
  `draw` (nested tuning) that evaluation draw's own labelled pool (validation or CV folds)."""
  return [rec.run_key(arm.name, cell, d, point)
          for d in draws_lib.tuning_draws(tune_draws, arm.folds, draw)]


def nested(plan_: Plan) -> bool:
  """Whether each evaluation draw is tuned on its own labelled pool (--tuning nested)."""
  return plan_.config.protocol.tuning == "nested"


def draw_slots(plan_: Plan) -> list[Optional[int]]:
  """The tuning choices a cell's arm makes: one per evaluation draw under --tuning nested
  (the draw's index), else one for the cell (None)."""
  return list(range(plan_.config.protocol.repeats)) if nested(plan_) else [None]


def choose(outcomes: dict, plan_: Plan, cell: Mapping, arm: ArmPlan,
           run_missing: Optional[Callable] = None, requested: Optional[set] = None,
           draw: Optional[int] = None) -> Optional[dict]:
  """The tuned point of `arm` in `cell` (`outcomes`: run key -> outcome, `by_key`;
  `run_missing(key) -> outcome` trains a missing tuning run): `Tuned.to_dict()` plus 'hp' (its knob text), or None
  without tuning draws, for an untuned arm, or when a tuning run is missing and
  `run_missing` is None (an unfinished grid).

  Tuning scores each point of the arm's grid by mean validation accuracy over the tuning draws
  (and their CV folds), extending an axis at an edge; a failed run scores 0. Under --tuning
  nested, `draw` names the evaluation draw whose own labelled pool scores the points. Ties
  go to the point first in grid order (the smaller LR, then the smaller knob values), for
  every arm alike (`jtransfer.protocol.tuning.tune`).
  """
  p = plan_.config.protocol
  if not arm.arm.tuned or not (p.tune_draws or nested(plan_)):
    return None
  # Equal budgets (`Study.tune_budget`) forbid extending an edge: it would add runs.
  extend = 0 if plan_.study.tune_budget else p.tune_extend
  if nested(plan_) != (draw is not None):
    raise ValueError(f"--tuning {p.tuning} chooses with draw={draw!r}")
  found = tuning.tune_records(arm.grid, lambda point: tuning_keys(arm, cell, point,
                                                                  p.tune_draws, draw),
                              outcomes, run_missing, extend, requested,
                              arm.strategy.knob_bounds if arm.strategy else None,
                              arm.arm.scales)
  if found is None:
    return None
  t = found.to_dict()
  t["hp"] = rec.hp_text(t["choice"])
  return t


def eval_points(plan_: Plan, arm: ArmPlan, tuned: Optional[dict]) -> list[dict]:
  """The knob points run on a cell's evaluation draws: the tuned point, plus under
  --paper-grid (or without tuning) every LR of the grid at the paper's knob values."""
  p = plan_.config.protocol
  if not arm.arm.tuned:
    names = list(arm.grid)
    return [dict(zip(names, map(float, v))) for v in itertools.product(*arm.grid.values())]
  points = ([arm.default_point(lr) for lr in arm.lrs]
            if (p.paper_grid or not (p.tune_draws or nested(plan_))) else [])
  if tuned is not None:
    chosen = {k: float(v) for k, v in tuned["choice"].items()}
    if rec.canon_point(chosen) not in [rec.canon_point(q) for q in points]:
      points.append(chosen)
  return points


def by_key(records: Sequence[dict]) -> dict:
  """key -> the outcome of a version-2 record (what tuning scores: 'status', 'val_acc')."""
  return {rec.key(r): r["outcome"] for r in records}


def choices(records: Sequence[dict], plan_: Plan, cells: Optional[Sequence[dict]] = None
            ) -> dict[tuple, dict]:
  """(cell values..., arm) -> tuned point, for every cell (default: the whole grid) whose
  tuning the records complete; under --tuning nested (cell values..., arm, draw index) ->
  that evaluation draw's tuned point."""
  found = by_key(records)
  out = {}
  for cell in plan_.cells if cells is None else cells:
    for arm in plan_.arms:
      for slot in draw_slots(plan_):
        t = choose(found, plan_, cell, arm, draw=slot)
        if t is not None:
          out[(*cell_key(plan_, cell), arm.name, *([] if slot is None else [slot]))] = t
  return out


def grid_keys(records: Sequence[dict], plan_: Plan) -> set[tuple]:
  """The keys of every run this invocation's grid holds, given its (version-2) records: the
  tuning runs the choices read (edge extensions included) and each cell's evaluation runs at
  its points. A cell whose tuning is unfinished counts the tuning run it lacks and no
  evaluation runs beyond the paper grid's."""
  found = by_key(records)
  requested: set = set()
  keys = set()
  reps = plan_.config.protocol.repeats
  for cell in plan_.mine:
    for arm in plan_.arms:
      for slot in draw_slots(plan_):
        tuned = choose(found, plan_, cell, arm, requested=requested, draw=slot)
        for point in eval_points(plan_, arm, tuned):
          keys |= {rec.run_key(arm.name, cell, draws_lib.Draw(draws_lib.EVAL, i), point)
                   for i in (range(reps) if slot is None else (slot,))}
  return keys | requested
