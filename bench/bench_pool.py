"""vgg_s train steps with the fused max-pool gradient vs Flax's (select_and_scatter) pooling.

  python -m bench.bench_pool                      # interleaved rounds, prints a table
  python -m bench.bench_pool --tiny               # seconds; what the test suite runs

Both variants run in one process, interleaved (old, new, old, new, ...), so that machine
drift hits both alike; each figure is the median step time of one round. A second table
times the pooling op alone (forward, and forward + gradient) at vgg_s's and ResNet-50's
pooling shapes.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import jax

from bench import run
from bench.common import command, emit
from jtransfer.models import common, vgg
from jtransfer.train.evaluate import median_latency_ms


VARIANTS = (("nn.max_pool (select_and_scatter)", common.max_pool_reduce_window),
            ("models.common.max_pool (fused VJP)", common.max_pool))
# (input NHWC, kernel, stride, padding): vgg_s's three 2x2 pools at batch 128, ResNet-50's stem
# pool (3x3/2/1) at batch 32 on 224px input.
OP_SHAPES = (((128, 28, 28, 32), 2, 2, 0), ((128, 14, 14, 64), 2, 2, 0),
             ((128, 7, 7, 128), 2, 2, 0), ((32, 112, 112, 64), 3, 2, 1))


def op_times(pool, shape, kernel, stride, padding, runs: int):
  """(forward ms, forward + gradient ms) of one pooling op, medians over `runs` calls."""
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  w = jax.random.normal(jax.random.PRNGKey(1), pool(x, kernel, stride, padding).shape)
  fwd = jax.jit(lambda x: pool(x, kernel, stride, padding))
  grad = jax.jit(jax.grad(lambda x: (pool(x, kernel, stride, padding) * w).sum()))
  return (median_latency_ms(fwd, x, runs=runs, warmup=3),
          median_latency_ms(grad, x, runs=runs, warmup=3))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--strategies", default="finetune,freeze_cwl,freeze")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--tiny", action="store_true", help="batch 8, 1 round of 1 window")
  p.add_argument("--out", default=None, help="also write the table here")
  args = p.parse_args(argv)
  windows, steps, warmup = (1, 1, 1) if args.tiny else (5, 3, 3)
  op_shapes, op_runs = OP_SHAPES, 20
  if args.tiny:
    args.batch, args.rounds = 8, 1
    op_shapes, op_runs = (((2, 8, 8, 4), 2, 2, 0), ((2, 9, 9, 4), 3, 2, 1)), 1
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
  ops = ["| input | pool | pooling | forward ms | forward + gradient ms |", "|---|---|---|---|---|"]
  for shape, kernel, stride, padding in op_shapes:
    for label, pool in VARIANTS:
      f, g = op_times(pool, shape, kernel, stride, padding, op_runs)
      ops.append(f"| {'x'.join(map(str, shape))} | {kernel}x{kernel}/{stride}/{padding} | "
                 f"{label} | {f:.2f} | {g:.2f} |")
  text = (f"# Max-pool gradient\n\nCommand: `{command('bench_pool', argv)}`.\n\n"
          f"Train steps: vgg_s, batch {args.batch}, 28x28x1; median of {windows} windows x "
          f"{steps} steps per round.\n\n" + "\n".join(lines) + "\n\n"
          f"The pooling op alone (median of {op_runs} calls):\n\n" + "\n".join(ops) + "\n")
  emit(text, args.out)
  return 0


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
