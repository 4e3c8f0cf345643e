"""Issue 31's parameter-efficient table (experiments/peft_table.py): equal tuning budgets, the
budgeted LR grid against a hand computation, a registered claim without evidence on the results
page, and the study end to end on a random-weight vit_s28 (smoke)."""
import dataclasses
import json
import os
import time

import numpy as np
import pytest

from experiments import peft_table
from jtransfer.study import results_page
from experiments.claims_registry import peft as registered
from jtransfer import models, study
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.study import flags
from jtransfer.study import grid as grid_lib
from model_helpers import random_variables

SHAPE = (28, 28, 1)


def _plan(arch, argv=()):
  argv = ["--arch", arch, "--strategies", ",".join(peft_table.ARMS[arch]), *argv]
  return grid_lib.plan(peft_table.STUDY, flags.parse(peft_table.STUDY, argv))


@pytest.mark.parametrize("arch", sorted(peft_table.ARMS))
def test_every_method_gets_the_same_tuning_budget(arch):
  plan = _plan(arch)
  cell = plan.cells[0]
  for arm in plan.arms:
    assert grid_lib.budget_points(arm) == peft_table.BUDGET, arm.name
    # Tuning that always prefers the largest LR would extend the edge without a budget; with
    # one it trains exactly BUDGET points on each tuning draw.
    trained = []

    def run_missing(key):
      trained.append(key)
      return {"status": "ok", "val_acc": dict(key[-1])["lr"]}

    t = grid_lib.choose({}, plan, cell, arm, run_missing)
    assert len(trained) == peft_table.BUDGET * plan.config.protocol.tune_draws, arm.name
    assert t["choice"]["lr"] == max(arm.lrs) and t["edges"], arm.name


def test_budgeted_lr_grid_by_hand():
  # 12 points, a 3-valued knob: 4 LRs from 1e-3 to 5e-2, ratio 50 ** (1/3) = 3.684.
  lrs = grid_lib.budgeted("lora", (1e-3, 5e-3, 1e-2, 5e-2), {"rank": (2, 4, 8)}, 12)
  assert lrs == (1e-3, 3.68e-3, 1.36e-2, 5e-2)
  assert len(grid_lib.budgeted("freeze", (1e-3, 5e-2), {}, 12)) == 12
  assert grid_lib.budgeted("delta", (1e-2,), {"a": (1, 2, 3)}, 6) == (1e-3, 1e-1)
  with pytest.raises(InputError, match="not a multiple"):
    grid_lib.budgeted("vpt_deep", (1e-3, 5e-2), {"num_tokens": (1, 5, 10, 50)}, 6)


def test_an_arm_that_does_not_apply_is_refused(tmp_path):
  assert peft_table.main(["--arch", "vgg_s", "--strategies", "freeze,conv_adapter",
                          "--out", str(tmp_path / "x")]) == 2
  assert not os.path.exists(tmp_path / "x")
  with pytest.raises(InputError, match="do not apply to --arch vit_s28"):
    _plan("vit_s28", ["--strategies", "freeze,freeze_cwl"])


def test_registered_claims_without_a_folder_read_not_tested_yet(tmp_path):
  lines = results_page.generated(str(tmp_path), registered.CLAIMS)
  rows = [l for l in lines if l.startswith("| peft.")]
  assert len(rows) == len(registered.CLAIMS)
  assert all("**not tested yet**" in r and "no published folder peft_" in r for r in rows)
  # every claim's margin and reason are listed before any verdict exists
  assert sum(l.startswith("- peft.") for l in lines) == len(registered.CLAIMS)
  # the equivalence family: every method but freeze and LoRA against LoRA
  near = [e for e in registered.CLAIMS if e.kind == "equivalence"]
  assert {e.runs[0] for e in near} == set(peft_table.LABELS) - {"freeze", "lora"}


@pytest.fixture(scope="module")
def vit_source(tmp_path_factory):
  """A random-weight vit_s28 source (no pretraining), saved as a checkpoint."""
  model = models.get_model("vit_s28", 5)
  path = str(tmp_path_factory.mktemp("vit") / "model")
  transfer.save_source(path, transfer.Source("vit_s28", models.model_config(model),
                                             random_variables(model, SHAPE), SHAPE, (0.5,),
                                             (0.25,)))
  return path


def _smoke(source, out, arms, budget):
  """The table on a random vit_s28, digits, k = 1, 2 draws, 2-step runs, budget `budget`."""
  argv = ["--arch", "vit_s28", "--source", f"ckpt:{source}", "--target", "digits",
          "--shots", "1", "--repeats", "2", "--tune-repeats", "1", "--strategies", arms,
          "--steps", "2", "--patience", "0", "--test-per-class", "3", "--val-per-class", "1",
          "--out", out, "--quiet"]
  declared = dataclasses.replace(peft_table.STUDY, tune_budget=budget)
  start = time.time()
  assert study.main(declared, argv) == 0
  records = json.load(open(os.path.join(out, "results.json")))
  print(f"smoke ({arms}, budget {budget}): {len(records)} runs, "
        f"{(time.time() - start) / len(records):.2f} s per run")
  return records


def _check(records, out, arms, budget):
  tuning = [r for r in records if r["draw"]["role"] == "tune"]
  assert len(tuning) == len(arms) * budget
  assert {r["arm"] for r in tuning} == set(arms)
  for r in records:  # peft_cost in every record; these methods merge into the model
    assert r["outcome"]["extra_flops"] == 0
  head = 96 * 10 + 10  # freeze trains the new head only: vit_s28's width 96 x digits' 10
  freeze = {r["outcome"]["trained_params"] for r in records if r["arm"] == "freeze"}
  other = {r["outcome"]["trained_params"] for r in records if r["arm"] != "freeze"}
  assert freeze == {head} and min(other) > head
  report = open(os.path.join(out, "report.md")).read()
  assert "trained params" in report and f"exactly {budget} points" in report
  assert "never extended" in report and "extended up to" not in report
  assert "LoRA at least matches fine-tuning" not in report  # finetune did not run


def test_smoke_end_to_end(vit_source, tmp_path):
  """Fast: freeze and SSF (no knobs) at a budget of 2 LRs each."""
  out = str(tmp_path / "peft")
  _check(_smoke(vit_source, out, "freeze,ssf", 2), out, ("freeze", "ssf"), 2)


@pytest.mark.slow
def test_smoke_with_the_declared_budget(vit_source, tmp_path):
  """The declared budget: 12 LRs for freeze, 4 LRs x 3 ranks for LoRA (~70 s on 2 cores)."""
  out = str(tmp_path / "peft")
  budget = peft_table.BUDGET
  _check(_smoke(vit_source, out, "freeze,lora", budget), out, ("freeze", "lora"), budget)


@pytest.mark.slow
def test_cost_of_training_only_keys_is_not_inference():
  """DELTA's frozen source copy and Co-Tuning's source head train or regularise but are not
  deployed: their runs' records say 0 extra FLOPs; Co-Tuning counts its trained source head,
  LP-FT the whole network (counted from the target model's params). ~90 s on 2 cores."""
  from jtransfer import surgery
  from jtransfer.study.config import Protocol
  from jtransfer.study.target import TargetRuns
  model = models.get_model("vgg_s", 5)
  src = transfer.Source("vgg_s", models.model_config(model), random_variables(model, SHAPE),
                        SHAPE, (0.5,), (0.25,))
  runs = TargetRuns(src, "digits", Protocol(test_per_class=2, batch_size=16), {}, {},
                    quiet=True)
  train = np.concatenate([np.flatnonzero(runs.pool.labels == c)[:2] for c in range(10)])
  val = np.setdiff1d(np.arange(40), train)[:10]
  params, _ = transfer.get_strategy("freeze").build(src, 10, 2).init(0, None, None)
  total = sum(np.size(v) for v in surgery.flatten(params).values())  # the target model
  for name in ("delta_noatt", "cotuning", "lpft"):
    out = runs.run(name, train, val, {"lr": 1e-4}, 0, 2)
    assert out["extra_flops"] == 0, name
    if name == "lpft":
      assert out["trained_params"] == total
    if name == "cotuning":  # the source head (5 classes) trains beside the target model
      assert out["trained_params"] > total
