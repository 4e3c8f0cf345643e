"""PyTorch accuracy parity: the same few-shot protocol in jtransfer and in PyTorch, paired per draw.

  python -m bench.parity [--draws 10] [--steps 100] [--out bench/PARITY.md]

For each (arch, target, strategy) cell and each k-shot draw, one fixed-step run in jtransfer
(on the study runner's `jtransfer.study.target.TargetRuns`: the strategy's Setup, Freeze on
cached backbone features, Finetune through the full model, the generic jitted step and `fit`)
and one in PyTorch with
bench/torch_ref.py's net of the same definition, sharing everything a run is made of:
  * the source weights (`jtransfer.sources.source_for`, copied into the torch net; the
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

import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

from bench.common import emit
from bench.parity_report import report
from bench.parity_runs import (OutOfTime, ParityConfig, Records, controlled, get_source,
                               run_target, step_times)
from jtransfer.errors import InputError
from jtransfer.study import flags


def parse(argv: Optional[Sequence[str]]) -> ParityConfig:
  """The typed configuration of the command line (the CLI edge: `jtransfer.study.flags`);
  --stem-draws defaults to --draws, --records to --out with .jsonl.

  Raises:
    InputError: one sentence naming a bad flag.
  """
  config = flags.command_config(ParityConfig, argv, __doc__)
  draws = config.protocol.repeats
  return dataclasses.replace(
      config, stem_draws=draws if config.stem_draws is None else config.stem_draws,
      records=config.records or os.path.splitext(config.out)[0] + ".jsonl")


def count(config: ParityConfig, records: Records) -> tuple[int, int]:
  """(runs the invocation wants, runs the records hold): parity and stem-study runs, their
  rounding controls and the stem study's two step-time measurements."""
  archs, targets, strategies, stem = config.archs, config.targets, config.strategies, config.stem
  draws = config.protocol.repeats
  want = len(archs) * len(targets) * len(strategies) * draws + (
      len(targets) * len(strategies) * config.stem_draws if stem else 0)
  have = sum(1 for k in records.items if k[0] == "run" and k[1] in archs and k[3] in targets
             and k[4] in strategies and k[5] < (draws if k[2] == 2 else config.stem_draws)
             and (k[2] == 2 or stem))
  controls = [s for s in strategies if controlled(config, s)]
  want += len(archs) * len(targets) * len(controls) * draws
  have += sum(1 for k in records.items if k[0] == "rev" and k[1] in archs and k[2] == 2
              and k[3] in targets and k[4] in controls and k[5] < draws)
  if stem:  # the two step-time measurements count as runs
    want += 2
    have += sum(records.get(("timing", stride)) is not None for stride in (1, 2))
  return want, have


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs what the records lack (until the time cap) and writes the report; 0 when complete,
  3 when runs are left, 1 when the two nets differ before training."""
  try:
    config = parse(argv)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
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
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
