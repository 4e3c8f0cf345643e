"""Feature-map metrics S1..S6 of base-model selection (base-model-selection-metrics, sec. 3).

On last-conv maps (N, H, W, C), post-ReLU, channels last, accumulated chunk by chunk from
sufficient statistics, so thousands of full-size maps never sit in memory together:
`feature_map_metrics(maps, labels, chunk_size=64)`, `feature_map_metrics_from_batches(it)` for
an iterator of (maps, labels) batches, or `feature_map_stats` / `merge_stats` /
`metrics_from_stats` to spread the work (over hosts, over time). `jtransfer.methods.selection`
re-exports every name.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from jtransfer.errors import InputError


METRIC_NAMES = ("S1", "S2", "S3", "S4", "S5", "S6")
# Raw S2, S4, S5, S6 are better when smaller; `normalize_metrics` negates them.
SMALLER_IS_BETTER = ("S2", "S4", "S5", "S6")
# S6's sign is an open reading of the paper. Its text (sec. 3.6: "The smaller the S6 value, the
# better it is"; sec. 5.3 inverts S6 before combining) makes smaller raw S6 better, which is how
# "S6" is oriented everywhere (SMALLER_IS_BETTER). Its App. A.2 (Fig. 5) reports Spearman's rho
# between S6 and truncate-fine-tune accuracy above 0.7 for every target, i.e. larger raw S6 went
# with higher accuracy. Reports list S6 under that second sign as this extra scorer too.
S6_APPENDIX = "S6 (App. A.2 sign)"
S6_SIGNS = {"S6": -1.0, S6_APPENDIX: 1.0}     # oriented score = sign * raw S6


@dataclasses.dataclass(frozen=True)
class FeatureMapStats:
  """Sufficient statistics for S1..S6 over a set of images; combine sets with `merge_stats`.

  Attributes:
    map_shape: (H, W, C) shared by every map.
    classes: (K,) sorted label values seen so far.
    counts: (K,) int64 images per class.
    means: (K, H*W*C) float64 mean flattened map per class.
    scatter: (K,) float64 sum over the class's images of ||F_i - Fbar_k||^2.
    num_images: images seen so far.
    corr_sum: sum over images of the S4 term.
    zero_frac_sum: sum over images of the S5 term.
    steep_sum: sum over images of the S6 term.
  """
  map_shape: tuple[int, int, int]
  classes: np.ndarray
  counts: np.ndarray
  means: np.ndarray
  scatter: np.ndarray
  num_images: int
  corr_sum: float
  zero_frac_sum: float
  steep_sum: float


def feature_map_stats(features: npt.ArrayLike, labels: npt.ArrayLike, *,
                      corr_batch: int = 8) -> FeatureMapStats:
  """Statistics of one chunk of last-conv feature maps (one jitted pass).

  Args:
    features: (B, H, W, C) maps, channels last, after ReLU; numpy or jax array of any float dtype
      (computed in float32).
    labels: (B,) integer class labels (any integer values; classes are the distinct values).
    corr_batch: images whose (C, C) correlation matrices are held at once for S4; peak memory is a
      small multiple of corr_batch * C * C * 4 bytes (128 MiB for C = 2048 and the default 8).

  Returns:
    The chunk's `FeatureMapStats`.

  Raises:
    InputError: wrong rank, label count mismatch, non-integer labels.
  """
  shape, labels = _check_maps(features, labels)
  if shape[0] == 0:
    return _empty_stats(shape[1:])
  classes, slot = np.unique(labels, return_inverse=True)
  k = len(classes)
  # Pad the class axis to a power of two so chunks with different class counts reuse compilations.
  counts, means, scatter, corr, zero_frac, steep = _chunk_kernel(
      jnp.asarray(features, jnp.float32), jnp.asarray(slot.reshape(-1), jnp.int32),
      num_slots=_next_pow2(k), corr_batch=max(1, min(int(corr_batch), shape[0])))
  return FeatureMapStats(
      map_shape=tuple(shape[1:]), classes=classes,
      counts=np.asarray(counts)[:k].round().astype(np.int64),
      means=np.asarray(means, np.float64)[:k], scatter=np.asarray(scatter, np.float64)[:k],
      num_images=shape[0], corr_sum=_sum64(corr), zero_frac_sum=_sum64(zero_frac),
      steep_sum=_sum64(steep))


def merge_stats(a: FeatureMapStats, b: FeatureMapStats) -> FeatureMapStats:
  """Combines the statistics of two disjoint image sets, as if computed on their union.

  Class means and scatters are merged with Chan et al.'s pairwise update (in float64), which avoids
  the cancellation of sum(x^2) - n * mean^2 on large post-ReLU activations.

  Args:
    a: statistics of one set.
    b: statistics of another set with the same map shape.

  Returns:
    Statistics of the union.

  Raises:
    InputError: the map shapes differ.
  """
  if a.map_shape != b.map_shape:
    raise InputError(f"cannot merge feature-map statistics of shapes {a.map_shape} and {b.map_shape}")
  classes = np.union1d(a.classes, b.classes)
  ia, ib = np.searchsorted(classes, a.classes), np.searchsorted(classes, b.classes)
  counts = np.zeros(len(classes), np.int64)
  means = np.zeros((len(classes), a.means.shape[1]), np.float64)
  scatter = np.zeros(len(classes), np.float64)
  counts[ia], means[ia], scatter[ia] = a.counts, a.means, a.scatter
  na, nb = counts[ib].astype(np.float64), b.counts.astype(np.float64)
  n = np.maximum(na + nb, 1.0)
  delta = b.means - means[ib]
  means[ib] += delta * (nb / n)[:, None]
  scatter[ib] += b.scatter + np.einsum("kd,kd->k", delta, delta) * na * nb / n
  counts[ib] += b.counts
  return FeatureMapStats(
      map_shape=a.map_shape, classes=classes, counts=counts, means=means, scatter=scatter,
      num_images=a.num_images + b.num_images, corr_sum=a.corr_sum + b.corr_sum,
      zero_frac_sum=a.zero_frac_sum + b.zero_frac_sum, steep_sum=a.steep_sum + b.steep_sum)


def metrics_from_stats(stats: FeatureMapStats) -> dict[str, float]:
  """Turns accumulated statistics into S1..S6.

  Args:
    stats: statistics of all the images (see `feature_map_stats`, `merge_stats`).

  Returns:
    {'S1': ..., ..., 'S6': ...}, raw values (S1, S3 larger is better; S2, S4, S5, S6 smaller is
    better). S3 follows sklearn's `calinski_harabasz_score`, including its value 1.0 when S2 == 0.

  Raises:
    InputError: fewer than 2 classes, or no more images than classes (S3 undefined).
  """
  k, n = len(stats.classes), stats.num_images
  if k < 2:
    raise InputError(f"selection metrics need labels from at least 2 classes, got {k}")
  if n <= k:
    raise InputError(f"selection metrics need more images than classes, got {n} images and {k} classes")
  grand = stats.counts @ stats.means / n
  s1 = float(stats.counts @ np.sum((stats.means - grand) ** 2, axis=1))
  s2 = float(np.sum(stats.scatter))
  s3 = 1.0 if s2 == 0.0 else (s1 / (k - 1)) / (s2 / (n - k))
  return {"S1": s1, "S2": s2, "S3": float(s3), "S4": stats.corr_sum / n,
          "S5": stats.zero_frac_sum / n, "S6": stats.steep_sum / n}


def feature_map_metrics(features: npt.ArrayLike, labels: npt.ArrayLike, *,
                        chunk_size: int | None = 64, corr_batch: int = 8) -> dict[str, float]:
  """S1..S6 of base-model-selection-metrics on last-conv feature maps, chunk by chunk.

  With Fbar the mean flattened map, Fbar_k the mean of class k, n_k its size, K classes, N images:

  * S1 = sum_k n_k ||Fbar - Fbar_k||^2, between-class scatter (larger is better).
  * S2 = sum_k sum_{i in C_k} ||Fbar_k - F_i||^2, within-class scatter (smaller is better).
  * S3 = (S1 / (K - 1)) / (S2 / (N - K)), the Calinski-Harabasz pseudo-F (larger is better).
  * S4 = mean over images of sum over ordered channel pairs (i, j), i != j, of
    |Pearson corr(F[:, :, i], F[:, :, j])| over the H*W positions (smaller is better). Each unordered
    pair counts twice, as in the paper's double sum; halve it for unordered pairs. A channel that is
    constant over the image (e.g. all zero after ReLU) has no defined correlation: it counts 0.
  * S5 = mean over images of #(elements == 0) / #elements (smaller is better).
  * S6 = mean over images of #(elements with max - x < 1) / #(elements == 0) (smaller is better),
    "less than 1 from the image's maximum" as in the paper. An image with no zero element would
    divide by zero: its denominator is taken as 1, so dense maps get a large (bad) value.

  Zeros are exact zeros, as ReLU produces. Per-chunk kernels run in float32 under `jax.jit`; chunks
  are merged in float64, so the result does not depend on `chunk_size` beyond float32 rounding.

  Args:
    features: (N, H, W, C) maps, channels last, after ReLU (a numpy memmap works: only one chunk is
      read at a time).
    labels: (N,) integer target labels.
    chunk_size: images per chunk; None for all at once.
    corr_batch: images whose (C, C) correlation matrices are held at once (see `feature_map_stats`).

  Returns:
    {'S1': ..., ..., 'S6': ...} as Python floats.

  Raises:
    InputError: wrong rank, label count mismatch, fewer than 2 classes, bad chunk size.
  """
  shape, labels = _check_maps(features, labels)
  n = shape[0]
  if chunk_size is None:
    chunk_size = max(n, 1)
  if int(chunk_size) < 1:
    raise InputError(f"chunk_size must be a positive integer or None, got {chunk_size}")
  chunk_size = int(chunk_size)
  batches = ((features[i:i + chunk_size], labels[i:i + chunk_size]) for i in range(0, n, chunk_size))
  return feature_map_metrics_from_batches(batches, corr_batch=corr_batch)


def feature_map_metrics_from_batches(batches: Iterable[tuple[npt.ArrayLike, npt.ArrayLike]], *,
                                     corr_batch: int = 8) -> dict[str, float]:
  """S1..S6 (see `feature_map_metrics`) from an iterable of (maps, labels) batches.

  Args:
    batches: yields (B, H, W, C) maps and (B,) integer labels; B may vary between batches.
    corr_batch: images whose (C, C) correlation matrices are held at once.

  Returns:
    {'S1': ..., ..., 'S6': ...}.

  Raises:
    InputError: no batches, inconsistent shapes, fewer than 2 classes in total.
  """
  stats = None
  for features, labels in batches:
    chunk = feature_map_stats(features, labels, corr_batch=corr_batch)
    stats = chunk if stats is None else merge_stats(stats, chunk)
  if stats is None:
    raise InputError("feature_map_metrics_from_batches got no batches")
  return metrics_from_stats(stats)


@functools.partial(jax.jit, static_argnames=("num_slots", "corr_batch"))
def _chunk_kernel(maps, slot, num_slots: int, corr_batch: int):
  """Per-class moments and per-image S4/S5/S6 terms of one chunk."""
  b = maps.shape[0]
  flat = maps.reshape(b, -1)
  # segment_sum rather than a one-hot matmul: plain adds, no reduced-precision matmul on GPU/TPU.
  counts = jax.ops.segment_sum(jnp.ones((b,), jnp.float32), slot, num_segments=num_slots)
  sums = jax.ops.segment_sum(flat, slot, num_segments=num_slots)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  # Scatter around the chunk's own class means: merging those is stable, sum of squares is not.
  resid = jnp.sum((flat - means[slot]) ** 2, axis=1)
  scatter = jax.ops.segment_sum(resid, slot, num_segments=num_slots)
  pixels = maps.reshape(b, -1, maps.shape[-1])
  # lax.map over sub-batches bounds memory to corr_batch (C, C) matrices, never (B, C, C).
  corr = jax.lax.map(_abs_corr_sum, pixels, batch_size=corr_batch)
  zero_frac, steep = _sparsity_terms(flat)
  return counts, means, scatter, corr, zero_frac, steep


def _abs_corr_sum(x):
  """Sum of |Pearson corr| over ordered channel pairs i != j of one image's (H*W, C) pixels."""
  # Exact test for constant channels: a centred norm of ~1e-8 would give meaningless correlations.
  constant = jnp.max(x, axis=0) == jnp.min(x, axis=0)
  centred = x - jnp.mean(x, axis=0)
  norm = jnp.sqrt(jnp.sum(centred * centred, axis=0))
  z = jnp.where(constant, 0.0, centred / jnp.where(constant, 1.0, norm))
  corr = jnp.abs(jnp.matmul(z.T, z, precision=jax.lax.Precision.HIGHEST))
  return jnp.sum(corr) - jnp.trace(corr)


def _sparsity_terms(flat):
  """Per-image S5 (zero fraction) and S6 (near-max count over zero count, denominator >= 1)."""
  zeros = jnp.sum(flat == 0, axis=1).astype(jnp.float32)
  top = jnp.max(flat, axis=1, keepdims=True)
  high = jnp.sum((top - flat) < 1.0, axis=1).astype(jnp.float32)
  return zeros / flat.shape[1], high / jnp.maximum(zeros, 1.0)


def _check_maps(features, labels) -> tuple[tuple[int, ...], np.ndarray]:
  """Validates (maps, labels) without reading the maps; returns the map shape and numpy labels."""
  shape = tuple(int(d) for d in np.shape(features))
  if len(shape) != 4:
    raise InputError(f"expected feature maps of rank 4 (N, H, W, C), got shape {shape}")
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != shape[0]:
    raise InputError(f"expected labels of shape ({shape[0]},) to match the maps, got {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise InputError(f"expected integer labels, got dtype {labels.dtype}")
  return shape, labels


def _empty_stats(map_shape) -> FeatureMapStats:
  d = int(np.prod(map_shape))
  return FeatureMapStats(tuple(map_shape), np.zeros(0, np.int64), np.zeros(0, np.int64),
                         np.zeros((0, d)), np.zeros(0), 0, 0.0, 0.0, 0.0)


def _next_pow2(k: int) -> int:
  return 1 << max(0, int(k) - 1).bit_length()


def _sum64(x) -> float:
  return float(np.sum(np.asarray(x, np.float64)))
