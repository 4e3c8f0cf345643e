"""Train-step benchmark: every strategy, both small archs, JAX vs a PyTorch reference.

  python -m bench.run                      # full suite, writes bench/RESULTS.md (~5 min)
  python -m bench.run --tiny --out /tmp/r.md  # seconds; what the test suite runs

Per (arch, strategy): the median over `--windows` windows of `--steps` steps each, after
warm-up (compilation excluded), as images/s; XLA's FLOP count of the compiled step (cost
analysis) and the fraction of the machine's measured GEMM peak (a jitted 2048^3 f32 matmul)
that it reaches; the same step in PyTorch (NCHW and channels_last for finetune) and the ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import command, emit
from jtransfer import models
from jtransfer.data import augment as aug
from jtransfer.methods import transfer
from jtransfer.train import init_state, make_train_step
from jtransfer.train.evaluate import xla_flops

STRATEGIES = ("finetune", "freeze", "freeze_cwl", "l2sp", "delta", "masked_sparse", "distill")


def random_source(arch: str, shape, classes: int = 5, dtype=None) -> transfer.Source:
  model = models.get_model(arch, classes, dtype=dtype)
  variables = jax.tree.map(np.asarray, models.init_model(model, jax.random.PRNGKey(0), shape))
  return transfer.Source(arch, models.model_config(model), variables, tuple(shape),
                         (0.5,) * shape[2], (0.25,) * shape[2])


def jax_step(arch: str, strategy: str, shape, batch: int, classes: int = 5, dtype=None,
             augment: str = "none"):
  """(step, state, batch) for a registered strategy, or one of the method-specific steps;
  `augment` wraps a strategy's loss in `jtransfer.data.augment` (a step then augments its
  batch on device first)."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (batch, *shape), dtype=np.uint8)
  labels = (np.arange(batch) % classes).astype(np.int32)
  data = {"image": images, "label": labels}
  source = random_source(arch, shape, classes, dtype)
  if strategy == "masked_sparse":
    from bench import method_steps
    return method_steps.masked_sparse(source, classes, data)
  if strategy == "distill":
    from bench import method_steps
    return method_steps.distill(source, classes, data)
  setup = transfer.get_strategy(strategy).build(source, classes, 100)
  params, stats = setup.init(0, images, labels)
  state = init_state(params, stats, setup.optimizer, 0, lr=1e-3)
  loss_fn = aug.wrap_loss(setup.loss_fn, aug.parse(augment))
  return make_train_step(loss_fn, setup.optimizer), state, data


def gemm_peak(n: int = 2048, reps: int = 5) -> float:
  """Measured f32 GEMM FLOP/s of this machine through XLA (the 'peak' figures are relative to)."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    f(a).block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def step_flops(step, state, data) -> float:
  try:
    return xla_flops(step.lower(state, data))
  except Exception:  # cost analysis is best-effort across backends
    return float("nan")


def time_jax(step, state, data, warmup: int, windows: int, steps: int) -> list[float]:
  for _ in range(warmup):
    state, m = step(state, data)
  jax.block_until_ready(state)
  out = []
  for _ in range(windows):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, data)
    jax.block_until_ready(state)
    out.append((time.perf_counter() - t0) / steps)
  return out


def torch_archs() -> tuple[str, ...]:
  """Archs bench/torch_ref.py implements."""
  from bench import torch_ref
  return torch_ref.ARCHS


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default="vgg_s,resnet_s")
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--shape", default="28,28,1")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--windows", type=int, default=5)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--dtype", default=None, choices=models.COMPUTE_DTYPES,
                 help="JAX compute dtype (mixed precision: params stay float32)")
  p.add_argument("--no-torch", action="store_true",
                 help="JAX only (also implied for archs without a torch reference, and for "
                      "float16)")
  p.add_argument("--augment", default="none",
                 help="augment every step's batch on device first (jtransfer.data.augment "
                      "recipe); the torch reference does not")
  p.add_argument("--tiny", action="store_true", help="batch 8, 1 window of 1 step")
  p.add_argument("--out", default="bench/RESULTS.md")
  args = p.parse_args(argv)
  args.command = command("run", argv)
  if args.tiny:
    args.batch, args.windows, args.steps, args.warmup = 8, 1, 1, 1
  shape = tuple(int(v) for v in args.shape.split(","))
  peak = gemm_peak(512 if args.tiny else 2048)
  rows = []
  for arch in args.archs.split(","):
    base = None
    for strategy in args.strategies.split(","):
      step, state, data = jax_step(arch, strategy, shape, args.batch, dtype=args.dtype,
                                   augment=args.augment)
      flops = step_flops(step, state, data)
      secs = statistics.median(time_jax(step, state, data, args.warmup, args.windows,
                                        args.steps))
      base = secs if strategy == "finetune" else base
      row = dict(arch=arch, strategy=strategy, jax_ips=args.batch / secs,
                 vs_finetune=secs / base if base else float("nan"), gflops=flops / 1e9,
                 peak_frac=flops / secs / peak)
      # PyTorch on its default device (CUDA when there is one), float32 or bf16 autocast.
      if not args.no_torch and arch in torch_archs() and args.dtype != "float16":
        import torch
        from bench import torch_ref
        torch.set_num_threads(os.cpu_count() or 1)
        for fmt, cl in (("nchw", False), ("cl", True)):
          if cl and strategy != "finetune":
            continue
          tstep = torch_ref.make_step(arch, strategy, shape, args.batch, channels_last=cl,
                                      bf16=args.dtype == "bfloat16")
          tsecs = statistics.median(torch_ref.time_step(tstep, args.warmup, args.windows,
                                                        args.steps))
          row[f"torch_{fmt}_ips"] = args.batch / tsecs
      rows.append(row)
      print(_fmt_row(row), file=sys.stderr)
  emit(report(rows, args, shape, peak), args.out)
  return 0


def _fmt_row(r) -> str:
  return (f"{r['arch']:9s} {r['strategy']:14s} jax {r['jax_ips']:8.1f} img/s  x{r['vs_finetune']:.2f}"
          f" of finetune  torch {r.get('torch_nchw_ips', float('nan')):8.1f}")


def report(rows, args, shape, peak) -> str:
  import jaxlib
  try:
    import torch
    tv = f"{torch.__version__} on {'cuda' if torch.cuda.is_available() else 'cpu'}"
  except ImportError:
    tv = "not installed"
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  lines = ["# Train-step benchmark", "",
           f"Command: `{args.command}`; machine: {cpu}, "
           f"{os.cpu_count()} cores, backend {jax.default_backend()}; jax {jax.__version__}, "
           f"jaxlib {jaxlib.__version__}, torch {tv}.",
           f"Input {shape}, batch {args.batch}, JAX compute dtype {args.dtype or 'float32'}; "
           f"median of {args.windows} windows x {args.steps} "
           f"steps after {args.warmup} warm-up steps. Measured GEMM peak: {peak / 1e9:.1f} "
           "GFLOP/s (f32, XLA).", "",
           "| arch | strategy | JAX img/s | step time / finetune | XLA GFLOP/step | "
           "% of GEMM peak | torch NCHW img/s | torch channels_last img/s | JAX / torch best |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    best = max(r.get("torch_nchw_ips", 0), r.get("torch_cl_ips", 0)) or float("nan")
    lines.append(f"| {r['arch']} | {r['strategy']} | {r['jax_ips']:.1f} | "
                 f"{r['vs_finetune']:.2f} | {r['gflops']:.2f} | {100 * r['peak_frac']:.1f} | "
                 f"{r.get('torch_nchw_ips', float('nan')):.1f} | "
                 f"{r.get('torch_cl_ips', float('nan')):.1f} | {r['jax_ips'] / best:.2f} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
