"""Batched, jit-compiled evaluation (running BN statistics, no dropout)."""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer.train import parallel


def predict_logits(forward: Callable, params, batch_stats, images: np.ndarray,
                   batch_size: int = 500) -> np.ndarray:
  """Logits of `forward(params, batch_stats, images_batch)` over `images`, in batches.

  The last partial batch is padded to `batch_size`, so one shape compiles once and is reused.
  """
  n = images.shape[0]
  if n == 0:
    raise ValueError("predict_logits: no images")
  bs = min(batch_size, n)
  if parallel.is_multiprocess():
    # Each process predicts its share of the rows on its own copy of the (replicated) params;
    # the logits are gathered (`parallel.gather_rows`).
    params, batch_stats = parallel.host_copy(params), parallel.host_copy(batch_stats)

  def rows(first: int, last: int) -> np.ndarray:
    out = []
    for start in range(first, last, bs):
      chunk = images[start:min(start + bs, last)]
      pad = bs - chunk.shape[0]
      if pad:
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      out.append(np.asarray(forward(params, batch_stats, chunk))[:bs - pad])
    return np.concatenate(out)

  return parallel.gather_rows(rows, n)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy in [0, 1]."""
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))


def xla_flops(lowered) -> float:
  """FLOPs of a lowered computation (`jax.jit(f).lower(...)`), by XLA's cost analysis of
  its HLO before backend optimisation, so the count does not depend on how a backend
  compiles it.

  The compiled executable's analysis does: on GPU, XLA rewrites convolutions into cuDNN
  custom calls that its cost analysis does not count (on an H200, ResNeXt-50 read 0.07
  GFLOPs per image, 4.3 on the CPU; bench/GPU.md). On the CPU the two counts agree within
  0.3% (resnet_s: 71.82 vs 71.98 MFLOPs at batch 2; vgg_s equal). Checked on the CPU only:
  the lease that found the GPU undercount ended before this was rerun there.
  """
  analysis = lowered.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float((analysis or {}).get("flops", float("nan")))


def forward_calls(forward: Callable, params, stats, image_shape: Sequence[int],
                  batches: Sequence[int]) -> tuple[float, dict[int, Callable[[], Any]]]:
  """A model's forward ready to time: (FLOPs per image, `xla_flops`,
  {batch: a call of the forward, compiled once for that batch size, on a zero uint8 batch,
  blocking until ready}), for `interleaved_latency_ms`.

  Args:
    forward: (params, stats, uint8 images) -> outputs, e.g. `transfer.eval_forward(...)`.
    params, stats: its variables (put on the device once).
    image_shape: (H, W, C) of one image.
    batches: the batch sizes.
  """
  params, stats = jax.device_put(params), jax.device_put(stats)
  flops, calls = float("nan"), {}
  for b in batches:
    x = jax.device_put(np.zeros((b, *image_shape), np.uint8))
    lowered = jax.jit(forward).lower(params, stats, x)
    if not calls:
      flops = xla_flops(lowered) / b
    compiled = lowered.compile()
    calls[b] = (lambda c=compiled, x=x: jax.block_until_ready(c(params, stats, x)))
  return flops, calls


def interleaved_latency_ms(calls: Mapping[str, Callable[[], Any]], runs: int = 20,
                           warmup: int = 2) -> dict[str, float]:
  """Median wall time (ms) of each call, timed round-robin (round r starts at call r mod n).

  On a machine shared with other jobs a load change then slows every call alike, so the
  ratios between them hold even when the absolute times do not. Each call runs `warmup`
  times first (compiles, caches) and must block until its result is ready.
  """
  if runs < 1:
    raise ValueError(f"runs must be >= 1, got {runs}")
  for call in calls.values():
    for _ in range(warmup):
      call()
  if not calls:
    return {}
  times: dict[str, list[float]] = {k: [] for k in calls}
  order = list(calls)
  for r in range(runs):
    # Each round starts one call later, so no call always follows the same (e.g. the
    # largest) one and finds the caches it left.
    for k in order[r % len(order):] + order[:r % len(order)]:
      t0 = time.perf_counter()
      calls[k]()
      times[k].append(time.perf_counter() - t0)
  return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def median_latency_ms(fn: Callable, *args, runs: int = 20, warmup: int = 2) -> float:
  """Median wall time (ms) of `fn(*args)` to a ready result, after `warmup` calls.

  `fn` is a jitted function or a compiled executable; `args` should already be on device so
  the host-to-device copy is not timed.
  """
  if runs < 1:
    raise ValueError(f"runs must be >= 1, got {runs}")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1000 * float(np.median(times))
