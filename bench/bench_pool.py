"""vgg_s train steps with the fused max-pool gradient vs Flax's (select_and_scatter) pooling.

  python -m bench.bench_pool                      # interleaved rounds, prints a table
  python -m bench.bench_pool --tiny               # seconds; what the test suite runs

Both variants run in one process, interleaved (old, new, old, new, ...), so that machine
drift hits both alike; each figure is the median step time of one round.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import flax.linen as nn

from bench import run
from bench.common import emit
from jtransfer.models import common, vgg


def flax_max_pool(x, kernel, stride, padding=0):
  pads = ((padding, padding), (padding, padding))
  return nn.max_pool(x, (kernel, kernel), strides=(stride, stride), padding=pads)


VARIANTS = (("nn.max_pool (select_and_scatter)", flax_max_pool),
            ("models.common.max_pool (fused VJP)", common.max_pool))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--strategies", default="finetune,freeze_cwl,freeze")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--tiny", action="store_true", help="batch 8, 1 round of 1 window")
  p.add_argument("--out", default=None, help="also write the table here")
  args = p.parse_args(argv)
  windows, steps, warmup = (1, 1, 1) if args.tiny else (5, 3, 3)
  if args.tiny:
    args.batch, args.rounds = 8, 1
  times: dict = {}
  try:
    for _ in range(args.rounds):
      for label, pool in VARIANTS:
        vgg.max_pool = pool  # vgg_s looks the pool up at trace time
        for strategy in args.strategies.split(","):
          step, state, data = run.jax_step("vgg_s", strategy, (28, 28, 1), args.batch)
          secs = statistics.median(run.time_jax(step, state, data, warmup, windows, steps))
          times.setdefault((strategy, label), []).append(1e3 * secs)
  finally:
    vgg.max_pool = common.max_pool
  lines = ["| strategy | pooling | ms/step, per round |", "|---|---|---|"]
  for (strategy, label), ms in times.items():
    lines.append(f"| {strategy} | {label} | {', '.join(f'{m:.1f}' for m in ms)} |")
  text = (f"vgg_s, batch {args.batch}, 28x28x1; median of {windows} windows x {steps} steps "
          f"per round.\n\n" + "\n".join(lines) + "\n")
  emit(text, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
