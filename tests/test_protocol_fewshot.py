"""The protocol inside the few-shot grid: no test image reaches LR or alpha selection, the
stopping rule's steps are recorded, and the report carries its claims."""
import json

import numpy as np
import pytest
from model_helpers import poison_test_split

from experiments import fewshot
from jtransfer.study import draws, records as records_lib
from jtransfer.study import publish

TINY = ["--shots", "2", "--repeats", "2", "--steps", "12", "--eval-every", "3",
        "--patience", "6", "--test-per-class", "6", "--val-per-class", "2", "--quiet",
        "--tune-repeats", "2", "--tune-extend", "1"]


def _records(out):
  return records_lib.rows(json.loads((out / "results.json").read_text()),
                          ("arch", "target", "shots", "factor"))


def _selection(records):
  """Everything selection reads or writes: the tuning records (minus timings)."""
  return sorted((json.dumps({k: v for k, v in r.items() if k != "seconds"}, sort_keys=True,
                            default=str)
                 for r in records if r["role"] == "tune"))


@pytest.mark.parametrize("strategies,extra", [
    ("freeze,finetune", ["--lrs", "1e-3,1e-2"]),
    # alpha by 2-fold CV on one tuning draw, the LR fixed
    pytest.param("l2sp", ["--cv-folds", "2", "--lrs", "1e-2", "--tune-repeats", "1"],
                 marks=pytest.mark.slow),
])
def test_no_test_image_reaches_selection(tiny_source_dir, tmp_path, monkeypatch, strategies,
                                         extra):
  src = ["--arch", "resnet_s", "--source", f"ckpt:{tiny_source_dir('resnet_s')}",
         "--strategies", strategies, *TINY, *extra, "--target", "digits:0,1,2"]
  assert fewshot.main([*src, "--out", str(tmp_path / "real")]) == 0
  real = _records(tmp_path / "real")

  # The same grid with the test split replaced by other images and other labels.
  poison_test_split(monkeypatch)
  assert fewshot.main([*src, "--out", str(tmp_path / "poisoned")]) == 0
  other = _records(tmp_path / "poisoned")
  assert _selection(real) and _selection(real) == _selection(other)
  tuned = lambda rs: sorted((r["arm"], r["lr"], r["hp"]) for r in rs
                            if r["role"] == "eval" and r["repeat"] == 0)
  assert tuned(real) == tuned(other)
  test_accs = lambda rs: [r["test_acc"] for r in rs if r["role"] == "eval"]
  assert test_accs(real) != test_accs(other)  # the test split did change
  assert all(r["test_acc"] is None for r in real if r["role"] == "tune")
  if "--cv-folds" in extra:
    folds = {r["fold"] for r in real if r["role"] == "tune"}
    assert folds == {0, 1} and all(r["hp"].startswith("alpha=") for r in real)


def test_steps_recorded_and_claims_reported(tiny_source_dir, tmp_path):
  out = tmp_path / "o"
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits", "--strategies", "freeze,finetune", "--lrs", "1e-3", "--out", str(out),
          *TINY, "--tune-repeats", "1"]
  assert fewshot.main(argv) == 0
  records = _records(out)
  for r in records:
    assert r["stopped"] in ("patience", "cap") and r["cap"] == 12
    assert r["best_step"] % 3 == 0 and r["best_step"] <= r["steps"] <= 12
    assert r["stopped"] == "cap" or r["steps"] - r["best_step"] >= 6
  report = (out / "report.md").read_text()
  assert "## Claims" in report and "fine-tuning beats freezing on a far domain" in report
  assert "| **all cells** (per target, shots, repeat) |" in report
  summary = json.loads((out / "summary.json").read_text())
  assert summary["claims"][0]["cells"][0]["paired"]["n"] == 2
  # the command heads the report, which regenerates from results.json alone; the records are
  # exactly the grid's runs
  assert report.startswith("# Few-shot transfer\n\nCommand: `python -m experiments.fewshot "
                           "--arch vgg_s --source ckpt:")
  assert publish.check(str(out)) == []


def test_budget_study_smoke_and_report(tiny_source_dir, tmp_path):
  from experiments import budget_study
  out = tmp_path / "b"
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1,2", "--shots", "2", "--repeats", "2", "--steps", "6", "--patience", "3",
          "--eval-every", "3", "--test-per-class", "5", "--val-per-class", "2",
          "--strategies", "freeze", "--lrs", "1e-3,1e-2", "--out", str(out), "--quiet"]
  assert budget_study.main(argv) == 0
  records = _records(out)
  assert sorted({r["factor"] for r in records}) == [1, 2, 4]
  for f in (1, 2, 4):
    assert all(r["cap"] == 6 * f for r in records if r["factor"] == f)
  assert (out / "results.jsonl").is_file()  # every factor's runs in one file
  report = (out / "report.md").read_text()
  assert "| vgg_s | digits:0,1,2 | freeze | 2 |" in report and "4x - 1x" in report
  assert publish.check(str(out)) == []  # grid complete, report regenerated from results.json
  assert budget_study.main([*argv, "--factors", "2,4", "--overwrite"]) == 2


def test_cv_folds_train_at_k_and_single_points_skip_tuning(tiny_source_dir, tmp_path):
  labels = np.repeat(np.arange(3), 12)
  train_idx = np.concatenate([np.flatnonzero(labels == c)[:2] for c in range(3)])
  val_idx = np.concatenate([np.flatnonzero(labels == c)[2:12] for c in range(3)])
  seen = []
  for fold in range(5):
    tr, va = draws.fold_split(labels, train_idx, val_idx, 5, fold, seed=3, shots=2)
    assert np.array_equal(np.bincount(labels[tr]), [2, 2, 2])  # k per class, as evaluated
    assert not set(tr) & set(va) and set(tr) | set(va) <= set(train_idx) | set(val_idx)
    seen += list(va)
  assert sorted(seen) == sorted(np.concatenate([train_idx, val_idx]))
  out = tmp_path / "one"
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1", "--strategies", "finetune", "--lrs", "1e-3", "--out", str(out), *TINY]
  assert fewshot.main(argv) == 0
  records = _records(out)
  assert records and all(r["role"] == "eval" for r in records)  # one LR: nothing tuned
