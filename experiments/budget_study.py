"""Budget study: does the step cap decide the tables? Accuracy at 1x, 2x and 4x the cap.

  python -m experiments.budget_study --out results/budget_study

runs the few-shot protocol (`experiments.fewshot`: runs stop by validation patience and keep
their best validation state; each strategy's LR and knobs tuned on tuning draws) three times,
with the cap and the patience at 1x, 2x and 4x (`--factors`), for freeze, freeze_cwl, finetune,
finetune_cwl, l2, l2sp and delta on both small archs and both embedded targets at k=10. Each
factor tunes afresh (a longer budget may prefer a smaller LR) on the same draws, so the
factors pair by draw. report.md gives, per cell, the tuned test accuracy, the mean steps
trained and the share of runs that hit the cap at each factor, and the paired difference
4x - 1x with its 95% CI and a reading: 'converged' when the interval lies within +-1 point,
'cap-bound' when it lies above 0, 'unclear' otherwise. Protocol rule 1 (docs/protocol.md).

Reduced (one arch, one target, three strategies, 3 draws; tens of CPU-minutes):

  python -m experiments.budget_study --arch resnet_s --target digits \
      --strategies freeze,freeze_cwl,finetune --repeats 3 --out results/budget_study_reduced

Each factor's runs live in OUT/x<factor>/ (results.jsonl, resumable); results.json gathers them
with a 'factor' field, and the report regenerates from it.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from typing import Sequence

import numpy as np

from experiments import cli, fewshot, pretrain, publish
from experiments.report import ResultsDir, pct, positive_ints
from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.protocol import stats

STRATEGIES = ("freeze", "freeze_cwl", "finetune", "finetune_cwl", "l2", "l2sp", "delta")
CONVERGED_MARGIN = 0.01  # |4x - 1x| within one point


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default=",".join(models.SMALL_ARCHS))
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE)
  p.add_argument("--target", action="append", default=None)
  p.add_argument("--shots", default="10")
  p.add_argument("--repeats", type=int, default=5, help="evaluation draws per cell")
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--lrs", default="paper")
  p.add_argument("--factors", default="1,2,4", help="multiples of --steps and --patience")
  fewshot.add_protocol_flags(p, steps=500, patience=100, tune_repeats=1)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--test-per-class", type=int, default=300)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  cli.add_results_flags(p, "results/budget_study")
  # fewshot's remaining flags at their defaults; no paper grid, CV off (cost) unless asked.
  p.set_defaults(paper_grid=False, cv_folds="0")
  return argparse.Namespace(**{**vars(fewshot.parse_args([])), **vars(p.parse_args(argv))})


def validate(args: argparse.Namespace) -> dict:
  plan = fewshot.validate(args)
  plan["factors"] = positive_ints(args.factors, "--factors")
  if plan["factors"][0] != 1 or plan["factors"] != sorted(set(plan["factors"])):
    raise InputError(f"--factors {args.factors!r}: expected increasing values starting at 1")
  return plan


def scaled(args: argparse.Namespace, factor: int) -> argparse.Namespace:
  return argparse.Namespace(**{**vars(args), "steps": args.steps * factor,
                               "patience": args.patience * factor})


def run(args: argparse.Namespace, plan: dict, results: ResultsDir) -> list[dict]:
  records = []
  for f in plan["factors"]:
    sub = ResultsDir(os.path.join(results.path, f"x{f}"), resume=True)
    fewshot.run_grid(scaled(args, f), plan, sub)
    records += [dict({k: v for k, v in r.items() if k != "seconds"}, factor=f)
                for r in sub.records]
  return records


def make_report(records: list[dict], plan: dict, args) -> tuple[str, dict]:
  """report.md and summary.json from the gathered records alone."""
  by_factor = defaultdict(list)
  for r in records:
    by_factor[r["factor"]].append(r)
  tuned = {f: fewshot.tuned_summary(rs, fewshot.choose(rs, plan, scaled(args, f)))
           for f, rs in by_factor.items()}
  acc = {f: {(r["arch"], r["target"], r["strategy"], r["shots"], r["repeat"]): r
             for r in fewshot.tuned_records(rs, fewshot.choose(rs, plan, scaled(args, f)))}
         for f, rs in by_factor.items()}
  factors, last = plan["factors"], plan["factors"][-1]
  lines = ["# Budget study: accuracy at " + ", ".join(f"{f}x" for f in factors) + " the cap", "",
           f"Source `{args.source}`; {args.repeats} evaluation draws per cell; cap "
           f"{args.steps} steps and patience {args.patience} at 1x (both scaled); LR and knobs "
           f"tuned afresh at each factor on {args.tune_repeats} tuning draw(s).", "",
           f"Cells: tuned test accuracy mean (std) in %, mean steps trained, share of runs that "
           f"stopped at the cap. Last column: paired {last}x - 1x per draw, mean [95% CI] "
           f"wins/N; 'converged' when the interval lies within +-{100 * CONVERGED_MARGIN:g} pt, "
           "'cap-bound' when it lies above 0, 'unclear' otherwise.", "",
           "| arch | target | strategy | k | " + " | ".join(f"{f}x" for f in factors) +
           f" | {last}x - 1x | reading |", "|---|---|---|---|" + "---|" * (len(factors) + 2)]
  summary = {}
  readings = defaultdict(int)
  for arch in plan["archs"]:
    for target in plan["targets"]:
      for strat in plan["strategies"]:
        for k in plan["shots"]:
          cell = (arch, target, strat, k)
          cells = []
          for f in factors:
            v = tuned.get(f, {}).get(cell)
            if not v or not v["n"]:
              cells.append("-")
              continue
            rs = [r for key, r in acc[f].items() if key[:4] == cell and r["status"] == "ok"]
            capped = np.mean([r["stopped"] == "cap" for r in rs])
            cells.append(f"{pct(v['mean'], v['std'])}, {v['steps']:.0f} st, "
                         f"{100 * capped:.0f}% cap")
          pairs = [(acc[last][key]["test_acc"], acc[1][key]["test_acc"])
                   for key in acc.get(1, {}) if key[:4] == cell and key in acc.get(last, {})
                   and acc[1][key]["status"] == "ok" and acc[last][key]["status"] == "ok"]
          diff, reading = "-", "-"
          if len(pairs) >= 2:
            c = stats.paired([a for a, _ in pairs], [b for _, b in pairs])
            diff = stats.format_paired(c)
            reading = ("converged" if -CONVERGED_MARGIN < c.lo and c.hi < CONVERGED_MARGIN
                       else "cap-bound" if c.lo > 0 else "unclear")
            readings[reading] += 1
            summary["|".join(map(str, cell))] = dict(paired=c.to_dict(), reading=reading)
          lines.append(f"| {arch} | {target} | {strat} | {k} | " + " | ".join(cells) +
                       f" | {diff} | {reading} |")
  lines += ["", "Readings: " + ", ".join(f"{n} {r}" for r, n in sorted(readings.items())), ""]
  return "\n".join(lines), summary


def record_key(r: dict) -> tuple:
  """A gathered record's key: its factor, then its few-shot key."""
  return (r["factor"], *map(str, fewshot.record_key(r)))


def grid_keys(records: list[dict], plan: dict, args) -> set[tuple]:
  """Every run of every factor's grid (`fewshot.grid_keys` at that factor's budget)."""
  keys = set()
  for f in plan["factors"]:
    mine = [r for r in records if r["factor"] == f]
    keys |= {(f, *map(str, k)) for k in fewshot.grid_keys(mine, plan, scaled(args, f))}
  return keys


def main(argv: Sequence[str] | None = None) -> int:
  return cli.main(argv, PUBLISHER, run, lambda _, records: sorted(records, key=record_key))


def collect(path: str) -> list[dict]:
  """Every factor's records (for `publish snapshot`), as main gathers them."""
  records = []
  for sub in sorted(d for d in os.listdir(path) if d.startswith("x") and d[1:].isdigit()):
    records += [dict(r, factor=int(sub[1:]))
                for r in publish.jsonl_records(os.path.join(path, sub))]
  return sorted(records, key=record_key)


PUBLISHER = publish.Publisher(
    "experiments.budget_study", parse_args, validate,
    lambda records, plan, args, _: make_report(records, plan, args), grid_keys, record_key,
    collect)


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
