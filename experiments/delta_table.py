"""DELTA's Table 1, Fig. 2 and Fig. 3 on the embedded few-shot benchmark, under the protocol.

  python -m experiments.delta_table --out results/delta_table

runs, for both small archs (vgg_s without BN, resnet_s with BN) pretrained on Fashion-MNIST
{0,2,3,4,6}, on both embedded targets (Fashion-MNIST {1,5,7,8,9}, digits), at k = 5, 10, 30
per class:
  * Table 1: L2-FE, L2, L2-SP, DELTA w/o ATT, DELTA, each at its alpha chosen by 5-fold
    cross-validation (as the paper) on one tuning draw per (arch, target, k) that is never
    tested; mean (std) test accuracy over 5 evaluation draws (one k-shot draw each, shared by
    every strategy), then a Claims section testing Table 1's orderings per draw (paired
    difference, 95% CI, wins, verdict) per cell and pooled: DELTA >= DELTA w/o ATT >= L2-SP
    >= L2 (non-inferiority, 1-point margin), DELTA > L2-SP, and each of them > L2-FE;
  * beside it, labelled, the paper's protocol: lr 0.01 at the paper's alpha, no tuning;
  * Fig. 2: training CE and test accuracy vs iteration, L2-SP vs DELTA, with StepLR and
    ExponentialLR (resnet_s on the first target, k=30 by default), fixed --curve-steps;
  * Fig. 3: the distance of every conv filter from its starting point, sorted, per stage,
    L2-SP vs DELTA (from the ExponentialLR runs of Fig. 2).
  Figs. 2 and 3 use the alpha tuned for their (arch, target, k) cell when the table has it,
  else the paper's (the report says which).
It writes results.jsonl / results.json (one record per run, tuning runs included),
summary.json, curves.json, report.md, accuracy_vs_shots.png, learning_curves.png and
filter_distance.png.

Recipe (the paper and the authors' code, see jtransfer/methods/delta.py): SGD momentum 0.9, batch
64 (a smaller k-shot set is one batch), beta = 0.01, BN in train mode for the fine-tuned strategies
(`--bn`, default train as the authors' code, also what a folder made before --bn ran; `--bn
frozen`: the source's running statistics, which L2-FE always keeps), lr 0.01 (`--lrs`; a list is
tuned too, extended at an edge), lr x0.1 at 67% of the step cap `--steps` (exponentially per epoch
by default, `--schedule step` for StepLR): the schedule is defined over the cap, so a run stopped
early by `--patience` stops before its lr has fully decayed, and keeps its best validation state.
Budget: cap 200 steps, stop after 100 steps without a validation gain (checked every 10). alpha:
tuned over delta.ALPHAS (1e-3, 1e-2, 1e-1) for L2-SP and DELTA, delta.ALPHAS_NOATT (1e-5, 1e-4,
1e-3) for DELTA w/o ATT (its unnormalised sum is ~H*W times stiffer; at 0.01 it diverges here),
each extended by up to `--tune-extend` values at an edge. `--alpha 0.01` (one value) fixes alpha,
no alpha tuning, and the paper-grid rows use it too; `--alpha 0.001,0.01` sets the grid. Same for
`--alpha-noatt`. The paper's alpha (0.01; 1e-4 for DELTA w/o ATT) gives the paper-grid rows.
`--att-bn` sets BatchNorm in DELTA's attention probe (delta.ATT_BN_MODES; 'authors' =
channel_eval.py). L2-FE has no knob to tune and at lr 0.01 stops at the 200-step cap in 25 of 40
runs of published/delta_table_k10: `--l2fe-lrs 0.01,0.1` tunes its LR like the other arms'
knobs (same patience), and `--l2fe-steps 1000` gives it its own cap (a head on cached features costs ~1 ms a step;
under the 200-step cap it still stopped at the cap in most runs at its tuned LR, under 1000 in
none; docs/decisions.md). published/delta_table_k10_converged reruns the table so with
`--steps 500`, where the other arms converge too.

Cost. Per (arch, target, k) cell: tuning 5 folds x 3 alphas (plus extensions) for each of L2-SP,
DELTA w/o ATT and DELTA (45+ runs, each of DELTA's computing its attention), one validation run
for L2 and L2-FE, then 5 evaluation draws x (paper point + tuned point) per strategy: ~80-110
runs of <= 200 SGD steps. The full grid (12 cells) is ~1000-1300 runs, up to ~250k steps: about
a day on 2 CPU cores (not measured on a GPU). Reduced (vgg_s, digits, k = 10, alpha fixed, so
one tuning run per strategy on the tuning draw's validation set, 2 evaluation draws; 15 runs +
4 curves; measured: 6.5 CPU-minutes, 16 min wall on a shared, loaded 2-core machine):
  python -m experiments.delta_table --arch vgg_s --target digits --shots 10 --repeats 2 \
      --alpha 0.01 --alpha-noatt 1e-4 --cv-folds 0 --test-per-class 200 --curve-arch vgg_s \
      --curve-shots 10 --curve-steps 100 --curve-every 20 --out results/delta_table_reduced
Measured there: every run finite, stopped after 130-200 steps; test accuracy (mean of 2 draws)
L2-FE 84.8, L2 83.1, L2-SP 83.1 (L2-SP = L2: at alpha 0.01 its penalty hardly acts), DELTA w/o
ATT 86.2, DELTA 85.5; every claim inconclusive on 2 draws (CIs of several points).
Smoke tests (tiny source, a few steps; mostly XLA compilation): tests/test_delta_experiment.py.

The grid, resume, shards and the report skeleton are the study runner's (`jtransfer.study`):
this module declares the arms, Table 1, the claims, DELTA's flags (`Knobs`, reaching
`Strategy.build` through the plan: `arm_plan`) and Figs. 2 and 3
(`jtransfer.methods.delta_study`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import types
from typing import Optional, Sequence

from jtransfer import models, sources, study
from jtransfer.data import parse_spec, sample_kshot
from jtransfer.errors import InputError
from jtransfer.methods import delta, delta_study
from jtransfer.protocol import claims
from jtransfer.study import fewshot as hooks
from jtransfer.study import grid, runner
from jtransfer.study import records as rec
from jtransfer.study import report as skeleton
from jtransfer.study.config import at_least, comma_list, number
from jtransfer.study.target import TargetRuns

STRATEGIES = ("l2fe", "l2", "l2sp", "delta_noatt", "delta")
# Later baselines of the same family (issue 20), rows of the table when --strategies names them;
# each keeps its own recipe (Adam, its LR grid), not DELTA's SGD one.
BASELINES = ("bss", "lpft", "wise_ft", "cotuning")
TITLES = types.MappingProxyType({
    "l2fe": "L2-FE", "l2": "L2", "l2sp": "L2-SP", "delta_noatt": "DELTA w/o ATT",
    "delta": "DELTA", "bss": "BSS", "lpft": "LP-FT", "wise_ft": "WiSE-FT",
    "cotuning": "Co-Tuning"})
CURVE_STRATEGIES = ("l2sp", "delta")
# L2-FE's (Budget, cap): --l2fe-steps, else --steps, with the protocol's patience.
L2FE_BUDGET = runner.own_cap(lambda config: config.extra.l2fe_steps)
ALPHA_ARMS = ("l2sp", "delta", "delta_noatt")


def _claim(text: str, a: str, b: str, at_least: bool) -> claims.Claim:
  return claims.Claim("DELTA", text, a, b, at_least=at_least, margin=0.01 if at_least else 0.0,
                      source="Table 1")


# DELTA's Table 1 orderings; '>=' as non-inferiority within one point, '>' strictly.
CLAIMS = (
    _claim("DELTA >= DELTA w/o ATT", "delta", "delta_noatt", True),
    _claim("DELTA w/o ATT >= L2-SP", "delta_noatt", "l2sp", True),
    _claim("L2-SP >= L2", "l2sp", "l2", True),
    _claim("DELTA > L2-SP", "delta", "l2sp", False),
    *(_claim(f"{TITLES[s]} > L2-FE", s, "l2fe", False)
      for s in ("l2", "l2sp", "delta_noatt", "delta")),
    claims.Claim("BSS", "BSS beats plain L2 fine-tuning at few shots", "bss", "l2",
                 source="Chen et al. 2019, Table 1"),
    claims.Claim("LP-FT", "LP-FT at least matches fine-tuning", "lpft", "l2", at_least=True,
                 margin=0.01, source="Kumar et al. 2022 (in-distribution)"),
    claims.Claim("DELTA", "DELTA beats the later baselines: DELTA > BSS", "delta", "bss",
                 source="issue 20 (not in the paper)"),
)


def _number(flag: str):
  def parse(text):
    try:
      return float(text)
    except ValueError:
      raise InputError(f"{flag} {text!r} is not a number") from None
  return parse


def _schedules(text: str) -> tuple[str, ...]:
  schedules = comma_list("--curve-schedules")(text)
  if not schedules or set(schedules) - {"step", "exp"}:
    raise InputError(f"--curve-schedules {text!r}: expected step and/or exp")
  return schedules


@dataclasses.dataclass(frozen=True)
class Knobs:
  """DELTA's flags and Figs. 2 and 3's (the runner adds the few-shot protocol's)."""
  alpha: Optional[tuple[float, ...]] = study.flag(
      "--alpha", None, "alpha of L2-SP and DELTA: one value fixes it (no alpha tuning; the "
      "paper-grid rows use it too), several are the grid tuned over (default: tuned over "
      f"{', '.join(f'{a:g}' for a in delta.ALPHAS)}; paper rows at 0.01)",
      parse=lambda t: delta_study.parse_alphas(t, "--alpha"), metavar="A[,A...]")
  alpha_noatt: Optional[tuple[float, ...]] = study.flag(
      "--alpha-noatt", None, "the same for DELTA w/o ATT (default: tuned over "
      f"{', '.join(f'{a:g}' for a in delta.ALPHAS_NOATT)}; paper rows at "
      f"{delta.ALPHAS_NOATT[1]:g})", parse=lambda t: delta_study.parse_alphas(
          t, "--alpha-noatt"), metavar="A[,A...]")
  beta: Optional[float] = study.flag("--beta", None, "weight of the head term (0.01)",
                                     parse=_number("--beta"))
  schedule: Optional[str] = study.flag(
      "--schedule", None, "lr schedule of the table's runs over the step cap (default exp, as "
      "the authors' run.sh)", choices=delta.SCHEDULES)
  att_bn: Optional[str] = study.flag(
      "--att-bn", None, "BatchNorm in DELTA's attention probe (default 'authors': as "
      "channel_eval.py, probe head trained in train mode, ablation in eval mode with the "
      "running statistics so moved; see delta.Config.att_bn)", choices=delta.ATT_BN_MODES)
  taps: dict = study.flag("--taps", None, "DELTA's tapped conv units for an arch (default: "
                          "the last conv of each stage); repeat for several archs",
                          action="append", parse=delta_study.parse_taps,
                          metavar="ARCH=UNIT,UNIT")
  no_curves: bool = study.flag("--no-curves", False, "skip Fig. 2 and Fig. 3",
                               action="store_true")
  curve_arch: str = study.flag("--curve-arch", "resnet_s", "the arch of Figs. 2 and 3")
  curve_target: Optional[str] = study.flag("--curve-target", None, "default: the first target")
  curve_shots: int = study.flag("--curve-shots", 30, "k of Figs. 2 and 3",
                                check=at_least(1, "--curve-shots"))
  curve_steps: int = study.flag("--curve-steps", 300, "fixed steps of each Fig. 2 run (no "
                                "early stopping: a learning curve)",
                                check=at_least(1, "--curve-steps"))
  curve_every: int = study.flag("--curve-every", 25, "test accuracy every N steps",
                                check=at_least(1, "--curve-every"))
  curve_test_per_class: int = study.flag("--curve-test-per-class", 100, "test images per "
                                         "class of Fig. 2")
  curve_lr: float = study.flag("--curve-lr", 0.01, "learning rate of Fig. 2's runs")
  l2fe_lrs: Optional[tuple[float, ...]] = study.flag(
      "--l2fe-lrs", None, "L2-FE's own LR grid, tuned on the tuning draws and extended at an "
      "edge like the other arms' knobs (e.g. 0.01,0.1: at 0.01 its head-only objective sits at "
      "the step cap in 25 of 40 published runs); default: --lrs", metavar="LR[,LR...]",
      parse=lambda t: delta_study.parse_alphas(t, "--l2fe-lrs", positive=True), added=True)
  l2fe_steps: Optional[int] = study.flag(
      "--l2fe-steps", None, "L2-FE's own step cap (its lr schedule spans it; patience and "
      "validation as the other arms'): a head on cached features costs ~1 ms a step, and under "
      "the 200-step cap it stops at the cap in most runs even at a tuned LR; default: --steps",
      metavar="STEPS", parse=number("--l2fe-steps", int), check=at_least(1, "--l2fe-steps"),
      added=True)
  curve_schedules: tuple[str, ...] = study.flag(
      "--curve-schedules", ("step", "exp"), "Fig. 2's schedules", cli="step,exp",
      parse=_schedules)

  def changes(self) -> dict:
    """The `delta.Config` fields the flags set."""
    out = {k: getattr(self, k) for k in ("beta", "schedule", "att_bn")
           if getattr(self, k) is not None}
    return dict(out, taps=self.taps) if self.taps else out


def check(config) -> None:
  """DELTA's settings and the curve flags, before anything is loaded."""
  k = config.extra
  delta_config(config)
  if not k.no_curves:
    if not (math.isfinite(k.curve_lr) and k.curve_lr > 0):
      raise InputError(f"--curve-lr must be a finite number > 0, got {k.curve_lr}")
    parse_spec(k.curve_target or config.cells.targets[0], flag="--curve-target")
    if k.curve_arch not in models.names():
      raise InputError(f"--curve-arch {k.curve_arch!r} is unknown; expected one of "
                       f"{', '.join(models.names())}")


def arm_plan(config, arm: grid.ArmPlan) -> grid.ArmPlan:
  """A DELTA-family arm with the flags' `delta.Config` and alpha grid; L2-FE with its own LR
  grid under --l2fe-lrs."""
  if arm.name == "l2fe" and config.extra.l2fe_lrs:
    arm = dataclasses.replace(arm, lrs=tuple(config.extra.l2fe_lrs))
  if arm.strategy is None or arm.strategy.name not in delta.CONFIG_STRATEGIES:
    return arm
  k, name = config.extra, arm.strategy.name
  alphas = k.alpha_noatt if name == "delta_noatt" else k.alpha if name in ALPHA_ARMS else None
  knobs, defaults = ((arm.knobs, arm.defaults) if alphas is None
                     else delta_study.alpha_knobs(arm.strategy, alphas))
  return dataclasses.replace(
      arm, strategy=dataclasses.replace(arm.strategy, knobs=knobs, knob_defaults=defaults),
      knobs=knobs, defaults=defaults, options={**arm.options, "config": delta_config(config)})


# ----------------------------------------------------------------------------- Fig. 2 / Fig. 3
def curves_of(config) -> Optional[dict]:
  """What determines Figs. 2 and 3 besides the knobs, or None: --no-curves, or a shard
  other than 0 (they run once; merge takes shard 0's curves.json)."""
  k, shard = config.extra, config.output.shard
  if k.no_curves or (shard and shard[0] != 0):
    return None
  return dict(arch=k.curve_arch, target=k.curve_target or config.cells.targets[0],
              shots=k.curve_shots, steps=k.curve_steps, every=k.curve_every, lr=k.curve_lr,
              test_per_class=k.curve_test_per_class, schedules=list(k.curve_schedules))


def curve_knobs(records: list[dict], plan) -> dict[str, dict]:
  """Per Fig. 2 strategy, its knob values and where they come from ('fixed', 'tuned' for the
  curves' cell, else 'paper'; `delta_study.curve_knob_origin`)."""
  c = curves_of(plan.config)
  tuned = grid.choices(rec.read(records), plan)
  # A curve strategy the table does not run still takes the flags' alpha grid.
  cells = dataclasses.replace(plan.config.cells, arms=CURVE_STRATEGIES)
  curve_plan = grid.plan(plan.study, dataclasses.replace(plan.config, cells=cells))
  return {a.name: delta_study.curve_knob_origin(a.strategy, (tuned.get(
      (c["arch"], c["target"], c["shots"], a.name)) or {}).get("hp")) for a in curve_plan.arms}


def curve_config(plan, knobs: dict) -> dict:
  """What determines the curves (a finished curves.json is reused only when it matches)."""
  return dict(curves_of(plan.config), knobs=knobs,
              settings=delta_study.settings_of(delta_config(plan.config)))


def run_curves(plan, knobs: dict) -> dict:
  """Fig. 2 runs (L2-SP, DELTA per schedule) and Fig. 3 distances (from the exp runs)."""
  config, c = plan.config, curves_of(plan.config)
  p = dataclasses.replace(config.protocol, steps=c["steps"], test_per_class=c["test_per_class"])
  source = sources.study_source(c["arch"], config)
  out = dict(config=curve_config(plan, knobs), curves={}, distances={})
  data_cache: dict = {}
  for schedule in c["schedules"]:
    options = {name: {"config": delta_study.with_schedule(delta_config(config), schedule)}
               for name in CURVE_STRATEGIES}
    runs = TargetRuns(source, c["target"], p, data_cache, {}, options,
                      source_label=config.source.spec, quiet=config.output.quiet)
    train_idx, _ = sample_kshot(runs.pool.labels, c["shots"], p.seed,
                                num_classes=runs.num_classes)
    for name in CURVE_STRATEGIES:
      t0 = time.time()
      setup, step, opt, _ = runs.setup(name, rec.parse_hp(knobs[name]["hp"]), c["steps"])
      curve, params = delta_study.learning_curve(
          setup, step, opt, runs.pool.take(train_idx), runs.test, p.seed, c["lr"],
          c["steps"], c["every"], p.batch_size)
      out["curves"][f"{schedule}|{name}"] = curve
      if schedule == "exp" or len(c["schedules"]) == 1:
        out["distances"][name] = delta_study.stage_filter_distances(
            params, source.variables["params"])
      if not config.output.quiet:
        acc = curve["test_acc"][-1] if curve["test_acc"] else float("nan")
        print(f"[curves] {schedule} {name} {knobs[name]['hp']}: test {acc:.4f} "
              f"({time.time() - t0:.1f}s)", file=sys.stderr)
  return out


def read_curves(folder: str) -> Optional[dict]:
  """A folder's curves.json, or None."""
  path = os.path.join(folder, "curves.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def check_settings(config, results) -> None:
  """Refuses to resume runs made with other DELTA settings (the JTRANSFER_DELTA_* environment
  is not among the flags the folder's settings fingerprint holds), then notes this run's in
  delta_settings.json (version-1 records carry theirs as 'delta')."""
  mine = json.dumps(delta_study.settings_of(delta_config(config)), sort_keys=True)
  path = os.path.join(results.path, "delta_settings.json")
  seen = {json.dumps(r["delta"], sort_keys=True) for r in rec.rows(results.records)
          if "delta" in r}
  if results.records and os.path.exists(path):
    with open(path) as f:
      seen.add(json.dumps(json.load(f), sort_keys=True))
  if seen - {mine}:
    raise InputError(f"--out {results.path} holds runs made with other DELTA settings "
                     f"({', '.join(sorted(seen))}), not {mine}: use the same --beta/--schedule"
                     "/--att-bn/--taps and JTRANSFER_DELTA_* environment, or another --out")
  if results.writer:
    results.write_json("delta_settings.json", json.loads(mine))


def run(study_, config, results) -> list[dict]:
  """The runner's grid, then Figs. 2 and 3 (reused from curves.json on --resume when their
  settings match)."""
  check_settings(config, results)
  records = runner.run(study_, config, results)
  plan = grid.plan(study_, config)
  if curves_of(config) and results.writer:
    knobs = curve_knobs(records, plan)
    curves = read_curves(results.path) if config.output.resume else None
    if not curves or curves.get("config") != json.loads(json.dumps(curve_config(plan, knobs))):
      results.write_json("curves.json", run_curves(plan, knobs))
  return records


# ----------------------------------------------------------------------------- report
def delta_config(config) -> delta.Config:
  """DELTA's settings: the JTRANSFER_DELTA_* environment (read at the CLI edge), then the
  flags; `Config.bn_train` is --bn train (one setting)."""
  return dataclasses.replace(delta.Config(**dict(config.protocol.delta_env)),
                             **config.extra.changes(),
                             bn_train=config.protocol.bn == "train").validate()


def recipe_text(plan) -> str:
  """One paragraph: DELTA's recipe, its alpha grids and how alpha was chosen."""
  p, config = plan.config.protocol, delta_config(plan.config)
  arms = {a.name: a for a in plan.arms}
  grids = [f"{TITLES[n]} {{{', '.join(f'{a:g}' for a in arms[n].knobs['alpha'])}}} "
           f"(paper rows {arms[n].defaults['alpha']:g})"
           for n in ("l2sp", "delta_noatt", "delta") if n in arms]
  folds = {a.folds for a in plan.arms if a.name in ALPHA_ARMS}
  how = (f"by {'/'.join(map(str, sorted(folds)))}-fold cross-validation on each tuning draw's "
         "labelled pool (k-shot + validation images)" if folds - {0} else
         "on each tuning draw's validation set")
  if not grids:
    alpha = ""
  elif p.tune_draws:
    alpha = (f" alpha grids: {'; '.join(grids)}; chosen {how} (a one-value grid fixes "
             "alpha).")
  else:
    alpha = f" alpha (no tuning draws: the paper-row values): {'; '.join(grids)}."
  k = plan.config.extra
  if k.l2fe_steps and k.l2fe_steps != p.steps and "l2fe" in arms:
    alpha += (f" L2-FE's own cap: {k.l2fe_steps} steps (--l2fe-steps; its lr schedule spans "
              "it, patience as the others').")
  return (f"DELTA recipe: SGD momentum {config.momentum}, batch {p.batch_size} (a smaller "
          f"k-shot set is one batch), lr x0.1 at {config.decay_fraction:.0%} of the "
          f"{p.steps}-step cap ({config.schedule}); beta {config.beta:g}; L2 weight decay "
          f"{config.weight_decay:g}; BN in train mode for fine-tuned strategies: "
          f"{config.bn_train}; attention probe BN: {config.att_bn}.{alpha}")


FIG3_CLAIM = claims.Claim(
    "DELTA", "DELTA's filters move farther from the starting point than L2-SP's (effect: mean "
    "conv-filter L2 distance x 100)", "delta", "l2sp", source="Fig. 3")


def fig3_claim(plan, tuned_records: list[dict]) -> list[dict]:
  """Fig. 3 as a paired claim: each evaluation run's mean filter distance from the source
  (`surgery.mean_filter_distance`), DELTA against L2-SP, each at its tuned alpha."""
  rows = [r for r in tuned_records if r.get("filter_distance") is not None]
  if not {"delta", "l2sp"} <= set(plan.config.cells.arms):
    return []
  return [claims.evaluate(FIG3_CLAIM, rows, ("arch", "target", "shots"), arm_field="arm",
                          value="filter_distance", draw_fields=("target", "shots", "repeat"))]


def make_report(plan, records: list[dict], folder: str = "") -> tuple[str, dict]:
  """report.md text and summary.json content, from the records (and curves.json) alone: the
  runner's skeleton with DELTA's recipe under the title and Figs. 2 and 3 after it."""
  text, summary = skeleton.make_report(plan, records)
  title, _, rest = text.partition("\n")
  text = f"{title}\n\n{recipe_text(plan)}\n{rest}"
  curves = read_curves(folder) if folder and curves_of(plan.config) else None
  if curves:
    text = "\n".join([text.rstrip("\n"), ""]
                     + delta_study.curve_lines(curves, TITLES, CURVE_STRATEGIES))
  return text, summary


def plots(summary: dict, plan, folder: str) -> None:
  """accuracy_vs_shots.png, and Figs. 2 and 3 from curves.json."""
  hooks.plot_accuracy(summary, plan, folder)
  curves = read_curves(folder) if curves_of(plan.config) else None
  if curves:
    delta_study.plot_curves(curves, os.path.join(folder, "learning_curves.png"), TITLES)
    if curves["distances"]:
      delta_study.plot_distances(curves["distances"],
                                 os.path.join(folder, "filter_distance.png"), TITLES)


STUDY = study.Study(
    module="experiments.delta_table", title="# DELTA: Table 1, Fig. 2, Fig. 3 on the embedded "
    "benchmark", arms=tuple(dataclasses.replace(a, budget=L2FE_BUDGET) if a.name == "l2fe"
                            else a for a in hooks.arms_with(STRATEGIES + BASELINES, TITLES)),
    claims=CLAIMS,
    tables=(study.Table("Table 1 layout", STRATEGIES + BASELINES),), extra=Knobs,
    prepare=hooks.prepare(sources.study_source),
    check_data=hooks.check_data(sources.source_input_shape), check=check, arm_plan=arm_plan,
    extra_claims=fig3_claim, run=run, keys=grid.grid_keys, report=make_report, plots=plots,
    defaults={"shots": "5,10,30", "repeats": 5, "strategies": ",".join(STRATEGIES),
              "lrs": "paper", "steps": 200, "patience": 100, "tune_repeats": 1,
              "val_per_class": 20, "out": "results/delta_table"},
    bn_before="train", doc=__doc__)  # its DELTA-family arms' recipe before --bn
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
