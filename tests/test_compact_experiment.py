"""experiments.compact_transfer: flags, costs, tuning, and main() end to end (tiny); the
library it runs on (pruning, the runs): tests/test_compact_lib.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import small_variables

from experiments import compact_report
from experiments import compact_transfer as ct
from jtransfer import models
from jtransfer.methods import distill, transfer
from jtransfer.sources import pretrain
from jtransfer.study import flags, publish
from jtransfer.study import grid as grid_lib
from jtransfer.study import records as rec


_fast_init = small_variables


@pytest.fixture(autouse=True)
def fast_init(monkeypatch):
  monkeypatch.setattr(models, "init_model", _fast_init)


@pytest.fixture(scope="module")
def sources(tiny_source_dir, tmp_path_factory):
  """(teacher source dir, compact source dir): tiny vgg_s sources, the compact one at half
  width (pretrain(..., epochs=0.02, max_train=256, model_config=...))."""
  path = str(tmp_path_factory.mktemp("compact-src") / "model")
  src = pretrain("vgg_s", "fmnist:0,2,3,4,6", epochs=0.02, max_train=256, batch_size=64,
                 progress=False, model_config=distill.compact_config("vgg_s"))
  transfer.save_source(path, src)
  return tiny_source_dir("vgg_s"), path


# Tiny protocol settings: converged runs on 2 validation images per class, one tuning draw.
TINY = ["--teacher-steps", "3", "--student-steps", "3", "--patience", "2", "--eval-every", "1",
        "--val-per-class", "2", "--tune-repeats", "1", "--tune-extend", "0",
        "--teacher-lr", "1e-3", "--student-lr", "2e-3", "--ft-lr", "1e-3", "--temperature", "4",
        "--lam", "0.7", "--latency-batches", "1", "--latency-runs", "1", "--test-per-class", "3",
        "--quiet"]


def _tiny(big, small, out, *extra):
  return ["--arch", "vgg_s", "--source", f"ckpt:{big}", "--student-source", f"ckpt:{small}",
          "--target", "digits", "--shots", "2", "--repeats", "1", *TINY, "--out", out, *extra]


def _regenerated(argv, out) -> str:
  """report.md made again from results.json alone (and run.json's command)."""
  return publish.regenerate(str(out))[0]


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("extra,match", [
    (["--strategies", "teacher,bogus"], "--strategies"),
    (["--strategies", "distill"], "needs arm(s) teacher"),
    (["--arch", "vgg_s,resnet_s"], "--arch takes one value"),
    (["--shots", "5,10"], "--shots takes one value"),
    (["--lam", "1.5"], "lambda must be in [0, 1]"),
    (["--lam", "0,0.5"], "must lie in (0, 1)"),
    (["--temperature", "0"], "temperature"),
    (["--temperature", "2,2"], "distinct"),
    (["--student-lr", "nan"], "--student-lr"),
    (["--teacher-lr", "1e-3,x"], "--teacher-lr"),
    (["--tune-repeats", "0"], "--tune-repeats 0 leaves no draws"),
    (["--patience", "-1"], "--patience"),
    (["--val-per-class", "0"], "--patience needs validation"),
    (["--approach-margin", "2"], "--approach-margin"),
    (["--prune-keep", "0"], "--prune-keep"),
    (["--augment", "pad2+rotate"], "--augment"),
    (["--student-steps", "0"], "--student-steps"),
    (["--latency-batches", "1,x"], "--latency-batches"),
    (["--student-config", "[1, 2]"], "JSON object"),
    (["--student-config", "{bad"], "not valid JSON"),
])
def test_bad_flags(extra, match, capsys):
  assert ct.main(["--target", "digits", "--out", "/nonexistent/x", *extra]) == 2
  assert match in capsys.readouterr().err


def test_runner_flags_it_does_not_offer(capsys):
  """Each variant runs at its chosen point: no --paper-grid (argparse refuses it, exit 2)."""
  with pytest.raises(SystemExit) as e:
    ct.main(["--paper-grid", "--out", "/nonexistent/x"])
  assert e.value.code == 2 and "--paper-grid" in capsys.readouterr().err


def test_checkpoint_flag_conflicts(capsys):
  argv = ["--source", "ckpt:/x", "--out", "/nonexistent/x"]
  assert ct.main(argv) == 2  # finetune/distill_ft need a compact source
  assert "--student-source" in capsys.readouterr().err
  assert ct.main(argv + ["--student-source", "ckpt:/y", "--student-config", "{}"]) == 2
  assert "conflicts" in capsys.readouterr().err


def test_student_config_flag_is_a_json_object_or_none():
  """--student-config: the student's widths as a JSON object, '' = none (bad text: above)."""
  def parse(*extra):
    return flags.parse(ct.STUDY, ["--target", "digits", *extra]).extra.student_config
  assert parse() is None and parse("--student-config", "") is None
  assert parse("--student-config", '{"stem_width": 8}') == {"stem_width": 8}


# ----------------------------------------------------------------------------- pieces
def test_forward_calls_count_matmul_flops():
  """FLOPs per image of x @ W are 2 * D * K (XLA counts a multiply-add as two)."""
  from jtransfer.train.evaluate import forward_calls, interleaved_latency_ms
  w = np.ones((16, 3), np.float32)
  forward = lambda p, s, x: x.reshape(x.shape[0], -1).astype(jnp.float32) @ p["w"]
  for batches in ([1, 4], [4]):
    flops, calls = forward_calls(forward, {"w": w}, {}, (4, 4, 1), batches)
    latency_ms = interleaved_latency_ms(calls, runs=2)
    assert 2 * 16 * 3 <= flops <= 2 * 16 * 3 + 2 * 16
    assert set(latency_ms) == set(batches)
    assert all(v > 0 for v in latency_ms.values())


def test_xla_flops_counts_convolutions_as_the_cpu_executable_does():
  """A 3x3 SAME conv of an 8x8 map, 2 -> 4 channels: XLA counts the taps that land inside the
  map, per axis 2 + 3 * 6 + 2 = 22 of the 8 * 3 (edge outputs lose one), so 2 * 22^2 * 2 * 4
  FLOPs by hand (a multiply-add is two); a whole
  model's pre-optimisation count is the CPU executable's within 0.5% (what the GPU's
  compiled analysis misses: its cuDNN custom calls)."""
  from jtransfer.train.evaluate import xla_flops
  k = jnp.ones((3, 3, 2, 4))
  conv = lambda x: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert xla_flops(jax.jit(conv).lower(jnp.ones((1, 8, 8, 2)))) == 2 * 22 ** 2 * 2 * 4
  model = models.get_model("resnet_s", 5)
  v = _fast_init(model, jax.random.PRNGKey(0), (28, 28, 1))
  lowered = jax.jit(lambda p, s, x: models.apply_model(model, p, s, x)[0]).lower(
      v["params"], v["batch_stats"], jnp.zeros((2, 28, 28, 1)))
  compiled = lowered.compile().cost_analysis()
  compiled = compiled[0] if isinstance(compiled, (list, tuple)) else compiled
  assert xla_flops(lowered) == pytest.approx(compiled["flops"], rel=5e-3)


def test_report_latency_is_the_median_over_draws():
  """A burst of load on one draw's timing (100 ms) does not set the reported latency."""
  recs = [dict(latency_ms={"1": v, "128": 10 * v}) for v in (2.0, 100.0, 3.0)]
  assert compact_report.median_latency(recs) == {"1": 3.0, "128": 30.0}
  assert compact_report.median_latency([dict(latency_ms=None)]) is None


# ----------------------------------------------------------------------------- tuning
def _plan(argv):
  return grid_lib.plan(ct.STUDY, flags.parse(ct.STUDY, argv))


def test_choose_tunes_lr_t_lambda_on_tuning_draws_only():
  """The runner's choice per variant: the LR, T and lambda jointly, on the tuning draws'
  validation accuracy; lambda's grid extends on the odds scale (stays in (0, 1)); the same
  choice again from the records alone; an unfinished grid leaves the variant out."""
  plan = _plan(["--target", "digits", "--strategies", "teacher,scratch,distill",
                "--tune-repeats", "2", "--teacher-lr", "1e-4,1e-3", "--student-lr", "1e-3,1e-2",
                "--temperature", "2,4,8", "--lam", "0.5,0.75", "--tune-extend", "1",
                "--shots", "5"])
  assert plan.arm("distill").grid == {"lr": (1e-3, 1e-2), "T": (2.0, 4.0, 8.0),
                                      "lam": (0.5, 0.75)}
  assert plan.arm("scratch").grid == {"lr": (1e-3, 1e-2)}
  found: dict = {}

  def run_missing(key):
    arm, cell, role, index, fold, knobs = key
    knobs = dict(knobs)
    assert role == "tune" and dict(cell)["shots"] == 5 and fold == -1  # tuning draws only
    # best: teacher lr 1e-3; students lr 1e-2, T 4, lambda as high as the grid goes
    val = -abs(np.log10(knobs["lr"]) - (-3 if arm == "teacher" else -2))
    if "T" in knobs:
      val += -abs(np.log2(knobs["T"]) - 2) + knobs["lam"]
    return dict(status="ok", val_acc=float(val) + 0.01 * index, test_acc=None)

  cell = plan.cells[0]
  tuned = {a.name: grid_lib.choose(found, plan, cell, a, run_missing) for a in plan.arms}
  t, s, d = tuned["teacher"], tuned["scratch"], tuned["distill"]
  # an LR on the grid's top edge extends it; the new value scores lower: no edge left
  assert t["choice"] == {"lr": 1e-3} and t["grid"]["lr"] == [1e-4, 1e-3, 1e-2]
  assert t["edges"] == [] and s["choice"] == {"lr": 1e-2}
  assert s["grid"]["lr"] == [1e-3, 1e-2, 0.1]
  # lambda 0.75 (odds 3) on the edge -> odds 9 (lambda 0.9) tried and chosen, still an edge
  # after the one extension allowed: flagged
  assert d["choice"] == {"lr": 1e-2, "T": 4.0, "lam": 0.9} and d["edges"] == ["lam:high"]
  assert d["grid"]["lam"] == [0.5, 0.75, 0.9]
  assert {k[3] for k in found} == {0, 1} and all(k[2] == "tune" for k in found)
  # from the records alone (the report), the same choices, nothing run
  assert {a.name: grid_lib.choose(found, plan, cell, a) for a in plan.arms} == tuned
  partial = {k: v for k, v in found.items() if k[0] != "distill"}
  assert grid_lib.choose(partial, plan, cell, plan.arm("distill")) is None


def test_single_values_are_fixed_not_tuned():
  plan = _plan(["--target", "digits", "--tune-repeats", "0", "--teacher-lr", "1e-3",
                "--student-lr", "2e-3", "--ft-lr", "1e-3", "--temperature", "4", "--lam", "1"])
  tuned = compact_report.chosen_points(plan, [])  # nothing to score: no run asked for
  assert tuned[("digits", "distill")]["choice"] == {"lr": 2e-3, "T": 4.0, "lam": 1.0}
  assert tuned[("digits", "teacher")]["choice"] == {"lr": 1e-3}
  # the evaluation draws run that one point, knobs included
  assert grid_lib.eval_points(plan, plan.arm("distill"), None) == [
      {"lr": 2e-3, "T": 4.0, "lam": 1.0}]
  assert "fixed, not tuned" in compact_report.protocol_text(plan.config)


# ----------------------------------------------------------------------------- end to end
class _GuardedTest:
  """A test split that fails the test when read during tuning (only its size may be asked)."""

  def __init__(self, inner):
    self._inner, self.tuning = inner, False

  def __len__(self):
    return len(self._inner)

  def __getattr__(self, name):
    if self.tuning:
      raise AssertionError(f"the test split's {name!r} was read by a tuning run")
    return getattr(self._inner, name)


def _rows(out):
  return rec.rows(json.load(open(os.path.join(out, "results.json"))))


def test_main_minimal(tiny_source_dir, tmp_path, monkeypatch, capsys):
  """Teacher, scratch and distilled student under the protocol: converged runs, the students'
  LR chosen on a tuning draw that never reads the test split, claims, report from results.json
  alone, resume."""
  cell_data, draw = ct.CellData, ct._draw

  def guarded_cell(trainer, pool, test, *a):
    return cell_data(trainer, pool, _GuardedTest(test), *a)

  def guarded_draw(ctx):
    ctx.data.test.tuning = ctx.draw.role == "tune"
    return draw(ctx)

  monkeypatch.setattr(ct, "CellData", guarded_cell)
  monkeypatch.setattr(ct, "_draw", guarded_draw)
  big = tiny_source_dir("vgg_s")
  out = str(tmp_path / "m")
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{big}", "--target", "digits", "--shots", "2",
          "--repeats", "2", *[a for a in TINY if a != "--quiet"], "--student-lr", "1e-3,1e-2",
          "--strategies", "teacher,scratch,distill", "--teacher-steps", "4", "--out", out]
  assert ct.main(argv) == 0
  # progress on stderr (not --quiet): the plan by kind, then done/total after each run
  err = capsys.readouterr().err
  assert "grid: 10 runs planned (4 tuning-draw runs, 6 tuned-point eval runs)" in err
  assert "[1/10, ETA" in err and "[10/10, last run] vgg_s digits k=2 eval draw 2/2 distill" in err
  rows = _rows(out)
  tune = [r for r in rows if r["role"] == "tune"]
  ev = [r for r in rows if r["role"] == "eval"]
  # tuning: each student at both LRs on the one tuning draw (the teacher's one LR is no
  # choice: it is trained there to teach, not recorded)
  assert sorted((r["arm"], r["lr"]) for r in tune) == [
      ("distill", 1e-3), ("distill", 1e-2), ("scratch", 1e-3), ("scratch", 1e-2)]
  for r in tune:  # never tested
    assert r["test_acc"] is None and 0 <= r["val_acc"] <= 1
    assert not {"agreement", "flops", "acc_before_ft", "latency_ms"} & set(r)
  assert sorted((r["arm"], r["repeat"]) for r in ev) == [
      (v, i) for v in ("distill", "scratch", "teacher") for i in (0, 1)]
  for r in rows:  # converged runs: steps recorded, each arm's own cap (Arm.budget)
    cap = 4 if r["arm"] == "teacher" else 3
    assert r["stopped"] in ("patience", "cap") and r["cap"] == cap
    assert 0 <= r["best_step"] <= r["steps"] <= cap and r["n_val"] == 20 and r["n_train"] == 20
  by = {(r["arm"], r["repeat"]): r for r in ev}
  t, s = by[("teacher", 0)], by[("distill", 0)]
  assert s["params"] < t["params"] / 3 and s["flops"] < t["flops"] / 2
  assert s["config"]["conv_widths"] == [[16, 16], [32, 32], [64, 64]]
  assert s["config"]["dense_widths"] == [] and t["config"]["dense_widths"] == []
  assert 0 <= s["agreement"] <= 1 and "agreement" not in t and "agreement" not in by[
      ("scratch", 0)]
  assert s["T"] == 4 and s["lam"] == 0.7 and s["teacher_lr"] == 1e-3
  # the students are timed round-robin with their draw's teacher
  for r in ev:
    assert r["latency_timing"] == ("alone" if r["arm"] == "teacher" else "with teacher")
    assert set(r["latency_ms"]) == {"1"}
  # the students run their evaluation draws at the LR chosen on the tuning draw
  val = {r["lr"]: r["val_acc"] for r in tune if r["arm"] == "distill"}
  assert s["lr"] == max(sorted(val), key=lambda lr: val[lr])
  report = open(os.path.join(out, "report.md")).read()
  assert "| teacher |" in report and "| distill |" in report and "## Claims" in report
  assert "each student timed round-robin with its draw's teacher" in report
  assert "the jointly learned compact net beats the same net trained on labels alone" in report
  assert "Tested as distill >= teacher, margin 2 pt." in report
  assert "distill_ft" not in report.split("## Claims")[1]  # not run: not claimed
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert [c["claim"]["b"] for c in summary["claims"]] == ["scratch", "teacher"]
  assert summary["claims"][0]["pooled"]["paired"]["n"] == 2
  assert _regenerated(argv, out) == report  # byte for byte, from results.json alone
  assert os.path.getsize(os.path.join(out, "accuracy_vs_flops.png")) > 0
  # a kill lost the last run's line: the resume reruns it (its teacher retrained, unrecorded)
  jsonl = os.path.join(out, "results.jsonl")
  lines = open(jsonl).readlines()
  lost = [line for line in lines if (json.loads(line)["arm"], json.loads(line)["draw"]) ==
          ("distill", {"role": "eval", "index": 1, "fold": -1})]
  assert len(lost) == 1
  open(jsonl, "w").writelines(line for line in lines if line not in lost)
  assert ct.main(argv + ["--resume"]) == 0
  err = capsys.readouterr().err
  assert "10 runs planned" in err and "9 already saved, skipped" in err
  assert "[10/10, last run] vgg_s digits k=2 eval draw 2/2 distill" in err
  assert len(_rows(out)) == len(lines)  # the lost run rerun once, nothing written twice
  rerun = next(r for r in _rows(out) if (r["arm"], r["role"], r["repeat"]) ==
               ("distill", "eval", 1))
  assert rerun["latency_timing"] == "alone"  # its teacher was retrained, not measured
  assert "(alone where a resume reran it" in open(os.path.join(out, "report.md")).read()
  assert publish.check(out) == []


@pytest.mark.slow
def test_main_all_variants(sources, tmp_path):
  """Every variant, pad-and-crop augmentation with flips (the teacher closed over in the loss), resume."""
  big, small = sources
  out = str(tmp_path / "a")
  argv = _tiny(big, small, out, "--repeats", "2", "--latency-batches", "1,2",
               "--augment", "pad2+flip")
  assert ct.main(argv) == 0
  for name in ("report.md", "results.json", "results.jsonl", "summary.json",
               "accuracy_vs_flops.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  records = _rows(out)
  ev = [r for r in records if r["role"] == "eval"]
  assert len(ev) == 2 * len(ct.VARIANTS)
  assert not [r for r in records if r["role"] == "tune"]  # one value per flag: nothing to tune
  by = {(r["arm"], r["repeat"]): r for r in ev}
  teacher = by[("teacher", 0)]
  for v in ct.VARIANTS[1:]:
    r = by[(v, 0)]
    assert r["params"] < teacher["params"] and r["flops"] < teacher["flops"], v
    assert set(r["latency_ms"]) == {"1", "2"}
  assert "acc_before_ft" in by[("pruned", 0)]
  assert by[("pruned", 0)]["config"]["conv_widths"] == [[16, 16], [32, 32], [64, 64]]
  report = open(os.path.join(out, "report.md")).read()
  for v in ct.VARIANTS:
    assert f"| {v} |" in report
  for line in ("distill vs scratch", "distill_ft vs finetune", "pruned_distill vs pruned",
               "Tested as distill_ft > finetune.", "Tested as distill_ft >= teacher"):
    assert line in report
  assert _regenerated(argv, out) == report
  # --resume skips every finished run; without it the directory is refused
  assert ct.main(argv + ["--resume"]) == 0
  assert len(_rows(out)) == len(records)
  assert ct.main(argv) == 2
