"""The not-converged check (jtransfer.protocol.convergence): an arm at its step cap in more
than 10% of evaluation runs is flagged in the report's tables, its claims read "not tested",
and a registered claim about it reads "not tested" from the records."""
import json

import pytest

from experiments import fewshot
from jtransfer.protocol import claims, convergence
from jtransfer.study import draws, records, report


def _v1(arm, repeat, stopped, role="eval"):
  return dict(strategy=arm, role=role, repeat=repeat, stopped=stopped, arch="vgg_s",
              target="digits", shots=5)


def test_share_at_the_cap_by_hand():
  # 10 runs of 'a': 1 at the cap (10%, not more): converged; 'b': 2 of 10; tuning runs and
  # fixed-step runs never count
  recs = [_v1("a", i, "cap" if i == 0 else "patience") for i in range(10)]
  recs += [_v1("b", i, "cap" if i < 2 else "patience") for i in range(10)]
  recs += [_v1("b", -1, "cap", role="tune"), _v1("c", 0, "fixed")]
  assert convergence.capped(recs) == {"a": (1, 10), "b": (2, 10), "c": (0, 1)}
  assert convergence.flagged(recs) == {"b": (2, 10)}
  # version-2 records read the same
  cell = dict(arch="vgg_s", target="digits", shots=5)
  v2 = [records.make("b", cell, draws.Draw("eval", i), {"lr": 0.1},
                     {"status": "ok", "stopped": "cap" if i < 2 else "patience"}, 0.0)
        for i in range(10)]
  assert convergence.flagged(v2) == {"b": (2, 10)}
  # the registry's detector names every (cell, draw) of the flagged arm only
  slots = convergence.not_converged("b").slots(recs)
  assert slots == {(frozenset(cell.items()), i) for i in range(10)}
  assert convergence.not_converged("a").slots(recs) == set()
  assert convergence.not_converged("b").slots(v2) == slots
  # either side of a claim: a flagged arm marks the slots whichever position it has
  assert convergence.not_converged("a", "b").slots(recs) == slots
  assert convergence.not_converged("b", "a").slots(recs) == slots
  assert convergence.not_converged("a", "c").slots(recs) == set()
  assert "a or b's evaluation runs" in convergence.not_converged("a", "b").reason
  with pytest.raises(ValueError):
    convergence.not_converged()


def test_a_claim_on_an_unconverged_arm_reads_not_tested():
  res = {"claim": {"a": "l2", "b": "l2fe"}, "cells": [{"verdict": claims.REPRODUCED}],
         "pooled": {"verdict": claims.REPRODUCED, "paired": {"mean": 0.1}}}
  out = report.untested(res, {"l2fe": (13, 20)})
  assert [c["verdict"] for c in out["cells"]] == [claims.NOT_TESTED]
  assert out["pooled"]["verdict"] == claims.NOT_TESTED and out["not_converged"] == ["l2fe"]
  assert out["pooled"]["paired"] == {"mean": 0.1}  # the difference stays, for the record
  assert report.untested(res, {"freeze": (2, 2)}) is res


def test_report_flags_an_arm_at_its_cap(tiny_source_dir, tmp_path):
  # 3 steps under a 50-step patience: every run stops at its cap
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1,2", "--shots", "2", "--repeats", "2", "--steps", "3", "--eval-every", "1",
          "--patience", "50", "--test-per-class", "3", "--val-per-class", "1", "--quiet",
          "--lrs", "1e-2", "--strategies", "freeze", "--no-paper-grid"]
  # (without --cap-share the summary keeps its old form: `publish check published` shows it)
  assert fewshot.main([*argv, "--cap-share", "0.1", "--out", str(tmp_path / "on")]) == 0
  on = json.loads((tmp_path / "on" / "summary.json").read_text())
  assert on["not_converged"] == {"freeze": [2, 2]}
  text = (tmp_path / "on" / "report.md").read_text()
  assert "freeze (not converged: 2/2 runs at the step cap)" in text
  assert "step cap in more than 10% of runs is flagged not converged" in text  # protocol
