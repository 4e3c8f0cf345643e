"""experiments.compact_transfer: flags, costs, tuning, and main() end to end (tiny); the
library it runs on (pruning, the runs): tests/test_compact_lib.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import compact_transfer as ct
from experiments import pretrain, publish
from jtransfer import models, surgery
from jtransfer.methods import distill, transfer


def _fast_init(model, rng, shape):
  """models.init_model without compiling Flax's random initialisers (seconds per config on
  2 cores); only shapes and finite values matter to these tests."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
  gen = np.random.default_rng(0)
  fill = lambda p, a: (np.ones(a.shape, np.float32) if p.endswith("var") else
                       (0.1 * gen.normal(size=a.shape)).astype(np.float32))
  return {k: surgery.map_with_path(fill, t) for k, t in shapes.items()}


@pytest.fixture(autouse=True)
def fast_init(monkeypatch):
  monkeypatch.setattr(models, "init_model", _fast_init)


@pytest.fixture(scope="module")
def sources(tiny_source_dir, tmp_path_factory):
  """(teacher source dir, compact source dir): tiny vgg_s sources, the compact one at half
  width (pretrain(..., epochs=0.02, max_train=256, model_config=...))."""
  path = str(tmp_path_factory.mktemp("compact-src") / "model")
  src = pretrain.pretrain("vgg_s", "fmnist:0,2,3,4,6", epochs=0.02, max_train=256,
                          batch_size=64, progress=False,
                          model_config=distill.compact_config("vgg_s"))
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
    (["--variants", "teacher,bogus"], "--variants"),
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


def test_checkpoint_flag_conflicts(capsys):
  argv = ["--source", "ckpt:/x", "--out", "/nonexistent/x"]
  assert ct.main(argv) == 2  # finetune/distill_ft need a compact source
  assert "--student-source" in capsys.readouterr().err
  assert ct.main(argv + ["--student-source", "ckpt:/y", "--student-config", "{}"]) == 2
  assert "conflicts" in capsys.readouterr().err


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
  assert ct.median_latency(recs) == {"1": 3.0, "128": 30.0}
  assert ct.median_latency([dict(latency_ms=None)]) is None


# ----------------------------------------------------------------------------- tuning
def test_choose_tunes_lr_t_lambda_on_tuning_draws_only():
  """choose(): the teacher first, then each student's LR, T and lambda jointly, on the tuning
  draws' validation accuracy; lambda's grid extends on the odds scale (stays in (0, 1)); the
  same choice again from the records alone."""
  argv = ["--target", "digits", "--variants", "teacher,scratch,distill", "--tune-repeats", "2",
          "--teacher-lr", "1e-4,1e-3", "--student-lr", "1e-3,1e-2", "--temperature", "2,4,8",
          "--lam", "0.5,0.75", "--tune-extend", "1", "--shots", "5"]
  args = ct.parse_args(argv)
  plan = ct.validate(args)
  assert ct.variant_grid(plan, "distill") == {"lr": (1e-3, 1e-2), "T": (2.0, 4.0, 8.0),
                                              "lam_odds": (1.0, 3.0)}
  assert ct.variant_grid(plan, "scratch") == {"lr": (1e-3, 1e-2)}
  made = []

  def run_missing(key, chosen):
    spec, shots, variant, repeat, lr, hp = key
    assert repeat < 0 and shots == 5  # tuning draws only
    if variant != "teacher":  # students learn from the teacher at its chosen point
      assert chosen[(spec, "teacher")]["lr"] == 1e-3
    knobs = dict(kv.split("=") for kv in hp.split(",") if kv)
    # best: teacher lr 1e-3; students lr 1e-2, T 4, lambda as high as the grid goes
    val = -abs(np.log10(lr) - (-3 if variant == "teacher" else -2))
    if "T" in knobs:
      val += -abs(np.log2(float(knobs["T"])) - 2) + float(knobs["lam"])
    r = dict(target=spec, shots=shots, variant=variant, repeat=repeat, lr=lr, hp=hp,
             role="tune", status="ok", val_acc=float(val) + 0.01 * repeat, test_acc=None)
    made.append(r)
    return r

  tuned = ct.choose([], plan, args, run_missing=run_missing)
  t, s, d = (tuned[("digits", v)] for v in ("teacher", "scratch", "distill"))
  # an LR on the grid's top edge extends it; the new value scores lower: no edge left
  assert t["lr"] == 1e-3 and t["grid"]["lr"] == [1e-4, 1e-3, 1e-2] and t["edges"] == []
  assert t["hp"] == "" and s["lr"] == 1e-2 and s["grid"]["lr"] == [1e-3, 1e-2, 0.1]
  # lambda 0.75 (odds 3) on the edge -> odds 9 (lambda 0.9) tried and chosen, still an edge
  # after the one extension allowed: flagged
  assert d["lr"] == 1e-2 and d["knobs"] == {"T": 4.0, "lam": 0.9} and d["hp"] == "T=4,lam=0.9"
  assert d["edges"] == ["lam_odds:high"]
  assert d["grid"]["lam_odds"] == [1.0, 3.0, 9.0]
  assert all(0 < ct.point_knobs({"lr": 1, "lam_odds": o})["lam"] < 1
             for o in d["grid"]["lam_odds"])
  assert len({ct.record_key(r) for r in made}) == len(made)  # each run once
  assert {r["repeat"] for r in made} == {-1, -2}
  # from the records alone (the report), the same choices, nothing run
  assert ct.choose(made, plan, args) == tuned
  # an unfinished grid: the missing cells are left out, not guessed
  partial = ct.choose([r for r in made if r["variant"] != "distill"], plan, args)
  assert set(partial) == {("digits", "teacher"), ("digits", "scratch")}


def test_single_values_are_fixed_not_tuned():
  args = ct.parse_args(["--target", "digits", "--tune-repeats", "0", "--teacher-lr", "1e-3",
                        "--student-lr", "2e-3", "--ft-lr", "1e-3", "--temperature", "4",
                        "--lam", "1"])
  plan = ct.validate(args)
  tuned = ct.choose([], plan, args)  # nothing to score: no run asked for
  assert tuned[("digits", "distill")]["knobs"] == {"T": 4.0, "lam": 1.0}
  assert tuned[("digits", "teacher")]["lr"] == 1e-3 and tuned[("digits", "scratch")]["hp"] == ""
  assert "fixed, not tuned" in ct.protocol_text(args, plan)


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


def test_main_minimal(tiny_source_dir, tmp_path, monkeypatch, capsys):
  """Teacher, scratch and distilled student under the protocol: converged runs, the students'
  LR chosen on a tuning draw that never reads the test split, claims, report from results.json
  alone."""
  init, tuning_run = ct.TargetRuns.__init__, ct.TargetRuns.run_tuning

  def guarded_init(self, *a, **k):
    init(self, *a, **k)
    self.test = _GuardedTest(self.test)

  def guarded_tuning(self, *a, **k):
    self.test.tuning = True
    try:
      return tuning_run(self, *a, **k)
    finally:
      self.test.tuning = False

  monkeypatch.setattr(ct.TargetRuns, "__init__", guarded_init)
  monkeypatch.setattr(ct.TargetRuns, "run_tuning", guarded_tuning)
  big = tiny_source_dir("vgg_s")
  out = str(tmp_path / "m")
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{big}", "--target", "digits", "--shots", "2",
          "--repeats", "2", *[a for a in TINY if a != "--quiet"], "--student-lr", "1e-3,1e-2",
          "--variants", "teacher,scratch,distill", "--out", out]
  assert ct.main(argv) == 0
  # progress on stderr (not --quiet): the plan by kind, then done/total after each run
  err = capsys.readouterr().err
  assert ("compact_transfer: 11 runs planned (1 teacher tuning runs, 4 student tuning runs, "
          "2 teacher eval runs, 4 student eval runs)") in err
  assert "[1/11, ETA" in err and "[11/11, last run] digits r=1 distill" in err
  records = json.load(open(os.path.join(out, "results.json")))
  tune = [r for r in records if r["repeat"] < 0]
  ev = [r for r in records if r["repeat"] >= 0]
  # tuning: the teacher at its one LR, each student at both LRs, on the one tuning draw
  assert sorted((r["variant"], r["lr"]) for r in tune) == [
      ("distill", 1e-3), ("distill", 1e-2), ("scratch", 1e-3), ("scratch", 1e-2),
      ("teacher", 1e-3)]
  for r in tune:  # never tested
    assert r["role"] == "tune" and r["test_acc"] is None and 0 <= r["val_acc"] <= 1
    assert not {"agreement", "flops", "acc_before_ft"} & set(r)
  assert sorted((r["variant"], r["repeat"]) for r in ev) == [
      (v, i) for v in ("distill", "scratch", "teacher") for i in (0, 1)]
  for r in records:  # converged runs: steps recorded
    assert r["stopped"] in ("patience", "cap") and r["cap"] == 3
    assert 0 <= r["best_step"] <= r["steps"] <= 3 and r["n_val"] == 20 and r["n_train"] == 20
  by = {(r["variant"], r["repeat"]): r for r in ev}
  t, s = by[("teacher", 0)], by[("distill", 0)]
  assert s["params"] < t["params"] / 3 and s["flops"] < t["flops"] / 2
  assert s["config"]["conv_widths"] == [[16, 16], [32, 32], [64, 64]]
  assert s["config"]["dense_widths"] == [] and t["config"]["dense_widths"] == []
  assert 0 <= s["agreement"] <= 1 and "agreement" not in t and "agreement" not in by[
      ("scratch", 0)]
  assert s["temperature"] == 4 and s["lam"] == 0.7 and s["teacher_lr"] == 1e-3
  # each draw's models are timed together, after the draw: every eval record has latencies
  for r in ev:
    assert r["latency_timing"] == "interleaved" and set(r["latency_ms"]) == {"1"}
  # both students run their evaluation draws at the LR chosen on the tuning draw
  val = {r["lr"]: r["val_acc"] for r in tune if r["variant"] == "distill"}
  assert s["lr"] == max(sorted(val), key=lambda lr: val[lr])
  report = open(os.path.join(out, "report.md")).read()
  assert "| teacher |" in report and "| distill |" in report and "## Claims" in report
  assert "the draw's models timed together round-robin" in report
  assert "the jointly learned compact net beats the same net trained on labels alone" in report
  assert "Tested as distill >= teacher, margin 2 pt." in report
  assert "distill_ft" not in report.split("## Claims")[1]  # not run: not claimed
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert [c["claim"]["b"] for c in summary["claims"]] == ["scratch", "teacher"]
  assert summary["claims"][0]["pooled"]["paired"]["n"] == 2
  assert _regenerated(argv, out) == report  # byte for byte, from results.json alone
  assert os.path.getsize(os.path.join(out, "accuracy_vs_flops.png")) > 0
  # a kill left draw 1 half recorded (its distilled student's line lost): the resume reruns
  # that student, times it alone, labels it so, and the report says so
  jsonl = os.path.join(out, "results.jsonl")
  lines = open(jsonl).readlines()
  lost = [l for l in lines if (json.loads(l)["variant"], json.loads(l)["repeat"]) == ("distill", 1)]
  assert len(lost) == 1
  open(jsonl, "w").writelines(l for l in lines if l not in lost)
  assert ct.main(argv + ["--resume"]) == 0
  err = capsys.readouterr().err
  assert "11 runs planned" in err and "10 already saved, skipped" in err
  assert "[11/11, last run] digits r=1 distill" in err
  records = json.load(open(os.path.join(out, "results.json")))
  assert len(records) == len(lines)  # the lost run rerun once, nothing written twice
  by = {(r["variant"], r["repeat"]): r for r in records if r["repeat"] >= 0}
  assert by[("distill", 1)]["latency_timing"] == "interleaved, resumed draw"
  assert by[("teacher", 1)]["latency_timing"] == by[("distill", 0)]["latency_timing"]
  assert by[("teacher", 1)]["latency_timing"] == "interleaved"
  assert "only among themselves" in open(os.path.join(out, "report.md")).read()
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
  records = json.load(open(os.path.join(out, "results.json")))
  ev = [r for r in records if r["role"] == "eval"]
  assert len(ev) == 2 * len(ct.VARIANTS)
  assert not [r for r in records if r["role"] == "tune"]  # one value per flag: nothing to tune
  by = {(r["variant"], r["repeat"]): r for r in ev}
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
  assert len(json.load(open(os.path.join(out, "results.json")))) == len(records)
  assert ct.main(argv) == 2
