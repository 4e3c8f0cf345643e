"""The native kernel gradient (jtransfer.models.ffi_conv) against XLA's backward-filter conv.

  python -m bench.bench_ffi_filter --out bench/FFI_FILTER.md   # vgg_s and resnet_s, minutes
  python -m bench.bench_ffi_filter --no-convs --steps resnet_s,vgg_s --runs 12   # whole steps

Times the library's native kernel gradient (an XLA FFI custom call built on first use:
in-cache im2col + OpenBLAS sgemm, images split over the cores) against XLA's backward-filter
convolution for every dense conv of the archs, interleaved in one process, wall and CPU time
(`time.process_time`, all threads), after checking that the two agree to float32 rounding;
with `--steps`, whole finetune steps under `gemm_conv`'s 'auto' with the native kernel
(where `gemm_conv.takes_native` gives it) and without (JTRANSFER_NATIVE=0 while tracing).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.bench_convs import auto_pick, conv_configs
from bench.common import command, emit, native_kernels
from jtransfer.models import ffi_conv


def _xla_filter_grad(x, dy, kernel_hw, strides, padding):
  kernel = jnp.zeros((*kernel_hw, x.shape[-1], dy.shape[-1]), x.dtype)
  conv = lambda k: lax.conv_general_dilated(x, k, strides, padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.vjp(conv, kernel)[1](dy)[0]


def compare(x_shape, w_shape, strides, padding, runs: int) -> dict[str, tuple[float, float]]:
  """{'xla' | 'native': (median wall ms, median CPU ms)} of the two kernel gradients,
  alternating; raises AssertionError if the native one differs from XLA's."""
  padding = tuple(tuple(p) for p in padding)
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  out_shape = jax.eval_shape(lambda a: lax.conv_general_dilated(
      a, jnp.zeros(w_shape), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")),
      x).shape
  dy = jax.random.normal(jax.random.PRNGKey(1), out_shape)
  hw = tuple(w_shape[:2])
  fns = {"xla": jax.jit(lambda x, dy: _xla_filter_grad(x, dy, hw, strides, padding)),
         "native": jax.jit(lambda x, dy: ffi_conv.kernel_gradient(x, dy, hw, strides, padding))}
  want = np.asarray(fns["xla"](x, dy))
  for name, f in fns.items():
    np.testing.assert_allclose(np.asarray(f(x, dy)), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max(), err_msg=name)
  wall = {k: [] for k in fns}
  cpu = {k: [] for k in fns}
  names = list(fns)
  for r in range(runs):
    for name in names[r % len(names):] + names[:r % len(names)]:
      c0, t0 = time.process_time(), time.perf_counter()
      jax.block_until_ready(fns[name](x, dy))
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  return {k: (1e3 * float(np.median(wall[k])), 1e3 * float(np.median(cpu[k]))) for k in fns}


def step_compare(arch: str, runs: int, batch: int) -> dict[str, tuple[float, float]]:
  """{'xla' | 'native': (median wall ms, median CPU ms) per finetune step} of `arch` under
  `gemm_conv`'s 'auto', traced with the native kernel gradient off (JTRANSFER_NATIVE=0) and
  on; 3 steps a round, the two alternating."""
  from bench import run
  steps = {}
  for name in ("xla", "native"):
    with native_kernels(name == "native"):
      step, state, data = run.jax_step(arch, "finetune", (28, 28, 1), batch)
      for _ in range(2):  # trace and compile with the variable set
        state, _ = step(state, data)
    steps[name] = [step, jax.block_until_ready(state), data]
  wall = {k: [] for k in steps}
  cpu = {k: [] for k in steps}
  for r in range(runs):
    for name in (("xla", "native") if r % 2 == 0 else ("native", "xla")):
      step, state, data = steps[name]
      c0, t0 = time.process_time(), time.perf_counter()
      for _ in range(3):
        state, _ = step(state, data)
      jax.block_until_ready(state)
      wall[name].append((time.perf_counter() - t0) / 3)
      cpu[name].append((time.process_time() - c0) / 3)
      steps[name][1] = state
  return {k: (1e3 * float(np.median(wall[k])), 1e3 * float(np.median(cpu[k]))) for k in steps}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default="vgg_s,resnet_s")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--runs", type=int, default=15, help="interleaved rounds (median)")
  p.add_argument("--out", default=None, help="also write the report here")
  p.add_argument("--steps", default="", help="archs whose whole finetune step is also timed "
                 "under 'auto' with and without the native kernel gradient")
  p.add_argument("--no-convs", action="store_true", help="skip the per-conv table")
  args = p.parse_args(argv)
  if not ffi_conv.available():
    print("error: the native kernel gradient could not be built here (see the warning above)",
          file=sys.stderr)
    return 2
  load_start = os.getloadavg()[0]
  rows = ["| arch | input | kernel | stride | XLA wall | native wall | XLA CPU | native CPU | "
          "native / XLA, CPU | 'auto' takes |", "|---" * 10 + "|"]
  for arch in ([] if args.no_convs else args.archs.split(",")):
    seen = set()
    for config in conv_configs(arch, args.batch):
      if config in seen:
        continue
      seen.add(config)
      t = compare(*config, args.runs)
      x_shape, w_shape, strides, _ = config
      rows.append(f"| {arch} | {'x'.join(map(str, x_shape))} | {'x'.join(map(str, w_shape))} | "
                  f"{strides[0]} | " + " | ".join(f"{t[k][0]:.2f}" for k in t) + " | "
                  + " | ".join(f"{t[k][1]:.2f}" for k in t)
                  + f" | {t['native'][1] / t['xla'][1]:.2f} | {auto_pick(config)} |")
      print(rows[-1], file=sys.stderr)
  step_rows = ["| arch | XLA step wall | native step wall | ratio | XLA step CPU | native step CPU | "
               "ratio |", "|---" * 7 + "|"]
  for arch in filter(None, args.steps.split(",")):
    t = step_compare(arch, args.runs, args.batch)
    step_rows.append(f"| {arch} | {t['xla'][0]:.1f} | {t['native'][0]:.1f} | "
                     f"{t['native'][0] / t['xla'][0]:.3f} | {t['xla'][1]:.1f} | "
                     f"{t['native'][1]:.1f} | {t['native'][1] / t['xla'][1]:.3f} |")
    print(step_rows[-1], file=sys.stderr)
  load = (load_start, os.getloadavg()[0])
  loaded = max(load) > (os.cpu_count() or 1)
  text = ("# The native kernel gradient (in-cache im2col + GEMM) vs XLA's backward-filter "
          "convolution\n\n"
          f"Command: `{command('bench_ffi_filter', argv)}`; backend {jax.default_backend()}, "
          f"jax {jax.__version__}, batch {args.batch}, medians of {args.runs} interleaved "
          f"rounds, ms. 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the "
          f"end, on {os.cpu_count()} cores"
          + (": every timing is loaded (a shared machine); only the ratios within a row mean "
             "anything, and CPU time (all threads) is the steadier of the two.\n\n"
             if loaded else ".\n\n")
          + ("" if args.no_convs else "Each conv's kernel gradient alone:\n\n"
             + "\n".join(rows) + "\n\n")
          + ("" if len(step_rows) == 2 else
             "Whole finetune steps under 'auto', ms a step, without and with the native kernel "
             "gradient (3 steps a round, the two alternating):\n\n"
             + "\n".join(step_rows) + "\n"))
  emit(text, args.out)
  return 0


if __name__ == "__main__":
  import jtransfer  # noqa: F401  (its CPU XLA flags, before the backend starts)
  sys.exit(main())
