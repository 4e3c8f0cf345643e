"""The base-model zoo, model_selection and truncation commands end to end, with a 3-model tiny
zoo (one family, one class count: one compilation), and truncation's analysis.

The library they run on is tested beside it: test_scoring_selection.py (scores),
test_model_zoo.py (zoo, schedule), test_selection_ground_truth.py (LR choice),
test_selection_analysis.py (rankings, claims).
"""
import json
import os

import pytest
from model_helpers import small_variables

from experiments import model_selection as ms
from experiments import model_zoo, truncation
from jtransfer import models, scoring
from jtransfer.methods import selection, transfer
from jtransfer.study import publish
from jtransfer.study import records as rec
from jtransfer.zoo.flags import ZooFlags
from jtransfer.zoo.members import build_zoo


# models.init_model without compiling Flax's initialisers (seconds per config).
_fast_init = small_variables


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


# ---------------------------------------------------------------- end to end
# One test builds the tiny zoo and runs zoo and model_selection on it (split, each pytest-xdist
# worker would train its own copy of the zoo); truncation cuts the session's tiny resnet_s.


def test_zoo_and_model_selection_commands(tmp_path, monkeypatch, capsys):
  root = str(tmp_path / "zoo")
  with monkeypatch.context() as mp:
    mp.setattr(models, "init_model", _fast_init)
    _check_zoo_command(root, str(tmp_path / "zoo-out"), capsys)
  _check_model_selection_main(root, str(tmp_path / "ms"), capsys)


def _check_zoo_command(root, out, capsys):
  assert model_zoo.main(["--tiny", "--zoo-root", root, "--out", out]) == 0
  err = capsys.readouterr().err  # progress (not --quiet): the plan, done/total per member
  assert "zoo: 3 runs planned (3 zoo members)\n" in err
  assert "[1/3, ETA" in err and "[3/3, last run] trained zoo member" in err
  names = sorted(os.listdir(root))
  assert names == ["resnet_s_narrow-c0_2_3-f100", "resnet_s_narrow-c0_2_3-f50",
                   "resnet_s_narrow-c4_6_8-f100"]
  records = rec.rows(json.load(open(os.path.join(out, "results.json"))), ())
  assert all(r["version"] == 2 for r in json.load(open(os.path.join(out, "results.json"))))
  assert {r["arm"] for r in records} == set(names)
  half = next(r for r in records if r["arm"].endswith("f50"))
  assert half["n_train"] == 30 and half["fraction"] == 0.5        # 0.5 x 20 images x 3 classes
  source = transfer.load_source(os.path.join(root, names[0]))
  assert source.config["stage_widths"] == [16, 32, 64]
  assert source.meta["zoo"]["settings"]["per_class"] == 20
  # A second build finds every model in the cache and trains nothing.
  specs, settings = ZooFlags(tiny=True).zoo()
  logs = []
  build_zoo(specs, settings, root, log=logs.append)
  assert logs == ["zoo: 3 runs planned (3 zoo members); 3 already saved, skipped"]
  assert publish.check(out) == []


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
  records = ms.rows(json.load(open(os.path.join(out, "results.json"))))
  assert len(records) == 3 and {r["n_train"] for r in records} == {12}
  assert all(set(selection.METRIC_NAMES + scoring.LABEL_SCORES) <= set(r) for r in records)
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
  records = ms.rows(json.load(open(os.path.join(out, "results.json"))))
  ref = [r for r in records if r.get("reference") == "scratch"]
  assert len(records) == 4 and [r["model"] for r in ref] == ["resnet_s_narrow-scratch"]
  assert ref[0]["source_accuracy"] is None and ref[0]["n_val"] == 60
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert list(summary.pop("scratch")) == ["resnet_s_narrow @ fmnist:1,5,7"]
  assert summary == before              # every ranking and claim as without the reference
  assert "random-init reference" in open(os.path.join(out, "report.md")).read()
  assert publish.check(out) == []
  assert ms.main(argv) == 2      # existing results without --resume / --overwrite


def test_truncation_command_and_target_growth(tiny_source_dir, tmp_path, capsys):
  out = str(tmp_path / "tr")
  src = f"ckpt:{tiny_source_dir('resnet_s')}"
  argv = ["--tiny", "--source", src, "--points", "stem,stage2/block1",
          "--target", "fmnist:1,5,7", "--out", out]
  capsys.readouterr()
  assert truncation.main(argv) == 0
  err = capsys.readouterr().err  # progress: the plan, done/total per (target, point)
  assert ("truncation: 2 runs planned (2 truncated ground-truth fine-tunings (3 LRs each, "
          "converged))") in err
  assert "[1/2, ETA" in err and "[2/2, last run] fmnist:1,5,7 cut after stage2/block1" in err
  assert truncation.main(argv + ["--resume"]) == 0
  assert "2 already saved, skipped" in capsys.readouterr().err
  saved = json.load(open(os.path.join(out, "results.json")))
  assert {r["version"] for r in saved} == {2} and [r["cell"] for r in saved] == [
      {"target": "fmnist:1,5,7"}] * 2  # version-2 records: arm = the point, cell = the target
  records = truncation.rows(saved)
  assert [r["point"] for r in records] == ["stem", "stage2/block1"]
  assert records[0]["map_shape"] == [14, 14, 32] and records[1]["map_shape"] == [7, 7, 64]
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
  bad = ["--tiny", "--source", src, "--points", "stem,nope", "--target",
         "fmnist:1,5,7", "--out", out, "--overwrite", "--quiet"]
  assert truncation.main(bad) == 2
  assert os.path.exists(os.path.join(out, "results.json"))  # refused before touching --out
  # The claims' draws are the targets: a resume may add targets (the finished ones are kept,
  # byte for byte, and only the new target's points run), never change the points.
  grown = argv + ["--target", "digits:0,1,2", "--resume", "--quiet"]
  assert truncation.main(grown[:4] + ["stem", *grown[5:]]) == 2
  assert json.load(open(os.path.join(out, "results.json"))) == saved
  assert truncation.main(grown) == 0
  after = json.load(open(os.path.join(out, "results.json")))
  assert [r for r in after if r["cell"]["target"] == "fmnist:1,5,7"] == saved
  assert sorted(r["cell"]["target"] for r in after) == ["digits:0,1,2"] * 2 + ["fmnist:1,5,7"] * 2
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["claims"][0]["pooled"]["paired"]["n"] == 2  # one draw per target
  assert publish.check(out) == []


def test_truncation_rows_read_published_version_1_records_as_version_2():
  """A published (version-1) record and the version-2 record the runner writes for the same
  run give the same report row: point, target, outcome, scores."""
  path = os.path.join(os.path.dirname(__file__), "..", "published", "truncation_resnet_s",
                      "results.json")
  v1 = json.load(open(path))[0]
  v2 = rec.make(v1["point"], {"target": v1["target"]}, rec.Draw("eval", 0), {"lr": v1["lr"]},
                {k: v1[k] for k in truncation.OUTCOME if k in v1},
                extra={k: v for k, v in v1.items()
                       if k not in truncation.OUTCOME + ("point", "target", "lr")})
  a, b = truncation.rows([v1])[0], truncation.rows([v2])[0]
  assert a["point"] == v1["point"] and a["target"] == v1["target"] and a["arm"] == v1["point"]
  for k in ("point", "target", "lr", "test_acc", "lr_val", "S6", "LogME", "map_shape"):
    assert a[k] == b[k] == v1[k]
