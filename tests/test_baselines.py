"""The newer baselines (issue 20): TransRate, SFDA, BSS, BitFit, FiLM, LP-FT, WiSE-FT, each
against an independent computation, and a tiny few-shot run of every new strategy."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.linear_model import LogisticRegression

from experiments import fewshot
from jtransfer import models, surgery
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import bss, cotuning, film, lpft, sfda, transfer, transrate
from jtransfer.protocol import tuning


def _blobs(seed=0, n=20, d=6, k=3, sep=1.5):
  rng = np.random.default_rng(seed)
  y = np.repeat(np.arange(k), n)
  x = rng.normal(size=(n * k, d)) + sep * np.eye(k, d)[y]
  return x, y


# ----------------------------------------------------------------------------- TransRate
def test_coding_rate_equals_its_eigenvalue_form():
  x, _ = _blobs()
  lam = np.linalg.eigvalsh(x.T @ x)
  want = 0.5 * np.sum(np.log1p(lam / (len(x) * 1e-2)))
  assert transrate.coding_rate(x, 1e-2) == pytest.approx(want, rel=1e-10)
  wide = x[:5]  # fewer rows than columns: computed on the 5 x 5 Gram matrix
  lam = np.linalg.eigvalsh(wide.T @ wide)
  want = 0.5 * np.sum(np.log1p(np.clip(lam, 0, None) / (5 * 1e-2)))
  assert transrate.coding_rate(wide, 1e-2) == pytest.approx(want, rel=1e-8)


def test_transrate_by_definition_and_its_properties():
  x, y = _blobs()
  z = x - x.mean(axis=0)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  rate = lambda a: 0.5 * np.linalg.slogdet(np.eye(a.shape[1]) + a.T @ a / (len(a) * 1e-4))[1]
  want = rate(z) - np.mean([rate(z[y == c]) for c in range(3)])
  assert transrate.transrate(x, y) == pytest.approx(want, rel=1e-10)
  # normalised rows: the overall feature scale does not matter
  assert transrate.transrate(7.0 * x, y) == pytest.approx(transrate.transrate(x, y), rel=1e-9)
  # well separated classes carry more label information than the same features with shuffled
  # labels (at sep 1.5 on 6 dimensions the estimate is too noisy to order them)
  xs, _ = _blobs(sep=5.0)
  shuffled = np.random.default_rng(1).permutation(y)
  assert transrate.transrate(xs, y) > transrate.transrate(xs, shuffled) + 0.3
  with pytest.raises(InputError, match="at least 2 classes"):
    transrate.transrate(x, np.zeros_like(y))
  with pytest.raises(InputError, match="must be"):
    transrate.transrate(x, y[:-1])


# ----------------------------------------------------------------------------- SFDA
def test_sfda_first_stage_is_shrinkage_lda_and_the_score_follows_its_steps():
  x, y = _blobs(d=5)
  lam = sfda.shrinkage(x, y)
  sw = sum(np.mean(y == c) * np.cov(x[y == c].T, bias=True) for c in range(3))
  assert lam == pytest.approx(max(np.exp(-5 * np.linalg.eigvalsh(sw)[-1]), 1e-10))
  lda = lambda a: LinearDiscriminantAnalysis(solver="eigen", shrinkage=lam).fit(a, y)
  np.testing.assert_allclose(sfda.fda_proba(x, y, lam), lda(x).predict_proba(x), atol=1e-10)
  # the whole score, step by step with scikit-learn's LDA for both stages
  p = lda(x).predict_proba(x)
  p = np.exp(p) / np.exp(p).sum(axis=1, keepdims=True)
  means = np.stack([x[y == c].mean(axis=0) for c in range(3)])
  others = np.stack([(means.sum(axis=0) - means[c]) / 2 for c in range(3)])
  pt = p[np.arange(len(y)), y][:, None]
  mixed = pt * x + (1 - pt) * others[y]
  want = lda(mixed).predict_proba(mixed)[np.arange(len(y)), y].mean()
  assert sfda.sfda(x, y) == pytest.approx(want, rel=1e-9)
  assert 0 < sfda.sfda(x, y) <= 1
  assert sfda.sfda(x, y) > sfda.sfda(x, np.random.default_rng(1).permutation(y))
  with pytest.raises(InputError, match="at least 2 classes"):
    sfda.sfda(x, np.zeros_like(y))


def _sfda_by_steps(x, y, lam):
  """SFDA step by step with scikit-learn's shrinkage LDA, in the features' full dimension."""
  lda = lambda a: LinearDiscriminantAnalysis(solver="eigen", shrinkage=lam).fit(a, y)
  p = lda(x).predict_proba(x)
  p = np.exp(p) / np.exp(p).sum(axis=1, keepdims=True)
  k = y.max() + 1
  means = np.stack([x[y == c].mean(axis=0) for c in range(k)])
  others = np.stack([(means.sum(axis=0) - means[c]) / (k - 1) for c in range(k)])
  pt = p[np.arange(len(y)), y][:, None]
  mixed = pt * x + (1 - pt) * others[y]
  return lda(mixed).predict_proba(mixed)[np.arange(len(y)), y].mean()


def test_sfda_with_fewer_images_than_dimensions_is_exact():
  """n < d: computed in the row space of the features, equal to the full-dimension steps (the
  features are scaled small so that lam is far from 0 and the full problem well posed)."""
  x, y = _blobs(n=8, d=40, k=3, sep=0.1)
  x = 0.05 * x
  sw = sum(np.mean(y == c) * np.cov(x[y == c].T, bias=True) for c in range(3))
  lam = max(np.exp(-5 * np.linalg.eigvalsh(sw)[-1]), 1e-10)
  assert sfda.shrinkage(x, y) == pytest.approx(lam)
  assert 0.1 < lam < 1
  assert sfda.sfda(x, y) == pytest.approx(_sfda_by_steps(x, y, lam), rel=1e-7)


# ----------------------------------------------------------------------------- BSS
def test_spectral_penalty_and_its_gradient():
  f = np.random.default_rng(0).normal(size=(8, 5)).astype(np.float32)
  s = np.linalg.svd(f, compute_uv=False)
  assert float(bss.spectral_penalty(jnp.asarray(f))) == pytest.approx(s[-1] ** 2, rel=1e-5)
  assert float(bss.spectral_penalty(jnp.asarray(f), 2)) == pytest.approx(
      s[-1] ** 2 + s[-2] ** 2, rel=1e-5)
  # d sigma_min^2 / dF = 2 sigma_min u v^T for a simple singular value
  u, s, vt = np.linalg.svd(f, full_matrices=False)
  grad = jax.grad(lambda a: bss.spectral_penalty(a))(jnp.asarray(f))
  np.testing.assert_allclose(grad, 2 * s[-1] * np.outer(u[:, -1], vt[-1]), atol=1e-4)


def test_bss_loss_is_ce_plus_eta_times_the_penalty(tiny_source_dir):
  source = transfer.load_source(tiny_source_dir("vgg_s"))
  setup = bss.build_bss(source, 3, 10, eta=0.5)
  images = np.random.default_rng(0).integers(0, 255, (6, 28, 28, 1), dtype=np.uint8)
  labels = np.array([0, 1, 2, 0, 1, 2])
  params, stats = setup.init(0, images, labels)
  loss, (aux, _) = setup.loss_fn(params, stats, {"image": images, "label": labels}, None)
  logits, _, taps = models.apply_model(setup.model, params, stats,
                                       normalize(images, source.mean, source.std),
                                       taps=("features",))
  ce = float(-np.mean(np.asarray(jax.nn.log_softmax(logits))[np.arange(6), labels]))
  sv = np.linalg.svd(np.asarray(taps["features"]).reshape(6, -1), compute_uv=False)
  assert float(aux["ce"]) == pytest.approx(ce, rel=1e-5)
  assert float(loss) == pytest.approx(ce + 0.5 * sv[-1] ** 2, rel=1e-4)


# ----------------------------------------------------------------------------- BitFit, FiLM
def test_bitfit_trains_only_biases_and_the_head(tiny_source_dir):
  source = transfer.load_source(tiny_source_dir("resnet_s"))
  setup = transfer.get_strategy("bitfit").build(source, 3, 10)
  trainable = surgery.flatten(setup.optimizer.trainable)
  on = sorted(p for p, t in trainable.items() if t)
  assert on and all(p.startswith("head/") or p.endswith("/bias") for p in on)
  assert any(p.endswith("bn/bias") for p in on)          # BN shifts are resnet_s's biases
  assert not any(p.endswith("kernel") and not p.startswith("head/") for p in on)


@pytest.mark.parametrize("arch", ["vgg_s", "resnet_s"])
def test_film_fold_equals_scale_and_shift_layers(tiny_source_dir, arch):
  source = transfer.load_source(tiny_source_dir(arch))
  setup = film.build_freeze_film(source, 3, 10)
  params, stats = setup.init(0)
  rng = np.random.default_rng(0)
  fp = jax.tree.map(lambda v: jnp.asarray(rng.normal(1.0, 0.3, v.shape), jnp.float32),
                    params[film.FILM_KEY])
  rest = {k: v for k, v in params.items() if k != film.FILM_KEY}
  x = normalize(rng.integers(0, 255, (4, 28, 28, 1), dtype=np.uint8), source.mean, source.std)
  folded, _, _ = models.apply_model(setup.model, film.apply_film(rest, fp), stats, x)

  flat = surgery.flatten(rest)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    mod = context.module
    unit = "/".join(mod.path[:-1])
    if context.method_name != "__call__" or unit not in fp["scale"]:
      return out
    has_bn = f"{unit}/bn/scale" in flat
    if (isinstance(mod, nn.BatchNorm) and has_bn) or (isinstance(mod, nn.Conv) and not has_bn
                                                      and mod.path[-1] == "conv"):
      return out * fp["scale"][unit] + fp["shift"][unit]
    return out

  with nn.intercept_methods(interceptor):
    layered, _, _ = models.apply_model(setup.model, rest, stats, x)
  np.testing.assert_allclose(folded, layered, rtol=1e-4, atol=1e-4)
  # the train path (fold at BN, a layer after convs without BN) computes the same logits
  as_used, _, _ = film.apply_model_film(setup.model, {film.FILM_KEY: fp, **rest}, stats, x)
  np.testing.assert_allclose(as_used, folded, rtol=1e-4, atol=1e-4)
  # at its init (gamma 1, beta 0) FiLM is the identity
  plain, _, _ = models.apply_model(setup.model, rest, stats, x)
  ident, _, _ = models.apply_model(setup.model, film.effective_params(params), stats, x)
  np.testing.assert_allclose(ident, plain, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- LP-FT, WiSE-FT
def test_probe_head_reproduces_logistic_regression():
  x, y = _blobs()
  head = lpft.probe_head(x, y, 4)  # a 4th class absent from the draw is never predicted
  lr = LogisticRegression(C=lpft.PROBE_C, max_iter=5000).fit(x, y)
  logits = x @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(logits[:, :3], lr.decision_function(x), rtol=1e-4, atol=1e-4)
  assert (logits.argmax(axis=1) == lr.predict(x)).all()
  # two classes: the binary model split into two logits whose difference is its decision value
  two = y < 2
  head2 = lpft.probe_head(x[two], y[two], 2)
  lr2 = LogisticRegression(C=lpft.PROBE_C, max_iter=5000).fit(x[two], y[two])
  diff = x[two] @ (head2["kernel"][:, 1] - head2["kernel"][:, 0]) + head2["bias"][1] - \
      head2["bias"][0]
  np.testing.assert_allclose(diff, lr2.decision_function(x[two]), rtol=1e-4, atol=1e-4)


def test_lpft_init_probes_the_frozen_features_and_wise_ft_interpolates(tiny_source_dir):
  source = transfer.load_source(tiny_source_dir("vgg_s"))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (9, 28, 28, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(3), 3)
  setup = lpft.build_lpft(source, 3, 10)
  params, _ = setup.init(0, images, labels)
  want = lpft.probe_head(transfer.extract_features(source, 3, images), labels, 3)
  np.testing.assert_allclose(params["head"]["kernel"], want["kernel"], rtol=1e-6)
  assert setup.finalize is None
  wise = transfer.get_strategy("wise_ft").build(source, 3, 10, alpha=0.25)
  start = {"a": np.zeros(3), "b": np.ones(2)}
  trained = {"a": np.full(3, 4.0), "b": np.full(2, 5.0)}
  out = wise.finalize(trained, start)
  np.testing.assert_allclose(out["a"], 1.0) and np.testing.assert_allclose(out["b"], 2.0)
  with pytest.raises(InputError, match="alpha must lie"):
    lpft.build_lpft(source, 3, 10, alpha=1.5)


def test_tuning_never_extends_a_bounded_knob_past_its_bound():
  # the best alpha is the grid's top (1.0): unbounded, the grid would grow to 1.33 and 1.78
  score = lambda p: p["alpha"]
  free = tuning.tune({"alpha": (0.5, 0.75, 1.0)}, score, 2)
  assert max(free.grid["alpha"]) > 1.0
  bounded = tuning.tune({"alpha": (0.5, 0.75, 1.0)}, score, 2, bounds={"alpha": (0.0, 1.0)})
  assert bounded.grid["alpha"] == [0.5, 0.75, 1.0] and bounded.choice["alpha"] == 1.0
  assert bounded.edges == ["alpha:high"]


# ----------------------------------------------------------------------------- Co-Tuning
def test_cotuning_relationship_and_loss_by_hand(tiny_source_dir):
  source = transfer.load_source(tiny_source_dir("vgg_s"))
  setup = cotuning.build_cotuning(source, 3, 10, lam=0.7)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (9, 28, 28, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(3), 3)
  params, stats = setup.init(0, images, labels)
  # at init the source branch is the source model itself (fc6, fc7 and its head kept)
  want = surgery.flatten(source.variables["params"])
  got = surgery.flatten(cotuning.source_branch_params(params))
  assert set(got) == set(want)
  assert all(np.array_equal(np.asarray(got[k]), np.asarray(want[k])) for k in want)
  src = np.asarray(transfer.eval_forward(source.model, source.mean, source.std)(
      source.variables["params"], source.variables.get("batch_stats", {}), images), np.float64)
  p = np.exp(src - src.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  r = np.stack([p[labels == t].mean(axis=0) for t in range(3)])
  np.testing.assert_allclose(params["frozen"]["relationship"], r, rtol=1e-5)
  loss, (aux, _) = setup.loss_fn(params, stats, {"image": images, "label": labels}, None)
  logits = np.asarray(setup.forward(params, stats, images), np.float64)
  lsm = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  ce = -lsm[np.arange(9), labels].mean()
  co = -np.mean(np.sum(r[labels] * np.log(p), axis=1))
  assert float(loss) == pytest.approx(ce + 0.7 * co, rel=1e-4)
  assert float(aux["cotuning"]) == pytest.approx(co, rel=1e-4)
  with pytest.raises(InputError, match="every target class"):
    cotuning.relationship(src, np.zeros(9, int), 3)


@pytest.mark.slow  # 53 s for both; each baseline is trained in its own test above
# ----------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("strategies", ["bitfit,freeze_film,bss", "lpft,wise_ft,cotuning"])
def test_new_strategies_run_the_fewshot_grid(tiny_source_dir, tmp_path, strategies):
  out = tmp_path / "o"
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1,2", "--shots", "2", "--repeats", "1", "--steps", "4", "--eval-every", "2",
          "--patience", "2", "--test-per-class", "4", "--val-per-class", "2", "--lrs", "1e-3",
          "--tune-repeats", "1", "--tune-extend", "0", "--no-paper-grid", "--strategies",
          strategies, "--out", str(out), "--quiet"]
  assert fewshot.main(argv) == 0
  from jtransfer.study.records import rows
  records = rows(json.loads((out / "results.json").read_text()))
  evals = [r for r in records if r["role"] == "eval"]
  assert {r["arm"] for r in evals} == set(strategies.split(","))
  assert all(r["status"] == "ok" and 0 <= r["test_acc"] <= 1 for r in evals)
  for r in evals:  # knobs tuned on the tuning draw: BSS's eta, WiSE-FT's alpha
    if r["arm"] == "bss":
      assert r["hp"].startswith("eta=")
    if r["arm"] == "wise_ft":
      assert r["hp"].startswith("alpha=") and 0 < float(r["hp"].split("=")[1]) <= 1
    if r["arm"] in ("bss", "lpft", "wise_ft", "cotuning"):
      assert r["filter_distance"] >= 0
    if r["arm"] == "cotuning":
      assert r["hp"].startswith("lam=")


def test_baseline_rows_and_claims_in_the_cwl_tables(tiny_source_dir, tmp_path):
  from experiments import cwl_tables
  out = tmp_path / "t"
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1,2", "--shots", "2", "--repeats", "2", "--steps", "4", "--eval-every", "2",
          "--patience", "2", "--test-per-class", "4", "--val-per-class", "2", "--lrs", "1e-3",
          "--tune-repeats", "1", "--tune-extend", "0", "--no-paper-grid", "--strategies",
          "freeze_cwl,freeze_film,bitfit,freeze", "--out", str(out), "--quiet"]
  assert cwl_tables.main(argv) == 0
  report = (out / "report.md").read_text()
  assert "| vgg_s | digits:0,1,2 | Freeze + FiLM |" in report
  assert "| vgg_s | digits:0,1,2 | BitFit |" in report
  summary = json.loads((out / "summary.json").read_text())
  texts = {c["claim"]["text"] for c in summary["claims"]}
  assert "FiLM (per-channel scale and shift) at least matches CWL (scale only)" in texts
  assert "training only the biases beats frozen convolutions" in texts
  assert not any("LP-FT" in t for t in texts)  # its arms did not run
