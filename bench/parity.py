"""PyTorch accuracy parity: the same few-shot protocol in jtransfer and in PyTorch, paired per draw.

  python -m bench.parity [--draws 10] [--steps 100] [--out bench/PARITY.md]

For each (arch, target, strategy) cell and each k-shot draw, one fixed-step run in jtransfer
(on the study runner's `jtransfer.study.target.TargetRuns`: the strategy's Setup, Freeze on
cached backbone features, Finetune through the full model, the generic jitted step and `fit`)
and one in PyTorch with
bench/torch_ref.py's net of the same definition, sharing everything a run is made of:
  * the source weights (`experiments.pretrain.source_for`, copied into the torch net; the
    report gives the largest logit difference of the two nets on the test set before training);
  * the new head's initial weights (jtransfer's, copied);
  * the k-shot draw (`jtransfer.study.draws`, the runner's seeds) and the batch of every
    step (`Batches.at`, same seed), preprocessing (`normalize` with the source's mean/std);
  * the loss (mean cross-entropy), the optimiser (Adam, lr, betas (0.9, 0.999), eps 1e-8: optax
    and torch defaults agree), the step count, the trained params (Freeze: the head; Finetune:
    all) and BN mode (running statistics in both strategies, torch `eval()`);
  * the test set (the target's test split capped per class as the runner does).
The report gives, per cell, jtransfer minus PyTorch test accuracy per draw (mean, 95% CI, wins /
ties / losses, `jtransfer.protocol.stats.paired`) and how far the two runs of a draw are apart
(test predictions that agree, largest |test accuracy difference|).

Rounding control (`--rounding-control`, on by default): every Finetune run of the parity table
is trained once more in PyTorch with each batch's rows reversed -- the same batch, the same mean
loss, summed in another order -- and PyTorch-reversed minus PyTorch is reported per cell beside
jtransfer minus PyTorch. It measures how far float rounding alone moves a PyTorch run's test
accuracy, and sets the equivalence margin of each cell's parity verdict: "equal within rounding"
when the jtransfer - PyTorch 95% interval lies within +-max(0.5 pt, the largest |PyTorch-reversed
- PyTorch| of the cell's draws), "different" otherwise.

Stem study (`--stem-study`, on by default): resnet_s with its default stride-2 stem against a
stride-1 stem (a second source, pretrained the same way and cached), Freeze and Finetune on the
same draws and head inits, jtransfer only, with the train-step and eval-forward time ratio.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

from bench.common import emit
from bench.parity_report import report
from bench.parity_runs import (OutOfTime, ParityConfig, Records, controlled, get_source,
                               run_target, step_times)


def parse_args(argv):
  """The bench's flags (defaults: `ParityConfig`'s)."""
  d = ParityConfig()
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default=",".join(d.archs))
  p.add_argument("--targets", default=";".join(d.targets), help="';'-separated target specs")
  p.add_argument("--strategies", default=",".join(d.strategies))
  p.add_argument("--shots", type=int, default=d.shots)
  p.add_argument("--draws", type=int, default=d.draws, help="k-shot draws per cell (repeats)")
  p.add_argument("--steps", type=int, default=d.steps, help="Adam steps per run")
  p.add_argument("--lr-freeze", type=float, default=d.lr_freeze)
  p.add_argument("--lr-finetune", type=float, default=d.lr_finetune)
  p.add_argument("--batch-size", type=int, default=d.batch_size)
  p.add_argument("--val-per-class", type=int, default=d.val_per_class)
  p.add_argument("--test-per-class", type=int, default=d.test_per_class)
  p.add_argument("--source", default=d.source,
                 help="source dataset spec (pretrained and cached), or 'random' (an untrained "
                      "source, for tests)")
  p.add_argument("--source-epochs", type=float, default=d.source_epochs)
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--stem-study", dest="stem_study", action="store_true", default=True)
  p.add_argument("--no-stem-study", dest="stem_study", action="store_false")
  p.add_argument("--stem-draws", type=int, default=None,
                 help="draws of the stem study (the first ones of the parity table's; default "
                      "--draws): a stride-1 finetune run costs ~3.5x a stride-2 one")
  p.add_argument("--rounding-control", dest="rounding_control", action="store_true",
                 default=True,
                 help="train each Finetune run's PyTorch arm again with each batch's rows "
                      "reversed (on by default)")
  p.add_argument("--no-rounding-control", dest="rounding_control", action="store_false")
  p.add_argument("--logit-tol", type=float, default=d.logit_tol,
                 help="largest |logit| difference of the two nets before training (relative "
                      "to the largest |logit|) accepted as the same net")
  p.add_argument("--torch-threads", type=int, default=d.torch_threads,
                 help="torch.set_num_threads (0 = torch's default)")
  p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                 help="start no run after this many minutes; the report then says what is "
                      "left, and the same command continues from the records")
  p.add_argument("--records", default=None,
                 help="JSON-lines file of finished runs (default: --out with .jsonl)")
  p.add_argument("--out", default=d.out)
  return p.parse_args(argv)


def config_of(args: argparse.Namespace) -> ParityConfig:
  """The typed configuration of the parsed flags (the CLI edge: nothing below sees argparse)."""
  fields = {f.name for f in dataclasses.fields(ParityConfig)}
  values = {k: v for k, v in vars(args).items() if k in fields}
  values.update(archs=tuple(a for a in args.archs.split(",") if a),
                targets=tuple(t for t in args.targets.split(";") if t),
                strategies=tuple(s for s in args.strategies.split(",") if s),
                stem_draws=args.draws if args.stem_draws is None else args.stem_draws,
                records=args.records or os.path.splitext(args.out)[0] + ".jsonl")
  return ParityConfig(**values)


def count(config: ParityConfig, records: Records) -> tuple[int, int]:
  """(runs the invocation wants, runs the records hold): parity and stem-study runs, their
  rounding controls and the stem study's two step-time measurements."""
  archs, targets, strategies, stem = config.archs, config.targets, config.strategies, config.stem
  want = len(archs) * len(targets) * len(strategies) * config.draws + (
      len(targets) * len(strategies) * config.stem_draws if stem else 0)
  have = sum(1 for k in records.items if k[0] == "run" and k[1] in archs and k[3] in targets
             and k[4] in strategies and k[5] < (config.draws if k[2] == 2 else config.stem_draws)
             and (k[2] == 2 or stem))
  controls = [s for s in strategies if controlled(config, s)]
  want += len(archs) * len(targets) * len(controls) * config.draws
  have += sum(1 for k in records.items if k[0] == "rev" and k[1] in archs and k[2] == 2
              and k[3] in targets and k[4] in controls and k[5] < config.draws)
  if stem:  # the two step-time measurements count as runs
    want += 2
    have += sum(records.get(("timing", stride)) is not None for stride in (1, 2))
  return want, have


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs what the records lack (until the time cap) and writes the report; 0 when complete,
  3 when runs are left, 1 when the two nets differ before training."""
  config = config_of(parse_args(argv))
  import torch
  torch.manual_seed(0)
  if config.torch_threads:
    # one intra-op thread: on a shared 2-core machine torch's OpenMP pool with 2 threads ran
    # these small steps 2-6x slower than with 1 (it spins while the other core is taken)
    torch.set_num_threads(config.torch_threads)
  deadline = time.time() + 60 * config.max_minutes
  records = Records(config.records, config.settings())
  caches: dict = {}
  sources: dict = {}
  try:
    jobs = [(arch, 2) for arch in config.archs] + ([("resnet_s", 1)] if config.stem else [])
    for arch, stride in jobs:
      source = get_source(arch, config, stem_stride=1 if stride == 1 else None)
      label = arch if stride == 2 else f"{arch} stride-1 stem"
      sources[label] = source.meta.get("source_test_acc", float("nan"))
      for spec in config.targets:
        run_target(source, stride, spec, config, stride == 2, caches, records, deadline)
      if config.stem and arch == "resnet_s" and records.get(("timing", stride)) is None:
        if time.time() > deadline:
          raise OutOfTime()
        records.add(("timing", stride),
                    times=step_times(source, config.targets[0], config, caches),
                    pretrain_s=float(source.meta.get("train_seconds", float("nan"))))
  except OutOfTime:
    pass
  want, have = count(config, records)
  emit(report(config, argv, records, sources, int(want - have)), config.out)
  bad = [r for k, r in records.items.items()
         if k[0] == "check" and r["diff"] > config.logit_tol * max(1.0, r["scale"])]
  if bad:
    print(f"error: the torch net's logits differ from jtransfer's: {bad}", file=sys.stderr)
    return 1
  if want > have:
    print(f"[parity] {int(want - have)} run(s) left: run the same command again",
          file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
