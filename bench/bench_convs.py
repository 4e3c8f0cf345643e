"""Where a train step's time goes: each convolution alone, JAX vs PyTorch, against the step.

  python -m bench.bench_convs                    # vgg_s and resnet_s at batch 128, ~3 min
  python -m bench.bench_convs --tiny             # seconds; what the test suite runs
  python -m bench.bench_convs --convs-only       # the per-conv table alone, no whole steps

For every convolution of the arch (shapes read from the Flax model by an interceptor), times
its forward, its input gradient (backward-data) and its kernel gradient (backward-filter),
each as one jitted call in JAX and as one aten call in PyTorch (channels_last, the layout
PyTorch is fastest in here). Summing them as a step needs them gives the convolution time of
a finetune step (all three, no backward-data for the first layer, whose input is the image)
and of a Freeze+CWL step (forward and backward-data: the kernels are frozen). The whole steps
are timed too, so `step - convolutions` is the time in everything else (elementwise, pooling,
BN, reductions, the optimizer): the split that says whether a gap is in the convolution
kernels or around them.

The kernel gradient is timed three times in JAX, round-robin so that a load change hits all
alike: XLA's backward-filter convolution (what every 3x3 layer used before `gemm_conv`'s
table), `jtransfer.models.gemm_conv`'s patch GEMM (chunked for kernels > 1x1) and the native
im2col + sgemm kernel (`jtransfer.models.ffi_conv`, where it is built); 'auto' is the one the
model uses (`gemm_conv.kernel_gradient_impl`, CONV_IMPL, JTRANSFER_CONV_IMPL,
JTRANSFER_NATIVE), and the step sums take it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bench import run
from bench.common import command, emit
from jtransfer import models
from jtransfer.models import ffi_conv, gemm_conv
from jtransfer.train.evaluate import interleaved_latency_ms, median_latency_ms

SHAPE = (28, 28, 1)
_HOWS = ("xla", "gemm", "native")  # jax_times' kernel-gradient columns, in order
_LABEL = {"xla": "XLA", "gemm": "GEMM", "native": "native"}


def conv_configs(arch: str, batch: int) -> list[tuple]:
  """(input NHWC, kernel HWIO, strides, padding) of every conv the arch applies, in order."""
  model = models.get_model(arch, 5)
  found = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, nn.Conv) and context.method_name == "__call__":
      x = args[0]
      kernel = (*module.kernel_size, x.shape[-1], module.features)
      found.append((tuple(x.shape), kernel, tuple(module.strides), tuple(module.padding)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch, *SHAPE)),
                                      train=False))
  return found


def _jax_conv(strides, padding):
  return lambda x, w: lax.conv_general_dilated(x, w, strides, padding,
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))


def jax_times(x_shape, w_shape, strides, padding, runs: int) -> tuple[float, ...]:
  """(forward, backward-data, backward-filter by XLA, by the patch GEMM, by the native
  kernel) ms of one conv in JAX, the three kernel gradients interleaved; the native one is
  nan where it is not built."""
  conv = _jax_conv(strides, padding)
  by = lambda how: lambda x, w: gemm_conv.dense_conv(x, w, strides, padding, kernel_grad=how)
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  w = jax.random.normal(jax.random.PRNGKey(1), w_shape) * 0.1
  g = jnp.ones(jax.eval_shape(conv, x, w).shape)
  fwd = jax.jit(conv)
  data = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0])
  filt = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0])
  hows = ("gemm", "native") if ffi_conv.available() else ("gemm",)
  kernel_grads = {how: jax.jit(lambda x, w, g, how=how: jax.vjp(lambda w: by(how)(x, w), w)[1](
      g)[0]) for how in hows}
  # the kernel gradients interleaved: their ratios hold on a loaded machine
  filters = interleaved_latency_ms(
      {"xla": lambda: jax.block_until_ready(filt(x, w, g)),
       **{how: (lambda f=f: jax.block_until_ready(f(x, w, g)))
          for how, f in kernel_grads.items()}}, runs=runs, warmup=2)
  return (median_latency_ms(fwd, x, w, runs=runs, warmup=2),
          median_latency_ms(data, x, w, g, runs=runs, warmup=2),
          filters["xla"], filters["gemm"], filters.get("native", float("nan")))


def auto_pick(config) -> str:
  """'xla', 'gemm' or 'native': the kernel gradient the model computes for this conv."""
  return gemm_conv.kernel_gradient_impl(*config)


def torch_times(x_shape, w_shape, strides, padding, runs: int) -> tuple[float, float, float]:
  """(forward, backward-data, backward-filter) ms of the same conv in PyTorch, channels_last."""
  import torch
  import torch.nn.functional as F
  n, h, w_, c = x_shape
  kh, kw, ci, co = w_shape
  cl = torch.channels_last
  x = torch.randn(n, c, h, w_).contiguous(memory_format=cl)
  w = (torch.randn(co, ci, kh, kw) * 0.1).contiguous(memory_format=cl)
  pad = [p[0] for p in padding]
  conv = lambda: F.conv2d(x, w, stride=list(strides), padding=pad)
  g = torch.ones_like(conv()).contiguous(memory_format=cl)

  def backward(mask):
    return lambda: torch.ops.aten.convolution_backward(
        g, x, w, None, list(strides), pad, [1, 1], False, [0, 0], 1, mask)

  # CPU aten calls return finished tensors: the shared latency helper times them as they are.
  return (median_latency_ms(conv, runs=runs),
          median_latency_ms(backward([True, False, False]), runs=runs),
          median_latency_ms(backward([False, True, False]), runs=runs))


def step_ms(arch: str, strategy: str, batch: int, windows: int, steps: int):
  """(JAX ms, PyTorch ms, PyTorch layout) of one whole train step; PyTorch in its faster layout.

  (Freeze+CWL's explicit scale layer runs slower in channels_last than in NCHW here.)
  """
  from bench import torch_ref
  step, state, data = run.jax_step(arch, strategy, SHAPE, batch)
  jax_s = statistics.median(run.time_jax(step, state, data, 2, windows, steps))
  torch_s = {}
  for layout, cl in (("NCHW", False), ("channels_last", True)):
    tstep = torch_ref.make_step(arch, strategy, SHAPE, batch, channels_last=cl)
    torch_s[layout] = statistics.median(torch_ref.time_step(tstep, 2, windows, steps))
  layout = min(torch_s, key=torch_s.get)
  return 1e3 * jax_s, 1e3 * torch_s[layout], layout


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default="vgg_s,resnet_s")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--runs", type=int, default=20, help="calls per conv timing (median)")
  p.add_argument("--tiny", action="store_true", help="batch 4, 2 calls, 1 step")
  p.add_argument("--out", default=None, help="also write the report here")
  p.add_argument("--convs-only", action="store_true",
                 help="the per-conv table only (no whole steps, no step sums)")
  args = p.parse_args(argv)
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  windows, steps = (5, 3) if not args.tiny else (1, 1)
  load_start = os.getloadavg()[0]
  if args.tiny:
    args.batch, args.runs = 4, 2
  ops = ["| arch | input | kernel | stride | times in net | JAX fwd | JAX bwd-data | "
         "JAX bwd-filter XLA (before) | JAX bwd-filter GEMM | JAX bwd-filter native | "
         "GEMM / XLA | native / XLA | JAX bwd-filter 'auto' (after) | torch fwd | "
         "torch bwd-data | torch bwd-filter |", "|---" * 16 + "|"]
  steps_tbl = ["| arch | step | JAX step ms | JAX convs ms | JAX rest ms | torch step ms | "
               "torch convs ms | torch rest ms |", "|---|---|---|---|---|---|---|---|"]
  for arch in args.archs.split(","):
    configs = conv_configs(arch, args.batch)
    sums = {("finetune", "jax"): 0.0, ("finetune", "torch"): 0.0,
            ("freeze_cwl", "jax"): 0.0, ("freeze_cwl", "torch"): 0.0}
    timed: dict = {}  # resnet_s repeats its block convs: time each shape once
    for i, config in enumerate(configs):
      if config not in timed:
        timed[config] = (jax_times(*config, args.runs), torch_times(*config, args.runs))
      data_needed = i > 0  # the first conv's input is the image: no input gradient
      (fwd, data, *kernel_grads), torch_t = timed[config]
      # the kernel gradient the model computes (gemm_conv.kernel_gradient_impl)
      jax_t = (fwd, data, dict(zip(_HOWS, kernel_grads))[auto_pick(config)])
      for lib, (f, d, w) in (("jax", jax_t), ("torch", torch_t)):
        sums[("finetune", lib)] += f + w + (d if data_needed else 0.0)
        sums[("freeze_cwl", lib)] += f + (d if data_needed else 0.0)
    for config, (j, t) in timed.items():
      x_shape, w_shape, strides, _ = config
      picked = auto_pick(config)
      after = dict(zip(_HOWS, j[2:]))[picked]
      ops.append(f"| {arch} | {'x'.join(map(str, x_shape))} | {'x'.join(map(str, w_shape))} | "
                 f"{strides[0]} | {configs.count(config)} | "
                 + " | ".join(f"{v:.2f}" for v in j) + f" | {j[3] / j[2]:.2f} | "
                 f"{j[4] / j[2]:.2f} | {after:.2f} ({_LABEL[picked]}) | "
                 + " | ".join(f"{v:.2f}" for v in t) + " |")
      print(ops[-1], file=sys.stderr)
    if args.convs_only:
      continue
    for strategy in ("finetune", "freeze_cwl"):
      js, ts, layout = step_ms(arch, strategy, args.batch, windows, steps)
      jc, tc = sums[(strategy, "jax")], sums[(strategy, "torch")]
      steps_tbl.append(f"| {arch} | {strategy} | {js:.1f} | {jc:.1f} | {js - jc:.1f} | "
                       f"{ts:.1f} ({layout}) | {tc:.1f} | {ts - tc:.1f} |")
      print(steps_tbl[-1], file=sys.stderr)
  load = (load_start, os.getloadavg()[0])
  loaded = max(load) > (os.cpu_count() or 1)
  mark = " (loaded)" if loaded else ""
  text = (f"# Convolutions vs the rest of a step\n\nCommand: `{command('bench_convs', argv)}`; "
          f"backend {jax.default_backend()}, jax {jax.__version__}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch threads. Batch {args.batch}, input "
          f"{'x'.join(map(str, SHAPE))}. 1-minute load average {load[0]:.1f} at the start, "
          f"{load[1]:.1f} at the end, on {os.cpu_count()} cores"
          + (": every timing below is loaded (the machine was shared); only ratios measured in "
             "one run, such as GEMM / XLA, mean anything.\n\n" if loaded else ".\n\n"))
  if not args.convs_only:
    text += (f"Whole steps{mark} (median of {windows} windows x {steps} steps; PyTorch in its "
             "faster layout) and the sum of their convolutions timed alone (PyTorch's in "
             "channels_last); 'rest' = step - convolutions:\n\n" + "\n".join(steps_tbl)
             + "\n\n")
  text += (f"Each convolution alone, ms{mark} (median of {args.runs} calls; the JAX "
           "kernel gradients interleaved; 'auto' is the one the model computes):\n\n"
           + "\n".join(ops) + "\n")
  emit(text, args.out)
  return 0


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
