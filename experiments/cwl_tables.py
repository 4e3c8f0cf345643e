"""Tables I and II of the CWL paper: Freeze vs Freeze+CWL and Finetune vs Finetune+CWL.

  python -m experiments.cwl_tables --out results/cwl_tables

runs the paper's tables on the embedded benchmark (both small archs, targets fmnist:1,5,7,8,9
and digits, k in {1,3,5,10}, 10 evaluation draws) under the protocol of docs/protocol.md,
through `experiments.fewshot`'s grid runner (one k-shot draw per (arch, target, k, repeat),
shared by all strategies):

  * every run trains until its validation accuracy has not improved for `--patience` steps (at
    most `--steps`) and keeps its best validation state;
  * each strategy's LR is chosen per (arch, target, k) on 2 tuning draws that are not
    evaluation draws (the paper's grids, finetune {1e-5,5e-5,1e-4,5e-4,1e-3}, freeze
    {1e-3,5e-3,1e-2,5e-2}, extended at an edge);
  * report.md: the tuned Tables I and II, a Claims section (Freeze+CWL > Freeze; more so
    without BN; Finetune+CWL >= Finetune; per draw, 95% CI, verdict), then the paper's
    protocol (best LR picked on the test set, labelled) with its paired rows, and the LR picked
    per draw on validation; accuracy_vs_shots.png.

A reduced run (vgg_s, one target, k in {1,5}, 3 draws, freeze pair only):

  python -m experiments.cwl_tables --arch vgg_s --target fmnist:1,5,7,8,9 --shots 1,5 \
      --repeats 3 --strategies freeze,freeze_cwl --test-per-class 200 --out results/cwl_reduced

Paper claims tested: CWL beats Freeze at few shots, more on VGG (no BN) than on ResNet; CWL
does not hurt finetuning.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from experiments import cli, fewshot, pretrain, publish
from jtransfer import models
from jtransfer.methods import transfer
from jtransfer.protocol import claims

STRATEGIES = ("freeze", "freeze_cwl", "finetune", "finetune_cwl")
LABELS = {"freeze": "Freeze", "freeze_cwl": "Freeze + CWL", "finetune": "Finetune",
          "finetune_cwl": "Finetune + CWL", "finetune_lowconv": "Alg. 1 (low-lr conv) + CWL",
          "freeze_film": "Freeze + FiLM", "bitfit": "BitFit", "lpft": "LP-FT",
          "wise_ft": "WiSE-FT", "bss": "BSS", "cotuning": "Co-Tuning"}
# The later baselines (issue 20) are rows of the table they compare with, when --strategies
# names them: FiLM and BitFit beside CWL's per-channel scales, LP-FT, WiSE-FT, BSS beside
# finetuning.
TABLES = (("Table I: frozen convolutions vs weighting convolutions",
           ("freeze", "freeze_cwl", "finetune_lowconv", "freeze_film", "bitfit"),
           ("freeze_cwl", "freeze")),
          ("Table II: finetuning vs finetuning with weighting convolutions",
           ("finetune", "finetune_cwl", "freeze", "lpft", "wise_ft", "bss", "cotuning"),
           ("finetune_cwl", "finetune")))
CLAIMS = (
    claims.Claim("CWL", "weighting convolutions beats frozen convolutions", "freeze_cwl",
                 "freeze", source="Table I"),
    claims.Claim("CWL", "weighting convolutions does not hurt finetuning", "finetune_cwl",
                 "finetune", at_least=True, margin=0.01, source="Table II"),
    # The later baselines against CWL and finetuning (evaluated when both arms run).
    claims.Claim("FiT", "FiLM (per-channel scale and shift) at least matches CWL (scale only)",
                 "freeze_film", "freeze_cwl", at_least=True, margin=0.01,
                 source="Shysheya et al. 2023"),
    claims.Claim("BitFit", "training only the biases beats frozen convolutions", "bitfit",
                 "freeze", source="Ben Zaken et al. 2022"),
    claims.Claim("LP-FT", "LP-FT at least matches fine-tuning", "lpft", "finetune",
                 at_least=True, margin=0.01, source="Kumar et al. 2022 (in-distribution)"),
    claims.Claim("WiSE-FT", "WiSE-FT at least matches the fine-tuned model it interpolates",
                 "wise_ft", "lpft", at_least=True, margin=0.01, source="Wortsman et al. 2022"),
    claims.Claim("BSS", "BSS beats fine-tuning at few shots", "bss", "finetune",
                 source="Chen et al. 2019, Table 1"),
    claims.Claim("Co-Tuning", "Co-Tuning beats fine-tuning", "cotuning", "finetune",
                 source="You et al. 2020, Table 1"),
) + fewshot.CLAIMS  # finetune > freeze on the far domain, not on the near one
# 'reduced': two LRs per family, the same for a strategy and its CWL variant (paired).
REDUCED = {"freeze": (1e-2, 5e-2), "finetune": (1e-4, 1e-3)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default=",".join(models.SMALL_ARCHS))
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE,
                 help="dataset spec to pretrain on (cached), or ckpt:PATH")
  p.add_argument("--target", action="append", default=None,
                 help="target spec; repeat (or ';'-separate) for several "
                      f"(default {';'.join(fewshot.DEFAULT_TARGETS)})")
  p.add_argument("--shots", default="1,3,5,10")
  p.add_argument("--repeats", type=int, default=10, help="evaluation draws per cell")
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--lrs", default="paper",
                 help="'paper' (each strategy's grid), 'reduced' (2 per family) or a comma list")
  fewshot.add_protocol_flags(p, steps=1000, patience=200)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--test-per-class", type=int, default=300, help="0 = all")
  p.add_argument("--data-dir", default=None,
                 help="TFDS data_dir or the Fashion-MNIST IDX directory (as fewshot)")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  fewshot.add_batch_runs_flag(p)
  p.add_argument("--no-feature-cache", action="store_true")
  # fewshot's defaults first, so flags fewshot adds later still have a value here.
  cli.add_results_flags(p, "results/cwl_tables")
  return argparse.Namespace(**{**vars(fewshot.parse_args([])), **vars(p.parse_args(argv))})


def family(name: str) -> str:
  """'freeze' or 'finetune': which paper LR grid the strategy uses."""
  return "freeze" if transfer.get_strategy(name).paper_lrs == transfer.FREEZE_LRS else "finetune"


def make_plan(args: argparse.Namespace) -> dict:
  """fewshot's plan, with paired reduced LR grids."""
  if args.lrs != "reduced":
    return fewshot.validate(args)
  plan = fewshot.validate(argparse.Namespace(**{**vars(args), "lrs": "paper"}))
  plan["lrs"] = {s: REDUCED[family(s)] for s in plan["strategies"]}
  return plan


def _cell(v: dict | None, mean_key: str, std_key: str) -> str:
  return f"{v[mean_key]:.3f} ({v[std_key]:.3f})" if v else "-"


def paired_delta(records: list[dict], summary: dict, arch: str, target: str, a: str, b: str,
                 k: int) -> tuple[float, float, int, int] | None:
  """Mean/std over repeats of acc(a) - acc(b), each at its best LR; wins of a; repeats."""
  va, vb = summary.get((arch, target, a, k)), summary.get((arch, target, b, k))
  if not va or not vb:
    return None
  acc = {}
  for r in records:
    if r.get("status", "ok") == "ok" and r["arch"] == arch and r["target"] == target \
        and r["shots"] == k:
      if (r["strategy"], r["lr"]) in ((a, va["best_lr"]), (b, vb["best_lr"])):
        acc[(r["strategy"], r["repeat"])] = r["test_acc"]
  reps = sorted({rep for (_, rep) in acc if (a, rep) in acc and (b, rep) in acc})
  if not reps:
    return None
  d = np.array([acc[(a, rep)] - acc[(b, rep)] for rep in reps])
  return float(d.mean()), float(d.std()), int(np.sum(d > 0)), len(reps)


def table(records: list[dict], summary: dict, plan: dict, title: str, rows: Sequence[str],
          pair: tuple[str, str], mean_key: str, std_key: str) -> list[str]:
  """A paper-style table: model and dataset header rows, one row per strategy, columns k."""
  rows = [s for s in rows if s in plan["strategies"]]
  if not any(s in plan["strategies"] for s in pair):
    return []
  shots = plan["shots"]
  out = [f"### {title}", "", "| training data / class | " + " | ".join(map(str, shots)) + " |",
         "|---|" + "---|" * len(shots)]
  blank = " |" * len(shots)
  for arch in plan["archs"]:
    out.append(f"| **{arch}** |{blank}")
    for target in plan["targets"]:
      out.append(f"| *{target}* |{blank}")
      for s in rows:
        cells = [_cell(summary.get((arch, target, s, k)), mean_key, std_key) for k in shots]
        out.append(f"| {LABELS.get(s, s)} | " + " | ".join(cells) + " |")
      if mean_key == "test_mean" and all(p in plan["strategies"] for p in pair):
        cells = []
        for k in shots:
          d = paired_delta(records, summary, arch, target, pair[0], pair[1], k)
          cells.append("-" if d is None else f"{d[0]:+.3f} ({d[1]:.3f}) {d[2]}/{d[3]}")
        out.append(f"| Δ {LABELS[pair[0]]} − {LABELS[pair[1]]} (wins) | " + " | ".join(cells)
                   + " |")
  return out + [""]


def bn_claim(records: list[dict]) -> list[dict]:
  """'CWL helps more without BN': per draw, (Freeze+CWL - Freeze) on vgg_s minus the same on
  resnet_s. The archs share their k-shot draws (the seed depends on k and the repeat only), so
  the gains pair by (target, k, repeat)."""
  acc = {(r["arch"], r["target"], r["shots"], r["repeat"], r["strategy"]): r["test_acc"]
         for r in records if r.get("status", "ok") == "ok"}
  gains = []
  for (arch, target, k, rep, strat), a in acc.items():
    b = acc.get((arch, target, k, rep, "freeze"))
    if strat == "freeze_cwl" and b is not None:
      gains.append(dict(arch=arch, target=target, shots=k, repeat=rep, test_acc=a - b))
  claim = claims.Claim("CWL", "weighting helps more without BN (VGG) than with it (ResNet)",
                       "vgg_s", "resnet_s", source="Table I, section 4")
  return [claims.evaluate(claim, gains, ("target", "shots"), arm_field="arch")]


def make_report(records: list[dict], plan: dict, args) -> tuple[str, dict]:
  def paper_tables(grid_records, summary):
    lines = []
    for heading, m, s in (("Best over LR (picked on the test set, as the paper; optimistic)",
                           "test_mean", "test_std"),
                          ("Validation-selected LR (picked per draw on its validation set)",
                           "val_sel_mean", "val_sel_std")):
      lines += [f"## {heading}", ""]
      for title, rows, pair in TABLES:
        lines += table(grid_records, summary, plan, title, rows, pair, m, s)
    lines += ["Δ rows: paired difference over the same k-shot draws, each strategy at its best "
              "LR; 'wins' = draws where CWL is better. Cells: test accuracy, mean (std).", "",
              "Best LR per cell: " + "; ".join(
                  f"{a}/{t}/{s}/k={k}: {v['best_lr']:g}" for (a, t, s, k), v in sorted(
                      summary.items(), key=lambda kv: tuple(map(str, kv[0])))), ""]
    return lines

  return fewshot.make_report(
      records, plan, args, title="# CWL Tables I and II (embedded benchmark)",
      claim_list=CLAIMS, tables=[(title, rows) for title, rows, _ in TABLES], labels=LABELS,
      extra_claims=bn_claim if {"freeze", "freeze_cwl"} <= set(plan["strategies"]) else None,
      paper_tables=paper_tables)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.main(argv, PUBLISHER, fewshot.run_grid,
                  lambda results, _: fewshot.results_records(results.records),
                  lambda summary, plan, args, results, _: fewshot.plot(
                      summary, plan, os.path.join(results.path, "accuracy_vs_shots.png")))


PUBLISHER = publish.Publisher(
    "experiments.cwl_tables", parse_args, make_plan,
    lambda records, plan, args, _: make_report(records, plan, args), fewshot.grid_keys,
    fewshot.record_key)


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
