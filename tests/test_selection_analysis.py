"""How the scores rank the zoo (`jtransfer.zoo.analysis`, its report sections): rank
correlations against scipy, the C_ij sweep against `selection.alpha_sweep`, the claims and the
random-init references' summary by hand."""
import numpy as np
import pytest
import scipy.stats

from experiments import model_selection as ms
from jtransfer import scoring
from jtransfer.errors import InputError
from jtransfer.methods import selection
from jtransfer.zoo import analysis, sections


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
  summary = analysis.analyze(records, step=0.01)
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
                                [analysis.group_label(r) for r in ordered], step=0.01)
  assert best["best_alpha"] == pytest.approx(sweep.best_alpha)
  assert best["best_mean"] == pytest.approx(sweep.best_mean)
  assert all(best["best_mean"] >= p["best_mean"] for p in summary["pairs"].values())
  assert len(summary["pairs"]) == 15 and len(best["mean_curve"]) == 101
  assert "beat" in sections.verdict(summary) or "ties" in sections.verdict(summary)
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
  assert analysis.score_settings(records) == analysis.LEGACY_SETTINGS        # records without the fields
  fresh = [dict(r, **scoring.SCORE_SETTINGS) for r in records]
  assert analysis.score_settings(fresh) == scoring.SCORE_SETTINGS
  with pytest.raises(InputError, match="different settings"):
    analysis.score_settings(fresh[:3] + records[3:])


def test_scratch_summary_by_hand():
  rec = lambda m, acc, **kw: dict(dict(model=m, family="f", target="t", test_acc=acc,
                                       n_test=100), **kw)
  records = [rec("a", 0.9), rec("b", 0.8), rec("c", 0.7), rec("s", 0.85, reference="scratch"),
             rec("x", 0.5, family="g")]           # a group without a reference: not reported
  assert [r["model"] for r in analysis.ranked(records)] == ["a", "b", "c", "x"]
  got = analysis.scratch_summary(records)
  assert list(got) == ["f @ t"]
  v = got["f @ t"]
  assert (v["scratch"], v["best"], v["worst"], v["above"], v["members"]) == (0.85, 0.9, 0.7,
                                                                              1, 3)
  assert v["spread"] == pytest.approx(0.2) and v["mean"] == pytest.approx(0.8)
  assert v["test_se"] == pytest.approx(0.04)          # sqrt(0.8 * 0.2 / 100)
  table = "\n".join(sections.scratch_table(got))
  assert "| f @ t | 85.0 | +5.0 | -5.0 | -15.0 | 1/3 | 20.0 | 4.0 |" in table
  assert sections.scratch_table({}) == []
