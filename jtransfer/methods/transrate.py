"""TransRate (Huang et al., "Frustratingly easy transferability estimation", ICML 2022).

The score of features Z (n x d) for labels y is the mutual information between features and
labels, estimated by coding rates:

  TrR(Z, y) = R(Z, eps) - (1/K) sum_k R(Z_k, eps),   R(Z, eps) = 1/2 logdet(I + Z^T Z / (n eps))

with Z centred, Z_k the rows of class k (n_k of them in R(Z_k)), eps the distortion (1e-4, the
paper's). Larger is better. As in the authors' repository (Long-Kai/TransRate,
generate_transrate/transrate.py), each centred feature vector is scaled to unit L2 norm first
(`normalize`), which makes the score independent of the features' overall scale; the paper's
listing centres only (`normalize=False`). Read, not copied; tested against a hand-derived case.
"""
from __future__ import annotations

import numpy as np

from jtransfer.errors import InputError


def coding_rate(z: np.ndarray, eps: float = 1e-4) -> float:
  """R(Z, eps) = 1/2 logdet(I_d + Z^T Z / (n eps)) of rows Z (n x d)."""
  z = np.asarray(z, np.float64)
  n, d = z.shape
  # det(I_d + Z^T Z c) = det(I_n + Z Z^T c) (Sylvester): the smaller Gram matrix.
  gram = z.T @ z if d <= n else z @ z.T
  sign, logdet = np.linalg.slogdet(np.eye(gram.shape[0]) + gram / (n * eps))
  if sign <= 0:
    raise InputError("coding rate: the matrix I + Z^T Z / (n eps) is not positive definite")
  return 0.5 * float(logdet)


def transrate(features: np.ndarray, labels: np.ndarray, eps: float = 1e-4,
              normalize: bool = True) -> float:
  """TransRate of `features` (n x d) for integer `labels` (n,), larger = more transferable.

  Raises:
    InputError: shapes disagree, fewer than 2 classes, or eps <= 0.
  """
  z = np.asarray(features, np.float64)
  y = np.asarray(labels)
  if z.ndim != 2 or y.shape != (z.shape[0],):
    raise InputError(f"transrate: features {z.shape} and labels {y.shape} must be (n, d), (n,)")
  if not eps > 0:
    raise InputError(f"transrate: eps must be > 0, got {eps}")
  classes = np.unique(y)
  if classes.size < 2:
    raise InputError("transrate: needs at least 2 classes")
  z = z - z.mean(axis=0, keepdims=True)
  if normalize:
    z = z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  conditional = np.mean([coding_rate(z[y == c], eps) for c in classes])
  return coding_rate(z, eps) - float(conditional)
