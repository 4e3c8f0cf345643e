"""What an experiment module declares: its arms, tables, claims and hooks (a `Study`).

  STUDY = Study(
      module="experiments.cwl_tables", title="# CWL Tables I and II (embedded benchmark)",
      arms=(Arm("freeze", "Freeze", strategy="freeze"), Arm("freeze_cwl", "Freeze + CWL",
            strategy="freeze_cwl"), ...),
      tables=(Table("Table I: ...", rows=("freeze", "freeze_cwl"),
                    compare=("freeze_cwl", "freeze")), ...),
      claims=(claims.Claim(...), ...), defaults={"shots": "1,3,5,10", "repeats": 10, ...},
      prepare=..., sections=..., plots=...)

  def main(argv=None): return jtransfer.study.main(STUDY, argv)

An arm is a registered strategy (`Arm(strategy=name)`: the runner builds, trains and scores
it, `jtransfer.study.target.TargetRuns`) or the module's own run function
`run(ctx: RunContext, point: dict) -> outcome dict` (`point`: the knob values, 'lr' included).
`after` names arms whose results this one reads (students after their teacher): they run
first within a cell. `tuned=False`: the arm's grid is not tuned, every point runs on every
evaluation draw.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from jtransfer.errors import InputError


@dataclasses.dataclass(frozen=True)
class Arm:
  """One arm of a study.

  Attributes:
    name: its record name.
    label: its display name in reports (default: the name).
    grid: knob -> values replacing the strategy's knob grids ('lr' included replaces the LR
      grid --lrs gives); None = the strategy's own.
    run: (RunContext, point) -> outcome dict ({'test_acc', 'val_acc', ...}); None = a
      registered strategy trains it.
    strategy: the registered strategy (default: `name` when `run` is None).
    after: arms that run before this one within a cell (their outcomes are in
      `RunContext.done`).
    tuned: tune the grid on the tuning draws (False: every point on every evaluation draw).
    scales: knob -> (forward, inverse) scale its tuning searches on
      (`jtransfer.protocol.tuning.tune`, e.g. `tuning.odds_scale()` for a weight in (0, 1)).
    budget: config -> (Budget or None, step cap) of this arm's runs, when they differ from
      the cell's (`Study.budget`), e.g. a teacher's cap beside its students'.

  `grid` may also be a function of the `Config` returning that mapping, for grids the
  study's own flags give.
  """
  name: str
  label: str = ""
  grid: Optional[Mapping[str, Sequence[float]] | Callable[[Any], Mapping]] = None
  run: Optional[Callable[..., dict]] = None
  strategy: Optional[str] = None
  after: tuple[str, ...] = ()
  tuned: bool = True
  scales: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
  budget: Optional[Callable[[Any], tuple]] = None

  @property
  def strategy_name(self) -> Optional[str]:
    """The registered strategy this arm trains, or None for a run function."""
    return self.strategy or (self.name if self.run is None else None)


@dataclasses.dataclass(frozen=True)
class Table:
  """A tuned table of the report: its title, its rows (arm names; those not run are left
  out) and an optional (a, b) pair compared per draw (`compare`)."""
  title: str
  rows: tuple[str, ...]
  compare: Optional[tuple[str, str]] = None


@dataclasses.dataclass
class RunContext:
  """What one run of a module's run function gets.

  Attributes:
    config: the invocation's `Config`; cell: {'arch', 'target', 'shots', ...}.
    data: what `Study.prepare` returned for the cell (e.g. a `TargetRuns`).
    draw: the `Draw`; seed: its seed; train_idx, val_idx: its rows of the target's pool.
    budget: the run's `Budget` (None: fixed steps); steps: the step cap.
    on_step: (step, cap, val acc) progress ticker.
    done: run key (`records.run_key`) -> outcome of every run so far (an `after` arm reads
      its predecessors' outcomes here).
    chosen: arm -> the point its tuning chose in this cell (None: not tuned), for the arms
      tuned so far (an `after` arm learns from its predecessor at its chosen point).
  """
  config: Any
  cell: Mapping[str, Any]
  data: Any
  draw: Any
  seed: int
  train_idx: np.ndarray
  val_idx: np.ndarray
  budget: Any
  steps: int
  on_step: Optional[Callable] = None
  done: dict = dataclasses.field(default_factory=dict)
  chosen: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Study:
  """An experiment module's declaration (see the module docstring).

  Attributes:
    module: its import name ('experiments.cwl_tables'); title: the report's first line.
    arms: the declared arms; any_strategy: also accept any registered strategy by name.
    cell_fields: the fields naming a cell; axes: config -> {field: values} of further cell
      axes beyond (arch, target, shots) (a budget study's 'factor').
    claims: `jtransfer.protocol.claims.Claim`s tested on the tuned evaluation runs.
    tables: the tuned tables (default: one table of every arm).
    extra: the module's own frozen dataclass of flag fields (`config.flag`), or None.
    prepare: (plan, cell, cache) -> the data a cell's runs share (for strategy arms a
      `target.TargetRuns`; the runner draws from its `pool.labels` and `num_classes`);
      `cache` is a dict kept for the whole invocation (sources, loaded targets).
    check_data: (config, cache) -> None, raising InputError: loads and checks every target
      before anything trains (e.g. the largest k against each class).
    sections: (plan, rows, tuned summary, best-over-LR summary) -> report lines replacing the
      default best-over-LR tables.
    extra_claims: (plan, tuned evaluation rows) -> more claim result dicts.
    plots: (summary, plan, folder) -> None.
    defaults: flag destination -> default as the command line writes it.
    groups: the shared flag groups the study offers ('cells', 'protocol', 'source',
      'output'); hidden: destinations not offered (given, each is refused by name, exit 2).
    check: config -> None, raising InputError: the study's own flag rules.
    reduced_lrs: strategy name -> the 'reduced' LR grid of `--lrs reduced`.
    budget: (config, cell) -> (Budget or None, step cap) of the cell's runs (default: the
      protocol's --steps/--patience/--eval-every).
    report: (plan, records, folder) -> (report text, summary) replacing the skeleton
      (`jtransfer.study.report.make_report`); records as results.json holds them.
    run: (study, config, results) -> records, replacing the grid runner (`runner.run`) for a
      study that is not a grid of draws (e.g. an analysis of one source).
    plan: config -> the plan of such a study (what `run`'s report, `publish check` and
      `regenerate` read), replacing the grid's `grid.plan`;
      it may raise `InputError` (checked before --out is opened).
    record_key: record -> its key (duplicate checks; results.json's order); default:
      `records.key` of the record read as version 2.
    additive: flag destinations a --resume may change because they only add runs beside the
      finished ones (model_selection's --scratch); left out of the settings fingerprint.
    grows: flag destinations a --resume may grow (a larger count, a comma list growing to a
      superset) because the first N draws of a bigger grid are the draws of a grid of N
      (`jtransfer.protocol.outdir.growth`); None = 'repeats' for a study on the runner's draws
      (the 'protocol' group with --repeats offered: `draws.draw_seed` depends on the draw, not
      on the count), none otherwise.
    arm_plan: (config, `grid.ArmPlan`) -> ArmPlan: the study's own knobs applied to a resolved
      arm (e.g. DELTA's --alpha grid and `delta.Config` from its flags), so they travel in the
      plan to `Strategy.build`, never through a global.
    keys: with `run`: (records read as version 2, plan) -> the keys (`records.key`) of every
      run its grid holds, for `publish check` (`plan`: its own `plan`'s, or the grid's); None =
      the study lists none (its grid's size is counted when its main finishes,
      `publish.save`). Studies on the grid runner list theirs from the plan.
    tune_budget: equal tuning budgets: every tuned strategy arm's grid holds exactly this
      many points (its knob grid times an LR grid spaced over its --lrs range, with no edge
      extension), so no arm is tuned with more runs than another (`grid.budgeted`); None =
      each arm's own grid, extended at an edge.
    bn_before: what --bn absent from a stored folder's flags means: the mode its fine-tuning
      arms ran in before the flag existed ('frozen'; DELTA's table 'train', its DELTA-family
      arms' recipe). A new command line always states --bn (`edge.main`).
    doc: the module's docstring (the --help description).
  """
  module: str
  title: str
  arms: tuple[Arm, ...] = ()
  any_strategy: bool = True
  cell_fields: tuple[str, ...] = ("arch", "target", "shots")
  axes: Optional[Callable[[Any], Mapping[str, Sequence]]] = None
  claims: tuple = ()
  tables: tuple[Table, ...] = ()
  extra: Optional[type] = None
  prepare: Optional[Callable] = None
  check_data: Optional[Callable] = None
  sections: Optional[Callable] = None
  extra_claims: Optional[Callable] = None
  plots: Optional[Callable] = None
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  groups: tuple[str, ...] = ("cells", "protocol", "source", "output")
  hidden: frozenset = frozenset()
  check: Optional[Callable] = None
  reduced_lrs: Optional[Callable[[str], tuple]] = None
  budget: Optional[Callable] = None
  report: Optional[Callable] = None
  run: Optional[Callable] = None
  plan: Optional[Callable] = None
  record_key: Optional[Callable] = None
  additive: frozenset = frozenset()
  grows: Optional[frozenset] = None
  keys: Optional[Callable] = None
  arm_plan: Optional[Callable] = None
  tune_budget: Optional[int] = None
  bn_before: str = "frozen"
  doc: str = ""

  def arm(self, name: str) -> Arm:
    """The declared arm `name`, or a registered strategy's arm.

    Raises:
      InputError: neither.
    """
    for a in self.arms:
      if a.name == name:
        return a
    if self.any_strategy:
      from jtransfer.methods import transfer
      transfer.get_strategy(name)  # unknown: one sentence listing the strategies
      return Arm(name, strategy=name)
    raise InputError(f"--strategies {name!r} is not an arm of {self.module}; expected one of "
                     f"{', '.join(a.name for a in self.arms)}")

  def labels(self) -> dict[str, str]:
    """arm name -> display name."""
    return {a.name: a.label for a in self.arms if a.label}
