"""Base-model selection: transferability scores, and how well they rank models.

Three groups of pure functions (docs/decisions.md, "Base-model selection"):

* Feature-map metrics S1..S6 (base-model-selection-metrics) on last-conv maps (N, H, W, C), post-ReLU,
  channels last. They are accumulated chunk by chunk from sufficient statistics, so thousands of
  full-size maps never have to sit in memory together:
  `feature_map_metrics(maps, labels, chunk_size=64)`, or `feature_map_metrics_from_batches(it)` for an
  iterator of (maps, labels) batches, or `feature_map_stats` / `merge_stats` / `metrics_from_stats`
  to spread the work yourself (over hosts, over time).
* Label-aware scores from the literature: `logme` and `h_score` on penultimate features (N, D),
  `leep` on source-model softmax outputs (N, K_src), `nce` on source hard predictions.
* Evaluation: `normalize_metrics` (every metric to [-1, 1], S2/S4/S5/S6 negated so larger is better),
  `combine` and `alpha_sweep` for C_ij(alpha) = (1 - alpha) S_i + alpha S_j, `spearman`,
  `weighted_tau`, and `rank_correlations`, which treats target-blind baselines
  (`target_blind_scores`: source accuracy, parameter count) exactly like any other score.

Every score is oriented so that it can be compared with fine-tuned accuracy by rank correlation;
S2, S4, S5, S6 are "smaller is better" in raw form (see `SMALLER_IS_BETTER`).

Example:
  maps, labels = ...                        # (N, H, W, C) last-conv maps of one model on one task
  m = feature_map_metrics(maps, labels)     # {'S1': ..., ..., 'S6': ...}
  entries = [m_model_task, ...]             # one dict per (model, task)
  norm = normalize_metrics(stack_metrics(entries))
  sweep = alpha_sweep(norm['S5'], norm['S6'], accuracy, groups=arch_target)
  sweep.best_alpha, sweep.best_mean         # paper: C_56(0.574), mean Spearman 0.7514
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Hashable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
import scipy.stats
from flax import traverse_util

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

# Which map S1..S6 (and MAC retrieval) read: 'conv' = the last conv layer's output after its
# activation, as the selection paper says ("featuremaps of the last convolutional layer") and
# MAC is defined (Tolias et al.); 'pooled' = the model's 'last_conv' tap, which for VGG and
# AlexNet comes after the last max pool (vgg_s: 7x7 -> 3x3, the last row and column dropped).
# For ResNets both are the last block's output.
MAP_TAPS = ("conv", "pooled")
# Pseudo-tap name for `apply_with_taps`: the output of the model's last conv unit (or block).
LAST_CONV_OUTPUT = "last_conv_output"

# LogME constants from the authors' reference code (thuml/LogME, fixed-point version).
_LOGME_MAX_ITERS = 11
_LOGME_TOL = 1e-3
_LOGME_EPS = 1e-5


# ------------------------------------------------------------------------------------------------
# Which map: the last conv layer's output, or the model's 'last_conv' tap
# ------------------------------------------------------------------------------------------------


def map_tap_name(map_tap: str) -> str:
  """The tap name `apply_with_taps` takes for a `MAP_TAPS` choice.

  Args:
    map_tap: 'conv' (the last conv layer's output, the default everywhere) or 'pooled' (the
      model's 'last_conv' tap, after the last max pool in VGG / AlexNet).

  Returns:
    `LAST_CONV_OUTPUT` or 'last_conv'.

  Raises:
    InputError: an unknown choice.
  """
  if map_tap not in MAP_TAPS:
    raise InputError(f"map tap {map_tap!r} is not one of {', '.join(MAP_TAPS)}")
  return LAST_CONV_OUTPUT if map_tap == "conv" else "last_conv"


def _conv_unit_classes() -> tuple[type, ...]:
  from jtransfer.models.common import ConvUnit
  from jtransfer.models.inception import InceptionBlock
  from jtransfer.models.mobilenet import InvertedResidual
  from jtransfer.models.resnet import BLOCKS
  return (ConvUnit, InceptionBlock, *BLOCKS.values(), InvertedResidual)


def _last_conv_is_the_map() -> tuple[type, ...]:
  from jtransfer.models.convnext import ConvNeXt
  from jtransfer.models.densenet import DenseNet
  return (ConvNeXt, DenseNet)


def apply_with_taps(model, params, batch_stats, x: jax.Array, taps: Sequence[str]
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eval-mode forward (running BN statistics) returning logits and feature taps; jit-able.

  As `jtransfer.models.apply_model(..., taps=taps)`, plus the pseudo-tap `LAST_CONV_OUTPUT`: the
  output of the model's last top-level conv unit or residual block, i.e. the last conv layer
  after its BN and ReLU, before any pooling. It is captured with Flax's capture_intermediates
  (the unit's `__call__` result), so the models need no extra tap. For vgg_s that is conv3_2's
  (N, 7, 7, 128) output at 28x28 input, where 'last_conv' is its 3x3 max pool; for a ResNet it
  equals 'last_conv'; for a truncated model (`truncate_after`) it is the map at the cut.

  Args:
    model: a Flax module from `jtransfer.models`.
    params: its 'params' tree.
    batch_stats: its 'batch_stats' tree, or None / {} without BN.
    x: (N, H, W, C) normalised inputs.
    taps: tap names (see `jtransfer.models.available_taps`) and/or `LAST_CONV_OUTPUT`.

  Returns:
    (logits, {tap: array}).

  Raises:
    InputError: an unknown tap name, or a model without conv units.
  """
  taps = tuple(taps)
  from jtransfer import models
  if LAST_CONV_OUTPUT not in taps:
    logits, _, got = models.apply_model(model, params, batch_stats, x, taps=taps or None)
    return logits, got
  if isinstance(model, _last_conv_is_the_map()):
    # The map before pooling follows a final norm (DenseNet's norm5 + ReLU) or sits inside
    # blocks that are not conv units (ConvNeXt): the models tap it as 'last_conv', also at
    # a truncation cut.
    wanted = tuple(t for t in taps if t != LAST_CONV_OUTPUT) + ("last_conv",)
    logits, _, got = models.apply_model(model, params, batch_stats, x, taps=wanted)
    return logits, dict({t: got[t] for t in taps if t != LAST_CONV_OUTPUT},
                        **{LAST_CONV_OUTPUT: got["last_conv"]})
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  units = _conv_unit_classes()
  logits, state = model.apply(
      variables, x, train=False, mutable=["intermediates"],
      capture_intermediates=lambda mdl, method: (method == "__call__" and len(mdl.path) == 1
                                                 and isinstance(mdl, units)))
  flat = traverse_util.flatten_dict(state["intermediates"], sep="/")
  # Units run (and are recorded) in call order: the last captured one is the last conv unit.
  called = [k for k in flat if k.endswith("/__call__")]
  if not called:
    raise InputError(f"{type(model).__name__} has no conv unit whose output could be tapped")
  got = {LAST_CONV_OUTPUT: flat[called[-1]][0]}
  sown = {k[:-len("/out")] if k.endswith("/out") else k: v for k, v in flat.items()
          if not k.endswith("/__call__")}
  missing = [t for t in taps if t != LAST_CONV_OUTPUT and t not in sown]
  if missing:
    raise InputError(f"unknown tap name(s) {missing} for {type(model).__name__}; available: "
                     f"{sorted(sown) + [LAST_CONV_OUTPUT]}")
  got.update({t: sown[t] for t in taps if t != LAST_CONV_OUTPUT})
  return logits, got


# ------------------------------------------------------------------------------------------------
# Feature-map metrics S1..S6
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# Label-aware transferability scores (LogME, LEEP, NCE, H-score)
# ------------------------------------------------------------------------------------------------


LOGME_VARIANTS = ("exact", "published")


def logme(features: npt.ArrayLike, labels: npt.ArrayLike, *, variant: str = "exact") -> float:
  """LogME (You et al. 2021): mean over classes of the maximum log evidence per sample.

  For each class k, y = 1[label == k] is modelled as y = F w + noise with w ~ N(0, 1/alpha),
  noise ~ N(0, 1/beta). alpha and beta are found by the fixed-point iteration of the authors' code
  (start 1, 1; at most 11 steps; stop when alpha/beta changes by <= 1e-3 relatively; 1e-5 added to
  the denominators), using one SVD of F shared by all classes. The evidence is
    L = D/2 log alpha + N/2 log beta - 1/2 sum_i log(alpha + beta s_i^2)
        - beta/2 ||y - F m||^2 - alpha/2 ||m||^2 - N/2 log 2 pi,   divided by N.

  Two variants differ only in which eigenvalues s_i^2 of F^T F the log-determinant runs over:

  * 'exact' (default): all D of them, zeros included, i.e. log det(alpha I + beta F^T F), the
    evidence as the paper defines it.
  * 'published': what the authors' published code computes (github.com/thuml/LogME, LogME.py,
    `LogME._fit_fixed_point`, the default `_fit`): it works in the SVD basis of F and sums over
    only the singular values it keeps, min(N, D) of them when N <= D (`np.linalg.svd(f,
    full_matrices=False)`), and for N > D those of the eigendecomposition of F^T F whose square
    root exceeds 1e-10 (`truncated_svd`). When fewer than D values are kept (N < D, or dead
    units / collinear features when N > D) it lacks (D - kept) * log(alpha) in the
    log-determinant, so its value is (D - kept) / (2N) * log(alpha) above the exact one (alpha,
    beta and m are the same). Published LogME numbers were computed this way: use it to compare
    with them. With N > D and F of full column rank the two agree to rounding.

  Classes are the distinct label values; the published code loops over 0..max(label) instead, so
  with labels 0..K-1 (as here everywhere) both loop over the same classes.

  Args:
    features: (N, D) penultimate features (computed in float64).
    labels: (N,) integer target labels; classes are the distinct values present.
    variant: 'exact' or 'published' (see above).

  Returns:
    The LogME score (larger is better).

  Raises:
    InputError: wrong rank, label count mismatch, fewer than 2 classes, non-finite features,
      unknown variant.
  """
  if variant not in LOGME_VARIANTS:
    raise InputError(f"logme: variant {variant!r} is not one of {', '.join(LOGME_VARIANTS)}")
  f, y_idx, k = _check_features(features, labels, "logme")
  n, d = f.shape
  if variant == "published" and n > d:
    # The published code's route for N > D: eigen-decompose F^T F, keep sqrt(eig) > 1e-10.
    lam, vecs = np.linalg.eigh(f.T @ f)
    s = np.sqrt(np.clip(lam, 0.0, None))
    keep = s > 1e-10
    s, vecs = s[keep], vecs[:, keep]
    u = (f @ vecs) / s
  else:
    u, s, _ = np.linalg.svd(f, full_matrices=False)
  sigma = (s ** 2)[:, None]                                   # (r, 1), r kept directions
  y = np.eye(k)[y_idx]                                        # (N, K) one-vs-rest targets
  x2 = (u.T @ y) ** 2                                         # (r, K) energy along each direction
  # Energy of y outside F's column space: reached by no w, always part of the residual.
  res_out = np.maximum(np.sum(y * y, axis=0) - np.sum(x2, axis=0), 0.0)
  alpha, beta = np.ones(k), np.ones(k)
  m2, res2 = np.zeros(k), np.zeros(k)
  active = np.ones(k, bool)
  for _ in range(_LOGME_MAX_ITERS):
    t = alpha / beta
    gamma = np.sum(sigma / (sigma + t), axis=0)
    new_m2 = np.sum(sigma * x2 / (t + sigma) ** 2, axis=0)
    new_res2 = np.sum(x2 / (1.0 + sigma / t) ** 2, axis=0) + res_out
    new_alpha = gamma / (new_m2 + _LOGME_EPS)
    new_beta = (n - gamma) / (new_res2 + _LOGME_EPS)
    # Each class keeps the values of its last step before convergence, as the per-class loop does.
    alpha, beta = np.where(active, new_alpha, alpha), np.where(active, new_beta, beta)
    m2, res2 = np.where(active, new_m2, m2), np.where(active, new_res2, res2)
    active &= np.abs(new_alpha / new_beta - t) / t > _LOGME_TOL
    if not active.any():
      break
  logdet = np.sum(np.log(alpha + beta * sigma), axis=0)
  if variant == "exact":
    logdet = logdet + (d - sigma.shape[0]) * np.log(alpha)    # the zero eigenvalues of F^T F
  evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - logdet / 2 - beta / 2 * res2
              - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
  return float(np.mean(evidence / n))


def leep(source_probs: npt.ArrayLike, labels: npt.ArrayLike) -> float:
  """LEEP (Nguyen et al. 2020): log expected empirical prediction.

  With theta(x_i) the source model's softmax over source classes z, the empirical joint is
  P(y, z) = 1/N sum_{i: y_i = y} theta_z(x_i), P(y | z) = P(y, z) / P(z), and
  LEEP = 1/N sum_i log sum_z P(y_i | z) theta_z(x_i). A source class with P(z) = 0 (probability 0 on
  every image) gets P(y | z) = 0; it multiplies zeros anyway.

  Args:
    source_probs: (N, K_src) source-model probabilities, rows summing to 1 (not logits).
    labels: (N,) integer target labels.

  Returns:
    The LEEP score (<= 0, larger is better).

  Raises:
    InputError: wrong rank, label count mismatch, fewer than 2 classes, rows that are not
      probability vectors.
  """
  p, y_idx, k = _check_features(source_probs, labels, "leep")
  if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-2):
    raise InputError("leep: expected source_probs to be non-negative rows summing to 1 (softmax "
                     "outputs, not logits)")
  joint = np.zeros((k, p.shape[1]))
  np.add.at(joint, y_idx, p / p.shape[0])
  pz = joint.sum(axis=0)
  cond = np.divide(joint, pz, out=np.zeros_like(joint), where=pz > 0)      # P(y | z)
  eep = np.sum(p * cond[y_idx], axis=1)
  return float(np.mean(np.log(eep)))


def nce(source_predictions: npt.ArrayLike, labels: npt.ArrayLike) -> float:
  """NCE (Tran et al. 2019): negative conditional entropy -H(Y | Z), natural log.

  Z is the source model's hard prediction. P(y, z) is the empirical joint of (target label, source
  prediction) and H(Y | Z) = -sum_{y, z} P(y, z) log(P(y, z) / P(z)).

  Args:
    source_predictions: (N,) integer source-class predictions, or (N, K_src) source scores or
      probabilities, reduced by argmax.
    labels: (N,) integer target labels.

  Returns:
    The NCE score (<= 0, larger is better; 0 when the prediction determines the label).

  Raises:
    InputError: wrong rank, label count mismatch, fewer than 2 classes.
  """
  z = np.asarray(source_predictions)
  if z.ndim == 2:
    z = np.argmax(z, axis=1)
  elif z.ndim != 1 or (z.size and not np.issubdtype(z.dtype, np.integer)):
    raise InputError(f"nce: expected integer predictions (N,) or scores (N, K_src), got shape "
                     f"{z.shape} and dtype {z.dtype}")
  _, y_idx, k = _check_features(z[:, None].astype(np.float64), labels, "nce")
  _, z_idx = np.unique(z, return_inverse=True)
  joint = np.zeros((k, int(z_idx.max()) + 1))
  np.add.at(joint, (y_idx, z_idx.reshape(-1)), 1.0 / len(z))
  pz = np.broadcast_to(joint.sum(axis=0), joint.shape)
  seen = joint > 0
  return float(np.sum(joint[seen] * np.log(joint[seen] / pz[seen])))


def h_score(features: npt.ArrayLike, labels: npt.ArrayLike, *, rcond: float = 1e-10) -> float:
  """H-score (Bao et al. 2019): tr(cov(f)^+ cov(E[f | y])).

  Both covariances use the N - 1 normaliser, as in the authors' code (it cancels). cov(f)^+ is the
  Moore-Penrose pseudo-inverse (no ridge), with eigenvalues below rcond * the largest one treated as
  zero; the authors use rcond = 1e-15, which lets rounding noise in singular covariances (N <= D,
  dead units) dominate, hence the larger default. Both agree for a well-conditioned cov(f).

  Args:
    features: (N, D) penultimate features (computed in float64).
    labels: (N,) integer target labels.
    rcond: relative cut-off of the pseudo-inverse.

  Returns:
    The H-score (larger is better; at most K - 1).

  Raises:
    InputError: wrong rank, label count mismatch, fewer than 2 classes.
  """
  f, y_idx, k = _check_features(features, labels, "h_score")
  n = f.shape[0]
  centred = f - f.mean(axis=0)
  cov_f = centred.T @ centred / (n - 1)
  counts = np.bincount(y_idx, minlength=k).astype(np.float64)
  class_means = np.zeros((k, f.shape[1]))
  np.add.at(class_means, y_idx, centred)
  class_means /= counts[:, None]
  # g_i = E[f | y_i] has mean 0 after centring, so cov(g) = sum_k n_k mu_k mu_k^T / (N - 1).
  cov_g = (class_means.T * counts) @ class_means / (n - 1)
  inv = np.linalg.pinv(cov_f, rcond=rcond, hermitian=True)
  return float(np.sum(inv * cov_g))                 # tr(A B) for symmetric A, B


def _check_features(features, labels, what: str) -> tuple[np.ndarray, np.ndarray, int]:
  """Validates (N, D) features and (N,) labels; returns float64 features, class indices, K."""
  f = np.asarray(features, dtype=np.float64)
  if f.ndim != 2:
    raise InputError(f"{what}: expected features of rank 2 (N, D), got shape {f.shape}")
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != f.shape[0]:
    raise InputError(f"{what}: expected labels of shape ({f.shape[0]},), got {labels.shape}")
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise InputError(f"{what}: expected integer labels, got dtype {labels.dtype}")
  if not np.all(np.isfinite(f)):
    raise InputError(f"{what}: features contain NaN or infinite values")
  classes, y_idx = np.unique(labels, return_inverse=True)
  if len(classes) < 2:
    raise InputError(f"{what}: needs labels from at least 2 classes, got {len(classes)}")
  return f, y_idx.reshape(-1), len(classes)


# ------------------------------------------------------------------------------------------------
# Normalisation, combination, alpha sweep
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlphaSweep:
  """Spearman of C_ij(alpha) against accuracy, per alpha and per group.

  Attributes:
    alphas: (A,) alpha values, 0 to 1.
    groups: group labels, in order of first appearance.
    spearman: (A, G) Spearman per alpha and group (NaN where C_ij is constant in a group).
    mean: (A,) mean over groups.
    var: (A,) population variance (ddof 0) over groups.
    best_alpha: alpha with the largest mean (the smallest such alpha on ties; NaN means skipped).
    best_mean: mean Spearman at best_alpha.
    best_var: variance over groups at best_alpha.
  """
  alphas: np.ndarray
  groups: tuple
  spearman: np.ndarray
  mean: np.ndarray
  var: np.ndarray
  best_alpha: float
  best_mean: float
  best_var: float


def stack_metrics(entries: Sequence[Mapping[str, float]]) -> dict[str, np.ndarray]:
  """Turns one metrics dict per (model, task) entry into one array per metric.

  Args:
    entries: e.g. the outputs of `feature_map_metrics`, all with the same keys.

  Returns:
    {name: (E,) float64 array}, entries in the given order.

  Raises:
    InputError: no entries, or entries with different keys.
  """
  if not entries:
    raise InputError("stack_metrics got no entries")
  keys = list(entries[0])
  for i, e in enumerate(entries):
    if set(e) != set(keys):
      raise InputError(f"stack_metrics: entry {i} has keys {sorted(e)}, expected {sorted(keys)}")
  return {key: np.array([e[key] for e in entries], np.float64) for key in keys}


def normalize_metrics(metrics: Mapping[str, npt.ArrayLike], *,
                      negate: Iterable[str] = SMALLER_IS_BETTER) -> dict[str, np.ndarray]:
  """Scales each metric to [-1, 1] over all the entries given; negates smaller-is-better ones.

  Min-max scaling, 2 (x - min) / (max - min) - 1, over every (model, task) entry at once, as the
  paper scales "considering all the network architectures and target tasks"; then metrics named in
  `negate` are multiplied by -1 so that larger is better for all. A metric constant over all
  entries maps to 0. NaN entries stay NaN and are ignored for min and max.

  Args:
    metrics: {name: (E,) values}, one value per entry (see `stack_metrics`).
    negate: names to negate; by default S2, S4, S5, S6. Names absent from `metrics` are ignored.

  Returns:
    {name: (E,) float64 array in [-1, 1]}.

  Raises:
    InputError: a metric that is not a non-empty 1-D array.
  """
  negate = set(negate)
  out = {}
  for name, values in metrics.items():
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or x.size == 0 or np.all(np.isnan(x)):
      raise InputError(f"normalize_metrics: expected {name!r} as a non-empty 1-D array of numbers, "
                       f"got shape {x.shape}")
    lo, hi = np.nanmin(x), np.nanmax(x)
    scaled = np.zeros_like(x) if hi == lo else 2.0 * (x - lo) / (hi - lo) - 1.0
    scaled[np.isnan(x)] = np.nan
    out[name] = -scaled if name in negate else scaled
  return out


def combine(s_i: npt.ArrayLike, s_j: npt.ArrayLike, alpha: float) -> np.ndarray:
  """C_ij(alpha) = (1 - alpha) S_i + alpha S_j, on normalised metrics.

  Args:
    s_i: (E,) normalised metric i.
    s_j: (E,) normalised metric j.
    alpha: weight of S_j, in [0, 1].

  Returns:
    (E,) combined metric.

  Raises:
    InputError: shapes differ or alpha outside [0, 1].
  """
  s_i, s_j = np.asarray(s_i, np.float64), np.asarray(s_j, np.float64)
  if s_i.shape != s_j.shape:
    raise InputError(f"combine: metrics have different shapes {s_i.shape} and {s_j.shape}")
  if not 0.0 <= alpha <= 1.0:
    raise InputError(f"combine: alpha must be in [0, 1], got {alpha}")
  return (1.0 - alpha) * s_i + alpha * s_j


def alpha_sweep(s_i: npt.ArrayLike, s_j: npt.ArrayLike, target: npt.ArrayLike,
                groups: Sequence[Hashable] | None = None, *, step: float = 0.001) -> AlphaSweep:
  """Spearman of C_ij(alpha) with the target for alpha = 0, step, ..., 1, per group.

  Spearman is computed per group (e.g. per (architecture, target task), ranking the models of that
  group) and then averaged over groups, as in the paper's Fig. 3 and its C_56(0.574) = 0.7514.

  Args:
    s_i: (E,) normalised metric i (see `normalize_metrics`).
    s_j: (E,) normalised metric j.
    target: (E,) fine-tuned accuracy per entry.
    groups: (E,) group label per entry (any hashable: strings, tuples); None for one group.
    step: alpha increment; 1 / step should be a whole number.

  Returns:
    An `AlphaSweep`.

  Raises:
    InputError: shape mismatch, a group with fewer than 2 entries, bad step.
  """
  s_i, s_j, target = _check_vectors(s_i, s_j, target, what="alpha_sweep")
  if not 0.0 < step <= 1.0:
    raise InputError(f"alpha_sweep: step must be in (0, 1], got {step}")
  alphas = np.linspace(0.0, 1.0, int(round(1.0 / step)) + 1)
  labels, index = _split_groups(groups, len(target), "alpha_sweep")
  rho = np.stack([_spearman_rows(np.outer(1.0 - alphas, s_i[idx]) + np.outer(alphas, s_j[idx]),
                                 target[idx]) for idx in index], axis=1)
  mean, var = rho.mean(axis=1), rho.var(axis=1)
  best = int(np.nanargmax(mean)) if np.any(np.isfinite(mean)) else 0
  return AlphaSweep(alphas=alphas, groups=labels, spearman=rho, mean=mean, var=var,
                    best_alpha=float(alphas[best]), best_mean=float(mean[best]),
                    best_var=float(var[best]))


def sweep_pairs(normalized: Mapping[str, npt.ArrayLike], target: npt.ArrayLike,
                groups: Sequence[Hashable] | None = None, *,
                step: float = 0.001) -> dict[tuple[str, str], AlphaSweep]:
  """`alpha_sweep` for every pair (i, j), i before j in the mapping's order (paper Fig. 3).

  Args:
    normalized: {name: (E,)} normalised metrics, e.g. S1..S6.
    target: (E,) fine-tuned accuracy.
    groups: (E,) group labels, or None.
    step: alpha increment.

  Returns:
    {(name_i, name_j): AlphaSweep}.
  """
  names = list(normalized)
  return {(a, b): alpha_sweep(normalized[a], normalized[b], target, groups, step=step)
          for n, a in enumerate(names) for b in names[n + 1:]}


def _spearman_rows(values: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Spearman of each row of `values` (A, M) with `target` (M,): Pearson of average ranks."""
  rv = scipy.stats.rankdata(values, axis=1)
  rt = scipy.stats.rankdata(target)
  rv -= rv.mean(axis=1, keepdims=True)
  rt -= rt.mean()
  den = np.sqrt(np.sum(rv * rv, axis=1) * np.sum(rt * rt))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, rv @ rt / den, np.nan)


# ------------------------------------------------------------------------------------------------
# Rank correlation and target-blind baselines
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankSummary:
  """Rank correlation of one scorer with accuracy, per group.

  Attributes:
    groups: group labels, in order of first appearance.
    spearman: (G,) Spearman per group.
    weighted_tau: (G,) weighted Kendall tau per group.
  """
  groups: tuple
  spearman: np.ndarray
  weighted_tau: np.ndarray

  def as_dict(self) -> dict:
    """Means, population variances (ddof 0) and per-group values, JSON-ready."""
    return {
        "spearman_mean": float(np.mean(self.spearman)),
        "spearman_var": float(np.var(self.spearman)),
        "weighted_tau_mean": float(np.mean(self.weighted_tau)),
        "weighted_tau_var": float(np.var(self.weighted_tau)),
        "per_group": {str(g): {"spearman": float(r), "weighted_tau": float(t)}
                      for g, r, t in zip(self.groups, self.spearman, self.weighted_tau)},
    }


def spearman(scores: npt.ArrayLike, target: npt.ArrayLike) -> float:
  """Spearman rank correlation (average ranks for ties); NaN if either side is constant.

  Args:
    scores: (M,) predicted transferability, larger meaning better.
    target: (M,) fine-tuned accuracy.

  Returns:
    rho in [-1, 1].
  """
  scores, target = _check_vectors(scores, target, what="spearman")
  if np.ptp(scores) == 0 or np.ptp(target) == 0:
    return float("nan")
  return float(scipy.stats.spearmanr(scores, target).statistic)


def weighted_tau(scores: npt.ArrayLike, target: npt.ArrayLike) -> float:
  """Weighted Kendall tau (scipy.stats.weightedtau, hyperbolic weights on rank).

  Swaps among the top-ranked models weigh more than swaps among the bottom ones, which is what
  matters when the score is used to pick a model. scipy averages the weighting by `scores`' ranking
  and by `target`'s.

  Args:
    scores: (M,) predicted transferability, larger meaning better.
    target: (M,) fine-tuned accuracy.

  Returns:
    tau_w in [-1, 1] (NaN if either side is constant).
  """
  scores, target = _check_vectors(scores, target, what="weighted_tau")
  if np.ptp(scores) == 0 or np.ptp(target) == 0:
    return float("nan")
  return float(scipy.stats.weightedtau(scores, target).statistic)


def ranks(scores: npt.ArrayLike) -> np.ndarray:
  """1-based ranks, 1 = largest score (predicted best), ties sharing their average rank.

  Args:
    scores: (M,) scores.

  Returns:
    (M,) float ranks.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1:
    raise InputError(f"ranks: expected a 1-D array of scores, got shape {scores.shape}")
  return scipy.stats.rankdata(-scores)


def target_blind_scores(*, source_accuracy: npt.ArrayLike | None = None,
                        param_count: npt.ArrayLike | None = None) -> dict[str, np.ndarray]:
  """Target-blind baselines as scores, larger meaning predicted better, for `rank_correlations`.

  Both are taken as given: higher source accuracy and more parameters predict better transfer.
  Reports should list them next to S1..S6, LogME, LEEP, NCE and H-score, since such baselines
  often rank models about as well.

  Args:
    source_accuracy: (E,) accuracy of each model on its source task, or None.
    param_count: (E,) parameter count of each model, or None.

  Returns:
    {'source_accuracy': ..., 'param_count': ...} for the arguments given.
  """
  out = {}
  for name, values in (("source_accuracy", source_accuracy), ("param_count", param_count)):
    if values is not None:
      x = np.asarray(values, np.float64)
      if x.ndim != 1:
        raise InputError(f"target_blind_scores: expected {name} as a 1-D array, got shape {x.shape}")
      out[name] = x
  return out


def rank_correlations(scores: Mapping[str, npt.ArrayLike], target: npt.ArrayLike,
                      groups: Sequence[Hashable] | None = None) -> dict[str, RankSummary]:
  """Spearman and weighted Kendall tau of every scorer with accuracy, per group.

  All scorers (feature-map metrics, combinations, LogME, LEEP, NCE, H-score, target-blind
  baselines) are treated the same way, so the report can put them side by side. Orient every score
  so that larger means predicted better (e.g. use `normalize_metrics` output, or negate raw S2).

  Args:
    scores: {name: (E,) score per entry}.
    target: (E,) fine-tuned accuracy per entry.
    groups: (E,) group label per entry (e.g. target task, or (arch, task)); None for one group.

  Returns:
    {name: RankSummary}.

  Raises:
    InputError: shape mismatch or a group with fewer than 2 entries.
  """
  target = np.asarray(target, np.float64)
  if target.ndim != 1:
    raise InputError(f"rank_correlations: expected target as a 1-D array, got shape {target.shape}")
  labels, index = _split_groups(groups, len(target), "rank_correlations")
  out = {}
  for name, values in scores.items():
    values, _ = _check_vectors(values, target, what=f"rank_correlations[{name!r}]")
    out[name] = RankSummary(
        groups=labels,
        spearman=np.array([spearman(values[i], target[i]) for i in index]),
        weighted_tau=np.array([weighted_tau(values[i], target[i]) for i in index]))
  return out


def _check_vectors(*arrays, what: str) -> list[np.ndarray]:
  """Converts to float64 1-D arrays of one common length >= 2."""
  out = [np.asarray(a, np.float64) for a in arrays]
  shapes = {a.shape for a in out}
  if len(shapes) != 1 or out[0].ndim != 1:
    raise InputError(f"{what}: expected 1-D arrays of one length, got shapes "
                     f"{[a.shape for a in out]}")
  if out[0].shape[0] < 2:
    raise InputError(f"{what}: needs at least 2 entries to rank, got {out[0].shape[0]}")
  return out


def _split_groups(groups, n: int, what: str) -> tuple[tuple, list[np.ndarray]]:
  """Group labels in order of first appearance and the entry indices of each."""
  if groups is None:
    return ("all",), [np.arange(n)]
  groups = list(groups)
  if len(groups) != n:
    raise InputError(f"{what}: expected {n} group labels, one per entry, got {len(groups)}")
  members: dict = {}
  for i, g in enumerate(groups):
    members.setdefault(g, []).append(i)
  for g, idx in members.items():
    if len(idx) < 2:
      raise InputError(f"{what}: group {g!r} has {len(idx)} entry; rank correlation needs at least 2")
  return tuple(members), [np.array(idx) for idx in members.values()]
