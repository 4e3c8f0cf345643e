"""Kronecker-product analysis of convolution layers (cwl-weighting-convolution, sec. III, Fig. 1).

Van Loan & Pitsianis (1993): for A of shape (m1*m2, n1*n2), B (m1, n1) and C (m2, n2),

    ||A - kron(B, C)||_F = ||R(A) - vec(B) vec(C)^T||_F,

so the best sum of k Kronecker products is a rank-k truncated SVD of the rearrangement R(A).

Conventions (used everywhere in this module):
* vec is row-major: vec(X)[i * n + j] = X[i, j] (numpy `X.reshape(-1)`), not the column-major vec
  of Van Loan's paper; the identity holds for either as long as R uses the same one.
* A is an m1 x n1 grid of m2 x n2 blocks, A[i1*m2 + i2, j1*n2 + j2] = A_{i1 j1}[i2, j2].
* R(A) has one row per block, blocks in row-major grid order, each row the block's row-major vec:
  R(A)[i1*n1 + j1, i2*n2 + j2] = A[i1*m2 + i2, j1*n2 + j2], shape (m1*n1, m2*n2).

Convolution (paper eq. 3-5): a conv kernel (H, W, I, O) in Flax HWIO layout is read as the filter
matrix V of shape (O, H*W*I), one row per output filter, each row the filter vectorised in
(h, w, i) row-major order. For an input image A (Hin, Win, I) cut into non-overlapping H x W
patches (stride = filter size, as in the paper's sec. III-C), `im2col_nonoverlap(A)` is R(A)
with one row per patch, and R(A) V^T is the convolution output (eq. 3). For a one-channel image
this im2col is exactly the Van Loan rearrangement with b_shape = (Hin/H, Win/W), c_shape = (H, W).
Least-squares feature maps for given filters (eq. 4-5) are U = R(A) V^T (V V^T)^{-1}; the paper
writes (V^T V)^{-1}, but with V of shape (k, whc) the k x k matrix that makes the product
well-defined is the filter Gram V V^T, which Fig. 1 shows per layer.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer.errors import InputError

GRAM_KINDS = ("gram", "cosine", "covariance")
Shape2 = tuple[int, int]

# ----------------------------------------------------------------------------------------------
# Van Loan rearrangement and rank-k Kronecker approximation.


def _pair(shape: Sequence[int], name: str) -> Shape2:
  if len(shape) != 2 or any(int(s) < 1 for s in shape):
    raise InputError(f"{name} must be two positive sizes (rows, cols), got {tuple(shape)}")
  return int(shape[0]), int(shape[1])


def _check_blocks(shape: Sequence[int], b_shape: Sequence[int],
                  c_shape: Sequence[int]) -> tuple[Shape2, Shape2]:
  (m1, n1), (m2, n2) = _pair(b_shape, "b_shape"), _pair(c_shape, "c_shape")
  if len(shape) != 2:
    raise InputError(f"the matrix to rearrange must be 2-D, got shape {tuple(shape)}")
  if tuple(shape) != (m1 * m2, n1 * n2):
    raise InputError(f"a matrix of shape {tuple(shape)} is not a grid of blocks for b_shape "
                     f"{(m1, n1)} and c_shape {(m2, n2)}: expected {(m1 * m2, n1 * n2)}")
  return (m1, n1), (m2, n2)


def van_loan_rearrange(a: jax.Array, b_shape: Sequence[int], c_shape: Sequence[int]) -> jax.Array:
  """R(A): one row per (m2 x n2) block of A, the block's row-major vec (see module docstring).

  Args:
    a: (m1*m2, n1*n2) matrix.
    b_shape: (m1, n1), the shape of the left Kronecker factor B.
    c_shape: (m2, n2), the shape of the right Kronecker factor C (the block size).

  Returns:
    (m1*n1, m2*n2) matrix with ||A - kron(B, C)||_F = ||R(A) - vec(B) vec(C)^T||_F.

  Raises:
    InputError: if `a` is not 2-D or the block sizes do not tile its shape.
  """
  (m1, n1), (m2, n2) = _check_blocks(jnp.shape(a), b_shape, c_shape)
  return jnp.asarray(a).reshape(m1, m2, n1, n2).transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)


def van_loan_inverse(r: jax.Array, b_shape: Sequence[int], c_shape: Sequence[int]) -> jax.Array:
  """Inverse of `van_loan_rearrange`: rebuilds A (m1*m2, n1*n2) from R(A) (m1*n1, m2*n2).

  Args:
    r: (m1*n1, m2*n2) rearranged matrix.
    b_shape: (m1, n1).
    c_shape: (m2, n2).

  Returns:
    The (m1*m2, n1*n2) matrix A.
  """
  (m1, n1), (m2, n2) = _pair(b_shape, "b_shape"), _pair(c_shape, "c_shape")
  if jnp.shape(r) != (m1 * n1, m2 * n2):
    raise InputError(f"R(A) for b_shape {(m1, n1)} and c_shape {(m2, n2)} must have shape "
                     f"{(m1 * n1, m2 * n2)}, got {jnp.shape(r)}")
  return jnp.asarray(r).reshape(m1, n1, m2, n2).transpose(0, 2, 1, 3).reshape(m1 * m2, n1 * n2)


class KronApprox(NamedTuple):
  """A ~= sum_r kron(b[r], c[r]).

  Attributes:
    b: (k, m1, n1) left factors, each scaled by sqrt(sigma_r) as in the paper.
    c: (k, m2, n2) right factors, each scaled by sqrt(sigma_r).
    singular_values: all singular values of R(A), descending (not only the k kept).
  """
  b: jax.Array
  c: jax.Array
  singular_values: jax.Array


def kron_approx(a: jax.Array, b_shape: Sequence[int], c_shape: Sequence[int],
                rank: int) -> KronApprox:
  """Best rank-k Kronecker approximation A ~= sum_{r<k} B_r kron C_r (truncated SVD of R(A)).

  By the Van Loan identity and Eckart-Young this minimises the Frobenius error over all sums of
  `rank` Kronecker products with these factor shapes; rank = min(m1*n1, m2*n2) is exact.

  Args:
    a: (m1*m2, n1*n2) matrix.
    b_shape: (m1, n1).
    c_shape: (m2, n2).
    rank: number of Kronecker terms k, 1 <= k <= min(m1*n1, m2*n2).

  Returns:
    A `KronApprox`.

  Raises:
    InputError: on bad block sizes or a rank outside [1, min(m1*n1, m2*n2)].
  """
  (m1, n1), (m2, n2) = _check_blocks(jnp.shape(a), b_shape, c_shape)
  max_rank = min(m1 * n1, m2 * n2)
  if not 1 <= rank <= max_rank:
    raise InputError(f"rank must be in [1, {max_rank}] for these block sizes, got {rank}")
  return KronApprox(*_kron_approx(jnp.asarray(a), (m1, n1), (m2, n2), int(rank)))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _kron_approx(a: jax.Array, b_shape: Shape2, c_shape: Shape2,
                 rank: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  # One compiled program per (shape, rank): eager dispatch would compile each sliced op apart.
  (m1, n1), (m2, n2) = b_shape, c_shape
  u, s, vt = jnp.linalg.svd(van_loan_rearrange(a, b_shape, c_shape), full_matrices=False)
  root = jnp.sqrt(s[:rank])  # split sigma evenly between the two factors (paper, sec. III-A)
  b = (u[:, :rank] * root).T.reshape(rank, m1, n1)
  c = (vt[:rank] * root[:, None]).reshape(rank, m2, n2)
  return b, c, s


def kron_sum(b: jax.Array, c: jax.Array) -> jax.Array:
  """sum_r kron(b[r], c[r]) for stacked factors b (k, m1, n1) and c (k, m2, n2).

  Args:
    b: (k, m1, n1) left factors.
    c: (k, m2, n2) right factors.

  Returns:
    (m1*m2, n1*n2) matrix.
  """
  if jnp.ndim(b) != 3 or jnp.ndim(c) != 3 or jnp.shape(b)[0] != jnp.shape(c)[0]:
    raise InputError(f"kron_sum expects stacks (k, m1, n1) and (k, m2, n2), got {jnp.shape(b)} "
                     f"and {jnp.shape(c)}")
  k, m1, n1 = jnp.shape(b)
  _, m2, n2 = jnp.shape(c)
  # kron(B, C)[i1*m2+i2, j1*n2+j2] = B[i1, j1] C[i2, j2], summed over r in one einsum
  return jnp.einsum("rac,rbd->abcd", b, c).reshape(m1 * m2, n1 * n2)


def relative_errors_from_singular_values(s: np.ndarray, ranks: Sequence[int]) -> np.ndarray:
  """||A - A_k||_F / ||A||_F for each k, from the singular values of R(A) (Eckart-Young).

  Args:
    s: singular values, any order.
    ranks: the k values.

  Returns:
    float64 array, one relative error per k (0 for an all-zero matrix).
  """
  s2 = np.sort(np.asarray(s, np.float64) ** 2)[::-1]
  total = s2.sum()
  tail = np.concatenate([np.cumsum(s2[::-1])[::-1], [0.0]])  # tail[k] = sum_{r>=k} s_r^2
  ks = np.clip(np.asarray(ranks, int), 0, s2.size)
  return np.sqrt(tail[ks] / total) if total > 0 else np.zeros(len(ks))


# ----------------------------------------------------------------------------------------------
# Convolution kernels as matrices.


def filter_matrix(kernel: jax.Array) -> jax.Array:
  """V: one row per output filter, each filter vectorised in (h, w, i) row-major order.

  Args:
    kernel: conv kernel (H, W, I, O) in Flax HWIO layout, or a dense kernel (I, O).

  Returns:
    (O, H*W*I) matrix (or (O, I) for a dense kernel).

  Raises:
    InputError: if the kernel is neither 4-D nor 2-D.
  """
  kernel = jnp.asarray(kernel)
  if kernel.ndim not in (2, 4):
    raise InputError(f"expected an HWIO conv kernel or an (in, out) dense kernel, got shape "
                     f"{kernel.shape}")
  return kernel.reshape(-1, kernel.shape[-1]).T


def im2col_nonoverlap(image: jax.Array, patch: Sequence[int]) -> jax.Array:
  """The paper's R(A): non-overlapping patches of an image, one row per patch.

  Rows follow the patch grid in row-major order; each row is the patch in (h, w, c) row-major
  order, matching `filter_matrix`, so `im2col_nonoverlap(A, (H, W)) @ filter_matrix(k).T` is the
  stride-(H, W), VALID convolution of A with k, one column per output channel (eq. 3).

  Args:
    image: (Hin, Win, C) image or feature map.
    patch: (H, W) patch (filter) size; must divide (Hin, Win).

  Returns:
    ((Hin/H) * (Win/W), H*W*C) matrix.

  Raises:
    InputError: if `image` is not 3-D or the patch size does not divide it.
  """
  h, w = _pair(patch, "patch")
  if jnp.ndim(image) != 3:
    raise InputError(f"im2col_nonoverlap expects an (H, W, C) image, got shape {jnp.shape(image)}")
  hin, win, c = jnp.shape(image)
  if hin % h or win % w:
    raise InputError(f"patch {(h, w)} does not tile an image of size {(hin, win)}")
  grid = jnp.asarray(image).reshape(hin // h, h, win // w, w, c).transpose(0, 2, 1, 3, 4)
  return grid.reshape((hin // h) * (win // w), h * w * c)


def least_squares_feature_maps(patches: jax.Array, kernel: jax.Array) -> jax.Array:
  """U = R(A) V^T (V V^T)^+, the best U for min ||R(A) - U V||_F given filters V (eq. 4-5).

  With orthonormal filters (V V^T = I) this is the plain convolution R(A) V^T; the pseudo-inverse
  keeps it defined for redundant (rank-deficient) filter banks.

  Args:
    patches: R(A), (num_patches, H*W*I), e.g. from `im2col_nonoverlap`.
    kernel: (H, W, I, O) kernel.

  Returns:
    (num_patches, O) feature maps.
  """
  v = filter_matrix(kernel)
  if jnp.ndim(patches) != 2 or jnp.shape(patches)[1] != v.shape[1]:
    raise InputError(f"patches must be (num_patches, {v.shape[1]}) for this kernel, got shape "
                     f"{jnp.shape(patches)}")
  return jnp.asarray(patches) @ v.T @ jnp.linalg.pinv(v @ v.T, hermitian=True)


def filter_gram(kernel: jax.Array, kind: str = "gram") -> jax.Array:
  """Per-layer O x O filter matrix, as shown in Fig. 1.

  Args:
    kernel: (H, W, I, O) conv kernel or (I, O) dense kernel.
    kind: 'gram': V V^T (the term in eq. 5); 'cosine': V V^T with unit-norm rows (identity
      means orthogonal filters; zero filters give zero rows); 'covariance': numpy's `np.cov(V)`
      (each filter centred over its own entries, divided by H*W*I - 1).

  Returns:
    (O, O) symmetric matrix.

  Raises:
    InputError: on an unknown kind.
  """
  v = filter_matrix(kernel)
  if kind == "gram":
    return v @ v.T
  if kind == "cosine":
    u = v / jnp.maximum(jnp.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return u @ u.T
  if kind == "covariance":
    if v.shape[1] < 2:
      raise InputError("the covariance of filters needs at least two entries per filter")
    centred = v - v.mean(axis=1, keepdims=True)
    return centred @ centred.T / (v.shape[1] - 1)
  raise InputError(f"unknown filter matrix kind {kind!r}; expected one of {GRAM_KINDS}")


def filter_redundancy(kernel: jax.Array) -> float:
  """Mean |cosine| between distinct filters: 0 for orthogonal filters, 1 for collinear ones.

  A one-number summary of Fig. 1's claim that the first layer holds the most redundant filters.

  Args:
    kernel: (H, W, I, O) conv kernel or (I, O) dense kernel.

  Returns:
    The mean absolute off-diagonal entry of the cosine matrix (0 for a single filter).
  """
  cos = np.abs(np.asarray(filter_gram(kernel, "cosine"), np.float64))
  o = cos.shape[0]
  return float((cos.sum() - np.trace(cos)) / (o * (o - 1))) if o > 1 else 0.0


# ----------------------------------------------------------------------------------------------
# Per-layer reports and figures.


def kernel_kron_shapes(kernel: jax.Array) -> tuple[Shape2, Shape2]:
  """Default Kronecker factor shapes for a layer's filter matrix V (O, H*W*I).

  B_r is (O, H*W), a spatial map per output filter, and C_r is (1, I), a weighting of input
  channels: rank k says how many spatial-times-channel separable terms the layer needs. For
  1x1 convs and dense layers this is the ordinary low-rank SVD of V.

  Args:
    kernel: (H, W, I, O) conv kernel or (I, O) dense kernel.

  Returns:
    (b_shape, c_shape).
  """
  shape = jnp.shape(kernel)
  if len(shape) == 4:
    h, w, i, o = shape
    return (o, h * w), (1, i)
  if len(shape) == 2:
    i, o = shape
    return (o, 1), (1, i)
  raise InputError(f"expected an HWIO conv kernel or an (in, out) dense kernel, got shape {shape}")


def _default_ranks(max_rank: int) -> list[int]:
  ranks, k = [], 1
  while k < max_rank:
    ranks.append(k)
    k *= 2
  return ranks + [max_rank]


def kron_rank_report(kernels: dict[str, jax.Array], ranks: Sequence[int] | None = None,
                     shapes: dict[str, tuple[Shape2, Shape2]] | None = None) -> dict[str, dict]:
  """Relative Kronecker approximation error vs rank k, per layer.

  Each layer's filter matrix V = `filter_matrix(kernel)` is approximated by a sum of k Kronecker
  products; the error ||V - V_k||_F / ||V||_F comes from the singular values of R(V) (float64).

  Args:
    kernels: {layer_name: kernel}, HWIO conv or (in, out) dense kernels.
    ranks: the k to report (clipped to each layer's maximum rank); default 1, 2, 4, ... and the
      maximum rank.
    shapes: optional {layer_name: (b_shape, c_shape)} overriding `kernel_kron_shapes`.

  Returns:
    {layer_name: {'kernel_shape', 'b_shape', 'c_shape', 'max_rank', 'ranks', 'relative_error'}},
    all plain Python values (JSON-ready).
  """
  report = {}
  for name, kernel in kernels.items():
    v = np.asarray(filter_matrix(kernel), np.float64)
    b_shape, c_shape = (shapes or {}).get(name) or kernel_kron_shapes(kernel)
    (m1, n1), (m2, n2) = _check_blocks(v.shape, b_shape, c_shape)
    r = v.reshape(m1, m2, n1, n2).transpose(0, 2, 1, 3).reshape(m1 * n1, m2 * n2)
    s = np.linalg.svd(r, compute_uv=False)
    max_rank = min(r.shape)
    ks = sorted({min(int(k), max_rank) for k in ranks}) if ranks else _default_ranks(max_rank)
    report[name] = {"kernel_shape": list(np.shape(kernel)), "b_shape": [m1, n1],
                    "c_shape": [m2, n2], "max_rank": max_rank, "ranks": ks,
                    "relative_error": relative_errors_from_singular_values(s, ks).tolist()}
  return report


def plot_filter_gram(kernels: dict[str, jax.Array], path: str | os.PathLike, kind: str = "gram",
                     ncols: int = 4, panel_size: float = 3.2) -> str:
  """Writes a Fig. 1-style PNG: one heatmap of the O x O filter matrix per layer.

  Args:
    kernels: {layer_name: kernel}, HWIO conv or (in, out) dense kernels, in panel order.
    path: output PNG path.
    kind: 'gram', 'cosine' or 'covariance' (see `filter_gram`).
    ncols: panels per row.
    panel_size: inches per panel side.

  Returns:
    The path written, as a string.

  Raises:
    InputError: if `kernels` is empty or `kind` is unknown.
  """
  # Figure + Agg canvas directly: no pyplot global state, no dependence on the display backend.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not kernels:
    raise InputError("plot_filter_gram needs at least one layer kernel")
  mats = {name: np.asarray(filter_gram(k, kind)) for name, k in kernels.items()}
  cols = max(1, min(ncols, len(mats)))
  rows = math.ceil(len(mats) / cols)
  fig = Figure(figsize=(panel_size * cols, panel_size * rows), layout="constrained")
  FigureCanvasAgg(fig)
  for i, (name, m) in enumerate(mats.items()):
    ax = fig.add_subplot(rows, cols, i + 1)
    lim = float(np.max(np.abs(m))) or 1.0  # symmetric colour scale so 0 is the neutral colour
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_title(f"{name} ({m.shape[0]} filters)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.colorbar(im, ax=ax, shrink=0.8)
  fig.suptitle(f"filter {kind} matrix per layer", fontsize=10)
  fig.savefig(os.fspath(path), format="png", dpi=100)
  return os.fspath(path)
