"""The study runner's arm options (jtransfer.study.declare.Arm): grids from the study's own
flags, a knob tuned on another scale, an arm's own step cap, an after-arm reading its
predecessor's chosen point, a run function's fixed knobs. A toy study of run functions that
train nothing: only the runner's flow is under test."""
import dataclasses
import json
import os
import types

import numpy as np

from jtransfer import study
from jtransfer.protocol import Budget, tuning
from jtransfer.study import flags, grid, records
from jtransfer.study.config import flag


@dataclasses.dataclass(frozen=True)
class _Knobs:
  a_lrs: tuple = flag("--a-lrs", (1e-3, 1e-2), "arm a's LR grid", cli="1e-3,1e-2",
                      parse=lambda t: tuple(float(v) for v in t.split(",")))
  b_cap: int = flag("--b-cap", 7, "arm b's step cap")


def _run_a(ctx, point):
  # the higher the LR the better: 1e-2 wins (an edge, extended once to 0.1, which loses)
  return {"status": "ok", "val_acc": {1e-3: 0.1, 1e-2: 0.5, 0.1: 0.2}[point["lr"]],
          "test_acc": 0.5, "cap_seen": ctx.steps, "a_chosen": None}


def _run_b(ctx, point):
  # the higher w the better, whatever the LR: w's odds grid extends past 0.8
  return {"status": "ok", "val_acc": point["w"], "test_acc": point["w"],
          "cap_seen": ctx.steps, "a_chosen": ctx.chosen.get("a")}


def _prepare(plan, cell, cache):
  return types.SimpleNamespace(pool=types.SimpleNamespace(labels=np.repeat(np.arange(2), 20)),
                               num_classes=2)


STUDY = study.Study(
    module="tests.test_study_arms", title="# toy", any_strategy=False, extra=_Knobs,
    arms=(study.Arm("a", grid=lambda c: {"lr": c.extra.a_lrs}, run=_run_a),
          study.Arm("b", grid={"lr": (1e-3,), "w": (0.5, 0.8)}, run=_run_b, after=("a",),
                    scales={"w": tuning.odds_scale()},
                    budget=lambda c: (Budget(cap=c.extra.b_cap, eval_every=1, patience=2),
                                      c.extra.b_cap))),
    prepare=_prepare, report=lambda plan, recs, folder: ("# toy\n", {}),
    defaults={"strategies": "a,b", "arch": "vgg_s", "target": ["digits"], "shots": "2",
              "paper_grid": False, "steps": 5},
    hidden=frozenset({"paper_grid"}))


def test_arm_options_through_the_runner(tmp_path):
  out = str(tmp_path / "toy")
  assert study.main(STUDY, ["--out", out, "--quiet", "--tune-extend", "1", "--repeats", "1",
                            "--a-lrs", "1e-3,1e-2"]) == 0
  rows = records.rows(json.load(open(os.path.join(out, "results.json"))))
  tune_b = sorted(r["w"] for r in rows if r["arm"] == "b" and r["role"] == "tune")
  # w on its odds: 1, 4 -> 16, i.e. 0.5, 0.8 -> 16/17 (6 digits), inside (0, 1)
  assert tune_b == [0.5, 0.8, round(16 / 17, 6)]
  ev = {r["arm"]: r for r in rows if r["role"] == "eval"}
  assert ev["a"]["lr"] == 1e-2 and ev["b"]["w"] == round(16 / 17, 6)
  # b learns from a's chosen point; each arm runs (and records) its own cap
  assert ev["b"]["a_chosen"] == {"lr": 1e-2}
  assert (ev["a"]["cap"], ev["a"]["cap_seen"]) == (5, 5)
  assert (ev["b"]["cap"], ev["b"]["cap_seen"]) == (7, 7)


def test_a_hidden_flag_takes_the_studys_default():
  assert "--paper-grid" not in flags.parser(STUDY).format_help()
  assert flags.parse(STUDY, []).protocol.paper_grid is False  # the dataclass's is True


def test_a_run_functions_single_values_are_its_fixed_point():
  p = grid.plan(STUDY, flags.parse(STUDY, ["--tune-repeats", "0", "--a-lrs", "3e-3"]))
  assert p.arm("a").grid == {"lr": (3e-3,)}
  b = p.arm("b")
  assert grid.eval_points(p, b, None) == [{"lr": 1e-3}]  # w has two values: no default
  one = dataclasses.replace(b, knobs={"w": (0.3,)}, defaults={"w": 0.3})
  assert grid.eval_points(p, one, None) == [{"lr": 1e-3, "w": 0.3}]


def test_an_arm_without_its_predecessor_is_refused_before_out_opens(tmp_path, capsys):
  out = tmp_path / "never"
  assert study.main(STUDY, ["--strategies", "b", "--out", str(out), "--quiet"]) == 2
  assert "arm b needs arm(s) a" in capsys.readouterr().err and not out.exists()
