"""Train-step benchmark: every strategy, both small archs, JAX vs a PyTorch reference.

  python -m bench.run                      # full suite, writes bench/RESULTS.md (~5 min)
  python -m bench.run --tiny --out /tmp/r.md  # seconds; what the test suite runs

Per (arch, strategy): the median over `--windows` windows of `--steps` steps each, after
warm-up (compilation excluded), as images/s; XLA's FLOP count of the compiled step (cost
analysis) and the fraction of the machine's measured GEMM peak (a jitted 2048^3 f32 matmul)
that it reaches; the same step in PyTorch (NCHW and channels_last for finetune) and the ratio.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import command, emit, native_kernels
from jtransfer import models
from jtransfer.data import augment as aug
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.study import flag, flags
from jtransfer.study.config import at_least, comma_list
from jtransfer.study.tables import positive_ints
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


def step_flops(arch, strategy, shape, batch, **kw) -> float:
  """XLA's FLOP count of the step, traced with XLA's convolutions throughout: the native
  kernel gradient (a custom call) would count as none, so the count and the '% of GEMM peak'
  column describe the same arithmetic whichever kernel computes it."""
  try:
    with native_kernels(False):
      step, state, data = jax_step(arch, strategy, shape, batch, **kw)
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


@dataclasses.dataclass(frozen=True)
class StepBench:
  """What one invocation times: its flags, typed (`jtransfer.study.flag` fields; `parse`
  applies --tiny)."""
  archs: tuple[str, ...] = flag("--archs", ("vgg_s", "resnet_s"), "comma list of archs",
                                cli="vgg_s,resnet_s", parse=comma_list("--archs"))
  strategies: tuple[str, ...] = flag("--strategies", STRATEGIES, "comma list of strategies",
                                     cli=",".join(STRATEGIES), parse=comma_list("--strategies"))
  shape: tuple[int, ...] = flag("--shape", (28, 28, 1), "input H,W,C", cli="28,28,1",
                                parse=lambda t: tuple(positive_ints(t, "--shape")))
  batch: int = flag("--batch", 128, "images per step", check=at_least(1, "--batch"))
  windows: int = flag("--windows", 5, "timed windows", check=at_least(1, "--windows"))
  steps: int = flag("--steps", 5, "steps per window", check=at_least(1, "--steps"))
  warmup: int = flag("--warmup", 3, "warm-up steps", check=at_least(0, "--warmup"))
  dtype: Optional[str] = flag("--dtype", None, "JAX compute dtype (mixed precision: params "
                              "stay float32)", choices=models.COMPUTE_DTYPES)
  no_torch: bool = flag("--no-torch", False, "JAX only (also implied for archs without a "
                        "torch reference, and for float16)", action="store_true")
  augment: str = flag("--augment", "none", "augment every step's batch on device first "
                      "(jtransfer.data.augment recipe); the torch reference does not")
  tiny: bool = flag("--tiny", False, "batch 8, 1 window of 1 step", action="store_true")
  out: str = flag("--out", "bench/RESULTS.md", "the report")


def parse(argv: Optional[Sequence[str]]) -> StepBench:
  """The typed configuration of the command line (`jtransfer.study.flags`), --tiny applied.

  Raises:
    InputError: one sentence naming a bad flag.
  """
  config = flags.command_config(StepBench, argv, __doc__)
  if config.tiny:
    config = dataclasses.replace(config, batch=8, windows=1, steps=1, warmup=1)
  return config


def main(argv=None) -> int:
  """Times every (arch, strategy) step in JAX and PyTorch and writes the report."""
  try:
    config = parse(argv)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  c, shape = config, config.shape
  peak = gemm_peak(512 if c.tiny else 2048)
  rows = []
  for arch in c.archs:
    base = None
    for strategy in c.strategies:
      step, state, data = jax_step(arch, strategy, shape, c.batch, dtype=c.dtype,
                                   augment=c.augment)
      flops = step_flops(arch, strategy, shape, c.batch, dtype=c.dtype, augment=c.augment)
      secs = statistics.median(time_jax(step, state, data, c.warmup, c.windows, c.steps))
      base = secs if strategy == "finetune" else base
      row = dict(arch=arch, strategy=strategy, jax_ips=c.batch / secs,
                 vs_finetune=secs / base if base else float("nan"), gflops=flops / 1e9,
                 peak_frac=flops / secs / peak)
      # PyTorch on its default device (CUDA when there is one), float32 or bf16 autocast.
      if not c.no_torch and arch in torch_archs() and c.dtype != "float16":
        import torch
        from bench import torch_ref
        torch.set_num_threads(os.cpu_count() or 1)
        for fmt, cl in (("nchw", False), ("cl", True)):
          if cl and strategy != "finetune":
            continue
          tstep = torch_ref.make_step(arch, strategy, shape, c.batch, channels_last=cl,
                                      bf16=c.dtype == "bfloat16")
          tsecs = statistics.median(torch_ref.time_step(tstep, c.warmup, c.windows, c.steps))
          row[f"torch_{fmt}_ips"] = c.batch / tsecs
      rows.append(row)
      print(_fmt_row(row), file=sys.stderr)
  emit(report(rows, config, command("run", argv), peak), c.out)
  return 0


def _fmt_row(r) -> str:
  return (f"{r['arch']:9s} {r['strategy']:14s} jax {r['jax_ips']:8.1f} img/s  x{r['vs_finetune']:.2f}"
          f" of finetune  torch {r.get('torch_nchw_ips', float('nan')):8.1f}")


def report(rows, config: StepBench, command_line: str, peak: float) -> str:
  """bench/RESULTS.md: the machine, the settings and one row per (arch, strategy)."""
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
           f"Command: `{command_line}`; machine: {cpu}, "
           f"{os.cpu_count()} cores, backend {jax.default_backend()}; jax {jax.__version__}, "
           f"jaxlib {jaxlib.__version__}, torch {tv}.",
           f"Input {config.shape}, batch {config.batch}, JAX compute dtype "
           f"{config.dtype or 'float32'}; median of {config.windows} windows x {config.steps} "
           f"steps after {config.warmup} warm-up steps. Measured GEMM peak: {peak / 1e9:.1f} "
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
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
