"""The verdict rule (claims.decide) on hand-derived intervals, its one-sided p-values against
scipy's one-sample t-test, and Holm's adjustment against statsmodels' multipletests."""
import numpy as np
import pytest
from scipy import stats as sps

from jtransfer.errors import InputError
from jtransfer.protocol import claims, registry, stats

SUP, NI, EQ, TH = claims.SUPERIORITY, claims.NONINFERIORITY, claims.EQUIVALENCE, claims.THRESHOLD
RG = claims.REGRET


def P(mean, lo, hi, n=10, ties=0):
  """A paired comparison with a given interval (p and wins play no part in the verdict)."""
  return stats.Paired(n, mean, lo, hi, n - ties, ties, 0, 0.5)


@pytest.mark.parametrize("kind,c,margin,want", [
    (SUP, P(0.02, 0.005, 0.035), 0.0, "reproduced"),
    (SUP, P(0.02, 0.005, 0.035), 0.01, "inconclusive"),  # above 0, not above the margin
    (SUP, P(-0.02, -0.035, -0.005), 0.0, "refuted"),
    (NI, P(-0.002, -0.008, 0.004), 0.01, "reproduced"),
    # retrieval_vgg_s's Finetune+CWL: wholly below 0, never reproduced, even inside the margin
    (NI, P(-0.001, -0.0016, -0.0004), 0.01, "inconclusive"),
    (NI, P(-0.023, -0.036, -0.00985), 0.01, "inconclusive"),  # top just above -1 pt
    (NI, P(-0.023, -0.036, -0.00985), 0.001, "refuted"),  # one image of 1000
    (EQ, P(0.0, -0.004, 0.004), 0.005, "reproduced"),
    (EQ, P(0.001, -0.004, 0.006), 0.005, "inconclusive"),
    (EQ, P(0.02, 0.006, 0.03), 0.005, "refuted"),
    (TH, P(-0.05, -0.09, -0.01), 0.1, "reproduced"),  # below the value, within its tolerance
    (TH, P(-0.5, -0.9, -0.2), 0.1, "refuted"),
    (SUP, P(0.0, 0.0, 0.0, ties=10), 0.0, "not tested"),
    (NI, P(0.0, 0.0, 0.0, ties=10), 0.01, "not tested"),
    (SUP, stats.paired([0.5], [0.4]), 0.0, "inconclusive"),
    # regret (pick - best <= 0): the same interval as the wholly-below-0 NI case reproduces,
    # a perfect pick (every difference 0) is reproduced, a large regret refuted
    (RG, P(-0.001, -0.0016, -0.0004), 0.01, "reproduced"),
    (RG, P(0.0, 0.0, 0.0, ties=10), 0.01, "reproduced"),
    (RG, P(-0.23, -0.50, 0.04), 0.00111, "inconclusive"),  # truncation_resnet_s's S6 pick
    (RG, P(-0.05, -0.08, -0.02), 0.01, "refuted"),
])
def test_decide_hand_cases(kind, c, margin, want):
  assert claims.decide(kind, c, margin).verdict == want


def test_decide_rejects_bad_input():
  with pytest.raises(InputError, match="kind"):
    claims.decide("better", P(0, -1, 1))
  with pytest.raises(InputError, match="margin"):
    claims.decide(SUP, P(0, -1, 1), -0.01)


def test_one_sided_p_matches_scipy_ttest_1samp():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0.8, 0.03, 8), rng.normal(0.79, 0.03, 8)
  c, d = stats.paired(a, b), a - b
  for bound in (-0.01, 0.0, 0.02):
    want = sps.ttest_1samp(d, bound, alternative="greater").pvalue
    assert claims.p_above(c, bound) == pytest.approx(want, rel=1e-9)
    want = sps.ttest_1samp(d, bound, alternative="less").pvalue
    assert claims.p_below(c, bound) == pytest.approx(want, rel=1e-9)
  # reproduced exactly when the one-sided p clears 0.025, i.e. when lo > bound
  dec = claims.decide(NI, c, 0.01)
  assert (dec.verdict == "reproduced") == (c.lo > -0.01 and c.hi >= 0)
  assert dec.p_reproduce == pytest.approx(claims.p_above(c, -0.01))


def test_holm_matches_statsmodels():
  multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
  rng = np.random.default_rng(1)
  for p in ([0.01, 0.04, 0.03, 0.005, 0.5, 0.04], list(rng.uniform(0, 0.2, 17)), [0.3]):
    want = multipletests(p, alpha=0.025, method="holm")[1]
    assert claims.holm(p) == pytest.approx(list(want), abs=1e-12)


def test_holm_hand_case_and_adjusted_verdict():
  # m = 3: sorted 0.01, 0.02, 0.04 -> 0.03, max(0.03, 0.04), max(0.04, 0.04)
  assert claims.holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
  c = P(0.02, 0.005, 0.035)
  d = claims.decide(SUP, c, 0.0)
  assert d.verdict == "reproduced" and d.p_reproduce < 0.025
  assert claims.adjusted(SUP, d, d.p_reproduce * 3, 1.0) == (
      "reproduced" if d.p_reproduce * 3 < 0.025 else "inconclusive")
  nt = claims.decide(SUP, P(0.0, 0.0, 0.0, ties=10))
  assert claims.adjusted(SUP, nt, 0.0, 0.0) == "not tested"


def test_registry_reads_a_not_converged_folder_as_not_tested():
  """A folder whose report marks the claim's arm not converged (--cap-share) reads 'not
  tested' in the registry too, saying why; the other folder's draws still count."""
  res = lambda capped: dict(claim=dict(text="t"), draw_field="repeat",
                            pooled=dict(draw_fields=["repeat"]),
                            cells=[dict(cell={"k": 1}, draws=[0, 1, 2], diffs=[0.1, 0.11, 0.12])],
                            **({"not_converged": ["b"]} if capped else {}))
  e = registry.Registered("x", "P", "T", "t", claims.SUPERIORITY, 0.0, "sup", "t",
                          registry.Evidence(("f",)))
  r = registry.decide_entry(e, e.primary, {"f": {"claims": [res(True)]}}, {"f": []})
  assert r["decision"].verdict == claims.NOT_TESTED and r["untested"] == (3, 3)
  assert r["decision"].reason.startswith("3 of 3 (cell, draw) pairs: b not converged (f's")
  r = registry.decide_entry(e, e.primary, {"f": {"claims": [res(False)]}}, {"f": []})
  assert r["decision"].verdict == claims.REPRODUCED
