"""Batched runs (`jtransfer.train.batched`) against runs one at a time: time per run and step.

  python -m bench.bench_batched [--archs vgg_s,resnet_s] [--runs 8,64] [--batches 5,50]

`--batch-runs auto` (experiments.fewshot) trains 64 runs of a frozen-backbone strategy as one
vmapped step on GPU/TPU and one at a time on the CPU. This bench measures the choice on the
backend it runs on: for each arch (a source pretrained for a few steps on fmnist:0,2,3,4,6;
the weights do not change the arithmetic), Freeze+CWL (the full model runs, only the head and
the CWL scales train) at each k-shot batch size, the jitted single-run step against the
batched step over R runs. Both are timed round-robin (`bench.common.round_robin_medians`) after
compilation; the table gives milliseconds per step, per run-step, and the batched speed-up
(single ms / (batched ms / R)). On the 2-core CPU an earlier measurement (docs/decisions.md) put
the speed-up at 0.75-0.89x, which is why 'auto' is 1 there; on an H200 it was 4.8-72x
(bench/GPU.md).
"""
from __future__ import annotations

import argparse

import jax
import numpy as np

from bench.common import round_robin_medians
from jtransfer import sources
from jtransfer.methods import transfer
from jtransfer.train import batched, init_state, make_train_step

CLASSES = 5


def _batch(size: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (size, 28, 28, 1), dtype=np.uint8),
          "label": rng.integers(0, CLASSES, (size,)).astype(np.int32)}


def step_calls(source: transfer.Source, strategy: str, batch: int, runs: int) -> dict:
  """{'single': one run's step, 'batched': R runs' step} as argument-free timed calls."""
  setup = transfer.get_strategy(strategy).build(source, CLASSES, 100)
  opt = setup.optimizer
  data = _batch(batch, 0)
  init = lambda s: setup.init(s, data["image"], data["label"])
  if not batched.batchable(opt, init(0)[0]):
    raise SystemExit(f"{strategy} trains conv kernels: experiments never batch its runs "
                     "(batched.batchable)")
  single = [init_state(*init(0), opt, 0, 1e-2)]
  step = make_train_step(setup.loss_fn, opt)
  states = [init_state(*init(r), opt, r, 1e-2) for r in range(runs)]
  bstate, frozen = batched.stack_states(states, opt)
  held = [bstate]
  bstep = batched.make_batched_train_step(setup.loss_fn, opt)
  # on the device once: the timed calls are the steps, not the host-to-device copies
  data = jax.device_put(data)
  bdata = jax.device_put(batched.stack_batches([_batch(batch, r) for r in range(runs)]))

  def one():
    single[0], m = step(single[0], data)
    jax.block_until_ready(m)

  def many():
    held[0], m = bstep(held[0], frozen, bdata)
    jax.block_until_ready(m)

  one(), many()  # compile
  return {"single": one, "batched": many}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default="vgg_s,resnet_s")
  p.add_argument("--strategy", default="freeze_cwl")
  p.add_argument("--runs", default="8,64", help="R values of the batched step")
  p.add_argument("--batches", default="5,50", help="k-shot batch sizes")
  p.add_argument("--repeats", type=int, default=20)
  args = p.parse_args(argv)
  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}; "
        f"{args.strategy}, median of {args.repeats} round-robin calls\n")
  print("| arch | batch | R | single ms/step | batched ms/step | batched ms/run-step | speed-up |")
  print("|---|---|---|---|---|---|---|")
  for arch in [a for a in args.archs.split(",") if a]:
    source = sources.pretrain(arch, "fmnist:0,2,3,4,6", epochs=0.02, max_train=256,
                               batch_size=64, progress=False)
    for b in (int(x) for x in args.batches.split(",")):
      for r in (int(x) for x in args.runs.split(",")):
        t = round_robin_medians(step_calls(source, args.strategy, b, r), args.repeats)
        single, many = 1000 * t["single"], 1000 * t["batched"]
        print(f"| {arch} | {b} | {r} | {single:.2f} | {many:.2f} | {many / r:.3f} | "
              f"{single / (many / r):.2f}x |", flush=True)


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  main()
