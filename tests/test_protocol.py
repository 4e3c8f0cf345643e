"""The protocol layer: paired statistics against scipy, the stopping rule on synthetic curves,
grid tuning with edge extension, stratified folds, claims."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from jtransfer.errors import InputError, NonFiniteError
from jtransfer.protocol import budget, claims, stats, tuning

A = [0.81, 0.78, 0.85, 0.80, 0.83, 0.79, 0.86, 0.82, 0.84, 0.77]
B = [0.79, 0.78, 0.80, 0.81, 0.80, 0.76, 0.83, 0.80, 0.79, 0.78]


def V(c, margin=0.0, at_least=False):
  """The verdict of `a > b` (or `a >= b` within margin) through the one rule, claims.decide."""
  return claims.decide(claims.NONINFERIORITY if at_least else claims.SUPERIORITY, c,
                       margin).verdict


def test_paired_matches_scipy():
  c = stats.paired(A, B)
  d = np.subtract(A, B)
  lo, hi = sps.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
  assert c.n == 10 and c.mean == pytest.approx(d.mean(), abs=1e-12)
  assert (c.lo, c.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
  assert c.p == pytest.approx(sps.ttest_rel(A, B).pvalue, rel=1e-9)
  assert (c.wins, c.ties, c.losses) == (7, 1, 2)  # hand count of A - B
  assert V(c) == "reproduced"  # lo > 0: 0.0083 here
  assert lo > 0


def test_paired_99_level_and_verdicts():
  c = stats.paired(A, B, level=0.99)
  d = np.subtract(A, B)
  lo, hi = sps.t.interval(0.99, len(d) - 1, loc=d.mean(), scale=sps.sem(d))
  assert (c.lo, c.hi) == (pytest.approx(lo), pytest.approx(hi))
  assert V(stats.paired(B, A)) in ("refuted", "inconclusive")
  neg = stats.paired([0.5, 0.4, 0.45], [0.6, 0.55, 0.62])
  assert V(neg) == "refuted"
  assert V(stats.paired([0.5, 0.6], [0.55, 0.52])) == "inconclusive"
  assert V(stats.paired([0.5], [0.4])) == "inconclusive"  # one draw: no interval
  # a >= b within 1 point: interval [-0.5, +0.1] pt is above -1 pt.
  close = stats.Paired(10, -0.002, -0.005, 0.001, 3, 2, 5, 0.3)
  assert V(close, margin=0.01, at_least=True) == "reproduced"
  assert V(close) == "inconclusive"
  assert stats.format_paired(c).endswith("7/10")


def test_paired_rejects_bad_input():
  with pytest.raises(InputError, match="equal-length"):
    stats.paired([1, 2], [1])
  with pytest.raises(InputError, match="non-finite"):
    stats.paired([1, math.nan], [1, 2])
  same = stats.paired([0.5, 0.6], [0.4, 0.5])  # constant difference: a point interval
  assert same.lo == same.hi == pytest.approx(0.1) and V(same) == "reproduced"


def test_stopping_point_on_synthetic_curve():
  b = budget.Budget(cap=200, eval_every=10, patience=30)
  # rises to 0.8 at step 50, plateaus below it: stops 30 steps later, keeps step 50.
  curve = [(s, min(0.8, s / 62.5) if s <= 50 else 0.79) for s in b.eval_steps()]
  assert budget.stopping_point(curve, b) == (50, 80)
  # a later equal value is no improvement (first max kept); a min_delta ignores tiny gains.
  curve = [(10, 0.5), (20, 0.6), (30, 0.6), (40, 0.6), (50, 0.61), (60, 0.6), (70, 0.6),
           (80, 0.6), (90, 0.6)]
  assert budget.stopping_point(curve, b) == (50, 80)
  assert budget.stopping_point(curve, budget.Budget(200, 10, 30, min_delta=0.02)) == (20, 50)
  # still improving at the cap: stops at the cap, keeps the cap.
  rising = [(s, s / 1000) for s in budget.Budget(cap=100, eval_every=10).eval_steps()]
  assert budget.stopping_point(rising, budget.Budget(cap=100, eval_every=10, patience=30)) \
      == (100, 100)
  assert budget.Budget(cap=25, eval_every=10).eval_steps() == [10, 20, 25]
  assert budget.Budget(100, 10, 30).scaled(4) == budget.Budget(400, 10, 120)
  with pytest.raises(InputError, match="patience"):
    budget.Budget(patience=0)


class _Counter:
  """A fake train state: `step` counts, validation accuracy read from a table."""

  def __init__(self, step):
    self.step = step


def test_fit_converged_follows_the_rule():
  b = budget.Budget(cap=200, eval_every=10, patience=30)
  table = {s: min(0.8, s / 62.5) if s <= 50 else 0.79 for s in b.eval_steps()}
  step_fn = lambda st, batch: (_Counter(st.step + 1), {"finite": True, "loss": 0.0})
  state, info = budget.fit_converged(_Counter(0), step_fn, lambda i: None,
                                     lambda st: table[st.step], b)
  curve = [(s, table[s]) for s in b.eval_steps()]
  assert (info["best_step"], info["steps"]) == budget.stopping_point(curve, b) == (50, 80)
  assert state.step == 50 and info["stopped"] == "patience"
  assert [s for s, _ in info["curve"]] == list(range(10, 81, 10))
  # no validation data: the cap, last state
  state, info = budget.fit_converged(_Counter(0), step_fn, lambda i: None, None, b)
  assert state.step == 200 and info["stopped"] == "cap"
  bad = lambda st, batch: (_Counter(st.step + 1), {"finite": st.step < 5, "loss": math.nan})
  with pytest.raises(NonFiniteError):
    budget.fit_converged(_Counter(0), bad, lambda i: None, lambda st: 0.5, b)


def test_tune_extends_edges_and_flags_what_is_left():
  score = lambda p: -abs(math.log10(p["lr"]) + 5)  # best at 1e-5, below the grid
  t = tuning.tune({"lr": [1e-3, 1e-2, 1e-1]}, score, max_extend=1)
  assert t.choice == {"lr": 1e-4} and t.edges == ["lr:low"]
  assert t.grid["lr"] == [1e-4, 1e-3, 1e-2, 1e-1]
  t = tuning.tune({"lr": [1e-3, 1e-2, 1e-1]}, score, max_extend=3)
  assert t.choice == {"lr": 1e-5} and t.edges == []  # 1e-6 scored and lost
  assert set(t.grid["lr"]) == {1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1}


def test_tune_two_axes_ties_and_fixed_axes():
  calls = []

  def score(p):
    calls.append(p)
    return 1.0 if p["alpha"] == 0.1 else 0.5  # lr ties: the smallest lr wins
  t = tuning.tune({"lr": [1e-3, 1e-2, 1e-1], "alpha": [0.01, 0.1, 1.0], "beta": [0.5]}, score)
  assert t.choice == {"lr": 1e-3, "alpha": 0.1, "beta": 0.5}
  assert t.edges == ["lr:low"]  # on the edge, but tied with 1e-2: not extended
  assert len(calls) == len(t.scores) == 3 * 3
  with pytest.raises(InputError, match="distinct finite"):
    tuning.tune({"lr": [1e-3, float("nan")]}, score)
  calls.clear()
  one = tuning.tune({"lr": [1e-3], "alpha": [0.1]}, score)
  assert one.choice == {"lr": 1e-3, "alpha": 0.1} and one.score is None and not calls


def test_tune_on_the_odds_scale_stays_inside_zero_one():
  """A weight in (0, 1) extended on its odds w / (1 - w): odds 1, 4 -> 16, 64, i.e. w 0.5,
  0.8 -> 16/17, 64/65 (by hand), rounded to 6 digits as record text holds them; a fixed
  value (one point) may be 1, outside the odds' domain."""
  seen = []

  def score(p):
    seen.append(p["lam"])
    return p["lam"] - 0.1 * abs(math.log2(p["T"]) - 1)  # the higher lambda the better

  t = tuning.tune({"T": [2.0, 4.0], "lam": [0.5, 0.8]}, score, max_extend=2,
                  scales={"lam": tuning.odds_scale()})
  assert t.grid["lam"] == [0.5, 0.8, round(16 / 17, 6), round(64 / 65, 6)]
  assert t.choice == {"T": 2.0, "lam": round(64 / 65, 6)} and t.edges == ["lam:high"]
  assert t.grid["T"] == [1.0, 2.0, 4.0]
  assert all(0 < v < 1 for v in seen) and set(seen) == set(t.grid["lam"])
  assert (2.0, round(64 / 65, 6)) in t.scores
  # a fixed weight of 1 is not transformed; a scaled axis ignores bounds
  one = tuning.tune({"lr": [1e-3, 1e-2], "lam": [1.0]}, lambda p: -p["lr"],
                    scales={"lam": tuning.odds_scale()}, bounds={"lam": (0.0, 1.0)})
  assert one.choice == {"lr": 1e-5, "lam": 1.0}


def test_kfold_is_stratified_and_disjoint():
  labels = np.repeat(np.arange(3), [5, 6, 7])
  folds = tuning.kfold(labels, 5, seed=0)
  assert len(folds) == 5
  val = np.concatenate([v for _, v in folds])
  assert np.array_equal(np.sort(val), np.arange(len(labels)))  # every image validated once
  for tr, va in folds:
    assert not set(tr) & set(va) and len(tr) + len(va) == len(labels)
    assert set(labels[va]) == {0, 1, 2}  # each fold holds every class
  with pytest.raises(InputError, match="smallest class has 5"):
    tuning.kfold(labels, 6, seed=0)


def test_claims_evaluate_and_section():
  recs = []
  for arch in ("vgg_s", "resnet_s"):
    for rep, (a, b) in enumerate(zip(A, B)):
      recs.append(dict(strategy="cwl", arch=arch, repeat=rep, test_acc=a, status="ok"))
      recs.append(dict(strategy="base", arch=arch, repeat=rep, test_acc=b, status="ok"))
  recs[0]["status"], recs[0]["test_acc"] = "failed", None  # vgg_s draw 0 of 'cwl' failed
  claim = claims.Claim("CWL", "CWL beats the base", "cwl", "base", source="Table I")
  res = claims.evaluate(claim, recs, ("arch",))
  by = {c["cell"]["arch"]: c for c in res["cells"]}
  assert by["resnet_s"]["paired"]["n"] == 10 and by["vgg_s"]["paired"]["n"] == 9
  assert res["missing"] == 1 and res["pooled"]["paired"]["n"] == 19
  ref = stats.paired(A[1:] + A, B[1:] + B)
  assert res["pooled"]["paired"]["mean"] == pytest.approx(ref.mean)
  # The two archs share their draws: pooled per repeat, each draw once (mean over archs).
  shared = claims.evaluate(claim, recs, ("arch",), draw_fields=("repeat",))
  assert shared["pooled"]["paired"]["n"] == 10
  d = np.subtract(A, B)
  per_draw = np.concatenate([[d[0]], (d[1:] + d[1:]) / 2])  # vgg_s draw 0 failed: resnet only
  assert shared["pooled"]["paired"]["mean"] == pytest.approx(per_draw.mean())
  assert shared["cells"] == res["cells"]
  with pytest.raises(ValueError, match="draw_fields"):
    claims.evaluate(claim, recs, ("arch",), draw_fields=("seed",))
  only = claims.evaluate(claims.Claim("CWL", "t", "cwl", "base", where={"arch": ("resnet_s",)}),
                         recs, ("arch",))
  assert [c["cell"]["arch"] for c in only["cells"]] == ["resnet_s"]
  text = "\n".join(claims.section([res], {"cwl": "Freeze + CWL"}))
  assert "Freeze + CWL > base" in text and "| **all cells** (per arch, repeat) |" in text and "left out" in text
  with pytest.raises(ValueError, match="two records"):
    claims.evaluate(claim, recs + recs[:2], ("arch",))
