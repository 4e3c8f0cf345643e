"""The main command end to end on tiny settings, its outputs, resume, and its input errors."""
import json

import numpy as np
import pytest

from experiments import fewshot
from jtransfer.study import records as records_lib

TINY = ["--shots", "1,2", "--repeats", "1", "--steps", "3", "--test-per-class", "5",
        "--val-per-class", "2", "--lrs", "0.001", "--quiet"]


def _run(argv):
  return fewshot.main(argv)


@pytest.mark.parametrize("arch", ["vgg_s", "resnet_s"])
def test_fewshot_smoke_outputs(arch, tiny_source_dir, tmp_path, capsys):
  out = tmp_path / arch
  code = _run(["--arch", arch, "--source", f"ckpt:{tiny_source_dir(arch)}", "--target",
               "fmnist:1,5,7", "--target", "digits:0,1,2", "--out", str(out), *TINY,
               "--paper-grid"])  # (the demo default leaves the paper grid out)
  assert code == 0
  raw = json.loads((out / "results.json").read_text())
  assert {r["version"] for r in raw} == {records_lib.VERSION}
  records = records_lib.rows(raw)
  evals = [r for r in records if r["role"] == "eval"]
  tunes = [r for r in records if r["role"] == "tune"]
  assert len(evals) == 2 * 2 * 2  # targets x shots x strategies
  assert not tunes  # one LR: nothing to choose, so no tuning draws (test_protocol_fewshot)
  r = records[0]
  for field in ("arm", "arch", "target", "shots", "repeat", "lr", "test_acc", "val_acc",
                "steps", "best_step", "stopped", "cap"):
    assert field in r
  assert all(0 <= r["test_acc"] <= 1 for r in evals)
  assert all(1 <= r["best_step"] <= r["steps"] <= 3 for r in records)
  report = (out / "report.md").read_text()
  assert "Best over LR" in report and "Validation-selected" in report
  assert "Tuned on validation" in report
  assert (out / "accuracy_vs_shots.png").stat().st_size > 1000
  assert fewshot.FULL_GRID not in report  # not the demo grid: no pointer to the full one


def test_cached_features_equal_full_forward(tiny_source_dir, tmp_path):
  src = f"ckpt:{tiny_source_dir('resnet_s')}"
  base = ["--arch", "resnet_s", "--source", src, "--target", "digits:0,1,2",
          "--strategies", "freeze", *TINY]
  assert _run([*base, "--out", str(tmp_path / "fast")]) == 0
  assert _run([*base, "--out", str(tmp_path / "slow"), "--no-feature-cache"]) == 0
  fast = records_lib.rows(json.loads((tmp_path / "fast" / "results.json").read_text()))
  slow = records_lib.rows(json.loads((tmp_path / "slow" / "results.json").read_text()))
  for a, b in zip(fast, slow):
    assert a["test_acc"] == pytest.approx(b["test_acc"], abs=1e-9)
    assert a["val_acc"] == pytest.approx(b["val_acc"], abs=1e-9)


def test_existing_results_refused_then_resumed(tiny_source_dir, tmp_path, capsys):
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1", "--strategies", "freeze", "--out", str(tmp_path / "o"), *TINY]
  assert _run(argv) == 0
  first = json.loads((tmp_path / "o" / "results.json").read_text())
  assert _run(argv) == 2
  assert "already holds results" in capsys.readouterr().err
  assert _run([*argv, "--resume"]) == 0  # nothing left to do: same records
  assert json.loads((tmp_path / "o" / "results.json").read_text()) == first


@pytest.mark.parametrize("extra,message", [
    (["--arch", "resnet7"], "--arch 'resnet7' is unknown"),
    (["--strategies", "freeze,magic"], "unknown strategy 'magic'"),
    (["--target", "mnist:1,2"], "--target spec 'mnist:1,2' has unknown kind"),
    (["--source", "fmnist:1,,2"], "empty class"),
    (["--shots", "0"], "--shots '0': values must be integers >= 1"),
    (["--repeats", "0"], "--repeats must be >= 1"),
    (["--lrs", "fast"], "expected 'paper' or a comma list"),
    (["--resume", "--overwrite"], "--resume and --overwrite conflict"),
    (["--lrs", "nan"], "learning rates must be finite numbers > 0"),
    (["--lrs", "1e-3,inf"], "learning rates must be finite numbers > 0"),
    (["--test-per-class", "-5"], "--test-per-class must be >= 0, got -5"),
    (["--target", "fmnist:"], "has an empty class list after ':'"),
    (["--target", "tfds:mnist:"], "has an empty class list after ':'"),
    (["--patience", "-1"], "--patience must be >= 0"),
    (["--val-per-class", "0"], "--patience needs validation images"),
    (["--val-per-class", "0", "--patience", "0"], "--tune-repeats needs validation images"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
])
def test_bad_flags_give_one_clear_error(extra, message, tmp_path, capsys):
  argv = ["--arch", "vgg_s", "--target", "digits", "--out", str(tmp_path / "o"), "--quiet",
          *extra]
  assert _run(argv) == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err


def test_kshot_larger_than_class(tiny_source_dir, tmp_path, capsys):
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1", "--shots", "500", "--out", str(tmp_path / "o"), "--quiet"]
  assert _run(argv) == 2
  assert "k-shot 500 is larger than class 0" in capsys.readouterr().err


def test_missing_data_path(tiny_source_dir, tmp_path, capsys, monkeypatch):
  monkeypatch.setenv("JTRANSFER_FMNIST_DIR", str(tmp_path / "nowhere"))
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "fmnist:1,2", "--out", str(tmp_path / "o"), "--quiet"]
  assert _run(argv) == 2
  assert "nowhere does not exist" in capsys.readouterr().err


def test_source_checkpoint_of_another_arch(tiny_source_dir, tmp_path, capsys):
  argv = ["--arch", "resnet_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits", "--out", str(tmp_path / "o"), "--quiet"]
  assert _run(argv) == 2
  assert "holds a vgg_s model, not --arch resnet_s" in capsys.readouterr().err


def test_kshot_too_large_is_caught_before_any_training(tmp_path, capsys, monkeypatch):
  # No source is cached under this cache root: the error must come before pretraining starts.
  from jtransfer import sources
  monkeypatch.setenv("JTRANSFER_CACHE", str(tmp_path / "cache"))  # read when used
  called = []
  monkeypatch.setattr(sources, "pretrain", lambda *a, **k: called.append(1))
  argv = ["--arch", "vgg_s", "--target", "digits:0,1", "--shots", "500",
          "--out", str(tmp_path / "o"), "--quiet"]
  assert fewshot.main(argv) == 2
  assert "k-shot 500 is larger than class 0" in capsys.readouterr().err
  assert not called


def test_finetune_bn_uses_batch_statistics_and_updates_running_ones(tiny_source_dir):
  """finetune_bn: the loss equals a hand forward with BN in train mode (batch statistics), and
  the step moves the running averages, which finetune leaves at the source's."""
  import jax
  from jtransfer import models
  from jtransfer.data.preprocess import normalize
  from jtransfer.methods import transfer
  from jtransfer.train import evaluate, init_state, make_train_step
  source = transfer.load_source(tiny_source_dir("resnet_s"))
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (6, *source.input_shape), dtype=np.uint8),
           "label": np.array([0, 1, 2, 0, 1, 2], np.int32)}
  stats_after = {}
  for name in ("finetune", "finetune_bn"):
    setup = transfer.get_strategy(name).build(source, 3, 10)
    params, stats = setup.init(0, batch["image"], batch["label"])
    logits, _, _ = models.apply_model(setup.model, params, stats,
                                      normalize(batch["image"], source.mean, source.std),
                                      train=name == "finetune_bn")
    want = float(evaluate.cross_entropy(logits, batch["label"]))
    state = init_state(params, stats, setup.optimizer, 0, 1e-3)  # the step donates `state`
    new, m = make_train_step(setup.loss_fn, setup.optimizer)(state, batch)
    assert float(m["ce"]) == pytest.approx(want, rel=1e-5)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
                         new.batch_stats, stats)
    stats_after[name] = max(jax.tree.leaves(moved))
  assert stats_after["finetune"] == 0.0 and stats_after["finetune_bn"] > 0.0


def test_demo_report_names_the_full_grid():
  """The embedded demo grid's report ends with the full grid's command; the report is the
  runner's otherwise."""
  from jtransfer.study import flags, grid
  from jtransfer.study.report import make_report
  plan = grid.plan(fewshot.STUDY, flags.parse(fewshot.STUDY, ["--out", "results/fewshot"]))
  text, summary = fewshot.report(plan, [], "unused")
  base, base_summary = make_report(plan, [])
  assert text.startswith(base.rstrip("\n")) and summary == base_summary
  assert text.rstrip().endswith(f"`{fewshot.FULL_GRID}` (about 40 min on 2 loaded CPU cores).")
  other = grid.plan(fewshot.STUDY, flags.parse(fewshot.STUDY, ["--shots", "1,5"]))
  assert fewshot.report(other, [], "unused")[0] == make_report(other, [])[0]


def test_test_split_runs_through_the_validation_forward(tiny_source_dir, monkeypatch):
  """A run's test evaluation uses the batch size of its validation checks (one compiled
  forward for both) and scores what a forward over the whole test split at once scores."""
  from jtransfer.methods import transfer
  from jtransfer.study import config as cfg, target
  from jtransfer.train import evaluate
  source = transfer.load_source(tiny_source_dir("resnet_s"))
  p = cfg.Protocol(test_per_class=7, val_per_class=3, steps=4, patience=2, eval_every=2)
  runs = target.TargetRuns(source, "digits:0,1,2", p, {}, {}, quiet=True)
  seen = []
  real = evaluate.predict_logits

  def spy(forward, params, stats, images, batch_size=500):
    seen.append((len(images), batch_size))
    return real(forward, params, stats, images, batch_size)
  monkeypatch.setattr(target, "predict_logits", spy)
  labels = runs.pool.labels
  train = np.concatenate([np.flatnonzero(labels == c)[:1] for c in range(3)])
  val = np.concatenate([np.flatnonzero(labels == c)[1:4] for c in range(3)])
  out = runs.run("finetune", train, val, {"lr": 1e-3}, 0, 4, None, test=True)
  assert (21, 9) in seen  # the 21 test images in batches of the 9 validation images
  assert {min(n, b) for n, b in seen} == {9}  # every forward at one batch shape
  assert 0 <= out["test_acc"] <= 1
  # batches of 9 (the last one padded) give the logits one batch of all 21 gives
  setup = runs.setup("finetune", {"lr": 1e-3}, 4)[0]
  params, stats = setup.init(0, runs.pool.images[train], labels[train])
  small = real(setup.forward, params, stats, runs.test.images, 9)
  whole = real(setup.forward, params, stats, runs.test.images, 500)
  assert small.shape == whole.shape == (21, 3)
  np.testing.assert_allclose(small, whole, rtol=1e-4, atol=1e-5)
