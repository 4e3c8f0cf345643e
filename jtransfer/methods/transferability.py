"""Label-aware transferability scores from the literature: LogME and H-score on penultimate
features (N, D), LEEP on source-model softmax outputs (N, K_src), NCE on source hard
predictions. Each is oriented larger-is-better; `jtransfer.methods.selection` re-exports them.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from jtransfer.errors import InputError


# LogME constants from the authors' reference code (thuml/LogME, fixed-point version).
_LOGME_MAX_ITERS = 11
_LOGME_TOL = 1e-3
_LOGME_EPS = 1e-5


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
