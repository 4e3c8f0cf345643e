"""Tests for jtransfer.methods.selection against independent numpy loops and hand-derived values."""

import numpy as np
import pytest
import scipy.stats
import sklearn.metrics

from jtransfer.errors import InputError
from jtransfer.methods import selection as sel


def _maps(rng, n, h, w, c, step=0.25):
  """Post-ReLU-like maps on a 0.25 grid: exact in float32, with zeros and exact ties at max - 1."""
  x = np.maximum(rng.normal(size=(n, h, w, c)) * 2.0, 0.0)
  return (np.round(x / step) * step).astype(np.float32)


def _hard_maps():
  """N=12, 3x3x4 maps with an all-zero channel, an all-zero image, a dense image, a constant channel."""
  rng = np.random.default_rng(0)
  maps = _maps(rng, 12, 3, 3, 4)
  maps[:, :, :, 2] = 0.0               # dead channel in every image
  maps[3] = 0.0                        # all-zero image
  maps[5] = np.abs(maps[5]) + 0.5      # no zero element: S6 denominator guard
  maps[7, :, :, 1] = 1.25              # constant non-zero channel
  labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
  return maps, labels


def _loop_metrics(maps, labels):
  """S1..S6 written directly from the definitions, in float64, one image and one pair at a time."""
  maps = maps.astype(np.float64)
  n = len(maps)
  flat = maps.reshape(n, -1)
  classes = sorted(set(labels.tolist()))
  grand = flat.mean(axis=0)
  s1 = s2 = 0.0
  for k in classes:
    members = flat[labels == k]
    mean_k = members.mean(axis=0)
    s1 += len(members) * np.sum((grand - mean_k) ** 2)
    for f in members:
      s2 += np.sum((mean_k - f) ** 2)
  kk = len(classes)
  s3 = (s1 / (kk - 1)) / (s2 / (n - kk))
  s4 = s5 = s6 = 0.0
  for img in maps:
    c = img.shape[-1]
    for i in range(c):
      for j in range(c):
        a, b = img[:, :, i].ravel(), img[:, :, j].ravel()
        if i != j and a.std() > 0 and b.std() > 0:
          s4 += abs(np.corrcoef(a, b)[0, 1]) / n
    zeros = np.sum(img == 0)
    s5 += zeros / img.size / n
    high = np.sum(img.max() - img < 1)
    s6 += high / max(zeros, 1) / n
  return {"S1": s1, "S2": s2, "S3": s3, "S4": s4, "S5": s5, "S6": s6}


def _assert_metrics_close(got, want, rtol=1e-5):
  assert set(got) == set(sel.METRIC_NAMES)
  for key in sel.METRIC_NAMES:
    np.testing.assert_allclose(got[key], want[key], rtol=rtol, atol=1e-9, err_msg=key)


# ---------------------------------------------------------------- S1..S6


def test_s3_equals_sklearn_calinski_harabasz():
  rng = np.random.default_rng(1)
  maps = rng.normal(size=(40, 3, 3, 5)).astype(np.float32)
  labels = rng.integers(0, 4, size=40)
  maps[labels == 1] += 0.7   # some separation so S1 is not tiny
  got = sel.feature_map_metrics(maps, labels, chunk_size=None)
  want = sklearn.metrics.calinski_harabasz_score(maps.reshape(40, -1).astype(np.float64), labels)
  np.testing.assert_allclose(got["S3"], want, rtol=1e-5)


def test_metrics_match_direct_loops_with_zero_channels():
  maps, labels = _hard_maps()
  got = sel.feature_map_metrics(maps, labels, chunk_size=None)
  want = _loop_metrics(maps, labels)
  _assert_metrics_close(got, want)
  # Hand check of the guards: the all-zero image has S5 = 1 and S6 = 36 / 36 = 1 (every element is
  # within 1 of the max 0); the dense image has no zero so its S6 term is #high / 1.
  dense = maps[5]
  assert np.sum(dense == 0) == 0
  assert sel.feature_map_metrics(maps[[3, 3, 5, 5]], np.array([0, 1, 0, 1]))["S6"] == pytest.approx(
      (1.0 + np.sum(dense.max() - dense < 1)) / 2)


def test_s4_counts_constant_channels_as_zero():
  # Two images, 2x2 pixels, 3 channels: channel 0 = [1,2,3,4], channel 1 = 2 * channel 0
  # (corr 1), channel 2 all zero (corr 0). Ordered pairs: (0,1) and (1,0) give 2 per image.
  img = np.zeros((2, 2, 3), np.float32)
  img[:, :, 0] = [[1, 2], [3, 4]]
  img[:, :, 1] = [[2, 4], [6, 8]]
  maps = np.stack([img, img, img])
  got = sel.feature_map_metrics(maps, np.array([0, 1, 1]))
  assert got["S4"] == pytest.approx(2.0, rel=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 7, 10])
def test_chunked_equals_all_at_once(chunk_size):
  rng = np.random.default_rng(2)
  maps = _maps(rng, 30, 4, 4, 6)
  maps[:, :, :, 0] = 0.0
  labels = rng.permutation(np.arange(30) % 4)
  whole = sel.feature_map_metrics(maps, labels, chunk_size=None)
  _assert_metrics_close(whole, _loop_metrics(maps, labels))
  chunked = sel.feature_map_metrics(maps, labels, chunk_size=chunk_size, corr_batch=3)
  _assert_metrics_close(chunked, whole)


def test_batches_iterator_and_merge_order():
  rng = np.random.default_rng(3)
  maps = _maps(rng, 21, 3, 3, 5)
  labels = np.array([0] * 8 + [1] * 7 + [2] * 6)    # batches see different class subsets
  whole = sel.feature_map_metrics(maps, labels, chunk_size=None)
  cuts = [(0, 5), (5, 13), (13, 21)]
  batches = ((maps[a:b], labels[a:b]) for a, b in cuts)
  _assert_metrics_close(sel.feature_map_metrics_from_batches(batches), whole)
  stats = [sel.feature_map_stats(maps[a:b], labels[a:b]) for a, b in cuts]
  merged = sel.merge_stats(stats[2], sel.merge_stats(stats[0], stats[1]))
  _assert_metrics_close(sel.metrics_from_stats(merged), whole)


def test_feature_map_input_errors():
  maps, labels = _hard_maps()
  with pytest.raises(InputError, match="rank 4"):
    sel.feature_map_metrics(maps[..., 0], labels)
  with pytest.raises(InputError, match="labels of shape"):
    sel.feature_map_metrics(maps, labels[:-1])
  with pytest.raises(InputError, match="at least 2 classes"):
    sel.feature_map_metrics(maps, np.zeros(12, int))
  with pytest.raises(InputError, match="integer labels"):
    sel.feature_map_metrics(maps, labels.astype(float))
  with pytest.raises(InputError, match="no batches"):
    sel.feature_map_metrics_from_batches([])


# ---------------------------------------------------------------- LogME, LEEP, NCE, H-score


def _logme_reference(f, y):
  """LogME written independently: per-class loop, eigh of F^T F, explicit solve for m."""
  f = f.astype(np.float64)
  n, d = f.shape
  lam, _ = np.linalg.eigh(f.T @ f)
  lam = np.clip(lam, 0.0, None)
  evidences = []
  for k in np.unique(y):
    t_k = (y == k).astype(np.float64)
    alpha, beta = 1.0, 1.0
    for _ in range(11):
      ratio = alpha / beta
      a_mat = alpha * np.eye(d) + beta * f.T @ f
      m = beta * np.linalg.solve(a_mat, f.T @ t_k)
      gamma = np.sum(beta * lam / (alpha + beta * lam))
      m2 = m @ m
      res2 = np.sum((t_k - f @ m) ** 2)
      alpha = gamma / (m2 + 1e-5)
      beta = (n - gamma) / (res2 + 1e-5)
      if abs(alpha / beta - ratio) / ratio <= 1e-3:
        break
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * lam))
          - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * np.log(2 * np.pi))
    evidences.append(ev / n)
  return np.mean(evidences)


@pytest.mark.parametrize("n,d", [(60, 8), (12, 20)])
def test_logme_matches_reference_loop(n, d):
  rng = np.random.default_rng(4)
  y = rng.integers(0, 3, size=n)
  f = rng.normal(size=(n, d)) + 1.5 * np.eye(3, d)[y]
  np.testing.assert_allclose(sel.logme(f, y), _logme_reference(f, y), rtol=1e-7)


def _logme_published_reference(f, y):
  """The published LogME algorithm (thuml/LogME, LogME._fit_fixed_point) re-derived here: one
  class at a time, in the basis of the singular vectors it keeps (all min(N, D) of a thin SVD
  when N <= D; for N > D those of F^T F's eigenvectors with sqrt(eigenvalue) > 1e-10), with the
  log-determinant over the kept singular values only."""
  f = f.astype(np.float64)
  n, d = f.shape
  if n > d:
    lam, v = np.linalg.eigh(f.T @ f)
    sv = np.sqrt(np.clip(lam, 0, None))
    kept = sv > 1e-10
    sv, v = sv[kept], v[:, kept]
    basis = f @ v / sv
  else:
    basis, sv, _ = np.linalg.svd(f, full_matrices=False)
  out = []
  for k in range(int(y.max()) + 1):
    t_k = (y == k).astype(np.float64)
    proj = basis.T @ t_k                       # coordinates of y on the kept directions
    outside = t_k @ t_k - proj @ proj          # residual energy no direction reaches
    alpha = beta = 1.0
    for _ in range(11):
      lam_ratio = alpha / beta
      shrink = sv ** 2 / (sv ** 2 + lam_ratio)
      gamma = shrink.sum()
      m_coef = sv * proj / (sv ** 2 + lam_ratio)          # m in the right singular basis
      m2 = m_coef @ m_coef
      res2 = np.sum((proj * (1 - shrink)) ** 2) + outside
      alpha, beta = gamma / (m2 + 1e-5), (n - gamma) / (res2 + 1e-5)
      if abs(alpha / beta - lam_ratio) / lam_ratio <= 1e-3:
        break
    ev = (d / 2 * np.log(alpha) + n / 2 * np.log(beta)
          - 0.5 * np.sum(np.log(alpha + beta * sv ** 2)) - beta / 2 * res2 - alpha / 2 * m2
          - n / 2 * np.log(2 * np.pi))
    out.append(ev / n)
  return np.mean(out)


@pytest.mark.parametrize("n,d,dead", [(12, 20, 0), (30, 30, 0), (60, 8, 0), (60, 10, 3)])
def test_logme_published_matches_a_rederivation_of_the_published_code(n, d, dead):
  rng = np.random.default_rng(7)
  y = np.arange(n) % 3
  f = rng.normal(size=(n, d)) + 1.5 * np.eye(3, d)[y]
  f[:, d - dead:] = 0.0                # dead units: rank < D although N > D
  np.testing.assert_allclose(sel.logme(f, y, variant="published"),
                             _logme_published_reference(f, y), rtol=1e-7)


def test_logme_variants_agree_for_full_rank_n_above_d_and_differ_below():
  rng = np.random.default_rng(8)
  y = np.arange(80) % 4
  f = rng.normal(size=(80, 12)) + np.eye(4, 12)[y]
  np.testing.assert_allclose(sel.logme(f, y, variant="published"), sel.logme(f, y), rtol=1e-9)
  # N < D: the published value lacks (D - N) log(alpha) / 2 in the log-determinant.
  small, ys = f[:10], y[:10]
  assert abs(sel.logme(small, ys, variant="published") - sel.logme(small, ys)) > 0.1
  with pytest.raises(InputError, match="variant"):
    sel.logme(f, y, variant="truncated")


def test_logme_prefers_informative_features():
  rng = np.random.default_rng(5)
  y = rng.integers(0, 3, size=80)
  noise = rng.normal(size=(80, 6))
  assert sel.logme(noise + 3.0 * np.eye(3, 6)[y], y) > sel.logme(noise, y)


def test_leep_hand_computed():
  # theta rows: x1 = [1, 0], x2 = [.5, .5], x3 = [0, 1], x4 = [.5, .5]; y = [0, 0, 1, 1].
  # Joint P(y, z) = [[1.5, .5], [.5, 1.5]] / 4, P(z) = [.5, .5], so P(y|z) = [[.75, .25], [.25, .75]].
  # EEP: x1 -> .75, x2 -> .5*.75 + .5*.25 = .5, x3 -> .75, x4 -> .5.
  # LEEP = (2 log .75 + 2 log .5) / 4 = log(.375) / 2 = -0.490415...
  probs = np.array([[1, 0], [.5, .5], [0, 1], [.5, .5]])
  labels = np.array([0, 0, 1, 1])
  assert sel.leep(probs, labels) == pytest.approx(np.log(0.375) / 2, rel=1e-12)
  # A source class never predicted (P(z) = 0) changes nothing.
  padded = np.concatenate([probs, np.zeros((4, 1))], axis=1)
  assert sel.leep(padded, labels) == pytest.approx(np.log(0.375) / 2, rel=1e-12)
  with pytest.raises(InputError, match="summing to 1"):
    sel.leep(probs * 3.0, labels)


def test_nce_hand_computed():
  # z = [0,0,0,0,1,1], y = [0,0,0,1,1,1]: P(y=0,z=0) = 3/6, P(y=1,z=0) = 1/6, P(y=1,z=1) = 2/6,
  # P(z=0) = 4/6, P(z=1) = 2/6. H(Y|Z) = 4/6 * H(3/4, 1/4) + 2/6 * 0
  #   = 2/3 * (-.75 ln .75 - .25 ln .25) = 2/3 * 0.5623351 = 0.3748901. NCE = -0.3748901.
  z = np.array([0, 0, 0, 0, 1, 1])
  y = np.array([0, 0, 0, 1, 1, 1])
  want = -2 / 3 * (-0.75 * np.log(0.75) - 0.25 * np.log(0.25))
  assert want == pytest.approx(-0.3748901, abs=1e-7)
  assert sel.nce(z, y) == pytest.approx(want, rel=1e-12)
  probs = np.eye(3)[z] * 0.8 + 0.2 / 3               # argmax recovers z
  assert sel.nce(probs, y) == pytest.approx(want, rel=1e-12)
  assert sel.nce(np.array([5, 5, 2, 2]), np.array([1, 1, 0, 0])) == 0.0   # z determines y


def test_h_score_matches_direct_numpy():
  rng = np.random.default_rng(6)
  y = rng.integers(0, 3, size=60)
  f = rng.normal(size=(60, 5)) + np.eye(3, 5)[y]
  g = np.zeros_like(f)
  for k in np.unique(y):
    g[y == k] = f[y == k].mean(axis=0)
  want = np.trace(np.linalg.pinv(np.cov(f, rowvar=False)) @ np.cov(g, rowvar=False))
  np.testing.assert_allclose(sel.h_score(f, y), want, rtol=1e-9)


def test_score_input_errors():
  f = np.ones((6, 3))
  with pytest.raises(InputError, match="rank 2"):
    sel.logme(f[None], np.arange(6) % 2)
  with pytest.raises(InputError, match="labels of shape"):
    sel.h_score(f, np.arange(5) % 2)
  with pytest.raises(InputError, match="at least 2 classes"):
    sel.leep(np.full((6, 3), 1 / 3), np.zeros(6, int))


# ---------------------------------------------------------------- normalisation, sweep, ranking


def test_normalize_metrics_range_and_sign():
  raw = {"S1": np.array([1.0, 3.0, 2.0]), "S2": np.array([10.0, 30.0, 20.0]),
         "S6": np.array([0.5, 0.5, 0.5])}
  norm = sel.normalize_metrics(raw)
  np.testing.assert_allclose(norm["S1"], [-1.0, 1.0, 0.0])
  np.testing.assert_allclose(norm["S2"], [1.0, -1.0, 0.0])     # smallest raw S2 becomes +1
  np.testing.assert_allclose(norm["S6"], [0.0, 0.0, 0.0])      # constant metric
  rng = np.random.default_rng(7)
  entries = [{k: float(v) for k, v in zip(sel.METRIC_NAMES, rng.normal(size=6))} for _ in range(9)]
  for name, values in sel.normalize_metrics(sel.stack_metrics(entries)).items():
    assert values.min() == pytest.approx(-1.0) and values.max() == pytest.approx(1.0)
    raw_values = np.array([e[name] for e in entries])
    sign = -1 if name in sel.SMALLER_IS_BETTER else 1
    assert np.argmax(values) == np.argmax(sign * raw_values)


def test_alpha_sweep_endpoints_equal_single_metric_spearman():
  rng = np.random.default_rng(8)
  groups = [g for g in ("alex/pets", "res/cars", "vgg/dtd") for _ in range(10)]
  s_i, s_j, acc = rng.normal(size=(3, 30))
  sweep = sel.alpha_sweep(s_i, s_j, acc, groups)
  assert len(sweep.alphas) == 1001 and sweep.alphas[574] == pytest.approx(0.574)
  assert sweep.groups == ("alex/pets", "res/cars", "vgg/dtd")
  for end, metric in ((0, s_i), (-1, s_j)):
    want = [scipy.stats.spearmanr(metric[g * 10:(g + 1) * 10], acc[g * 10:(g + 1) * 10]).statistic
            for g in range(3)]
    np.testing.assert_allclose(sweep.spearman[end], want, rtol=1e-12)
    assert sweep.mean[end] == pytest.approx(np.mean(want))
    assert sweep.var[end] == pytest.approx(np.var(want))
  best = int(np.argmax(sweep.mean))
  assert sweep.best_alpha == sweep.alphas[best] and sweep.best_mean == sweep.mean[best]
  mid = sel.combine(s_i, s_j, sweep.alphas[300])
  assert sweep.spearman[300, 1] == pytest.approx(sel.spearman(mid[10:20], acc[10:20]))
  assert set(sel.sweep_pairs({"S1": s_i, "S5": s_j, "S6": acc}, acc, groups, step=0.1)) == {
      ("S1", "S5"), ("S1", "S6"), ("S5", "S6")}


def test_rank_correlations_and_target_blind_baselines():
  acc = np.array([0.61, 0.70, 0.55, 0.80, 0.66, 0.72])
  params = np.array([1e6, 2e6, 5e5, 4e6, 1e6, 3e6])
  scores = {"S6": -np.array([0.3, 0.2, 0.5, 0.1, 0.25, 0.22]),
            **sel.target_blind_scores(source_accuracy=acc + 0.01, param_count=params)}
  out = sel.rank_correlations(scores, acc)
  assert set(out) == {"S6", "source_accuracy", "param_count"}
  for name, summary in out.items():
    assert summary.spearman[0] == pytest.approx(scipy.stats.spearmanr(scores[name], acc).statistic)
    assert summary.weighted_tau[0] == pytest.approx(
        scipy.stats.weightedtau(scores[name], acc).statistic)
  assert out["source_accuracy"].as_dict()["spearman_mean"] == pytest.approx(1.0)
  np.testing.assert_array_equal(sel.ranks([0.2, 0.9, 0.5]), [3, 1, 2])
  with pytest.raises(InputError, match="at least 2"):
    sel.rank_correlations(scores, acc, groups=["a"] * 5 + ["b"])


# ---------------------------------------------------------------- which map is read


def test_conv_tap_is_the_last_conv_output_before_the_pool():
  import jax
  import jax.numpy as jnp
  from jtransfer import models
  model = models.get_model("vgg_s", 3, conv_widths=((4,), (6,)), dense_widths=(5,))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 12, 1)), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  _, got = sel.apply_with_taps(model, params, {}, x, (sel.map_tap_name("conv"),
                                                      sel.map_tap_name("pooled"), "conv2_1"))
  conv = np.asarray(got[sel.LAST_CONV_OUTPUT])
  # vgg_s has no BN: the last conv unit's output is ReLU of its raw conv tap, at full 6x6 size.
  np.testing.assert_allclose(conv, np.maximum(np.asarray(got["conv2_1"]), 0.0), rtol=1e-6)
  assert conv.shape == (2, 6, 6, 6) and got["last_conv"].shape == (2, 3, 3, 6)
  pooled = conv.reshape(2, 3, 2, 3, 2, 6).max(axis=(2, 4))          # the 2x2 max pool after it
  np.testing.assert_allclose(np.asarray(got["last_conv"]), pooled, rtol=1e-6)
  with pytest.raises(InputError, match="map tap"):
    sel.map_tap_name("fc7")


def test_conv_tap_equals_last_conv_for_resnet_with_bn():
  import jax
  import jax.numpy as jnp
  from jtransfer import models
  model = models.get_model("resnet_s", 3, stage_widths=(4, 4, 8), stem_width=4)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 16, 16, 1)), jnp.float32)
  v = model.init(jax.random.PRNGKey(0), x)
  logits, got = sel.apply_with_taps(model, v["params"], v["batch_stats"], x,
                                    (sel.LAST_CONV_OUTPUT, "last_conv"))
  np.testing.assert_array_equal(got[sel.LAST_CONV_OUTPUT], got["last_conv"])
  np.testing.assert_allclose(logits, models.apply_model(model, v["params"], v["batch_stats"], x)[0],
                             rtol=1e-6)
