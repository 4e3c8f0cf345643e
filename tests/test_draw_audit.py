"""`publish draws`: every registered claim's primary cells and their draws, the short ones
flagged, and the command (and cost) that brings a short folder to 10 draws. Folders written
here from hand-made records; the committed docs/reruns.md is the one the published folders
give now."""
import json
import os

import pytest

from experiments import cwl_tables, publish
from experiments.claims_registry import ALL
from jtransfer.errors import InputError
from jtransfer.protocol import claims, registry
from jtransfer.study import draw_audit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIM = claims.Claim("P", "m beats base", "m", "base")
CORR = claims.Claim("P", "rho above 0.7", "rho", "bar")
ARGV = ["--arch", "vgg_s", "--target", "digits", "--shots", "1,5", "--repeats", "5",
        "--strategies", "freeze,freeze_cwl", "--out", "results/x"]


def _write(path, summary, records, run):
  os.makedirs(path)
  for name, obj in (("summary.json", summary), ("results.json", records), ("run.json", run)):
    with open(os.path.join(path, name), "w") as f:
      json.dump(obj, f)


@pytest.fixture
def root(tmp_path):
  """'few': shots 1 with 5 evaluation draws, shots 5 with 3, and 4 tuning runs on one tuning
  draw; 'corr': a correlation over 2 targets (truncation's kind of claim)."""
  recs = [dict(strategy=s, shots=1, repeat=-1, role="tune", lr=lr, val_acc=0.5)
          for s in ("m", "base") for lr in (1e-3, 1e-2)]
  for shots, n in ((1, 5), (5, 3)):
    recs += [dict(strategy=s, shots=shots, repeat=i, role="eval", test_acc=0.5 + (s == "m") / 10)
             for s in ("m", "base") for i in range(n)]
  run = dict(module="experiments.cwl_tables", argv=ARGV + ["--resume"], wall_s=180.0,
             records=len(recs), invocations=[dict(wall_s=180.0)], complete=True)
  res = claims.evaluate(CLAIM, recs, ("shots",), keep=lambda r: r["role"] == "eval")
  _write(tmp_path / "few", dict(claims=[res]), recs, run)
  corr = [dict(target=t, arm=a, value=v) for t in ("t1", "t2")
          for a, v in (("rho", 0.8), ("bar", 0.7))]
  res = claims.evaluate(CORR, corr, (), arm_field="arm", draw_field="target", value="value")
  _write(tmp_path / "corr", dict(claims=[res]), corr,
         dict(module="experiments.truncation", argv=[], wall_s=10.0, records=4,
              invocations=[dict(wall_s=10.0)], complete=True))
  return str(tmp_path)


ENTRIES = [
    registry.Registered("p.m_gt_base", "P", "T1", "m beats base", claims.SUPERIORITY, 0.0,
                        "sup", CLAIM.text, registry.Evidence(("few",))),
    registry.Registered("p.rho", "P", "T2", "rho above 0.7", claims.THRESHOLD, 0.0, "paper",
                        CORR.text, registry.Evidence(("corr",))),
    registry.Registered("p.later", "P", "T3", "later", claims.SUPERIORITY, 0.0, "sup", "later",
                        registry.Evidence(("not_yet",))),
]


def test_audit_counts_and_flags_each_primary_cell(root):
  got = draw_audit.audit(ENTRIES, root)
  few, corr, later = got
  assert [(c.cell, c.draws, c.unit, c.short) for c in few.cells] == [
      ({"shots": 1}, 5, "draws", True), ({"shots": 5}, 3, "draws", True)]
  assert [(c.draws, c.unit, c.needed, c.short) for c in corr.cells] == [(2, "targets", 5, True)]
  assert later.pending == ("not_yet",) and later.cells == ()


def test_rerun_grows_in_place_with_the_fresh_protocol_rerun_beside(root):
  found, notes = draw_audit.reruns(draw_audit.audit(ENTRIES, root), root)
  (r,) = found
  few = os.path.join(root, "few")
  assert r.in_place and r.command == (
      "python -m experiments.cwl_tables --arch vgg_s --target digits --shots 1,5 --repeats 10 "
      f"--strategies freeze,freeze_cwl --out {few} --bn frozen --resume")  # made before --bn
  argv = r.command.split()[3:]
  assert cwl_tables.PUBLISHER.validate(cwl_tables.PUBLISHER.parse_args(argv))
  # in place: the 4 tuning runs are kept, the 16 evaluation runs scale by the 7 draws added
  # to the fewest (3): round(16 * 7 / 3) = 37; 180 s over 20 records = 9 s a run
  assert (r.runs_now, r.runs) == (20, 37) and r.seconds == pytest.approx(9.0 * 37)
  f = r.fresh
  assert f.command == ("python -m experiments.cwl_tables --arch vgg_s --target digits --shots "
                       "1,5 --repeats 10 --strategies freeze,freeze_cwl --out results/x_10draws "
                       "--bn frozen --tuning nested --cap-share 0.1 --resume")
  assert f.added == ("--tuning nested", "--cap-share 0.1")  # no --l2fe-lrs: not delta_table
  argv = f.command.split()[3:]
  assert cwl_tables.PUBLISHER.validate(cwl_tables.PUBLISHER.parse_args(argv))
  # 16 evaluation runs at 3 draws (the fewest) -> x 10/3; 4 tuning runs of the one tuning draw
  # per evaluation draw: 16 * 10 / 3 + 10 * 4 = 93; 180 s over 20 records = 9 s a run
  assert (f.runs_now, f.runs) == (20, 93) and f.seconds == pytest.approx(9.0 * 93)
  assert not f.in_place and f.fresh is None
  assert len(notes) == 1 and notes[0].startswith("corr: 2 targets, fewer than 5")


def test_no_growth_in_place_under_disjoint_tuning(root):
  """--disjoint-tuning's tuning draws change with the count: only the fresh rerun is given."""
  run_file = os.path.join(root, "few", "run.json")
  run = json.load(open(run_file))
  run["argv"] = run["argv"] + ["--disjoint-tuning"]
  json.dump(run, open(run_file, "w"))
  assert draw_audit.grow(os.path.join(root, "few"), "repeat", 3) is None
  (r,), _ = draw_audit.reruns(draw_audit.audit(ENTRIES, root), root)
  assert not r.in_place and r.command.endswith("--out results/x_10draws --disjoint-tuning "
                                               "--bn frozen --tuning nested --cap-share 0.1 "
                                               "--resume")


def test_shared_estimate_and_a_module_without_a_draw_flag(root):
  recs = json.load(open(os.path.join(root, "few", "results.json")))
  assert draw_audit._estimate(recs, 5, nested=False) == (
      36, "4 tuning runs, plus 16 evaluation (and other) runs x 2")
  with pytest.raises(InputError, match="takes no --repeats"):
    draw_audit.rerun(os.path.join(root, "corr"), "repeat", 2)


def test_cli_and_the_committed_page_is_current(root, tmp_path, capsys):
  out = str(tmp_path / "reruns.md")
  assert publish.main(["draws", "--root", os.path.join(root, "missing"), "--out", out]) == 2
  assert "no published folder" in capsys.readouterr().err and not os.path.exists(out)
  cwd = os.getcwd()
  os.chdir(REPO)  # the page names the root as given
  try:
    audits = draw_audit.audit(ALL, "published")
    found, notes = draw_audit.reruns(audits, "published")
    want = draw_audit.render(audits, found, notes, "published")
  finally:
    os.chdir(cwd)
  with open(os.path.join(REPO, "docs", "reruns.md")) as f:
    assert f.read() == want, "docs/reruns.md is stale: python -m experiments.publish draws"
  text = draw_audit.render(draw_audit.audit(ENTRIES, root), *draw_audit.reruns(
      draw_audit.audit(ENTRIES, root), root), root)
  assert "| p.m_gt_base | superiority | few | 1 cell x 3 draws, 1 cell x 5 draws | " \
         "**2 of 2 short** |" in text
  assert "| p.later | superiority | not_yet | not published yet | |" in text
