"""Tests for jtransfer.methods.kronecker (Van Loan rearrangement, rank-k Kronecker, filter Gram)."""
import jax
import numpy as np
import pytest

from jtransfer.errors import InputError
from jtransfer.methods import kronecker as K

_SHAPES = [((2, 3), (4, 5)), ((3, 3), (3, 3)), ((1, 4), (6, 1)), ((5, 2), (2, 7))]


@pytest.mark.parametrize("b_shape,c_shape", _SHAPES)
def test_van_loan_identity(b_shape, c_shape):
  rng = np.random.default_rng(0)
  (m1, n1), (m2, n2) = b_shape, c_shape
  a = rng.normal(size=(m1 * m2, n1 * n2))
  r = np.asarray(K.van_loan_rearrange(a, b_shape, c_shape))
  assert r.shape == (m1 * n1, m2 * n2)
  for _ in range(3):
    b, c = rng.normal(size=b_shape), rng.normal(size=c_shape)
    lhs = np.linalg.norm(a - np.kron(b, c))
    rhs = np.linalg.norm(r - np.outer(b.reshape(-1), c.reshape(-1)))  # row-major vec
    assert lhs == pytest.approx(rhs, rel=1e-5)
  np.testing.assert_allclose(np.asarray(K.van_loan_inverse(r, b_shape, c_shape)), a, atol=1e-6)


def test_rearrange_of_exact_kron_is_rank_one_outer():
  rng = np.random.default_rng(1)
  b, c = rng.normal(size=(2, 3)), rng.normal(size=(4, 2))
  r = np.asarray(K.van_loan_rearrange(np.kron(b, c), (2, 3), (4, 2)))
  np.testing.assert_allclose(r, np.outer(b.ravel(), c.ravel()), atol=1e-6)


def test_bad_block_sizes():
  with pytest.raises(InputError, match="not a grid of blocks"):
    K.van_loan_rearrange(np.zeros((6, 10)), (4, 2), (2, 5))
  with pytest.raises(InputError):
    K.van_loan_rearrange(np.zeros((2, 3, 4)), (1, 1), (2, 3))
  with pytest.raises(InputError, match="rank"):
    K.kron_approx(np.zeros((6, 10)), (2, 2), (3, 5), rank=5)


@pytest.mark.parametrize("b_shape,c_shape", _SHAPES)
def test_full_rank_reconstructs(b_shape, c_shape):
  rng = np.random.default_rng(2)
  a = rng.normal(size=(b_shape[0] * c_shape[0], b_shape[1] * c_shape[1])).astype(np.float32)
  full = min(b_shape[0] * b_shape[1], c_shape[0] * c_shape[1])
  approx = K.kron_approx(a, b_shape, c_shape, full)
  assert approx.b.shape == (full, *b_shape) and approx.c.shape == (full, *c_shape)
  np.testing.assert_allclose(np.asarray(K.kron_sum(approx.b, approx.c)), a, atol=1e-5)


def test_rank_one_of_exact_kron_is_exact():
  rng = np.random.default_rng(3)
  b, c = rng.normal(size=(3, 2)), rng.normal(size=(4, 5))
  a = np.kron(b, c).astype(np.float32)
  approx = K.kron_approx(a, (3, 2), (4, 5), 1)
  np.testing.assert_allclose(np.asarray(K.kron_sum(approx.b, approx.c)), a, atol=1e-5)
  # the factors are B, C up to a scale (and sign) split between them
  np.testing.assert_allclose(np.asarray(np.kron(approx.b[0], approx.c[0])), a, atol=1e-5)


def test_error_decreases_with_rank_and_matches_svd_tail():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(4 * 3, 3 * 5)).astype(np.float32)
  errs, ks = [], [1, 3, 6, 9]  # max rank min(12, 15) = 12
  for k in ks:
    approx = K.kron_approx(a, (4, 3), (3, 5), k)
    errs.append(np.linalg.norm(a - np.asarray(K.kron_sum(approx.b, approx.c))) / np.linalg.norm(a))
  assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:]))
  s = np.asarray(K.kron_approx(a, (4, 3), (3, 5), 1).singular_values)
  np.testing.assert_allclose(K.relative_errors_from_singular_values(s, ks), errs,
                             rtol=1e-4)


def test_kron_approx_is_jittable():
  a = np.arange(24, dtype=np.float32).reshape(4, 6)
  f = jax.jit(lambda x: K.kron_sum(*K.kron_approx(x, (2, 3), (2, 2), 2)[:2]))
  np.testing.assert_allclose(np.asarray(f(a)), a, atol=1e-4)


# ---------------------------------------------------------------- conv kernels


def test_filter_matrix_and_gram_against_numpy():
  rng = np.random.default_rng(5)
  kernel = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)  # HWIO
  v = np.stack([kernel[..., o].reshape(-1) for o in range(6)])  # row o = filter o, (h, w, i)
  np.testing.assert_array_equal(np.asarray(K.filter_matrix(kernel)), v)
  np.testing.assert_allclose(np.asarray(K.filter_gram(kernel)), v @ v.T, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(K.filter_gram(kernel, "covariance")), np.cov(v),
                             rtol=1e-4, atol=1e-5)
  u = v / np.linalg.norm(v, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(K.filter_gram(kernel, "cosine")), u @ u.T, atol=1e-5)
  with pytest.raises(InputError):
    K.filter_gram(kernel, "correlation")


def test_filter_redundancy():
  orth = np.eye(4, dtype=np.float32).reshape(1, 1, 4, 4)  # 4 orthogonal 1x1 filters
  assert K.filter_redundancy(orth) == pytest.approx(0.0)
  same = np.ones((2, 2, 3, 5), np.float32)  # 5 identical filters
  assert K.filter_redundancy(same) == pytest.approx(1.0)


def test_im2col_is_conv_and_van_loan():
  rng = np.random.default_rng(6)
  image = rng.normal(size=(6, 9, 2)).astype(np.float32)
  kernel = rng.normal(size=(2, 3, 2, 5)).astype(np.float32)
  patches = K.im2col_nonoverlap(image, (2, 3))
  assert patches.shape == (3 * 3, 2 * 3 * 2)
  conv = jax.lax.conv_general_dilated(image[None], kernel, window_strides=(2, 3), padding="VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)
  got = np.asarray(patches @ K.filter_matrix(kernel).T)
  np.testing.assert_allclose(got, np.asarray(conv).reshape(9, 5), rtol=1e-5, atol=1e-5)
  # for one channel, the paper's im2col R(A) is exactly the Van Loan rearrangement
  gray = image[..., 0]
  np.testing.assert_array_equal(np.asarray(K.im2col_nonoverlap(gray[..., None], (2, 3))),
                                np.asarray(K.van_loan_rearrange(gray, (3, 3), (2, 3))))
  with pytest.raises(InputError, match="does not tile"):
    K.im2col_nonoverlap(image, (4, 3))


def test_least_squares_feature_maps():
  rng = np.random.default_rng(7)
  # orthonormal filters: eq. 5 reduces to the plain convolution R(A) V^T
  q, _ = np.linalg.qr(rng.normal(size=(12, 4)))
  kernel = q.reshape(2, 2, 3, 4).astype(np.float32)
  patches = rng.normal(size=(10, 12)).astype(np.float32)
  v = q.T
  np.testing.assert_allclose(np.asarray(K.least_squares_feature_maps(patches, kernel)),
                             patches @ v.T, atol=1e-4)
  # general filters: matches numpy least squares min_U ||R - U V||
  kernel = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
  v = kernel.reshape(-1, 4).T
  want = np.linalg.lstsq(v.T, patches.T, rcond=None)[0].T
  np.testing.assert_allclose(np.asarray(K.least_squares_feature_maps(patches, kernel)), want,
                             atol=1e-3)


def test_rank_report():
  rng = np.random.default_rng(8)
  kernels = {"conv1": rng.normal(size=(3, 3, 3, 8)), "conv2": rng.normal(size=(3, 3, 8, 16)),
             "fc": rng.normal(size=(16, 10))}
  rep = K.kron_rank_report(kernels)
  assert rep["conv1"]["b_shape"] == [8, 9] and rep["conv1"]["c_shape"] == [1, 3]
  assert rep["conv1"]["max_rank"] == 3 and rep["conv1"]["ranks"] == [1, 2, 3]
  assert rep["conv2"]["ranks"] == [1, 2, 4, 8] and rep["fc"]["max_rank"] == 10
  for layer in rep.values():
    errs = layer["relative_error"]
    assert all(e1 >= e2 for e1, e2 in zip(errs, errs[1:]))
    assert errs[-1] == pytest.approx(0.0, abs=1e-7)  # full rank is exact
  # explicit factor shapes and ranks, checked against the explicit approximation
  rep = K.kron_rank_report({"conv2": kernels["conv2"]}, ranks=[2, 100],
                           shapes={"conv2": ((4, 3), (4, 24))})
  v = np.asarray(K.filter_matrix(kernels["conv2"]), np.float32)
  approx = K.kron_approx(v, (4, 3), (4, 24), 2)
  want = np.linalg.norm(v - np.asarray(K.kron_sum(approx.b, approx.c))) / np.linalg.norm(v)
  assert rep["conv2"]["ranks"] == [2, 12]
  assert rep["conv2"]["relative_error"][0] == pytest.approx(want, rel=1e-4)


def test_heatmap_png(tmp_path):
  rng = np.random.default_rng(9)
  kernels = {f"conv{i}": rng.normal(size=(3, 3, c, 8)).astype(np.float32)
             for i, c in enumerate([1, 8, 8, 8, 8], start=1)}
  path = K.plot_filter_gram(kernels, tmp_path / "fig1.png", kind="cosine")
  data = (tmp_path / "fig1.png").read_bytes()
  assert path.endswith("fig1.png") and len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(InputError):
    K.plot_filter_gram({}, tmp_path / "empty.png")
