"""SFDA, Self-challenging Fisher Discriminant Analysis (Shao et al., "Not All Models Are
Equal: Predicting Model Transferability in a Self-challenging Fisher Space", ECCV 2022).

A transferability score from features X (n x d) and labels y, larger = better:

  1. regularised FDA: within-class scatter S_w = sum_c prior_c Cov(X_c) and total scatter S_t
     = Cov(X), both shrunk toward their mean eigenvalue as (1 - lam) S + lam (tr S / d) I, with
     lam = exp(-a * sigma_max(S_w)), a = 5 (the paper's adaptive strength: little shrinkage when
     the features spread a lot); S_b = S_t - S_w; the projection V solves the generalised
     eigenproblem S_b v = mu S_w v; class c scores x^T W_c + b_c with W = M V V^T (M the class
     means) and b_c = -1/2 m_c^T W_c + log prior_c, i.e. shrinkage LDA;
  2. self-challenge (ConfMix): each x of class c moves toward the mean of the other classes'
     means by 1 - p(c|x), with p the softmax of the first stage's class probabilities (the
     authors soften the probabilities once more, so p is softmax(softmax(scores)));
  3. the score is the mean probability of the true class under a second FDA (same lam) fitted
     on the mixed features.

Follows the authors' code (TencentARC/SFDA, metrics.py `SFDA_Score`), read, not copied, with one
difference: sigma_max(S_w) is the exact largest eigenvalue, where their `iterative_A` runs 3
power iterations (equal once converged). Stage 1 equals scikit-learn's
`LinearDiscriminantAnalysis(solver='eigen', shrinkage=lam)` (the test checks it). With fewer
images than feature dimensions (few-shot targets) both stages separate the training images
almost perfectly and the score saturates near 1: it ranks nothing there.
"""
from __future__ import annotations

import numpy as np
from scipy import linalg

from jtransfer.errors import InputError

ADAPTIVE_A = 5.0  # the paper's a in lam = exp(-a sigma_max(S_w))


def _shrunk(cov: np.ndarray, lam: float, dim: int | None = None) -> np.ndarray:
  """(1 - lam) cov + lam (tr cov / dim) I, dim the features' full dimension."""
  d = cov.shape[0]
  return (1.0 - lam) * cov + lam * (np.trace(cov) / (dim or d)) * np.eye(d)


def _softmax(s: np.ndarray) -> np.ndarray:
  e = np.exp(s - s.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _within_scatter(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(S_w = sum_c prior_c Cov(X_c), class means (C x d), priors (C,)), classes sorted."""
  classes, yi = np.unique(y, return_inverse=True)
  d = x.shape[1]
  priors = np.bincount(yi) / len(yi)
  means = np.stack([x[yi == c].mean(axis=0) for c in range(len(classes))])
  sw = sum(p * np.cov(x[yi == c].T, bias=True).reshape(d, d) for c, p in enumerate(priors))
  return sw, means, priors


def shrinkage(x: np.ndarray, y: np.ndarray) -> float:
  """lam = max(exp(-a sigma_max(S_w)), 1e-10)."""
  sw, _, _ = _within_scatter(x, y)
  return max(float(np.exp(-ADAPTIVE_A * np.linalg.eigvalsh(sw)[-1])), 1e-10)


def fda_proba(x: np.ndarray, y: np.ndarray, lam: float, dim: int | None = None) -> np.ndarray:
  """Class probabilities (n x C, classes in sorted order) of shrinkage-regularised FDA fitted
  and evaluated on x.

  With every generalised eigenvector kept, as the authors do, W = M V V^T = M S_w^-1 (V^T S_w V
  = I): the class scores need S_w alone, solved here directly. `dim` is the features' full
  dimension when x holds coordinates in a subspace containing every row (see `sfda`).
  """
  sw, means, priors = _within_scatter(x, y)
  coef = linalg.solve(_shrunk(sw, lam, dim), means.T, assume_a="pos").T
  intercept = -0.5 * np.sum(means * coef, axis=1) + np.log(priors)
  return _softmax(x @ coef.T + intercept)


def sfda(features: np.ndarray, labels: np.ndarray) -> float:
  """The SFDA score of `features` (n x d) for integer `labels` (n,).

  Raises:
    InputError: shapes disagree or fewer than 2 classes.
  """
  x = np.array(features, np.float64)
  y = np.asarray(labels)
  if x.ndim != 2 or y.shape != (x.shape[0],):
    raise InputError(f"sfda: features {x.shape} and labels {y.shape} must be (n, d), (n,)")
  classes, yi = np.unique(y, return_inverse=True)
  if classes.size < 2:
    raise InputError("sfda: needs at least 2 classes")
  dim = x.shape[1]
  if x.shape[0] < dim:
    # Fewer images than dimensions: every row (and every class mean, and every ConfMix point)
    # lies in the row space of x, and the shrunk S_w is block diagonal between that space and
    # its complement, so the scores equal those computed in an orthonormal basis of it (with
    # the shrinkage target's tr / dim kept over the full dimension): exact, and d x d -> n x n.
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    x = x @ vt[s > s[0] * 1e-12].T
  lam = shrinkage(x, y)  # S_w's largest eigenvalue is the same in the row space
  prob = _softmax(fda_proba(x, y, lam, dim))  # softened once more, as the authors do
  means = np.stack([x[yi == c].mean(axis=0) for c in range(len(classes))])
  others = (means.sum(axis=0, keepdims=True) - means) / (len(classes) - 1)
  p_true = prob[np.arange(len(yi)), yi][:, None]
  mixed = p_true * x + (1.0 - p_true) * others[yi]
  final = fda_proba(mixed, y, lam, dim)
  return float(final[np.arange(len(yi)), yi].mean())
