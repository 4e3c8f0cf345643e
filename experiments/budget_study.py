"""Budget study: does the step cap decide the tables? Accuracy at 1x, 2x and 4x the cap.

  python -m experiments.budget_study --out results/budget_study

runs the few-shot protocol (runs stop by validation patience and keep their best validation
state; each strategy's LR and knobs tuned on tuning draws) with the cap and the patience at
1x, 2x and 4x (`--factors`, a cell axis of the study runner), for freeze, freeze_cwl,
finetune, finetune_cwl, l2, l2sp and delta on both small archs and both embedded targets at
k=10. Each factor tunes afresh (a longer budget may prefer a smaller LR) on the same draws, so
the factors pair by draw. report.md gives, per cell, the tuned test accuracy, the mean steps
trained and the share of runs that hit the cap at each factor, and the paired difference
4x - 1x with its 95% CI and a reading: 'converged' when the interval lies within +-1 point,
'cap-bound' when it lies above 0, 'unclear' otherwise. Protocol rule 1 (docs/protocol.md).

Reduced (one arch, one target, three strategies, 3 draws; tens of CPU-minutes):

  python -m experiments.budget_study --arch resnet_s --target digits \
      --strategies freeze,freeze_cwl,finetune --repeats 3 --out results/budget_study_reduced

Every factor's runs are records of one results.jsonl (cell field 'factor'); folders published
before the runner kept them in OUT/x<factor>/ and results.json with a 'factor' field, which the
report reads the same. BatchNorm: `--bn` (default train) for the fine-tuning arms; the published
folders predate it, when finetune and finetune_cwl kept the source's statistics but l2sp (its
DELTA-family recipe) trained them: no `--bn` reproduces both, so they are not resumed
(`edge.bn_check`); rerun them in a new folder.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Sequence

import numpy as np

from jtransfer import sources, study
from jtransfer.errors import InputError
from jtransfer.protocol import Budget, stats
from jtransfer.study import fewshot as hooks
from jtransfer.study import grid, records
from jtransfer.study import report as skeleton
from jtransfer.study.tables import pct, positive_ints

STRATEGIES = ("freeze", "freeze_cwl", "finetune", "finetune_cwl", "l2", "l2sp", "delta")
CONVERGED_MARGIN = 0.01  # |4x - 1x| within one point
CELL = ("arch", "target", "shots", "factor")


def _factors(text: str) -> tuple[int, ...]:
  values = positive_ints(text, "--factors")
  if values[0] != 1 or values != sorted(set(values)):
    raise InputError(f"--factors {text!r}: expected increasing values starting at 1")
  return tuple(values)


@dataclasses.dataclass(frozen=True)
class Knobs:
  """The study's own flag."""
  factors: tuple[int, ...] = study.flag("--factors", (1, 2, 4), "multiples of --steps and "
                                        "--patience", cli="1,2,4", parse=_factors)


def budget(config, cell: dict) -> tuple[Budget | None, int]:
  """A cell's budget: --steps and --patience times its factor."""
  p, f = config.protocol, cell["factor"]
  return Budget.from_flags(p.steps * f, p.eval_every, p.patience * f), p.steps * f


def make_report(plan, recs: list[dict], folder: str = "") -> tuple[str, dict]:
  """report.md and summary.json from the records alone."""
  config, p = plan.config, plan.config.protocol
  recs = records.read(recs, CELL)
  tuned_all = grid.choices(recs, plan)
  rows = [records.flat(r) for r in recs]
  tuned, acc = {}, {}
  for f in config.extra.factors:
    mine = [r for r in rows if r["factor"] == f]
    t = {(*k[:3], k[4]): v for k, v in tuned_all.items() if k[3] == f}
    if mine:
      tuned[f] = skeleton.tuned_summary(mine, t)
      acc[f] = {(r["arch"], r["target"], r["arm"], r["shots"], r["repeat"]): r
                for r in skeleton.tuned_rows(mine, t, CELL[:3])}
  factors, last = config.extra.factors, config.extra.factors[-1]
  lines = ["# Budget study: accuracy at " + ", ".join(f"{f}x" for f in factors) + " the cap", "",
           f"Source `{config.source.spec}`; {p.repeats} evaluation draws per cell; cap "
           f"{p.steps} steps and patience {p.patience} at 1x (both scaled); LR and knobs "
           f"tuned afresh at each factor on {p.tune_draws} tuning draw(s).", "",
           f"Cells: tuned test accuracy mean (std) in %, mean steps trained, share of runs that "
           f"stopped at the cap. Last column: paired {last}x - 1x per draw, mean [95% CI] "
           f"wins/N; 'converged' when the interval lies within +-{100 * CONVERGED_MARGIN:g} pt, "
           "'cap-bound' when it lies above 0, 'unclear' otherwise.", "",
           "| arch | target | strategy | k | " + " | ".join(f"{f}x" for f in factors) +
           f" | {last}x - 1x | reading |", "|---|---|---|---|" + "---|" * (len(factors) + 2)]
  summary, readings = {}, defaultdict(int)
  c = config.cells
  for cell in ((a, t, s, k) for a in c.archs for t in c.targets for s in c.arms for k in c.shots):
    cells = []
    for f in factors:
      v = tuned.get(f, {}).get(cell)
      if not v or not v["n"]:
        cells.append("-")
        continue
      rs = [r for key, r in acc[f].items() if key[:4] == cell and r["status"] == "ok"]
      capped = np.mean([r["stopped"] == "cap" for r in rs])
      cells.append(f"{pct(v['mean'], v['std'])}, {v['steps']:.0f} st, {100 * capped:.0f}% cap")
    pairs = [(acc[last][key]["test_acc"], acc[1][key]["test_acc"])
             for key in acc.get(1, {}) if key[:4] == cell and key in acc.get(last, {})
             and acc[1][key]["status"] == "ok" and acc[last][key]["status"] == "ok"]
    diff, reading = "-", "-"
    if len(pairs) >= 2:
      ci = stats.paired([a for a, _ in pairs], [b for _, b in pairs])
      diff = stats.format_paired(ci)
      reading = ("converged" if -CONVERGED_MARGIN < ci.lo and ci.hi < CONVERGED_MARGIN
                 else "cap-bound" if ci.lo > 0 else "unclear")
      readings[reading] += 1
      summary["|".join(map(str, cell))] = dict(paired=ci.to_dict(), reading=reading)
    lines.append(f"| {' | '.join(map(str, cell))} | " + " | ".join(cells) +
                 f" | {diff} | {reading} |")
  lines += ["", "Readings: " + ", ".join(f"{n} {r}" for r, n in sorted(readings.items())), ""]
  return "\n".join(lines), summary


STUDY = study.Study(
    module="experiments.budget_study", title="# Budget study", cell_fields=CELL,
    axes=lambda config: {"factor": config.extra.factors}, extra=Knobs, budget=budget,
    report=make_report, prepare=hooks.prepare(sources.study_source),
    check_data=hooks.check_data(sources.source_input_shape),
    defaults={"shots": "10", "repeats": 5, "strategies": ",".join(STRATEGIES), "lrs": "paper",
              "paper_grid": False, "cv_folds": "0", "out": "results/budget_study"},
    doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
