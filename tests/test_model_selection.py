"""Tests for the base-model zoo, model_selection and truncation experiments.

Scores are checked against direct jtransfer.methods.selection calls (and a forward pass written
out by hand); the analysis against scipy; the lr schedule against its closed form; the modules
end to end with a 3-model tiny zoo (one family, one class count: one compilation).
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from experiments import model_selection as ms
from experiments import model_zoo, publish, truncation
from jtransfer import models, surgery
from jtransfer.data import ImageSet, normalize
from jtransfer.errors import InputError
from jtransfer.methods import selection, sfda, transfer, transrate
from jtransfer.train import init_state, make_optimizer, make_train_step, sgd


def _fast_init(model, rng, shape):
  """models.init_model without its jitted Flax init (seconds of compile per config)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
  gen = np.random.default_rng(0)
  fill = lambda p, a: (np.ones(a.shape, np.float32) if p.endswith("var") else
                       (0.1 * gen.normal(size=a.shape)).astype(np.float32))
  return {k: surgery.map_with_path(fill, t) for k, t in shapes.items()}


# ---------------------------------------------------------------- scores


def test_score_outputs_equal_direct_selection_calls():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 6)
  maps = np.maximum(rng.normal(size=(24, 3, 3, 5)) * 2, 0).astype(np.float32)
  feats = rng.normal(size=(24, 7))
  logits = rng.normal(size=(24, 3)) * 3
  got = ms.score_outputs(labels, maps, feats, logits)
  want = selection.feature_map_metrics(maps, labels)
  want.update({"LogME": selection.logme(feats, labels), "H-score": selection.h_score(feats, labels),
               "LEEP": selection.leep(scipy.special.softmax(logits, axis=1), labels),
               "NCE": selection.nce(np.argmax(logits, axis=1), labels),
               "TransRate": transrate.transrate(feats, labels), "SFDA": sfda.sfda(feats, labels)})
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
  # Without features / logits only S1..S6 are computed.
  assert set(ms.score_outputs(labels, maps)) == set(selection.METRIC_NAMES)


def _random_source(arch="resnet_s", classes=3, **config):
  model = models.get_model(arch, classes, **config)
  variables = jax.tree.map(np.asarray, _fast_init(model, None, (28, 28, 1)))
  return transfer.Source(arch, models.model_config(model), variables, (28, 28, 1), (0.3,), (0.4,),
                         {"source_test_acc": 0.5})


def test_source_scores_equal_a_hand_written_forward_and_selection_calls():
  source = _random_source(stage_widths=(8, 8, 16), stem_width=8)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(12, 28, 28, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(3), 4).astype(np.int32)
  got, outputs = ms.source_scores(source, images, labels, model_zoo.Compiled())
  v = source.variables
  logits, _, taps = models.apply_model(source.model, v["params"], v["batch_stats"],
                                       normalize(images, source.mean, source.std),
                                       taps=("last_conv", "features"))
  # For a ResNet the last conv output is the 'last_conv' tap.
  conv = outputs[selection.LAST_CONV_OUTPUT]
  np.testing.assert_allclose(conv, taps["last_conv"], rtol=1e-5, atol=1e-6)
  assert conv.shape == (12, 4, 4, 16) and outputs["logits"].shape == (12, 3)
  want = selection.feature_map_metrics(np.asarray(taps["last_conv"]), labels)
  want["LogME"] = selection.logme(np.asarray(taps["features"]), labels, variant="published")
  want["LEEP"] = selection.leep(scipy.special.softmax(np.asarray(logits, np.float64), 1), labels)
  for k, w in want.items():
    np.testing.assert_allclose(got[k], w, rtol=1e-3, atol=1e-6, err_msg=k)


def test_vgg_source_scores_read_the_chosen_map_and_features():
  source = _random_source("vgg_s", conv_widths=((4,), (6,)), dense_widths=(5, 5))
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(12, 28, 28, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(3), 4).astype(np.int32)
  v = source.variables
  _, _, taps = models.apply_model(source.model, v["params"], {},
                                  normalize(images, source.mean, source.std),
                                  taps=("conv2_1", "last_conv", "features"))
  conv = np.maximum(np.asarray(taps["conv2_1"]), 0.0)         # last conv, ReLU, no pool: 14x14
  pooled = np.asarray(taps["last_conv"])                       # after the last 2x2 max pool
  assert conv.shape == (12, 14, 14, 6) and pooled.shape == (12, 7, 7, 6)
  compiled = model_zoo.Compiled()
  # Defaults: S1..S6 on the last conv output; LogME (published) / H-score on what the target
  # keeps, the flattened pooled map (the target drops fc6, fc7).
  got, outputs = ms.source_scores(source, images, labels, compiled)
  want = selection.feature_map_metrics(conv, labels)
  flat = pooled.reshape(12, -1)
  want.update(LogME=selection.logme(flat, labels, variant="published"),
              **{"H-score": selection.h_score(flat, labels)})
  for k, w in want.items():
    np.testing.assert_allclose(got[k], w, rtol=1e-3, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(outputs["features"], flat, rtol=1e-5, atol=1e-6)
  # The old choices: the pooled map, the source's fc7, exact LogME.
  got, outputs = ms.source_scores(source, images, labels, compiled, map_tap="pooled",
                                  selection_features="source", logme_variant="exact")
  fc7 = np.asarray(taps["features"])
  want = selection.feature_map_metrics(pooled, labels)
  want.update(LogME=selection.logme(fc7, labels), **{"H-score": selection.h_score(fc7, labels)})
  for k, w in want.items():
    np.testing.assert_allclose(got[k], w, rtol=1e-3, atol=1e-6, err_msg=k)
  assert set(outputs) == {"last_conv", "features", "logits"}
  with pytest.raises(InputError, match="selection features"):
    ms.source_scores(source, images, labels, compiled, selection_features="fc6")


def test_fit_step_decay_follows_the_papers_shape():
  # loss = w with plain SGD: each step moves w by exactly -lr_t, so w_end = -sum(lr_t).
  params = {"w": jnp.zeros(())}
  opt = make_optimizer(params, [(".*", "all")], {"all": sgd(1.0, momentum=0.0)},
                       injected_lr=True)
  step = make_train_step(lambda p, s, b, r: (p["w"], ({}, s)), opt)
  config = model_zoo.TrainConfig(lr=0.5)
  state = init_state(params, {}, opt, 0, config.lr)
  state = model_zoo.fit_step_decay(state, step, lambda i: {}, 30, config)
  lrs = [0.5 * 0.1 ** sum(i >= b for b in (7, 14, 21, 28)) for i in range(30)]
  assert int(state.step) == 30
  np.testing.assert_allclose(float(state.params["w"]), -sum(lrs), rtol=1e-6)


# ---------------------------------------------------------------- zoo pieces


def _kept(s, per_class, fraction):
  """Indices kept by horizontal_subset (each image holds its own index as its pixel)."""
  marked = ImageSet(np.arange(len(s)).astype(np.uint8).reshape(-1, 1, 1, 1), s.labels,
                    s.class_names)
  kept = model_zoo.horizontal_subset(marked, per_class, fraction, seed=3)
  return kept.images.ravel().tolist(), np.bincount(kept.labels).tolist()


def test_horizontal_subset_is_stratified_and_nested():
  labels = np.repeat(np.arange(3), [10, 20, 7]).astype(np.int32)
  s = ImageSet(np.zeros((37, 1, 1, 1), np.uint8), labels, ("a", "b", "c"))
  full, full_counts = _kept(s, 10, 1.0)
  part, part_counts = _kept(s, 10, 0.3)
  assert full_counts == [10, 10, 7]           # capped at per_class, all of the small class
  assert part_counts == [3, 3, 2]             # round(0.3 * min(10, n_c))
  assert set(part) <= set(full)               # smaller fractions are subsets of larger ones
  assert len(set(full)) == len(full)


def test_zoo_specs_and_bad_flags():
  specs = model_zoo.zoo_specs(["vgg_s", "resnet_s_narrow"], [(0, 2, 3, 4, 6), (0, 2, 4)],
                              [1.0, 0.3])
  assert [s.name for s in specs] == [
      "vgg_s-c0_2_3_4_6-f100", "vgg_s-c0_2_3_4_6-f30", "vgg_s-c0_2_4-f100",
      "resnet_s_narrow-c0_2_3_4_6-f100", "resnet_s_narrow-c0_2_3_4_6-f30",
      "resnet_s_narrow-c0_2_4-f100"]
  assert specs[3].arch == "resnet_s" and specs[3].config["stage_widths"] == (16, 32, 64)
  assert len(model_zoo.zoo_specs(list(model_zoo.FAMILIES), [(0, 2, 3, 4, 6), (0, 2, 4),
                                                            (3, 4, 6)], [1, 0.3, 0.1])) == 15
  with pytest.raises(InputError, match="families"):
    model_zoo.zoo_specs(["alexnet_s"], [(0, 1)], [1.0])
  with pytest.raises(InputError, match="fraction"):
    model_zoo.zoo_specs(["vgg_s"], [(0, 1)], [1.5])


# ---------------------------------------------------------------- analysis


def _records(seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for fam in ("fa", "fb"):
    for target in ("t1", "t2"):
      for m in range(5):
        r = dict(model=f"{fam}-{m}", family=fam, target=target, test_acc=float(rng.uniform()),
                 source_accuracy=float(rng.uniform()), param_count=100 if fam == "fa" else 200,
                 LogME=float(rng.normal()), LEEP=float(rng.normal()), NCE=float(rng.normal()),
                 **{"H-score": float(rng.normal())})
        r.update({k: float(rng.uniform(0.1, 2)) for k in selection.METRIC_NAMES})
        out.append(r)
  return out


def test_analyze_matches_scipy_and_alpha_sweep():
  records = _records()
  summary = ms.analyze(records, step=0.01)
  group = "fa @ t2"
  rs = [r for r in records if r["family"] == "fa" and r["target"] == "t2"]
  acc = [r["test_acc"] for r in rs]
  sc = summary["scorers"]
  for name, sign in (("S1", 1), ("S6", -1), ("LogME", 1)):
    want = scipy.stats.spearmanr([sign * r[name] for r in rs], acc).statistic
    np.testing.assert_allclose(sc[name]["per_group"][group]["spearman"], want, rtol=1e-12)
  # Parameter count is constant within a family: undefined there, defined when pooled.
  assert sc["param_count"]["spearman_mean"] is None
  assert summary["pooled"]["param_count"]["groups_defined"] == 2
  # The best pair's alpha is what selection.alpha_sweep finds on the same normalised metrics.
  ordered = sorted(records, key=lambda r: (r["family"], r["target"], r["model"]))
  norm = selection.normalize_metrics(selection.stack_metrics(
      [{k: r[k] for k in selection.METRIC_NAMES} for r in ordered]))
  best = summary["pairs"][summary["best_pair"]]
  sweep = selection.alpha_sweep(norm[best["i"]], norm[best["j"]],
                                [r["test_acc"] for r in ordered],
                                [ms.group_label(r) for r in ordered], step=0.01)
  assert best["best_alpha"] == pytest.approx(sweep.best_alpha)
  assert best["best_mean"] == pytest.approx(sweep.best_mean)
  assert all(best["best_mean"] >= p["best_mean"] for p in summary["pairs"].values())
  assert len(summary["pairs"]) == 15 and len(best["mean_curve"]) == 101
  assert "beat" in ms.verdict(summary) or "ties" in ms.verdict(summary)
  # S6 under App. A.2's sign: raw S6 larger = better, so rho is the text sign's negative.
  app = sc[selection.S6_APPENDIX]["per_group"][group]["spearman"]
  np.testing.assert_allclose(app, scipy.stats.spearmanr([r["S6"] for r in rs], acc).statistic,
                             rtol=1e-12)
  np.testing.assert_allclose(app, -sc["S6"]["per_group"][group]["spearman"], rtol=1e-12)


def test_selection_claims_pair_groups_by_hand():
  """Held-out C_ij against the best single metric and the paper's rho, paired by group."""
  groups = ["a @ t", "b @ t", "c @ t"]
  held = [0.9, 0.5, 0.7]
  single = {"S1": [0.2, 0.4, 0.3], "S2": [0.6, 0.1, 0.8]}   # S2 has the best mean (0.5)
  summary = dict(
      held_out=dict(per_group={g: dict(pair="S5+S6", alpha=0.5, spearman=v)
                               for g, v in zip(groups, held)}),
      scorers={n: dict(spearman_mean=float(np.mean(v)),
                       per_group={g: dict(spearman=x) for g, x in zip(groups, v)})
               for n, v in single.items()})
  res = ms.claim_results(summary)
  assert res[0]["best_single"] == "S2"
  d = np.array(held) - np.array(single["S2"])
  p = res[0]["pooled"]["paired"]
  assert p["mean"] == pytest.approx(d.mean()) and p["n"] == 3 and p["wins"] == 2
  half = scipy.stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
  assert p["lo"] == pytest.approx(d.mean() - half)
  assert res[1]["pooled"]["paired"]["mean"] == pytest.approx(np.mean(held) - ms.PAPER_RHO)


def test_score_settings_must_agree():
  records = _records()
  assert ms.score_settings(records) == ms.LEGACY_SETTINGS        # records without the fields
  fresh = [dict(r, **ms.SCORE_SETTINGS) for r in records]
  assert ms.score_settings(fresh) == ms.SCORE_SETTINGS
  with pytest.raises(InputError, match="different settings"):
    ms.score_settings(fresh[:3] + records[3:])


def test_truncation_reports_both_s6_signs():
  points = ["a", "b", "c"]
  s6, acc = [0.5, 2.0, 1.0], [0.2, 0.9, 0.5]      # larger S6, higher accuracy (App. A.2)
  records = [dict(target="t", point=p, test_acc=a, LogME=0.0, **{"H-score": 0.0},
                  **{k: 1.0 for k in selection.METRIC_NAMES[:5]}, S6=v)
             for p, v, a in zip(points, s6, acc)]
  summary = truncation.analyze(records, points)
  sc = summary["scorers"]
  assert sc["S6"]["per_group"]["t"]["spearman"] == pytest.approx(-1.0)
  assert sc[selection.S6_APPENDIX]["per_group"]["t"]["spearman"] == pytest.approx(1.0)
  assert summary["s6_pick"]["t"]["point"] == "a"              # smallest S6 (the text)
  assert summary["s6_pick_appendix"]["t"]["point"] == "b"     # largest S6 (App. A.2)
  assert summary["s6_pick_appendix"]["t"]["best_point"] == "b"
  # the claims, one draw per target: rho of raw S6 against 0.7, the pick against the best point
  two = truncation.analyze(records + [dict(r, target="u", test_acc=a) for r, a in
                                      zip(records, [0.5, 0.6, 0.7])], points)
  res = truncation.claim_results(two)
  assert res[0]["pooled"]["paired"]["n"] == 2
  assert res[0]["pooled"]["paired"]["mean"] == pytest.approx(((1.0 - 0.7) + (0.5 - 0.7)) / 2)
  assert res[1]["pooled"]["paired"]["mean"] == pytest.approx(((0.9 - 0.9) + (0.6 - 0.7)) / 2)


def test_scratch_summary_by_hand():
  rec = lambda m, acc, **kw: dict(dict(model=m, family="f", target="t", test_acc=acc,
                                       n_test=100), **kw)
  records = [rec("a", 0.9), rec("b", 0.8), rec("c", 0.7), rec("s", 0.85, reference="scratch"),
             rec("x", 0.5, family="g")]           # a group without a reference: not reported
  assert [r["model"] for r in ms.ranked(records)] == ["a", "b", "c", "x"]
  got = ms.scratch_summary(records)
  assert list(got) == ["f @ t"]
  v = got["f @ t"]
  assert (v["scratch"], v["best"], v["worst"], v["above"], v["members"]) == (0.85, 0.9, 0.7,
                                                                              1, 3)
  assert v["spread"] == pytest.approx(0.2) and v["mean"] == pytest.approx(0.8)
  assert v["test_se"] == pytest.approx(0.04)          # sqrt(0.8 * 0.2 / 100)
  table = "\n".join(ms.scratch_table(got))
  assert "| f @ t | 85.0 | +5.0 | -5.0 | -15.0 | 1/3 | 20.0 | 4.0 |" in table
  assert ms.scratch_table({}) == []


def test_scratch_member_is_an_untrained_copy_of_the_family():
  variables = models.init_model(models.get_model("resnet_s", 3, stage_widths=(8, 8, 8),
                                                 stem_width=8), jax.random.PRNGKey(5),
                                (12, 12, 1))
  model = models.get_model("resnet_s", 3, stage_widths=(8, 8, 8), stem_width=8)
  spec = model_zoo.ZooSpec("resnet_s_narrow", (0, 2, 3), 1.0)
  like = model_zoo.Member(spec, "p", transfer.Source(
      "resnet_s", models.model_config(model), jax.tree.map(np.asarray, variables), (12, 12, 1),
      (0.3,), (0.2,), dict(source_test_acc=0.9, class_names=["a", "b", "c"], steps=7,
                           n_train=30, zoo=dict(family="resnet_s_narrow", fraction=1.0))))
  ref = model_zoo.scratch_member(like, seed=0)
  assert ref.name == "resnet_s_narrow-scratch" and ref.spec.fraction == 0
  assert (ref.source.mean, ref.source.std, ref.source.config) == ((0.3,), (0.2,),
                                                                   like.source.config)
  assert ref.source.meta["source_test_acc"] is None and ref.source.meta["steps"] == 0
  want = models.init_model(model, jax.random.PRNGKey(0), (12, 12, 1))
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), dict(want),
                      ref.source.variables)
  assert all(jax.tree.leaves(same))                 # the seed's init, untouched
  assert jax.tree.structure(ref.source.variables) == jax.tree.structure(like.source.variables)


# ---------------------------------------------------------------- end to end
# One test builds the tiny zoo and runs the three commands on it: split into several tests, each
# pytest-xdist worker would train its own copy of the zoo.


def test_zoo_model_selection_and_truncation_commands(tmp_path, monkeypatch, capsys):
  root = str(tmp_path / "zoo")
  with monkeypatch.context() as mp:
    mp.setattr(models, "init_model", _fast_init)
    _check_zoo_command(root, str(tmp_path / "zoo-out"), capsys)
  _check_model_selection_main(root, str(tmp_path / "ms"), capsys)
  _check_truncation_main(root, str(tmp_path / "tr"), capsys)


def _check_zoo_command(root, out, capsys):
  assert model_zoo.main(["--tiny", "--zoo-root", root, "--out", out]) == 0
  err = capsys.readouterr().err  # progress (not --quiet): the plan, done/total per member
  assert "zoo: 3 runs planned (3 zoo members)\n" in err
  assert "[1/3, ETA" in err and "[3/3, last run] trained zoo member" in err
  names = sorted(os.listdir(root))
  assert names == ["resnet_s_narrow-c0_2_3-f100", "resnet_s_narrow-c0_2_3-f50",
                   "resnet_s_narrow-c4_6_8-f100"]
  records = json.load(open(os.path.join(out, "results.json")))
  assert {r["model"] for r in records} == set(names)
  half = next(r for r in records if r["model"].endswith("f50"))
  assert half["n_train"] == 30 and half["fraction"] == 0.5        # 0.5 x 20 images x 3 classes
  source = transfer.load_source(os.path.join(root, names[0]))
  assert source.config["stage_widths"] == [16, 32, 64]
  assert source.meta["zoo"]["settings"]["per_class"] == 20
  # A second build finds every model in the cache and trains nothing.
  specs, settings = model_zoo.zoo_from_args(_zoo_args(root))
  logs = []
  model_zoo.build_zoo(specs, settings, root, log=logs.append)
  assert logs == ["zoo: 3 runs planned (3 zoo members); 3 already saved, skipped"]


def _zoo_args(root):
  import argparse
  p = argparse.ArgumentParser()
  model_zoo.add_zoo_args(p)
  return p.parse_args(["--tiny", "--zoo-root", root])


def _check_model_selection_main(root, out, capsys):
  argv = ["--tiny", "--zoo-root", root, "--target", "fmnist:1,5,7", "--alpha-step", "0.01",
          "--out", out, "--quiet"]
  loud = argv[:-1]
  capsys.readouterr()
  assert ms.main(loud) == 0
  err = capsys.readouterr().err  # progress (not --quiet): the plan, done/total per pair
  assert ("model_selection: 3 runs planned (3 ground-truth fine-tunings (3 LRs each, "
          "converged))") in err
  assert "[1/3, ETA" in err and "[3/3, last run] resnet_s_narrow-" in err
  for name in ("report.md", "results.json", "results.jsonl", "summary.json", "spearman.png",
               "alpha_curves.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  records = json.load(open(os.path.join(out, "results.json")))
  assert len(records) == 3 and {r["n_train"] for r in records} == {12}
  assert all(set(selection.METRIC_NAMES + ms.LABEL_SCORES) <= set(r) for r in records)
  for r in records:  # the ground truth: converged runs, the LR chosen on validation
    assert r["n_val"] == 60 and r["stopped"] in ("patience", "cap") and r["steps"] <= 2
    best = max(sorted(r["lr_val"], key=float), key=lambda lr: r["lr_val"][lr])
    assert r["lr"] == float(best) and r["val_acc"] == r["lr_val"][best]
  assert "## Fine-tuning runs (the LR chosen on validation)" in open(
      os.path.join(out, "report.md")).read()
  assert all(r["map_tap"] == "conv" and r["logme_variant"] == "published" for r in records)
  report = open(os.path.join(out, "report.md")).read()
  assert "C_56(0.574)" in report and "source_accuracy" in report and "Verdict" in report
  assert selection.S6_APPENDIX in report and "--logme published" in report
  assert ms.main(argv + ["--resume", "--logme", "exact"]) == 2   # other score flags: refused
  assert ms.main(argv + ["--resume", "--tune-extend", "1"]) == 2  # runs tuned without it
  capsys.readouterr()
  assert ms.main(loud + ["--resume"]) == 0
  err = capsys.readouterr().err
  assert ("model_selection: 3 runs planned (3 ground-truth fine-tunings (3 LRs each, "
          "converged)); 3 already saved, skipped") in err
  assert "[1/3" not in err  # nothing rerun
  assert len(json.load(open(os.path.join(out, "results.json")))) == 3
  assert publish.check(out) == []  # the report regenerates from results.json and zoo.json
  # --scratch adds the family's random-init reference: fine-tuned, reported, not ranked.
  before = json.load(open(os.path.join(out, "summary.json")))
  assert ms.main(argv + ["--resume", "--scratch"]) == 0
  records = json.load(open(os.path.join(out, "results.json")))
  ref = [r for r in records if r.get("reference") == "scratch"]
  assert len(records) == 4 and [r["model"] for r in ref] == ["resnet_s_narrow-scratch"]
  assert ref[0]["source_accuracy"] is None and ref[0]["n_val"] == 60
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert list(summary.pop("scratch")) == ["resnet_s_narrow @ fmnist:1,5,7"]
  assert summary == before              # every ranking and claim as without the reference
  assert "random-init reference" in open(os.path.join(out, "report.md")).read()
  assert publish.check(out) == []
  assert ms.main(argv) == 2      # existing results without --resume / --overwrite


def _check_truncation_main(root, out, capsys):
  ckpt = os.path.join(root, "resnet_s_narrow-c0_2_3-f100")
  argv = ["--tiny", "--source", f"ckpt:{ckpt}", "--points", "stem,stage2/block1",
          "--target", "fmnist:1,5,7", "--out", out]
  capsys.readouterr()
  assert truncation.main(argv) == 0
  err = capsys.readouterr().err  # progress: the plan, done/total per (target, point)
  assert ("truncation: 2 runs planned (2 truncated ground-truth fine-tunings (3 LRs each, "
          "converged))") in err
  assert "[1/2, ETA" in err and "[2/2, last run] fmnist:1,5,7 cut after stage2/block1" in err
  assert truncation.main(argv + ["--resume"]) == 0
  assert "2 already saved, skipped" in capsys.readouterr().err
  records = json.load(open(os.path.join(out, "results.json")))
  assert [r["point"] for r in records] == ["stem", "stage2/block1"]
  assert records[0]["map_shape"] == [14, 14, 16] and records[1]["map_shape"] == [7, 7, 32]
  for r in records:  # converged runs, the LR chosen on validation (ties to the smaller)
    assert r["n_val"] == 60 and r["stopped"] in ("patience", "cap") and r["steps"] <= 2
    assert set(r["lr_val"]) == {"0.003", "0.01", "0.03"}
    best = max(sorted(r["lr_val"], key=float), key=lambda lr: r["lr_val"][lr])
    assert r["lr"] == float(best) and r["val_acc"] == r["lr_val"][best]
  assert "## Fine-tuning runs (the LR chosen on validation)" in open(
      os.path.join(out, "report.md")).read()
  for name in ("truncation_accuracy.png", "truncation_spearman.png", "report.md"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert publish.check(out) == []  # regenerates from results.json and source.json
  bad = ["--tiny", "--source", f"ckpt:{ckpt}", "--points", "stem,nope", "--target",
         "fmnist:1,5,7", "--out", out, "--overwrite", "--quiet"]
  assert truncation.main(bad) == 2
  assert os.path.exists(os.path.join(out, "results.json"))  # refused before touching --out


def test_ground_truth_lr_choice_skips_a_diverged_lr(monkeypatch):
  """An LR whose run goes non-finite leaves the choice (validation picks among the rest); when
  every LR diverges the error propagates (main turns it into one line and exit code 2)."""
  import argparse
  from jtransfer.errors import NonFiniteError
  val = {0.003: 0.6, 0.01: 0.8}

  def fake(source, task, budget, config, compiled, seed, **overrides):
    if config.lr not in val:
      raise NonFiniteError(3, ["grad"])
    return dict(test_acc=val[config.lr] - 0.1, val_acc=val[config.lr], steps=20, best_step=10,
                stopped="patience")

  monkeypatch.setattr(ms, "finetune_converged", fake)
  task = ms.TargetTask("t", None, None, val=[0] * 40)
  args = argparse.Namespace(steps=100, eval_every=10, patience=20, seed=0,
                            ft_lrs="0.003,0.01,0.03")
  got = ms.finetune_tuned(None, task, args, ms.TrainConfig(), None)
  assert got["lr"] == 0.01 and got["test_acc"] == pytest.approx(0.7) and got["n_val"] == 40
  assert got["lr_val"] == {"0.003": 0.6, "0.01": 0.8, "0.03": None}
  assert "0.03: diverged" in "\n".join(ms.runs_table([dict(got, model="m", target="t")],
                                                     ("model", "target")))
  val.clear()
  with pytest.raises(NonFiniteError):
    ms.finetune_tuned(None, task, args, ms.TrainConfig(), None)


def test_ground_truth_lr_grid_extends_past_a_winning_edge(monkeypatch):
  """--tune-extend N: a best LR on the grid's edge grows the grid on that side (the grid's own
  ratio), at most N times; the record says when the choice is still on an edge."""
  import argparse
  tried = []

  def fake(source, task, budget, config, compiled, seed, **overrides):
    tried.append(round(config.lr, 6))
    acc = 0.9 - abs(np.log10(config.lr) - np.log10(3e-4)) / 10   # peaks at 3e-4: below the grid
    return dict(test_acc=acc - 0.1, val_acc=acc, steps=20, best_step=10, stopped="patience")

  monkeypatch.setattr(ms, "finetune_converged", fake)
  task = ms.TargetTask("t", None, None, val=[0] * 40)
  args = argparse.Namespace(steps=100, eval_every=10, patience=20, seed=0,
                            ft_lrs="0.01,0.003", tune_extend=0)
  got = ms.finetune_tuned(None, task, args, ms.TrainConfig(), None)
  assert got["lr"] == 0.003 and "edges" not in got and tried == [0.003, 0.01]  # as before
  tried.clear()
  args.tune_extend = 1
  got = ms.finetune_tuned(None, task, args, ms.TrainConfig(), None)
  assert tried == [0.003, 0.01, 0.0009] and got["lr"] == pytest.approx(0.0009)
  assert got["edges"] == ["lr:low"] and list(got["lr_val"]) == ["0.0009", "0.003", "0.01"]
  tried.clear()
  args.tune_extend = 3                       # 0.0009, 0.00027 (best), then 8.1e-5 loses
  got = ms.finetune_tuned(None, task, args, ms.TrainConfig(), None)
  assert tried == [0.003, 0.01, 0.0009, 0.00027, 8.1e-05]
  assert got["lr"] == pytest.approx(0.00027) and got["edges"] == []
  table = "\n".join(ms.runs_table([dict(got, model="m", target="t", edges=["lr:low"])],
                                  ("model", "target")))
  assert "still on an edge of the extended grid" in table and "m t lr:low" in table
  # A diverged LR past the edge scores below any accuracy: the edge stays the choice.
  def diverge_low(source, task, budget, config, compiled, seed, **overrides):
    from jtransfer.errors import NonFiniteError
    if config.lr < 0.002:
      raise NonFiniteError(3, ["grad"])
    return fake(source, task, budget, config, compiled, seed)
  monkeypatch.setattr(ms, "finetune_converged", diverge_low)
  args.tune_extend = 1
  got = ms.finetune_tuned(None, task, args, ms.TrainConfig(), None)
  assert got["lr"] == 0.003 and got["lr_val"]["0.0009"] is None and got["tune_extend"] == 1
  # One LR, or no validation images: nothing to extend, refused with the flags named.
  base = dict(val_per_class=20, patience=100, eval_every=10, ft_lrs="0.003,0.01",
              tune_extend=1)
  assert ms.check_protocol_args(argparse.Namespace(**base)) == [0.003, 0.01]
  for change in (dict(ft_lrs="0.01"), dict(ft_lrs="0.01,0.01"), dict(val_per_class=0)):
    with pytest.raises(InputError, match="--tune-extend 1 extends an LR grid"):
      ms.check_protocol_args(argparse.Namespace(**dict(base, **change)))
  with pytest.raises(InputError, match="--patience must be >= 1, got 0"):
    ms.check_protocol_args(argparse.Namespace(**dict(base, patience=0)))
  # A resume may not mix runs tuned with and without extension.
  plain, extended = dict(lr_val={"0.01": 0.5}), dict(lr_val={"0.01": 0.5}, edges=[])
  ms.check_resume_protocol([plain, dict(model="no ground truth")], argparse.Namespace(
      tune_extend=0))
  ms.check_resume_protocol([extended], argparse.Namespace(tune_extend=2))
  with pytest.raises(InputError, match="tuned without LR-grid extension, not --tune-extend 1"):
    ms.check_resume_protocol([plain], argparse.Namespace(tune_extend=1))
  with pytest.raises(InputError, match="tuned with LR-grid extension, not --tune-extend 0"):
    ms.check_resume_protocol([dict(plain, tune_extend=1)], argparse.Namespace(tune_extend=0))
  assert "extended by up to 3 LRs" in ms.finetune_text(argparse.Namespace(
      val_per_class=20, ft_batch_size=50, train_per_class=20, patience=100, eval_every=10,
      steps=1000, ft_lrs="0.003,0.01", tune_extend=3))
