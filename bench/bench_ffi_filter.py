"""A lead for issue 32 item 2: the kernel gradient as a fused im2col + GEMM outside XLA's ops.

  python -m bench.bench_ffi_filter --out bench/FFI_FILTER.md   # vgg_s and resnet_s, minutes
  python -m bench.bench_ffi_filter --no-convs --steps resnet_s,vgg_s --runs 12   # whole steps

Builds bench/ffi_filter_grad.cc (an XLA FFI custom call: per image and block of output rows,
im2col patches in a cache-sized buffer, a single-threaded sgemm from the OpenBLAS numpy
bundles, images split over threads) with the system's g++ into .cache/ffi/, and times it
against XLA's backward-filter convolution for every dense conv of the archs, interleaved in
one process, wall and CPU time (`time.process_time`, all threads), after checking that it
equals XLA's to float32 rounding. A measurement prototype, not part of the library: using it
in the models would need a build step for a native extension and a fallback where none is
built (docs/decisions.md, "Dense-conv filter gradients").
"""
from __future__ import annotations

import argparse
import ctypes
import glob
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bench.bench_convs import conv_configs
from bench.common import command, emit

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ffi_filter_grad.cc")
_TARGET = "jtransfer_bench_filter_grad"


def build(out_dir: str = ".cache/ffi") -> str:
  """Compiles the FFI kernel (g++ -O3 -march=native) against jaxlib's headers and numpy's
  bundled OpenBLAS; returns the shared library's path. Raises RuntimeError when it cannot."""
  import jaxlib
  import numpy
  include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  blas = glob.glob(os.path.join(os.path.dirname(os.path.dirname(numpy.__file__)),
                                "numpy.libs", "libscipy_openblas64_*.so"))
  if not blas or not os.path.isdir(include):
    raise RuntimeError("numpy's bundled OpenBLAS or jaxlib's FFI headers not found")
  os.makedirs(out_dir, exist_ok=True)
  lib = os.path.abspath(os.path.join(out_dir, "libfilter_grad.so"))
  cmd = ["g++", "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w",
         f"-I{include}", _SOURCE, "-o", lib, blas[0],
         f"-Wl,-rpath,{os.path.dirname(blas[0])}", "-lpthread"]
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True)
  except (OSError, subprocess.CalledProcessError) as e:
    raise RuntimeError(f"could not build {_SOURCE}: {getattr(e, 'stderr', e)}") from e
  return lib


def register(lib_path: str) -> None:
  """Registers the built kernel as an XLA FFI target on the CPU platform."""
  lib = ctypes.cdll.LoadLibrary(lib_path)
  jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.FilterGrad), platform="cpu")


def ffi_filter_grad(x, dy, kernel_hw, strides, padding, threads: int = 2):
  """(kH, kW, C, O) kernel gradient of an NHWC x HWIO conv by the registered FFI kernel."""
  (kh, kw), (sh, sw), ((pt, _), (pl, _)) = kernel_hw, strides, padding
  k = kh * kw * x.shape[-1]
  rows = max(1, (64 * 1024) // (dy.shape[2] * k))  # a 256 KB patch block: inside L2
  i64 = np.int64
  return jax.ffi.ffi_call(
      _TARGET, jax.ShapeDtypeStruct((kh, kw, x.shape[-1], dy.shape[-1]), jnp.float32))(
          x.astype(jnp.float32), dy.astype(jnp.float32), kh=i64(kh), kw=i64(kw), sh=i64(sh),
          sw=i64(sw), pt=i64(pt), pl=i64(pl), threads=i64(threads), rows=i64(rows))


def _xla_filter_grad(x, dy, kernel_hw, strides, padding):
  kernel = jnp.zeros((*kernel_hw, x.shape[-1], dy.shape[-1]), x.dtype)
  conv = lambda k: lax.conv_general_dilated(x, k, strides, padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.vjp(conv, kernel)[1](dy)[0]


def compare(x_shape, w_shape, strides, padding, runs: int) -> dict[str, tuple[float, float]]:
  """{name: (median wall ms, median CPU ms)} of XLA's and the FFI kernel gradient (1 and 2
  threads), round-robin; raises AssertionError if the FFI's differs from XLA's."""
  padding = tuple(tuple(p) for p in padding)
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  out_shape = jax.eval_shape(lambda a: lax.conv_general_dilated(
      a, jnp.zeros(w_shape), strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")),
      x).shape
  dy = jax.random.normal(jax.random.PRNGKey(1), out_shape)
  hw = tuple(w_shape[:2])
  fns = {"xla": jax.jit(lambda x, dy: _xla_filter_grad(x, dy, hw, strides, padding)),
         "ffi 2 threads": jax.jit(lambda x, dy: ffi_filter_grad(x, dy, hw, strides, padding, 2)),
         "ffi 1 thread": jax.jit(lambda x, dy: ffi_filter_grad(x, dy, hw, strides, padding, 1))}
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
  """{'xla' | 'ffi': (median wall ms, median CPU ms) per finetune step} of `arch`, the second
  with the FFI kernel gradient on every 3x3 conv with 32+ input channels (where it measured
  faster alone) and the models' own elsewhere; 3 steps a round, the two alternating.

  The FFI step is built by switching `gemm_conv` to 'gemm' and its `kernel_gradient` to the
  FFI's while the step traces, both restored after: a bench-only swap.
  """
  from bench import run
  from jtransfer.models import gemm_conv
  own, impl = gemm_conv.kernel_gradient, gemm_conv.CONV_IMPL

  def ffi_where_faster(x, dy, kernel_hw, strides, padding, precision=None, chunk=None):
    if tuple(kernel_hw) == (3, 3) and x.shape[-1] >= 32:
      return ffi_filter_grad(x, dy, kernel_hw, strides, padding, 2)
    if gemm_conv.AUTO_GEMM.get((tuple(kernel_hw), strides[0]), False):
      return own(x, dy, kernel_hw, strides, padding, precision, chunk)
    return _xla_filter_grad(x, dy, tuple(kernel_hw), strides, padding)

  steps = {}
  try:
    for name in ("xla", "ffi"):
      gemm_conv.CONV_IMPL = "auto" if name == "xla" else "gemm"
      gemm_conv.kernel_gradient = own if name == "xla" else ffi_where_faster
      step, state, data = run.jax_step(arch, "finetune", (28, 28, 1), batch)
      for _ in range(2):  # trace and compile under the swap
        state, _ = step(state, data)
      steps[name] = [step, jax.block_until_ready(state), data]
  finally:
    gemm_conv.kernel_gradient, gemm_conv.CONV_IMPL = own, impl
  wall = {k: [] for k in steps}
  cpu = {k: [] for k in steps}
  for r in range(runs):
    for name in (("xla", "ffi") if r % 2 == 0 else ("ffi", "xla")):
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
                 "with the FFI kernel gradient on its 3x3 convs of 32+ channels")
  p.add_argument("--no-convs", action="store_true", help="skip the per-conv table")
  args = p.parse_args(argv)
  try:
    register(build())
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  load_start = os.getloadavg()[0]
  rows = ["| arch | input | kernel | stride | XLA wall | FFI 2 thr wall | FFI 1 thr wall | "
          "XLA CPU | FFI 2 thr CPU | FFI 1 thr CPU | FFI 2 thr / XLA, CPU |", "|---" * 11 + "|"]
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
                  + f" | {t['ffi 2 threads'][1] / t['xla'][1]:.2f} |")
      print(rows[-1], file=sys.stderr)
  step_rows = ["| arch | XLA step wall | FFI step wall | ratio | XLA step CPU | FFI step CPU | "
               "ratio |", "|---" * 7 + "|"]
  for arch in filter(None, args.steps.split(",")):
    t = step_compare(arch, args.runs, args.batch)
    step_rows.append(f"| {arch} | {t['xla'][0]:.1f} | {t['ffi'][0]:.1f} | "
                     f"{t['ffi'][0] / t['xla'][0]:.3f} | {t['xla'][1]:.1f} | {t['ffi'][1]:.1f} | "
                     f"{t['ffi'][1] / t['xla'][1]:.3f} |")
    print(step_rows[-1], file=sys.stderr)
  load = (load_start, os.getloadavg()[0])
  loaded = max(load) > (os.cpu_count() or 1)
  text = ("# The kernel gradient as an FFI im2col + GEMM vs XLA's backward-filter convolution\n\n"
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
             "Whole finetune steps, ms a step (3 steps a round, the two alternating):\n\n"
             + "\n".join(step_rows) + "\n"))
  emit(text, args.out)
  return 0


if __name__ == "__main__":
  import jtransfer  # noqa: F401  (its CPU XLA flags, before the backend starts)
  sys.exit(main())
