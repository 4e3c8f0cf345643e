"""experiments.delta_table end to end on a tiny pretrained source, its flags, and DELTA w/o
ATT's default staying finite (issue 16).

The source is conftest's session-wide vgg_s (pretrain(..., epochs=0.02, max_train=256) saved
with transfer.save_source): vgg_s has no BN, so its train steps compile faster than
resnet_s's; BN paths are tested in test_delta.py.
"""

import json
import os

import numpy as np
import pytest

from experiments import delta_table, fewshot
from jtransfer.data import Batches, load_spec, sample_kshot
from jtransfer.errors import InputError
from jtransfer.methods import delta, delta_study, transfer
from jtransfer.study import flags, grid, publish
from jtransfer.study import records as rec
from jtransfer.train import init_state, make_train_step

TINY = ["--arch", "vgg_s", "--curve-arch", "vgg_s", "--target", "digits", "--shots", "2",
        "--repeats", "2", "--steps", "4", "--patience", "2", "--eval-every", "2",
        "--test-per-class", "5", "--val-per-class", "3", "--tune-repeats", "1", "--cv-folds", "0",
        "--curve-steps", "2", "--curve-every", "1", "--curve-shots", "2",
        "--curve-schedules", "exp", "--curve-test-per-class", "5", "--quiet"]


def test_delta_table_smoke(tiny_source_dir, tmp_path):
  """Table 1 under the protocol: tuning draws, tuned table, claims, paper grid, resume."""
  out = str(tmp_path / "d")
  registered = {s: transfer.get_strategy(s) for s in delta_table.STRATEGIES}
  # alpha fixed (one value: no alpha tuning; test_alpha_flags_set_the_tuning_grid covers grids
  # and folds without training), tuning on the tuning draw's validation set (--cv-folds 0):
  # fewer XLA compiles.
  argv = TINY + ["--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--out", out, "--no-curves",
                 "--alpha", "0.02", "--alpha-noatt", "1e-4"]
  assert delta_table.main(argv) == 0
  # the flags reach the runs as knobs: the registry is as it was
  assert {s: transfer.get_strategy(s) for s in delta_table.STRATEGIES} == registered
  for name in ("results.json", "results.jsonl", "summary.json", "report.md",
               "accuracy_vs_shots.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "results.json")) as f:
    saved = json.load(f)
  assert all(r["version"] == 2 for r in saved)
  records = rec.rows(saved)
  assert all(r["status"] == "ok" for r in records)
  tune = [r for r in records if r["role"] == "tune"]
  evals = [r for r in records if r["role"] == "eval"]
  # One LR and a fixed alpha: nothing to choose, so no tuning draws run; alpha as the flags say.
  assert not tune
  assert {r["hp"] for r in evals if r["arm"] in ("l2sp", "delta")} == {"alpha=0.02"}
  assert {r["hp"] for r in evals if r["arm"] == "delta_noatt"} == {"alpha=0.0001"}
  assert sorted(r["arm"] for r in evals) == sorted(delta_table.STRATEGIES * 2)
  assert all(0.0 <= r["test_acc"] <= 1.0 and r["steps"] <= 4 and r["cap"] == 4
             for r in evals)
  report = open(os.path.join(out, "report.md")).read()
  assert "## Tuned on validation" in report and "### Table 1 layout" in report
  assert "| vgg_s | digits | DELTA w/o ATT |" in report and "alpha=0.02" in report
  assert "## Claims" in report and "DELTA: DELTA >= DELTA w/o ATT (Table 1)" in report
  assert "Tested as L2-SP >= L2, margin 1 pt" in report
  assert "Tested as DELTA > L2-FE." in report
  assert "attention probe BN: authors" in report and "Best over LR" in report
  with open(os.path.join(out, "summary.json")) as f:
    summary = json.load(f)
  # every claim whose arms ran (the later baselines' did not), + Fig. 3's filter distance
  ran = [c for c in delta_table.CLAIMS if {c.a, c.b} <= set(delta_table.STRATEGIES)]
  assert len(ran) == 8 and len(summary["claims"]) == len(ran) + 1
  fig3 = summary["claims"][-1]
  assert fig3["claim"]["source"] == "Fig. 3"
  dist = {(r["arm"], r["repeat"]): r["filter_distance"] for r in evals
          if r["arm"] in ("delta", "l2sp")}
  assert all(v > 0 for v in dist.values())  # every fine-tuned run moved its filters
  assert fig3["pooled"]["paired"]["mean"] == pytest.approx(np.mean(
      [dist[("delta", i)] - dist[("l2sp", i)] for i in (0, 1)]))
  assert all("filter_distance" not in r for r in evals if r["arm"] == "l2fe")
  assert all(len(c["cells"]) == 1 and c["pooled"]["paired"]["n"] == 2
             for c in summary["claims"])
  # --resume finds every run done and rewrites the same report ...
  assert delta_table.main(argv + ["--resume"]) == 0
  assert open(os.path.join(out, "report.md")).read() == report
  assert publish.check(out) == []
  # ... but not with other DELTA settings (the folder's settings fingerprint), nor another
  # JTRANSFER_DELTA_* environment (delta_settings.json).
  assert delta_table.main(argv + ["--resume", "--att-bn", "eval"]) == 2
  with pytest.MonkeyPatch.context() as m:
    m.setenv("JTRANSFER_DELTA_BETA", "0.5")
    assert delta_table.main(argv + ["--resume"]) == 2


@pytest.mark.slow  # 20 s; test_delta_table_smoke runs the module
def test_delta_table_curves(tiny_source_dir, tmp_path):
  """Fig. 2 and Fig. 3: fixed-step runs of L2-SP and DELTA at the alpha the table tuned."""
  out = str(tmp_path / "c")
  argv = TINY + ["--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--out", out,
                 "--strategies", "l2sp,delta", "--alpha", "0.02", "--repeats", "1"]
  assert delta_table.main(argv) == 0
  for name in ("curves.json", "learning_curves.png", "filter_distance.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  report = open(os.path.join(out, "report.md")).read()
  assert "## Fig. 2" in report and "L2-SP alpha=0.02 (fixed); DELTA alpha=0.02 (fixed)" in report
  with open(os.path.join(out, "curves.json")) as f:
    curves = json.load(f)
  assert set(curves["curves"]) == {"exp|l2sp", "exp|delta"}
  assert all(len(c["test_acc"]) == 2 for c in curves["curves"].values())
  # Fig. 3: every conv filter once, per stage, sorted.
  d = curves["distances"]["delta"]
  assert {k: len(v) for k, v in d.items()} == {"stage1": 64, "stage2": 128, "stage3": 256}
  assert all(np.diff(d["stage3"]) <= 0) and d["stage3"][0] > 0
  # --resume reuses the curves (same config) and rewrites the same report.
  mtime = os.path.getmtime(os.path.join(out, "curves.json"))
  assert delta_table.main(argv + ["--resume"]) == 0
  assert os.path.getmtime(os.path.join(out, "curves.json")) == mtime
  assert open(os.path.join(out, "report.md")).read() == report
  assert publish.check(out) == []  # the report, Fig. 2 included, regenerates from the folder


def test_delta_table_flag_errors(tmp_path, capsys):
  out = str(tmp_path / "e")
  assert delta_table.main(["--taps", "resnet_s", "--out", out]) == 2
  assert "--taps" in capsys.readouterr().err
  assert delta_table.main(["--alpha", "-1", "--out", out]) == 2
  assert delta_table.main(["--curve-schedules", "cosine", "--out", out]) == 2
  assert delta_table.main(["--alpha-noatt", "1e-4,nan", "--out", out]) == 2
  assert delta_table.main(["--alpha", "0.01,0.01", "--out", out]) == 2
  with pytest.raises(SystemExit):
    delta_table.main(["--att-bn", "batch", "--out", out])
  assert not os.path.exists(os.path.join(out, "results.jsonl"))


def test_filter_distances_by_hand():
  w0 = {"conv2_1": {"conv": {"kernel": np.zeros((1, 1, 2, 3)), "bias": np.zeros(3)}},
        "stage1/block0": {"conv1": {"conv": {"kernel": np.zeros((1, 1, 1, 2))}}}}
  w = {"conv2_1": {"conv": {"kernel": np.zeros((1, 1, 2, 3)), "bias": np.ones(3)}},
       "stage1/block0": {"conv1": {"conv": {"kernel": np.zeros((1, 1, 1, 2))}}}}
  w["conv2_1"]["conv"]["kernel"][0, 0, :, 1] = [3.0, 4.0]   # filter 1 moved by 5
  w["stage1/block0"]["conv1"]["conv"]["kernel"][0, 0, 0, 0] = -2.0
  got = delta_study.stage_filter_distances(w, w0)
  assert got == {"stage2": [5.0, 0.0, 0.0], "stage1": [2.0, 0.0]}
  assert delta_study.stage_of("stem") == "stem"


@pytest.mark.parametrize("value", ["resnet_s=", "=a,b", "resnet_s"])
def test_parse_taps_rejects(value):
  with pytest.raises(InputError):
    delta_study.parse_taps([value])


def test_alpha_flags_set_the_tuning_grid():
  """--alpha / --alpha-noatt reach the grid the runner tunes over (no training: a stub
  scores)."""
  argv = ["--arch", "vgg_s", "--target", "digits", "--shots", "5", "--strategies",
          "l2,l2sp,delta_noatt", "--alpha", "0.02", "--alpha-noatt", "1e-5,1e-4"]
  study = delta_table.STUDY
  config = flags.parse(study, argv)
  p = config.protocol
  assert (p.steps, p.patience, p.tune_draws, p.cv_folds) == (200, 100, 1, None)
  plan = grid.plan(study, config)
  alphas = {a.name: (a.knobs["alpha"], a.defaults["alpha"]) for a in plan.arms
            if "alpha" in a.knobs}
  assert alphas == {"l2sp": ((0.02,), 0.02), "delta_noatt": ((1e-5, 1e-4), 1e-4)}
  registered = transfer.get_strategy("delta_noatt")
  seen = []

  def run_missing(key):  # alpha 1e-4 scores best: on the grid's top edge, so it extends once
    seen.append(key)
    return {"status": "ok", "val_acc": 0.6 if dict(key[5])["alpha"] == 1e-4 else 0.5}

  cell = {"arch": "vgg_s", "target": "digits", "shots": 5}
  tuned = {a.name: grid.choose({}, plan, cell, a, run_missing) for a in plan.arms}
  assert transfer.get_strategy("delta_noatt") is registered
  noatt = [k for k in seen if k[0] == "delta_noatt"]
  assert {dict(k[5])["alpha"] for k in noatt} == {1e-5, 1e-4, 1e-3}
  assert sorted({k[4] for k in noatt}) == [0, 1, 2, 3, 4]      # the paper's 5-fold CV
  # one LR and one alpha (l2sp), one LR (l2): nothing to choose, no tuning runs
  assert not [k for k in seen if k[0] in ("l2sp", "l2")]
  assert tuned["l2sp"]["hp"] == "alpha=0.02"
  assert tuned["l2"]["choice"] == {"lr": 0.01}
  assert all(k[2] == "tune" for k in seen)                      # tuning draws only
  assert tuned["delta_noatt"]["hp"] == "alpha=0.0001"
  # Fig. 2 takes the alpha tuned for its cell (here from tuning records alone), or the fixed
  # one, else the paper's.
  records = [{"strategy": name, "arch": "vgg_s", "target": "digits", "shots": 5, "repeat": -1,
              "lr": 0.01, "hp": f"alpha={a:g}", "fold": -1, "status": "ok", "val_acc": acc}
             for name in ("l2sp", "delta") for a, acc in ((1e-3, 0.5), (1e-2, 0.6), (0.1, 0.4))]
  curve_argv = argv[:6] + ["--strategies", "l2sp,delta", "--cv-folds", "0", "--curve-arch",
                           "vgg_s", "--curve-shots", "5"]
  for extra, want in (([], {"hp": "alpha=0.01", "origin": "tuned"}),
                       (["--alpha", "0.02"], {"hp": "alpha=0.02", "origin": "fixed"})):
    plan = grid.plan(study, flags.parse(study, curve_argv + extra))
    assert delta_table.curve_knobs(records, plan) == {"l2sp": want, "delta": want}
  # the alpha grid (no flag), at a cell the table did not tune
  plan = grid.plan(study, flags.parse(study, curve_argv + ["--curve-shots", "10"]))
  assert delta_table.curve_knobs(records, plan)["delta"] == {"hp": "alpha=0.01",
                                                             "origin": "paper"}
  # Without the flags: the registered grids and paper values.
  plan = grid.plan(study, flags.parse(study, argv[:6]))
  assert plan.arm("l2sp").knobs == {"alpha": delta.ALPHAS}
  assert transfer.get_strategy("delta").knobs["alpha"] == delta.ALPHAS


@pytest.mark.slow
def test_delta_noatt_defaults_stay_finite(tiny_source_dir):
  """Issue 16's divergent default, on a tiny resnet_s source and the swapped split: DELTA w/o
  ATT at its default alpha trains 50 SGD steps at lr 0.01 with finite losses, where the old
  shared alpha = 0.01 blows up within a few steps."""
  source = transfer.load_source(tiny_source_dir("resnet_s"))  # pretrained on fmnist 0,2,3,4,6
  data = load_spec("fmnist:1,5,7,8,9", source.input_shape)
  idx, _ = sample_kshot(data.train.labels, 10, 0, num_classes=data.train.num_classes)
  images, labels = data.train.images[idx], data.train.labels[idx]
  strategy = transfer.get_strategy("delta_noatt")

  def losses(steps, **knobs):
    setup = strategy.build(source, data.train.num_classes, 100, **knobs)
    params, stats = setup.init(0, images, labels)
    step = make_train_step(setup.loss_fn, setup.optimizer)
    state = init_state(params, stats, setup.optimizer, 0, 0.01)
    batches = Batches(images, labels, 64, 0)
    out = []
    for t in range(steps):
      state, m = step(state, batches.at(t))
      out.append(float(m["loss"]) if bool(m["finite"]) else float("nan"))
    return np.array(out)

  default = losses(50)
  assert np.all(np.isfinite(default)) and default[-1] < default[0]
  assert not np.all(np.isfinite(losses(10, alpha=0.01)))


@pytest.mark.slow
def test_issue_delta_noatt_command(tmp_path):
  """Issue 16's command (a source pretrained on fmnist 1,5,7,8,9: minutes on first use, then
  cached), one run of 100 steps: every run finite."""
  out = str(tmp_path / "n")
  argv = ["--arch", "resnet_s", "--source", "fmnist:1,5,7,8,9", "--target",
          "fmnist:0,2,3,4,6", "--shots", "10", "--strategies", "delta_noatt", "--lrs", "0.01",
          "--repeats", "1", "--tune-repeats", "0", "--patience", "0", "--steps", "100",
          "--out", out, "--quiet"]
  assert fewshot.main(argv) == 0
  with open(os.path.join(out, "results.json")) as f:
    records = json.load(f)
  assert records and all(r["status"] == "ok" and r["steps"] == 100 for r in records)
  assert all(0.0 <= r["test_acc"] <= 1.0 for r in records)


def test_l2fe_lrs_give_l2fe_a_tuned_lr_grid():
  """--l2fe-lrs: L2-FE's LR is tuned over its own grid (issue 29 item 6); others keep --lrs."""
  from jtransfer.study import flags
  from jtransfer.study import grid as grid_lib
  argv = ["--arch", "vgg_s", "--target", "digits", "--shots", "5", "--strategies", "l2fe,l2"]

  def lrs(extra):
    plan = grid_lib.plan(delta_table.STUDY, flags.parse(delta_table.STUDY, [*argv, *extra]))
    return {a.name: tuple(a.lrs) for a in plan.arms}

  got = lrs(["--l2fe-lrs", "0.1,0.01"])
  assert got["l2fe"] == (0.01, 0.1) and got["l2"] == (0.01,)
  assert lrs([])["l2fe"] == (0.01,)
  for bad in ("0", "x", "0.1,0.1"):
    with pytest.raises(InputError, match="--l2fe-lrs"):
      lrs(["--l2fe-lrs", bad])


def test_l2fe_steps_give_l2fe_its_own_cap(tiny_source_dir, tmp_path, monkeypatch):
  """--l2fe-steps: L2-FE's runs train to their own cap (patience 0: exactly that many steps),
  the other arms to --steps; the records and the report's recipe say so; bad values refused.
  --batch-runs 2 trains L2-FE's two evaluation runs as one batched step (a head on frozen
  features), so the batched path honours the arm's cap too; L2 trains kernels, one at a time."""
  out = str(tmp_path / "cap")
  argv = TINY + ["--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--out", out, "--no-curves",
                 "--strategies", "l2fe,l2", "--patience", "0", "--batch-runs", "2",
                 "--l2fe-steps", "7"]
  from jtransfer.study.target import TargetRuns
  batched, run_many = [], TargetRuns.run_many

  def spy(self, name, jobs, steps, strategy=None):
    batched.append((name, len(jobs), steps))
    return run_many(self, name, jobs, steps, strategy)
  monkeypatch.setattr(TargetRuns, "run_many", spy)
  assert delta_table.main(argv) == 0
  assert batched == [("l2fe", 2, 7)]
  with open(os.path.join(out, "results.json")) as f:
    records = rec.rows(json.load(f))
  caps = {(r["arm"], r["cap"], r["steps"]) for r in records}
  assert caps == {("l2fe", 7, 7), ("l2", 4, 4)}
  report = open(os.path.join(out, "report.md")).read()
  assert "L2-FE's own cap: 7 steps" in report and "of the 4-step cap" in report
  assert publish.check(out) == []
  for bad in ("0", "x", "2.5"):
    with pytest.raises(InputError, match="--l2fe-steps"):
      flags.parse(delta_table.STUDY, TINY + ["--l2fe-steps", bad])
