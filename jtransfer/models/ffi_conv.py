"""A native CPU kernel for a dense convolution's kernel gradient (an XLA FFI custom call).

XLA:CPU computes a 3x3 convolution's kernel gradient as a backward-filter convolution that
reaches about half of this CPU's GEMM rate; no pure-JAX patch-matrix form beat it
(`gemm_conv`). `native/filter_grad.cc` computes it as im2col + GEMM in cache-sized blocks:
per image and block of output rows it writes the patches into a buffer that stays in the L2
cache and multiplies them into a float32 accumulator with OpenBLAS's sgemm (the copy numpy
ships), images split over the cores. On vgg_s / resnet_s's 3x3 layers with 32+ input
channels it took 0.65-0.87x XLA's CPU time (bench/FFI_FILTER.md).

It is compiled on first use with the system's C++ compiler against jaxlib's FFI headers into
`.cache/native/<key>/`, beside the compilation cache (the key hashes the source, jaxlib's
version, the BLAS and the CPU flags, so a copied cache never loads a library built for
another machine), then registered with XLA once per process. Where it cannot be built (no
compiler, no headers, a numpy without its bundled OpenBLAS) or `JTRANSFER_NATIVE=0`,
`available()` is False and `gemm_conv` keeps XLA's kernel gradient: the same values to
float32 rounding. `gemm_conv` reads the switch when a step is traced, so a function already
jitted keeps what it was traced with. The custom call has no partitioning rule: `gemm_conv`
uses it only when jax sees one device (a sharded step would gather the batch onto every
device).

Reference for the API: jax's FFI tutorial (docs "Foreign function interface (FFI)",
`jax.ffi.ffi_call`, `jax.ffi.register_ffi_target`).
"""
from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "filter_grad.cc")
TARGET = "jtransfer_filter_grad"
# A 64 K-float (256 KB) patch block per thread: inside a core's L2 cache.
BLOCK_FLOATS = 64 * 1024


def enabled() -> bool:
  """False when $JTRANSFER_NATIVE is '0': no native kernel is built or used."""
  return os.environ.get("JTRANSFER_NATIVE", "1") != "0"


def _blas() -> Optional[str]:
  found = glob.glob(os.path.join(os.path.dirname(os.path.dirname(np.__file__)),
                                 "numpy.libs", "libscipy_openblas64_*.so"))
  return found[0] if found else None


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line for line in f if line.startswith("flags")), "")
  except OSError:
    return platform.processor()


def _cache_dir() -> str:
  # Beside the compilation cache (.cache/jax of a checkout), not inside it: jax's cache
  # evicts files of its own directory.
  from jtransfer import compile_cache
  return str(compile_cache.default_cache_dir().parent / "native")


def build(out_dir: Optional[str] = None) -> str:
  """Compiles `native/filter_grad.cc` (g++ -O3 -march=native) unless already built; returns
  the shared library's path.

  Raises:
    RuntimeError: no C++ compiler, no jaxlib FFI headers, no bundled OpenBLAS, or the
      compiler failed (its message included).
  """
  import jaxlib
  include = os.path.join(os.path.dirname(jaxlib.__file__), "include")
  blas, cxx = _blas(), shutil.which(os.environ.get("CXX", "g++"))
  if cxx is None:
    raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
  if blas is None or not os.path.isdir(include):
    raise RuntimeError("numpy's bundled OpenBLAS or jaxlib's FFI headers not found")
  with open(SOURCE, "rb") as f:
    key = hashlib.sha256(f.read() + jaxlib.__version__.encode() + blas.encode()
                         + _cpu_flags().encode()).hexdigest()[:16]
  lib = os.path.abspath(os.path.join(out_dir or _cache_dir(), key, "libfilter_grad.so"))
  if os.path.isfile(lib):
    return lib
  os.makedirs(os.path.dirname(lib), exist_ok=True)
  # Built beside its final name and renamed into place, so that two processes building at
  # once (pytest workers, parallel grids) never load a half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(lib))
  os.close(fd)
  cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{include}",
         SOURCE, "-o", tmp, blas, f"-Wl,-rpath,{os.path.dirname(blas)}", "-lpthread"]
  try:
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    os.replace(tmp, lib)
  except (OSError, subprocess.SubprocessError) as e:
    raise RuntimeError(f"could not build {SOURCE}: {getattr(e, 'stderr', None) or e}") from e
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return lib


@functools.lru_cache(maxsize=None)  # build and register once per process
def _registered() -> bool:
  try:
    lib = ctypes.cdll.LoadLibrary(build())
  except (RuntimeError, OSError) as e:
    warnings.warn(f"jtransfer: the native kernel gradient is unavailable ({e}); XLA's "
                  "backward-filter convolution is used instead (same values, slower)")
    return False
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.FilterGrad), platform="cpu")
  return True


def available() -> bool:
  """Whether the native kernel can run here: enabled, on the CPU backend, and built."""
  return enabled() and jax.default_backend() == "cpu" and _registered()


def _threads() -> int:
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not Linux
    return max(1, os.cpu_count() or 1)


def kernel_gradient(x: jax.Array, dy: jax.Array, kernel_hw: Sequence[int],
                    strides: Sequence[int], padding) -> jax.Array:
  """(kH, kW, C, O) float32 kernel gradient of an NHWC x HWIO convolution by the native
  kernel: dk[i, j, c, o] = sum over n, h, w of x_pad[n, s*h + i, s*w + j, c] * dy[n, h, w, o].

  Differentiable again (reverse mode): dk is bilinear in (x, dy), so its VJP is the
  convolution's own input gradient and forward pass with the cotangent as the kernel.

  Args:
    x: (N, H, W, C) input (computed in float32).
    dy: (N, OH, OW, O) output cotangent (computed in float32).
    kernel_hw: (kH, kW).
    strides: (sH, sW).
    padding: ((top, bottom), (left, right)), non-negative.

  Raises:
    RuntimeError: the kernel is not available here (`available()` is False).
  """
  if not available():
    raise RuntimeError("the native kernel gradient is not available here (JTRANSFER_NATIVE=0, "
                       "not on the CPU backend, or it could not be built)")
  hw, st = tuple(int(v) for v in kernel_hw), tuple(int(v) for v in strides)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _bilinear(x, dy, hw, st, pads)


def _call(x, dy, kernel_hw, strides, padding):
  (kh, kw), (sh, sw), ((pt, _), (pl, _)) = kernel_hw, strides, padding
  k = kh * kw * x.shape[-1]
  rows = max(1, BLOCK_FLOATS // max(1, dy.shape[2] * k))
  i64 = np.int64
  out = jax.ShapeDtypeStruct((kh, kw, x.shape[-1], dy.shape[-1]), jnp.float32)
  # Under jax.vmap (train.batched runs several runs in one step) the custom call runs once
  # per batch member: the kernel takes no batch dimension of its own. The thread count is
  # fixed when the step is traced.
  return jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")(
      x.astype(jnp.float32), dy.astype(jnp.float32), kh=i64(kh), kw=i64(kw), sh=i64(sh),
      sw=i64(sw), pt=i64(pt), pl=i64(pl), threads=i64(min(_threads(), max(1, x.shape[0]))),
      rows=i64(rows))


def _conv(x, kernel, strides, padding):
  return jax.lax.conv_general_dilated(x, kernel, strides, padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


_bilinear = jax.custom_vjp(_call, nondiff_argnums=(2, 3, 4))


def _bilinear_fwd(x, dy, kernel_hw, strides, padding):
  return _call(x, dy, kernel_hw, strides, padding), (x, dy)


def _bilinear_bwd(kernel_hw, strides, padding, res, ck):
  # <dk(x, dy), ck> = <conv(x, ck), dy>: the VJP in x is the conv's input gradient with ck as
  # the kernel and dy as the output cotangent; in dy it is conv(x, ck).
  x, dy = res
  ck = ck.astype(jnp.float32)
  x32 = x.astype(jnp.float32)
  y, conv_vjp = jax.vjp(lambda v: _conv(v, ck, strides, padding), x32)
  (dx,) = conv_vjp(dy.astype(jnp.float32))
  return dx.astype(x.dtype), y.astype(dy.dtype)


_bilinear.defvjp(_bilinear_fwd, _bilinear_bwd)
