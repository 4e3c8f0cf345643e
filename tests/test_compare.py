"""`publish compare`: two folders of the same cells under two protocols, side by side.

The folders are written here from hand-made records (summary.json through `claims.evaluate`,
as a study writes it); every interval the comparison shows is checked against scipy's t
quantile on the differences the test chose, and each moved verdict's reason against a hand
reading of which end crossed which boundary."""
import json
import math
import os

import numpy as np
import pytest
from scipy import stats as sps

from experiments import publish
from experiments.claims_registry import ALL
from jtransfer.errors import InputError
from jtransfer.protocol import claims, registry, stats
from jtransfer.study import compare

CLAIM = claims.Claim("P", "m beats base", "m", "base")
SAME = claims.Claim("P", "m2 at least matches base", "m2", "base", at_least=True, margin=0.01)
ENTRY = registry.Registered("p.m_gt_base", "P", "Table 1", "m beats base", claims.SUPERIORITY,
                            0.0, "superiority", CLAIM.text, registry.Evidence(("a",)))


def _folder(path, diffs, same):
  """A published-like folder: per shots, one m - base difference per draw (diffs), and m2 -
  base = `same` per draw (the second claim)."""
  records = []
  for shots, ds in diffs.items():
    for i, d in enumerate(ds):
      records += [dict(strategy="base", shots=shots, repeat=i, test_acc=0.5, status="ok"),
                  dict(strategy="m", shots=shots, repeat=i, test_acc=0.5 + d, status="ok"),
                  dict(strategy="m2", shots=shots, repeat=i, test_acc=0.5 + same, status="ok")]
  os.makedirs(path)
  summary = dict(claims=[claims.evaluate(c, records, ("shots",)) for c in (CLAIM, SAME)])
  for name, obj in (("summary.json", summary), ("results.json", records)):
    with open(os.path.join(path, name), "w") as f:
      json.dump(obj, f)
  return str(path)


# A: the draw-by-draw noise of nested tuning widens shots=1's interval threefold, same mean.
A_DIFFS = {1: [0.0, 0.03, 0.06], 5: [0.01, 0.02, 0.06]}
B_DIFFS = {1: [0.02, 0.03, 0.04], 5: [0.01, 0.02, 0.06]}


@pytest.fixture
def folders(tmp_path):
  return (_folder(tmp_path / "a", A_DIFFS, 0.0), _folder(tmp_path / "b", B_DIFFS, 0.02))


def _interval(d):
  d = np.asarray(d, float)
  half = sps.t.ppf(0.975, d.size - 1) * d.std(ddof=1) / math.sqrt(d.size)
  return d.mean() - half, d.mean() + half


def test_cells_and_pooled_rows_match_scipy(folders):
  a, b = folders
  got = compare.compare(a, b, [ENTRY])
  assert [c.entry.id for c in got] == ["p.m_gt_base", "(unregistered)"]
  assert got[0].where == {}  # folder 'a' is ENTRY's primary evidence, every cell
  c = got[0]
  assert [r.cell for r in c.cells] == [{"shots": 1}, {"shots": 5}]
  for row, shots in zip(c.cells, (1, 5)):
    for side, diffs in ((row.a, A_DIFFS), (row.b, B_DIFFS)):
      lo, hi = _interval(diffs[shots])
      assert (side.paired.lo, side.paired.hi) == pytest.approx((lo, hi), abs=1e-12)
      assert side.width == pytest.approx(hi - lo, abs=1e-12)
  # B's shots=1: +3.0 [+0.52, +5.48]; A's: +3.0 [-4.45, +10.45]: sd 0.03 against 0.01
  assert c.cells[0].b.paired.lo == pytest.approx(0.03 - 4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
  assert c.cells[0].ratio == pytest.approx(3.0)
  assert c.cells[1].ratio == pytest.approx(1.0) and c.cells[1].moved == ""
  assert (c.cells[0].b.decision.verdict, c.cells[0].a.decision.verdict) == (
      "reproduced", "inconclusive")
  assert c.cells[0].moved == "interval widened past 0 (lower end +0.52 -> -4.45 points)"
  # pooled: six draws (shots x repeat), each its own
  for side, diffs in ((c.pooled.a, A_DIFFS), (c.pooled.b, B_DIFFS)):
    lo, hi = _interval(diffs[1] + diffs[5])
    assert (side.paired.lo, side.paired.hi) == pytest.approx((lo, hi), abs=1e-12)
    assert side.paired.n == 6


def test_identical_arms_and_the_unregistered_claim(folders):
  """m2 equals base on every draw under A (not tested) and is 2 points up under B; with no
  registry entry the module's own non-inferiority margin (1 point) reads it."""
  a, b = folders
  c = compare.compare(a, b, [ENTRY])[1]
  assert c.entry.kind == claims.NONINFERIORITY and c.entry.margin == 0.01
  assert c.pooled.a.decision.verdict == "not tested"
  assert c.pooled.b.decision.verdict == "reproduced"  # every difference 0.02: a point interval
  assert c.pooled.moved == "under A: not tested (every paired difference is exactly 0)"


def test_a_claim_the_report_marks_not_converged_reads_not_tested(folders):
  """--cap-share flagged an arm in A's report: its claim reads not tested there (every draw
  left out, as the registry reads it for RESULTS.md)."""
  a, b = folders
  with open(os.path.join(a, "summary.json")) as f:
    summary = json.load(f)
  summary["claims"][0]["not_converged"] = ["m"]
  with open(os.path.join(a, "summary.json"), "w") as f:
    json.dump(summary, f)
  c = compare.compare(a, b, [ENTRY])[0]
  assert c.pooled.a.decision.verdict == "not tested" and c.pooled.a.paired is None
  assert c.pooled.moved.startswith("under A: not tested (6 of 6 (cell, draw) pairs: m not "
                                   "converged")
  assert c.cells[1].a.decision.verdict == "not tested"
  assert "no draws" in compare.render([c], a, b)


def _side(mean, half, n=10):
  p = stats.Paired(n, mean, mean - half, mean + half, 5, 0, 5, math.nan)
  return compare.Side(p, claims.decide(claims.NONINFERIORITY, p, 0.01))


def test_why_moved_names_the_cause_and_the_boundary():
  # non-inferiority, margin 1 point: lower end above -1 reproduces
  wide = compare.why_moved(claims.NONINFERIORITY, 0.01, _side(0.0, 0.02), _side(0.0, 0.005))
  assert wide == "interval widened past -1 (lower end -0.50 -> -2.00 points)"
  fell = compare.why_moved(claims.NONINFERIORITY, 0.01, _side(-0.03, 0.005), _side(0.0, 0.005))
  assert fell == "effect fell past -1 (lower end -0.50 -> -3.50 points)"
  # refuted under A (upper end below -1) from reproduced: both the mean and the width moved
  both = compare.why_moved(claims.NONINFERIORITY, 0.01, _side(-0.04, 0.02), _side(0.0, 0.005))
  assert both == "interval widened and effect fell past -1 (lower end -0.50 -> -6.00 points)"
  assert compare.why_moved(claims.NONINFERIORITY, 0.01, _side(0.0, 0.005),
                           _side(0.001, 0.004)) == ""


def test_cli_writes_the_page_and_refuses_bad_folders(folders, tmp_path, capsys):
  a, b = folders
  out = str(tmp_path / "cmp.md")
  assert publish.main(["compare", a, b, "--out", out]) == 0
  text = open(out).read()
  assert "## Verdicts that moved" in text
  assert "| (unregistered): m beats base | shots=1 | reproduced | inconclusive | interval " \
         "widened past 0" in text
  assert "| **all cells** | +3.0 [" in text  # the pooled row leads each claim's table
  assert publish.main(["compare", a, a, "--out", out]) == 2
  assert "two different folders" in capsys.readouterr().err
  assert publish.main(["compare", a, str(tmp_path / "nope"), "--out", out]) == 2
  assert "missing or unreadable" in capsys.readouterr().err
  with pytest.raises(InputError, match="no claim in common"):
    os.makedirs(tmp_path / "empty")
    for name in ("summary.json", "results.json"):
      (tmp_path / "empty" / name).write_text("{}" if name == "summary.json" else "[]")
    compare.compare(a, str(tmp_path / "empty"), [ENTRY])


@pytest.mark.slow  # two tiny bn_mode grids (the fine-tuning steps compile): 65 s CPU, 4 min loaded
def test_compare_two_real_study_folders(tiny_source_dir, tmp_path):
  """The lead's use: experiments.bn_mode under nested tuning (A) and the same cells with one
  shared tuning draw (B), compared through the command line."""
  from experiments import bn_mode
  argv = ["--arch", "resnet_s", "--source", f"ckpt:{tiny_source_dir('resnet_s')}", "--target",
          "digits:0,1,2", "--shots", "1", "--repeats", "2", "--steps", "4", "--eval-every", "2",
          "--patience", "2", "--test-per-class", "3", "--val-per-class", "2", "--quiet",
          "--tune-extend", "0"]
  a, b = str(tmp_path / "bn_mode"), str(tmp_path / "bn_mode_shared")
  assert bn_mode.main(argv + ["--out", a]) == 0
  assert bn_mode.main(argv + ["--tuning", "shared", "--tune-repeats", "1", "--out", b]) == 0
  out = str(tmp_path / "cmp.md")
  assert publish.main(["compare", a, b, "--out", out]) == 0
  text = open(out).read()
  assert f"## bn.train_mode_gt_frozen_stats: {bn_mode.CLAIM_TEXT}" in text
  got = compare.compare(a, b, ALL)
  c = got[0]
  assert c.entry.id == "bn.train_mode_gt_frozen_stats" and c.where == {"arch": ("resnet_s",)}
  assert [r.cell for r in c.cells] == [{"arch": "resnet_s", "shots": 1, "target": "digits:0,1,2"}]
  assert c.pooled.a is not None and c.pooled.b is not None
