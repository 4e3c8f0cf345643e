"""The sparse study's pipeline (`experiments.sparse_transfer`): its plan, records, tuning, loop.

The pipeline is not a grid of independent runs (each stage trains from the last one's nets),
so the study brings its own `run` (`jtransfer.study.Study.run`): the Sparse-SourceNet once,
then per target the Table 1 nets tuned on the tuning seeds (`choose`, through each variant
arm's run function), then per evaluation seed one `hybrid_run.Unit` (the four nets at their
tuned points, connection pruning K+ and K-, neuron pruning). Records are version 2
(`jtransfer.study.records`); `rows` gives the report the flat form every published folder
holds (version 1), so old folders and new ones read alike.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from types import MappingProxyType

from jtransfer import sources
from jtransfer.data import load_spec, parse_spec
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.methods import hybrid, hybrid_run, hybrid_source, sparsity
from jtransfer.protocol import Budget, fit_converged, progress, tuning
from jtransfer.study import records as rec
from jtransfer.study.declare import RunContext
from jtransfer.study.draws import Draw
from jtransfer.study.runner import emitter
from jtransfer.study.tables import float_list

VARIANTS = tuple(hybrid.VARIANTS)
# Version-2 arm of each record kind beside the Table 1 variants (whose arm is the variant).
KIND_ARMS = MappingProxyType({"source": "sparse_source", "target_prune": "sparse_target",
                              "neuron": "neuron"})
ARM_KINDS = MappingProxyType({v: k for k, v in KIND_ARMS.items()})
CELL = MappingProxyType({"source": ("round",), "transfer": ("target",), "neuron": ("target",),
                         "target_prune": ("target", "knowledge", "rate")})
EXTRA = ("train_per_class", "cap")


# ----------------------------------------------------------------------------- plan
def floats_in(text: str, flag: str, lo: float, hi: float, open_lo: bool = False) -> list[float]:
  """Sorted distinct values of a comma list in [lo, hi] (or (lo, hi] with `open_lo`)."""
  ok = (lambda v: lo < v <= hi) if open_lo else (lambda v: lo <= v <= hi)
  return sorted(set(float_list(text, flag, ok, f"values must lie in "
                                               f"{'(' if open_lo else '['}{lo}, {hi}]")))


def plan_of(config) -> dict:
  """The invocation's plan from its checked `Config` (`Study.plan`): targets, nets, rates,
  seeds and the tuning grids, the Sparse-SourceNet's round targets.

  Raises:
    InputError: one sentence naming the first bad flag or rule.
  """
  p, x = config.protocol, config.extra
  for t in config.cells.targets:
    parse_spec(t, flag="--target")
  if not config.source.spec.startswith("ckpt:"):
    parse_spec(config.source.spec, flag="--source")
  if "hybrid" not in x.variants or "standard" not in x.variants:
    raise InputError("--variants must include 'hybrid' (pruned into the Sparse-TargetNet) and "
                     "'standard' (its accuracy is the neuron-pruning stop level)")
  if x.neuron_from is not None and x.neuron_from not in x.target_rates:
    raise InputError(f"--neuron-from {x.neuron_from} is not one of --target-rates "
                     f"{list(x.target_rates)}")
  if set(x.seeds) & set(x.tune_seeds):
    raise InputError(f"--tune-seeds {','.join(map(str, x.tune_seeds))!r} overlap --seeds "
                     f"{','.join(map(str, x.seeds))!r}: a tuning draw must never be an "
                     "evaluation draw")
  tuned = len(x.lrs) > 1 or len(x.lams) > 1 or len(x.taus) > 1
  if (p.patience or tuned) and not p.val_per_class:
    raise InputError("early stopping (--patience) and tuning (several --lrs, --lam or --tau "
                     "values) need validation images: set --val-per-class >= 1")
  return dict(config=config, targets=list(config.cells.targets),
              variants=[v for v in VARIANTS if v in x.variants], rates=list(x.target_rates),
              neuron_from=x.neuron_from, seeds=list(x.seeds),
              neuron_layers=list(x.neuron_layers), lrs=list(x.lrs), lams=list(x.lams),
              taus=list(x.taus), tune_seeds=list(x.tune_seeds),
              source_targets=sparsity.round_sparsities(x.source_sparsity, x.source_rounds,
                                                       kind=x.source_schedule))


# ----------------------------------------------------------------------------- records
def to_record(flat: dict) -> dict:
  """A finished piece's flat record as version 2: arm (the variant, or the kind's arm),
  cell (target, and the rate of a pruning point), draw (role, seed), knobs (lr, lam, tau)."""
  kind = flat["kind"]
  cell = {f: flat[f] for f in CELL[kind]}
  knobs = {k: flat[k] for k in ("lr", "lam", "tau") if flat.get(k) is not None}
  used = {"kind", "variant", "role", "seed", "lr", "lam", "tau", "seconds", *CELL[kind],
          *EXTRA}
  outcome = {k: v for k, v in flat.items() if k not in used}
  if kind == "source":  # the round's target sparsity, apart from a cell's target dataset
    outcome["target_sparsity"] = flat["target"]
  return rec.make(flat.get("variant") or KIND_ARMS[kind], cell,
                  Draw(flat.get("role", "eval"), int(flat.get("seed", 0))), knobs, outcome,
                  flat.get("seconds"), {k: flat[k] for k in EXTRA if k in flat})


def flat_of(r: dict) -> dict:
  """The flat (version-1) form of a record (a version-1 record as it is)."""
  if r.get("version") != rec.VERSION:
    return r
  kind = ARM_KINDS.get(r["arm"], "transfer")
  out = {"kind": kind, **r["cell"], **r["extra"], **r["outcome"]}
  if "seconds" in r:
    out["seconds"] = r["seconds"]
  if kind == "source":
    out["target"] = out.pop("target_sparsity")
    return out
  out.update(seed=r["draw"]["index"], lr=r["knobs"]["lr"], lam=r["knobs"].get("lam"),
             tau=r["knobs"].get("tau"))
  if kind == "transfer":
    out.update(variant=r["arm"], role=r["draw"]["role"])
  return out


def record_key(r: dict) -> tuple:
  """The run a record (either version) records: `records.key` of its version-2 form."""
  return rec.key(r if r.get("version") == rec.VERSION else to_record(r))


def rows(records) -> list[dict]:
  """The flat form of every record (what the report and the tuning read)."""
  return [flat_of(r) for r in records]


# ----------------------------------------------------------------------------- tuning
def grid(plan: dict, variant: str) -> dict:
  """The tuning grid of a Table 1 net: LR, plus lambda and tau for the K+ nets."""
  g = {"lr": plan["lrs"]}
  if hybrid.VARIANTS[variant][1]:
    g.update(lam=plan["lams"], tau=plan["taus"])
  return g


def point(variant: str, values: dict) -> dict:
  """(lr, lam, tau) of a tuning point; lam and tau are None for the K- nets."""
  k = hybrid.VARIANTS[variant][1]
  return dict(lr=float(values["lr"]), lam=float(values["lam"]) if k else None,
              tau=float(values["tau"]) if k else None)


def tune_key(r: dict) -> tuple:
  """A flat tuning record's key: (target, variant, seed, lr, lam, tau)."""
  return (r["target"], r["variant"], r["seed"], r["lr"], r.get("lam"), r.get("tau"))


def is_eval(r: dict) -> bool:
  """Whether a flat record is of an evaluation seed."""
  return r.get("role", "eval") == "eval"


def choose(flat: list[dict], plan: dict, tune_extend: int, run_missing=None) -> dict:
  """The (lr, lam, tau) each (target, net) uses on its evaluation seeds.

  A grid with one point is used as given (no tuning runs). Otherwise each point scores the mean
  validation accuracy of its runs on the tuning seeds (a failed run scores 0; only 'val_acc' is
  read: tuning records hold no test accuracy), through `jtransfer.protocol.tuning`. From flat
  records alone (the report; cells not tuned yet are left out) or, with `run_missing(key) ->
  record`, training what is missing.

  Returns:
    (target, variant) -> Tuned.to_dict() with 'choice' = {'lr', 'lam', 'tau'} and 'fixed'.
  """
  by_key = {tune_key(r): r for r in flat if r.get("kind") == "transfer" and not is_eval(r)}
  out = {}
  for target in plan["targets"]:
    for variant in plan["variants"]:
      g = grid(plan, variant)
      if all(len(v) == 1 for v in g.values()):
        out[(target, variant)] = dict(choice=point(variant, {k: v[0] for k, v in g.items()}),
                                      score=None, grid=g, edges=[], scores=[], fixed=True)
        continue

      def keys_of(values, target=target, variant=variant):
        p = point(variant, values)
        return [(target, variant, seed, p["lr"], p["lam"], p["tau"])
                for seed in plan["tune_seeds"]]

      found = tuning.tune_records(g, keys_of, by_key, run_missing, tune_extend)
      if found is None:  # the report of an unfinished grid: that cell is not tuned yet
        continue
      t = found.to_dict()
      t["choice"] = point(variant, t["choice"])
      out[(target, variant)] = dict(t, fixed=False)
  return out


# ----------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class CellData:
  """What the runs of one target share (`RunContext.data`): the nets' sources, the loaded
  target, compiled functions and the units of the seeds run so far."""
  config: object
  source: object
  sparse: tuple
  data: object
  compiled: hybrid_run.Compiled
  log: object
  emit: object
  units: dict = dataclasses.field(default_factory=dict)

  def unit(self, seed: int) -> hybrid_run.Unit:
    """The (cached) unit of `seed`: its draw, compiled steps shared."""
    if seed not in self.units:
      p, x = self.config.protocol, self.config.extra
      draw = hybrid_run.draw_target(self.data, seed, x.train_per_class, p.val_per_class,
                                    p.test_per_class, self.log)
      self.units[seed] = hybrid_run.Unit(
          self.source, self.sparse, draw, seed, unit_settings(self.config),
          self.compiled, converge_rule(p), self.log,
          lambda label: progress.ticker(label, self.emit))
    return self.units[seed]


def unit_settings(config) -> hybrid_run.UnitSettings:
  """The units' typed settings from the config."""
  x = config.extra
  return hybrid_run.UnitSettings(
      n_m=x.n_m, n_e=x.n_e, batch_size=config.protocol.batch_size, steps=config.protocol.steps,
      target_rates=tuple(x.target_rates), target_steps=x.target_steps, scope=x.scope,
      neuron_from=x.neuron_from, neuron_layers=tuple(x.neuron_layers),
      neuron_frac=x.neuron_frac, neuron_steps=x.neuron_steps,
      neuron_images_per_class=x.neuron_images_per_class)


def converge_rule(p):
  """The protocol's stopping rule for `hybrid_run.Unit` (None: fixed steps, --patience 0)."""
  if not p.patience:
    return None

  def converge(state, step_fn, batch_at, val_acc, cap, on_step=None):
    return fit_converged(state, step_fn, batch_at, val_acc,
                         Budget.from_flags(cap, p.eval_every, p.patience), on_step=on_step)
  return converge


def run_transfer(variant: str, ctx: RunContext, values: dict) -> dict:
  """A variant arm's run function: one Table 1 net on the context's seed at `values`; a
  tuning run (draw role 'tune') is never tested."""
  unit = ctx.data.unit(ctx.seed)
  return unit.transfer(variant, values, test=ctx.draw.role == "eval")[3]


def _drop(results, pred) -> None:
  """Removes records (in memory and in results.jsonl), e.g. of a unit cut short by a kill."""
  results.records = [r for r in results.records if not pred(flat_of(r))]
  results.write_text("results.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n"
                                              for r in results.records))


def sparse_source(config, plan: dict, source, results, log):
  """Sparse-SourceNet (`hybrid_source.prune_source`), each round recorded; reloaded from
  models/ when a resumed run finished it."""
  x = config.extra
  path = os.path.join(results.path, "models", "sparse_source")
  done = [r for r in rows(results.records) if r["kind"] == "source"]
  saved = hybrid_source.load_sparse_source(path)
  if len(done) == len(plan["source_targets"]) + 1 and saved is not None:
    return saved
  spec = x.source_data or source.meta.get("source_spec")
  if not spec:
    raise InputError("the source checkpoint has no source_spec in its meta: pass --source-data")
  data = load_spec(spec, source.input_shape, flag="--source-data",
                   data_dir=config.protocol.data_dir)
  _drop(results, lambda r: r["kind"] == "source")  # an incomplete stage is redone whole
  cfg = hybrid_source.SourcePruning(
      tuple(plan["source_targets"]), x.source_steps, x.source_lr, x.source_batch_size,
      x.source_max_train, x.source_test_per_class, x.scope)

  def on_row(row):
    results.add(to_record(dict(kind="source", **dataclasses.asdict(row))))
    if row.round:
      log(f"[sparse_source] target {row.target:.3f}: sparsity {row.sparsity:.3f}, acc pruned "
          f"{row.acc_pruned:.4f} -> retrained {row.acc:.4f}")

  params, masks, _ = hybrid_source.prune_source(source, data, cfg, on_row)
  hybrid_source.save_sparse_source(path, source, params)
  return params, masks


def planned_runs(plan: dict) -> dict[str, int]:
  """Runs the grid plans, by kind, before tuning has chosen anything: each point of a net's
  grid on each tuning seed where the grid has several points (`choose`), and one evaluation
  unit per (target, seed). Extensions at a grid's edge add tuning runs later."""
  points = [math.prod(len(v) for v in grid(plan, variant).values())
            for variant in plan["variants"]]
  per_target = sum(n for n in points if n > 1) * len(plan["tune_seeds"])
  return progress.plan_counts({
      "tuning runs": per_target * len(plan["targets"]),
      "eval units (targets x seeds)": len(plan["targets"]) * len(plan["seeds"])})


def saved_runs(flat: list[dict], plan: dict) -> int:
  """The runs of `planned_runs` a resume skips: tuning runs recorded, and units complete (their
  last record, the neuron one, written; an incomplete unit is rerun whole)."""
  targets = set(plan["targets"])
  tuning_runs = sum(1 for r in flat if r.get("kind") == "transfer" and not is_eval(r)
                    and r.get("target") in targets)
  units = {(r.get("target"), r.get("seed")) for r in flat
           if r.get("kind") == "neuron" and is_eval(r)}
  return tuning_runs + sum((t, s) in units for t in plan["targets"] for s in plan["seeds"])


def run(study, config, results) -> list[dict]:
  """`Study.run`: the whole pipeline into `results`; returns every record."""
  plan = plan_of(config)
  emit = emitter(config)
  log = (lambda line: None) if emit is None else emit
  source = sources.source_for("vgg_s", config.source.spec, epochs=config.source.epochs,
                               progress=not config.output.quiet)
  if source.arch != "vgg_s":
    raise InputError(f"--source must be a vgg_s model, got {source.arch}")
  sparse = sparse_source(config, plan, source, results, log)
  compiled = hybrid_run.Compiled()
  grid_progress = progress.GridProgress(planned_runs(plan),
                                        saved=saved_runs(rows(results.records), plan), emit=emit)
  grid_progress.announce("sparse_transfer")
  budget = Budget.from_flags(config.protocol.steps, config.protocol.eval_every,
                             config.protocol.patience)
  for spec in plan["targets"]:
    data = load_spec(spec, source.input_shape, flag="--target", data_dir=config.protocol.data_dir)
    cell = CellData(config, source, sparse, data, compiled, log, emit)

    def run_missing(key, spec=spec, cell=cell):
      """One tuning run: validation accuracy only, the test split is never evaluated."""
      _, variant, seed, lr, lam, tau = key
      u, hp, t0 = cell.unit(seed), dict(lr=lr, lam=lam, tau=tau), time.time()
      ctx = RunContext(config, {"target": spec}, cell, Draw("tune", seed), seed,
                       u.draw.train_idx, u.draw.val_idx, budget, config.protocol.steps)
      try:
        r = study.arm(variant).run(ctx, hp)
      except NonFiniteError as e:
        r = dict(kind="transfer", role="tune", variant=variant, **hp, status="failed",
                 error=str(e), val_acc=None, test_acc=None, seconds=round(time.time() - t0, 1))
      r = dict(r, target=spec, seed=seed, train_per_class=u.draw.shots)
      results.add(to_record(r))
      val = "failed" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
      grid_progress.finished(f"tuning run {spec} seed {seed} {variant} lr={lr:g} lam={lam} "
                             f"tau={tau}: val {val} steps {r.get('steps', '-')}")
      return r

    tuned = choose(rows(results.records), dict(plan, targets=[spec]),
                   config.protocol.tune_extend, run_missing)
    cell.units.clear()
    choice = {v: tuned[(spec, v)]["choice"] for v in plan["variants"]}
    for seed in plan["seeds"]:
      in_unit = lambda r: r.get("target") == spec and r.get("seed") == seed and is_eval(r)
      if any(in_unit(r) and r["kind"] == "neuron" for r in rows(results.records)):
        continue  # the neuron record is a unit's last: the unit is complete
      _drop(results, in_unit)
      t0 = time.time()
      u = cell.unit(seed)
      u.run(lambda r: results.add(to_record(dict(r, target=spec, seed=seed,
                                                 train_per_class=u.draw.shots))),
            choice, plan["variants"])
      grid_progress.finished(f"eval unit {spec} seed {seed} done in {time.time() - t0:.0f} s")
  return results.records
