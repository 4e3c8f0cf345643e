"""Runner options of issue 29: nested tuning (each evaluation draw tuned on its own labelled
pool, never its test images), the tie rule, tuning draws disjoint from evaluation draws (and the
overlap measured where they cannot be)."""
import json

import numpy as np
import pytest
from model_helpers import poison_test_split

from experiments import fewshot
from jtransfer.data import load_spec
from jtransfer.study import draws, flags, grid, records, report


def _plan(*argv):
  return grid.plan(fewshot.STUDY, flags.parse(fewshot.STUDY, list(argv)))


def _overlap_by_hand(cell):
  """Share of each evaluation draw's images found in some tuning draw, with Python sets."""
  tuned = set()
  for r, (_, tr, va) in cell.items():
    if r < 0:
      tuned |= set(tr.tolist()) | set(va.tolist())
  out = []
  for r in sorted(r for r in cell if r >= 0):
    mine = set(cell[r][1].tolist()) | set(cell[r][2].tolist())
    out.append(len(mine & tuned) / len(mine))
  return out


@pytest.fixture(scope="module")
def digit_labels():
  return load_spec("digits", (28, 28, 1)).train.labels


def test_overlap_on_digits_both_ways(digit_labels):
  # Today's rule (issue 29 item 9): tuning and evaluation draws differ by seed, not by images.
  shared = draws.cell_draws(digit_labels, 10, 10, 0, 10, 1, 20)
  o = draws.overlap(shared)
  assert o == pytest.approx(_overlap_by_hand(shared))
  assert 0.25 < np.mean(o) < 0.40  # ~30 of each class's ~90 pool images sit in the tuning draw
  # --disjoint-tuning where the pool is large enough (k=1, 2 draws: 42 of ~90 per class used)
  cell = draws.cell_draws(digit_labels, 10, 1, 0, 2, 1, 20, disjoint=True)
  assert draws.overlap(cell) == _overlap_by_hand(cell) == [0.0, 0.0]
  plain = draws.cell_draws(digit_labels, 10, 1, 0, 2, 1, 20)
  assert all(np.array_equal(a, b) for a, b in zip(cell[0][1:], plain[0][1:]))  # eval unchanged
  _, tr, va = cell[-1]
  assert np.array_equal(np.bincount(digit_labels[tr], minlength=10), np.ones(10))
  assert len(va) == 200 and not set(tr) & set(va)
  # too small (10 draws x 30 images per class > ~90): as without the flag, overlap stated
  big = draws.cell_draws(digit_labels, 10, 10, 0, 10, 1, 20, disjoint=True)
  assert draws.overlap(big) == pytest.approx(o)


def _nested_records(p, cell, arm, val):
  """Nested tuning records of `arm`: validation accuracy val(draw, lr) on each draw's pool."""
  a = p.arm(arm)
  return [records.make(arm, cell, d, {"lr": lr}, {"status": "ok", "val_acc": val(i, lr)})
          for i in range(p.config.protocol.repeats) for lr in a.lrs
          for d in draws.tuning_draws(0, a.folds, i)]


def test_nested_choices_are_per_draw_and_their_keys():
  p = _plan("--strategies", "freeze,finetune", "--lrs", "1e-3,1e-2", "--repeats", "3",
            "--arch", "vgg_s", "--target", "digits", "--shots", "5", "--tuning", "nested",
            "--tune-extend", "0", "--no-paper-grid")
  cell = dict(p.cells[0])
  # draw 1 prefers the larger LR, the others the smaller
  val = lambda i, lr: (0.7 if lr == 1e-2 else 0.5) if i == 1 else (0.5 if lr == 1e-2 else 0.7)
  recs = _nested_records(p, cell, "freeze", val) + _nested_records(p, cell, "finetune", val)
  assert {r["draw"]["role"] for r in recs} == {"nested"}
  ch = grid.choices(recs, p)
  assert {k[-1] for k in ch} == {0, 1, 2} and len(ch) == 6
  assert [ch[("vgg_s", "digits", 5, "freeze", i)]["choice"]["lr"] for i in range(3)] == \
      [1e-3, 1e-2, 1e-3]
  keys = grid.grid_keys(recs, p)
  evals = sorted((k[0], k[3], dict(k[5])["lr"]) for k in keys if k[2] == "eval")
  # one evaluation run per draw at that draw's own choice; the tuning runs are the nested ones
  assert evals == sorted((a, i, 1e-2 if i == 1 else 1e-3) for a in ("freeze", "finetune")
                         for i in range(3))
  assert set(keys) - {k for k in keys if k[2] == "eval"} == set(grid.by_key(recs))
  with pytest.raises(ValueError):  # a nested plan chooses per draw only
    grid.choose(grid.by_key(recs), p, cell, p.arm("freeze"))


def test_ties_go_to_the_smaller_lr_for_every_arm():
  # Every arm alike: freeze's grid and finetune's grid both tie on every draw.
  p = _plan("--strategies", "freeze,finetune", "--lrs", "reduced", "--repeats", "2",
            "--arch", "vgg_s", "--target", "digits", "--shots", "5", "--tuning", "nested")
  cell = dict(p.cells[0])
  recs = (_nested_records(p, cell, "freeze", lambda i, lr: 0.6)
          + _nested_records(p, cell, "finetune", lambda i, lr: 0.6))
  for arm in ("freeze", "finetune"):
    for i in range(2):
      t = grid.choose(grid.by_key(recs), p, cell, p.arm(arm), draw=i)
      assert t["choice"]["lr"] == min(p.arm(arm).lrs) and t["edges"] == ["lr:low"]
  assert "ties go to the smaller LR" in report.protocol_text(p.config)


TINY = ["--shots", "2", "--repeats", "2", "--steps", "6", "--eval-every", "3",
        "--patience", "3", "--test-per-class", "4", "--val-per-class", "2", "--quiet",
        "--tune-extend", "0", "--lrs", "1e-3,1e-2", "--strategies", "freeze",
        "--target", "digits:0,1,2", "--no-paper-grid", "--tuning", "nested"]


def _rows(out):
  return records.rows(json.loads((out / "results.json").read_text()))


def test_nested_tuning_never_reads_a_test_image(tiny_source_dir, tmp_path, monkeypatch):
  src = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", *TINY]
  assert fewshot.main([*src, "--out", str(tmp_path / "real")]) == 0
  real = _rows(tmp_path / "real")
  poison_test_split(monkeypatch)  # the test split replaced by other images and other labels
  assert fewshot.main([*src, "--out", str(tmp_path / "poisoned")]) == 0
  other = _rows(tmp_path / "poisoned")
  selection = lambda rs: sorted((r["repeat"], r["lr"], r["val_acc"]) for r in rs
                                if r["role"] == "nested")
  assert len(selection(real)) == 2 * 2 and selection(real) == selection(other)
  assert all(r["test_acc"] is None for r in real if r["role"] == "nested")
  assert not [r for r in real if r["role"] == "tune"]  # no shared tuning draw was run
  chosen = lambda rs: sorted((r["repeat"], r["lr"]) for r in rs if r["role"] == "eval")
  assert chosen(real) == chosen(other) and len(chosen(real)) == 2
  assert {r.get("tuning") for r in real if r["role"] == "eval"} == {"nested"}
  assert [r["test_acc"] for r in real if r["role"] == "eval"] != \
      [r["test_acc"] for r in other if r["role"] == "eval"]
  text = (tmp_path / "real" / "report.md").read_text()
  assert "tuned on its own labelled pool" in text


def test_disjoint_tuning_states_its_overlap(tiny_source_dir, tmp_path):
  out = tmp_path / "disjoint"
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}",
          *[a for a in TINY if a not in ("--tuning", "nested")], "--tune-repeats", "1",
          "--disjoint-tuning", "--out", str(out)]
  assert fewshot.main(argv) == 0
  rows = _rows(out)
  # 2 draws x (2 + 2) images of ~90 per class: the tuning draw avoids them all
  assert {r["tune_overlap"] for r in rows if r["role"] == "eval"} == {0.0}
  assert json.loads((out / "run.json").read_text())["tune_overlap"] == {"digits:0,1,2|2": 0.0}
  text = (out / "report.md").read_text()
  assert "Tuning-draw overlap" in text and "digits:0,1,2 k=2: 0.0%" in text


def test_nested_report_names_the_extended_grid():
  p = _plan("--strategies", "freeze", "--lrs", "1e-3,1e-2", "--repeats", "2", "--arch", "vgg_s",
            "--target", "digits", "--shots", "5", "--tuning", "nested", "--tune-extend", "1",
            "--no-paper-grid")
  cell = dict(p.cells[0])
  recs = _nested_records(p, cell, "freeze", lambda i, lr: lr)  # the top edge wins: extend
  recs += [records.make("freeze", cell, d, {"lr": 0.1}, {"status": "ok", "val_acc": 0.0})
           for i in range(2) for d in draws.tuning_draws(0, 0, i)]
  recs += [records.make("freeze", cell, draws.Draw("eval", i), {"lr": 1e-2},
                        {"status": "ok", "val_acc": 0.5, "test_acc": 0.5 + i / 10, "steps": 3},
                        0.0) for i in range(2)]
  text, summary = report.make_report(p, recs)
  assert "freeze: 0.001, 0.01 (extended by tuning to 0.1)" in text
  assert summary["tuned"]["vgg_s|digits|freeze|5"]["chosen"] == "2/2"
  assert "lr 0.01 (2/2 draws)" in text
