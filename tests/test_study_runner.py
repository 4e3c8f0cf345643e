"""The study runner's loop (jtransfer.study.runner) on arms that are run functions, without a
model: dependency order, tuning then evaluation on shared draws, records saved as they finish,
resume, and the grid check of what it wrote."""
import dataclasses
import types

import numpy as np
import pytest

from jtransfer.errors import InputError
from jtransfer.study import Arm, Study, flags, grid, records, runner
from jtransfer.study.results import ResultsDir


def _data(plan, cell, cache):
  """A cell's shared data: only a labelled pool (4 classes x 30 images)."""
  return types.SimpleNamespace(pool=types.SimpleNamespace(labels=np.repeat(np.arange(4), 30)),
                               num_classes=4)


CALLS = []


def _teacher(ctx, point):
  CALLS.append(("teacher", ctx.draw.repeat))
  # validation accuracy peaks at lr 0.1: tuning must choose it
  return {"val_acc": 1.0 - abs(point["lr"] - 0.1), "test_acc": 0.5, "seed": ctx.seed}


def _student(ctx, point):
  CALLS.append(("student", ctx.draw.repeat))
  teacher = [o for k, o in ctx.done.items() if k[0] == "teacher" and
             k[1] == tuple(sorted(ctx.cell.items())) and (k[2], k[3]) ==
             (ctx.draw.role, ctx.draw.index)]
  assert teacher, "the teacher ran first on this draw"
  assert len(ctx.train_idx) == 4 * ctx.cell["shots"] and not set(ctx.train_idx) & set(
      ctx.val_idx)
  return {"val_acc": teacher[0]["val_acc"] * point["lr"], "test_acc": 0.25}


STUDY = Study(module="tests.study", title="# T", any_strategy=False,
              arms=(Arm("student", run=_student, after=("teacher",), grid={"lr": (0.5, 1.0)}),
                    Arm("teacher", run=_teacher, grid={"lr": (0.01, 0.1, 1.0)})),
              prepare=_data)
ARGV = ["--arch", "vgg_s", "--target", "digits", "--shots", "2", "--strategies",
        "student,teacher", "--repeats", "2", "--tune-repeats", "1", "--tune-extend", "0",
        "--no-paper-grid", "--val-per-class", "3", "--quiet"]


def test_function_arms_run_in_dependency_order_and_resume(tmp_path):
  config = flags.parse(STUDY, ARGV + ["--out", str(tmp_path / "o")])
  results = ResultsDir(str(tmp_path / "o"))
  CALLS.clear()
  recs = runner.run(STUDY, config, results)
  # the teacher's 3 tuning runs and 2 evaluation runs, then the student's 2 + 2
  assert CALLS == [("teacher", -1)] * 3 + [("teacher", 0), ("teacher", 1)] + \
      [("student", -1)] * 2 + [("student", 0), ("student", 1)]
  rows = records.rows(recs)
  teach = [r for r in rows if r["arm"] == "teacher" and r["role"] == "eval"]
  assert {r["lr"] for r in teach} == {0.1}  # chosen on the tuning draw
  student = [r for r in rows if r["arm"] == "student" and r["role"] == "eval"]
  assert {r["lr"] for r in student} == {1.0}
  # each draw has its own seed, shared by the arms
  assert len({r["seed"] for r in teach}) == 2
  # saved as they finished; the grid is exactly what was run
  assert len(ResultsDir(str(tmp_path / "o"), resume=True).records) == len(recs) == 9
  plan = grid.plan(STUDY, config)
  assert grid.grid_keys(recs, plan) == {records.key(r) for r in recs}
  # a resume runs nothing and returns every record of the folder
  CALLS.clear()
  again = runner.run(STUDY, config, ResultsDir(str(tmp_path / "o"), resume=True))
  assert CALLS == [] and sorted(map(records.key, again)) == sorted(map(records.key, recs))


def test_an_arm_waiting_on_an_absent_arm_is_refused(tmp_path):
  config = flags.parse(STUDY, [a if a != "student,teacher" else "student" for a in ARGV])
  with pytest.raises(InputError, match="arm student needs arm"):
    runner.arm_order(grid.plan(STUDY, config))


def test_untuned_arm_runs_its_whole_grid_on_every_draw(tmp_path):
  flat = dataclasses.replace(STUDY, arms=(Arm("teacher", run=_teacher, tuned=False,
                                              grid={"lr": (0.01, 0.1)}),))
  config = flags.parse(flat, [a if a != "student,teacher" else "teacher" for a in ARGV] +
                       ["--out", str(tmp_path / "u")])
  recs = runner.run(flat, config, ResultsDir(str(tmp_path / "u")))
  rows = records.rows(recs)
  assert all(r["role"] == "eval" for r in rows)
  assert sorted((r["repeat"], r["lr"]) for r in rows) == [(0, 0.01), (0, 0.1), (1, 0.01),
                                                          (1, 0.1)]
