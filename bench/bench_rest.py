"""The part of a train step outside the convolutions: eval-mode BatchNorm before and after.

  python -m bench.bench_rest --profile --out bench/REST.md   # resnet_s, batch 128, ~5 min
  python -m bench.bench_rest --tiny                          # seconds; what the test suite runs

Times the same finetune step compiled twice, under `jtransfer.models.batchnorm.EVAL_IMPL`
'flax' (nn.BatchNorm's eval mode, the library before) and 'affine' (one per-channel affine
with a hand-written VJP), with PyTorch's step (channels_last) in the same round-robin, so load
changes on a shared machine hit every column alike. Wall time is the median over rounds; CPU
time (this process's, both XLA threads) is reported beside it because on a loaded machine it
moves less than wall time.

`--profile` adds the per-op breakdown of resnet_s's step under each form: XLA:CPU's thunks as
`jax.profiler` records them, each op's fastest of `--profile-steps` steps (the least-disturbed
run of each op), summed by the op's kind (convolutions, layout transposes, elementwise
fusions, copies).
"""
from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

import jax

from bench import run
from bench.common import command, emit
from jtransfer.models import batchnorm

SHAPE = (28, 28, 1)
IMPLS = ("flax", "affine")


def jax_step(arch: str, strategy: str, batch: int, impl: str):
  """(step, state, data) of the registered strategy, compiled (traced) under `impl`."""
  step, state, data = run.jax_step(arch, strategy, SHAPE, batch)
  data = jax.device_put(data)
  old, batchnorm.EVAL_IMPL = batchnorm.EVAL_IMPL, impl
  try:
    state, _ = step(state, data)  # the trace happens here, under impl
  finally:
    batchnorm.EVAL_IMPL = old
  jax.block_until_ready(state)
  return step, state, data


def round_robin(calls: dict, rounds: int, steps: int) -> dict[str, tuple[float, float]]:
  """{name: (median wall ms, median CPU ms) per step}; each round runs every call `steps`
  times in turn."""
  wall = collections.defaultdict(list)
  cpu = collections.defaultdict(list)
  for _ in range(rounds):
    for name, call in calls.items():
      t0, c0 = time.perf_counter(), time.process_time()
      for _ in range(steps):
        call()
      wall[name].append((time.perf_counter() - t0) / steps * 1e3)
      cpu[name].append((time.process_time() - c0) / steps * 1e3)
  return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in calls}


def _jax_call(built):
  box = list(built)

  def call():
    step, state, data = box
    box[1], _ = step(state, data)
    jax.block_until_ready(box[1])
  return call


def op_profile(arch: str, batch: int, impl: str, steps: int) -> dict[str, float]:
  """{op kind: ms per step}, each op's fastest of `steps` profiled steps, summed by kind."""
  from jax._src.lib import _profile_data  # jax's reader of its own profiler's XSpace files
  step, state, data = jax_step(arch, "finetune", batch, impl)
  state, _ = step(state, data)
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(steps):
        state, _ = step(state, data)
      jax.block_until_ready(state)
    space = _profile_data.ProfileData.from_file(
        glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0])
  durations = collections.defaultdict(list)
  for plane in space.planes:
    for line in plane.lines:
      if "XLAEigen" not in line.name:  # the thunk executor's threads
        continue
      for event in line.events:
        if not event.name.startswith(("ThunkExecutor", "end:")):
          durations[event.name].append(event.duration_ns)
  kinds: dict[str, float] = collections.Counter()
  for name, ds in durations.items():
    per_step = max(1, round(len(ds) / steps))
    kinds[_kind(name)] += min(ds) * per_step / 1e6
  return dict(kinds)


def _kind(op: str) -> str:
  if op.startswith(("conv_general_dilated", "convolution", "ynn_fusion")):
    return "convolution (XLA/YNNPACK)"
  if op.startswith("transpose_copy_fusion"):
    return "layout transpose (+ fused elementwise)"
  if op.startswith("copy"):
    return "copy"
  return "other fusions" if "fusion" in op else "other"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default="resnet_s")
  p.add_argument("--strategies", default="finetune", help="finetune_bn: a control (BN in "
                 "train mode is Flax's under both)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--rounds", type=int, default=9, help="round-robin rounds (median)")
  p.add_argument("--steps", type=int, default=3, help="steps per call in a round")
  p.add_argument("--profile", action="store_true", help="add resnet_s's per-op breakdown")
  p.add_argument("--profile-steps", type=int, default=10)
  p.add_argument("--tiny", action="store_true", help="batch 4, 1 round of 1 step, no torch")
  p.add_argument("--out", default=None, help="also write the report here")
  args = p.parse_args(argv)
  if args.tiny:
    args.batch, args.rounds, args.steps, args.profile_steps = 4, 1, 1, 2
  rows = ["| arch | step | JAX flax BN ms (CPU ms) | JAX affine BN ms (CPU ms) | affine / "
          "flax wall (CPU) | torch ms (CPU ms) | torch / JAX affine (wall) |",
          "|---|---|---|---|---|---|---|"]
  for arch in args.archs.split(","):
    for strategy in args.strategies.split(","):
      calls = {impl: _jax_call(jax_step(arch, strategy, args.batch, impl)) for impl in IMPLS}
      if strategy == "finetune" and not args.tiny:  # the torch reference has BN-eval steps
        from bench import torch_ref
        calls["torch"] = torch_ref.make_step(arch, strategy, SHAPE, args.batch,
                                             channels_last=True, device="cpu")
        calls["torch"]()
      t = round_robin(calls, args.rounds, args.steps)
      (aw, ac), (vw, vc) = t["flax"], t["affine"]
      torch_cols = (f"{t['torch'][0]:.1f} ({t['torch'][1]:.1f}) | {t['torch'][0] / vw:.2f}"
                    if "torch" in t else "- | -")
      rows.append(f"| {arch} | {strategy} | {aw:.1f} ({ac:.1f}) | {vw:.1f} ({vc:.1f}) | "
                  f"{vw / aw:.2f} ({vc / ac:.2f}) | {torch_cols} |")
      print(rows[-1], file=sys.stderr)
  import torch
  text = (f"# Eval-mode BatchNorm: Flax's form vs one affine with a hand-written VJP\n\n"
          f"Command: "
          f"`{command('bench_rest', argv)}`; backend {jax.default_backend()}, jax "
          f"{jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end (loaded: "
          f"compare columns of one row, not rows of different runs). Batch {args.batch}, "
          f"input {'x'.join(map(str, SHAPE))}; median of {args.rounds} round-robin rounds x "
          f"{args.steps} steps; PyTorch channels_last, BN in eval mode as the JAX finetune "
          "step.\n\n" + "\n".join(rows) + "\n")
  if args.profile:
    prof = {impl: op_profile("resnet_s", args.batch, impl, args.profile_steps)
            for impl in IMPLS}
    before, after = prof["flax"], prof["affine"]
    kinds = sorted(set(before) | set(after), key=lambda k: -before.get(k, 0))
    lines = ["| op kind | flax BN ms | affine BN ms |", "|---|---|---|"]
    lines += [f"| {k} | {before.get(k, 0):.2f} | {after.get(k, 0):.2f} |" for k in kinds]
    lines.append(f"| all ops | {sum(before.values()):.2f} | {sum(after.values()):.2f} |")
    text += (f"\nresnet_s finetune, per op kind (each op's fastest of {args.profile_steps} "
             "profiled steps, summed; both XLA threads, so the total can exceed the step's "
             "wall time):\n\n" + "\n".join(lines) + "\n")
  emit(text, args.out)
  return 0


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
