"""`run(study, config, results)`: a study's grid, run by run, resumable.

Per cell of this invocation's shard (arch x target x shots x the study's axes), in arm
dependency order (`Arm.after`): tune the arm on the cell's tuning draws (training the tuning
runs the records lack, `grid.choose`), then run its evaluation points (`grid.eval_points`) on
each evaluation draw not yet recorded. Every run's record (`records.make`, version 2) is saved
as it finishes, so a killed grid resumes where it stopped. Draws are shared by every arm and
knob value of a cell (`draws.cell_draws`). A registered strategy's run goes through
`target.TargetRuns`; a module's own arm through its run function with a `RunContext`.
Without early stopping, runs of a frozen-backbone strategy may train together, one vmapped
step per group of up to --batch-runs runs.
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional

from jtransfer.errors import InputError, NonFiniteError
from jtransfer.protocol import Budget, progress
from jtransfer.study import draws as draws_lib
from jtransfer.study import grid as grid_lib
from jtransfer.study import records as rec
from jtransfer.study.config import Config
from jtransfer.study.declare import RunContext, Study
from jtransfer.study.results import ResultsDir
from jtransfer.train import parallel

# Runs of a frozen-backbone strategy trained together per vmapped step (jtransfer.train.batched).
# Measured on the 2-core CPU: 0.75-0.89x the speed of one run at a time (the runs are already
# compute-bound there; docs/decisions.md), so 'auto' batches only on accelerators, where a k-shot
# batch of 5-64 images leaves the device idle.
BATCH_RUNS_ACCELERATOR = 64


def batch_runs(config: Config) -> int:
  """--batch-runs as an int ('auto': 1 on CPU, `BATCH_RUNS_ACCELERATOR` else)."""
  n = config.protocol.batch_runs
  if n is None:
    import jax
    return 1 if jax.default_backend() == "cpu" else BATCH_RUNS_ACCELERATOR
  return n


def cell_budget(study: Study, config: Config, cell: dict) -> tuple[Optional[Budget], int]:
  """(Budget or None for fixed steps, step cap) of a cell's runs."""
  if study.budget is not None:
    return study.budget(config, cell)
  p = config.protocol
  return Budget.from_flags(p.steps, p.eval_every, p.patience), p.steps


def own_cap(steps_of: Callable[[Config], Optional[int]]) -> Callable[[Config], tuple]:
  """An `Arm.budget`: the step cap `steps_of(config)` (None: --steps) with the protocol's
  patience and validation interval (e.g. a teacher's cap beside its students', or L2-FE's
  beside the fine-tuned arms')."""
  def budget(config: Config) -> tuple[Optional[Budget], int]:
    p = config.protocol
    cap = steps_of(config) or p.steps
    return Budget.from_flags(cap, p.eval_every, p.patience), cap
  return budget


def emitter(config: Config) -> Optional[Callable[[str], None]]:
  """A stderr line printer, or None under --quiet."""
  if config.output.quiet:
    return None
  return lambda line: print(line, file=sys.stderr, flush=True)


def planned_runs(plan: grid_lib.Plan) -> dict[str, int]:
  """Runs the grid plans, by kind, before tuning has chosen anything (extensions at a grid's
  edge add runs later; `GridProgress` says so)."""
  p = plan.config.protocol
  tuning = folded = paper = tuned = 0
  for _ in plan.mine:
    for arm in plan.arms:
      points = math.prod(len(v) for v in arm.grid.values())
      if not arm.arm.tuned:
        paper += points * p.repeats
        continue
      # nested tuning: the cell's tuning runs once per evaluation draw, on its own pool
      draws = p.repeats if grid_lib.nested(plan) else p.tune_draws
      if draws and points > 1:
        if arm.folds:
          folded += points * draws * arm.folds
        else:
          tuning += points * draws
      if p.paper_grid or not draws:
        paper += len(arm.lrs) * p.repeats
      if draws and (not p.paper_grid or arm.knobs):
        tuned += p.repeats
  return progress.plan_counts({"tuning-draw runs": tuning, "CV-fold tuning runs": folded,
                               "paper-grid eval runs": paper, "tuned-point eval runs": tuned})


def arm_order(plan: grid_lib.Plan) -> list:
  """The plan's arms with every arm after those it names in `after` (stable otherwise).

  Raises:
    InputError: an arm waits on an arm the invocation does not run.
  """
  names = [a.name for a in plan.arms]
  out, placed = [], set()
  pending = list(plan.arms)
  while pending:
    for a in pending:
      missing = [n for n in a.arm.after if n not in names]
      if missing:
        raise InputError(f"arm {a.name} needs arm(s) {', '.join(missing)}: add them to "
                         "--strategies")
      if all(n in placed for n in a.arm.after):
        out.append(a)
        placed.add(a.name)
        pending.remove(a)
        break
    else:
      raise InputError(f"arms {', '.join(a.name for a in pending)} wait on each other")
  return out


def _check_resume(results: ResultsDir, records: list, config: Config) -> None:
  """A resumed folder's runs must share --augment and --stored-size with this invocation."""
  recipe = config.protocol.augment
  extras = [r.get("extra", {}) for r in records]
  other = {e.get("augment", "none") for e in extras} - {_recipe_text(recipe)}
  if other:
    raise InputError(f"--out {results.path} holds runs made with --augment "
                     f"{', '.join(sorted(other))}, not {_recipe_text(recipe)}: use the same "
                     "--augment or another --out")
  stored = int(config.protocol.stored_size or 0)
  sizes = {e["stored_size"] for e in extras if "stored_size" in e}
  if sizes - {stored} or (sizes and any("stored_size" not in e for e in extras)):
    raise InputError(f"--out {results.path} holds runs with target images stored at "
                     f"{sorted(sizes)} px, not --stored-size {stored or 'input size'}: use the "
                     "same --stored-size or another --out")


def _recipe_text(text: str) -> str:
  from jtransfer.data import augment
  return str(augment.parse(text))


def run(study: Study, config: Config, results: ResultsDir) -> list[dict]:
  """Runs every missing run of the invocation's grid into `results`; returns all records
  (version 2)."""
  plan = grid_lib.plan(study, config)
  p = config.protocol
  records = rec.read(results.records, study.cell_fields)
  _check_resume(results, records, config)
  found = grid_lib.by_key(records)
  cache: dict = {}
  if study.check_data is not None:
    study.check_data(config, cache)
  emit = emitter(config)
  mine = {tuple(sorted(c.items())) for c in plan.mine}
  grid = progress.GridProgress(planned_runs(plan), emit=emit,
                               saved=sum(1 for k in found if k[1] in mine))
  grid.announce()
  arms = arm_order(plan)
  together = batch_runs(config) if parallel.default_mesh() is None else 1
  recipe = _recipe_text(p.augment)
  for cell in plan.mine:
    data = study.prepare(plan, cell, cache) if study.prepare else None
    budget, steps = cell_budget(study, config, cell)
    labels, classes = _pool(data)
    tune_draws = 0 if grid_lib.nested(plan) else p.tune_draws
    draws = draws_lib.cell_draws(labels, classes, cell["shots"], p.seed, p.repeats,
                                 tune_draws, p.val_per_class,
                                 p.disjoint_tuning) if labels is not None else {}
    shared = draws_lib.overlap(draws) if draws else []

    chosen: dict = {}  # arm -> its tuned point in this cell (RunContext.chosen)

    def arm_budget(arm) -> tuple[Optional[Budget], int]:
      # An arm's own budget (`Arm.budget`: e.g. a head-only baseline's longer cap) or the cell's.
      return arm.arm.budget(config) if arm.arm.budget else (budget, steps)

    def add(arm, draw, point, train_idx, val_idx, result, seconds):
      outcome = (dict(status="failed", error=str(result), test_acc=None, val_acc=None)
                 if isinstance(result, NonFiniteError) else dict(result))
      outcome.setdefault("status", "ok")
      cap = arm_budget(arm)[1]
      extra = dict(n_train=int(len(train_idx)), n_val=int(len(val_idx)), cap=cap)
      if data is not None and hasattr(data, "test"):
        extra["n_test"] = len(data.test)
      if recipe != "none":  # unaugmented records keep their old form
        extra["augment"] = recipe
      if getattr(data, "stored", None) is not None:
        extra["stored_size"] = int(data.stored.images.shape[1])
      if getattr(data, "notes", ()):  # conversions and warnings, repeated in the report
        extra["notes"] = list(data.notes)
      if grid_lib.nested(plan) and draw.role == draws_lib.EVAL:
        # which tuning chose this run's point (shared-tuning records keep their old form)
        extra["tuning"] = "nested"
      if p.disjoint_tuning and draw.role == draws_lib.EVAL and tune_draws:
        # (recorded only under the flag, so folders made without it keep their records' form)
        extra["tune_overlap"] = shared[draw.index]
      r = rec.make(arm.name, cell, draw, point, outcome, seconds, extra)
      results.add(r)
      records.append(r)
      found[rec.key(r)] = r["outcome"]
      grid.finished(run_line(r, p, arm.folds))
      return r["outcome"]

    def run_one(arm, key):
      draw = draws_lib.Draw(key[2], key[3], key[4])
      point = dict(key[5])
      seed, train_idx, val_idx = draws[draw.repeat]
      if draw.fold >= 0:
        train_idx, val_idx = draws_lib.fold_split(labels, train_idx, val_idx, arm.folds,
                                                  draw.fold, seed, cell["shots"])
      label = (f"{cell['arch']} k={cell['shots']} "
               f"{progress.draw_label(draw.repeat, p.tune_draws, p.repeats)} {arm.name} "
               f"lr={point.get('lr', 0):g}")
      t0 = time.time()
      b, cap = arm_budget(arm)
      try:
        if arm.arm.run is not None:
          ctx = RunContext(config, cell, data, draw, seed, train_idx, val_idx, b, cap,
                           progress.ticker(label, emit), found, chosen)
          out = arm.arm.run(ctx, point)
        else:
          out = data.run(arm.name, train_idx, val_idx, point, seed, cap, b,
                         test=draw.role == draws_lib.EVAL, on_step=progress.ticker(label, emit),
                         strategy=arm.arm.strategy_name)
      except NonFiniteError as e:
        out = e
      return add(arm, draw, point, train_idx, val_idx, out, time.time() - t0)

    for arm in arms:
      todo = []
      for slot in grid_lib.draw_slots(plan):  # the cell, or each evaluation draw (nested)
        tuned = grid_lib.choose(found, plan, cell, arm, draw=slot,
                                run_missing=lambda k, a=arm: run_one(a, k))
        # (what an `after` arm reads: the cell's choice; under nested tuning, the last draw's)
        chosen[arm.name] = dict(tuned["choice"]) if tuned else None
        todo += [rec.run_key(arm.name, cell, draws_lib.Draw(draws_lib.EVAL, i), point)
                 for point in grid_lib.eval_points(plan, arm, tuned)
                 for i in (range(p.repeats) if slot is None else (slot,))]
      todo = [k for k in dict.fromkeys(todo) if k not in found]
      b, cap = arm_budget(arm)
      if together > 1 and b is None and len(todo) > 1 and arm.arm.run is None and \
          not arm.knobs and data.batchable(arm.name, cap, arm.arm.strategy_name):
        for i in range(0, len(todo), together):
          group = todo[i:i + together]
          jobs = [(*draws[k[3]][1:], dict(k[5])["lr"], draws[k[3]][0]) for k in group]
          t0 = time.time()
          outs = data.run_many(arm.name, jobs, cap, arm.arm.strategy_name)
          seconds = (time.time() - t0) / len(group)
          for k, job, out in zip(group, jobs, outs):
            add(arm, draws_lib.Draw(k[2], k[3], k[4]), dict(k[5]), job[0], job[1], out, seconds)
        continue
      for k in todo:
        run_one(arm, k)
  return records


def _pool(data):
  """(pool labels, class count) of a cell's data, or (None, 0) when it has no pool."""
  pool = getattr(data, "pool", None)
  if pool is None:
    return None, 0
  return pool.labels, data.num_classes


def run_line(r: dict, p, folds: int) -> str:
  """What one finished run was and scored: its cell, its draw (named, not r=-1), arm, LR,
  knobs, the accuracy it reports (validation for tuning runs, test else), steps, time."""
  d, c, o = r["draw"], r["cell"], r["outcome"]
  tune = d["role"] != draws_lib.EVAL
  acc = o.get("val_acc" if tune else "test_acc")
  draw = progress.draw_label(draws_lib.Draw(d["role"], d["index"]).repeat, p.tune_draws,
                             p.repeats, d["fold"], folds)
  cell = " ".join(str(v) for k, v in c.items() if k != "shots")
  draw = f"nested {draw}" if d["role"] == draws_lib.NESTED else draw
  return (f"{cell} k={c.get('shots')} {draw} {r['arm']} lr={r['knobs'].get('lr', 0):g} "
          f"{rec.hp_text(r['knobs'])} {'val' if tune else 'test'}="
          f"{'failed' if acc is None else f'{acc:.4f}'} steps={o.get('steps', '-')} "
          f"({r.get('seconds', 0):.1f}s)").replace("  ", " ")
