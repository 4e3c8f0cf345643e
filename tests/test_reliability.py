"""Crash-safety of experiment grids: NaN runs marked failed, kill/resume, determinism, outputs."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from experiments import fewshot
from jtransfer.methods import transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--shots", "1,2", "--repeats", "2", "--steps", "3", "--test-per-class", "5",
        "--val-per-class", "2", "--lrs", "0.001", "--quiet", "--target", "digits:0,1,2"]


@pytest.mark.parametrize("text,kwargs,error", [
    ("1,x", {}, "--f '1,x': expected a comma list of numbers"),
    (" , ", {}, "--f ' , ': expected at least one number"),
    ("1,nan", {}, "values must be finite numbers"),
    ("0.5,2", dict(ok=lambda v: v >= 1, what="values must be >= 1"), "--f '0.5,2': values must be >= 1"),
])
def test_float_list_names_the_flag_and_the_problem(text, kwargs, error):
  from jtransfer.study.tables import float_list
  from jtransfer.errors import InputError
  with pytest.raises(InputError, match=re.escape(error)):
    float_list(text, "--f", **kwargs)


def test_float_list_and_the_flags_built_on_it():
  from experiments import compact_transfer, cwl_pruning
  from jtransfer.study import sparse_pipeline as sparse_runs
  from jtransfer.study.tables import float_list, positive_floats
  from jtransfer.errors import InputError
  assert float_list(" 3, -1.5,,2e-3 ", "--f") == [3.0, -1.5, 0.002]      # order kept
  assert positive_floats("0.1,1", "--lr") == [0.1, 1.0]
  with pytest.raises(InputError, match="> 0"):
    positive_floats("0,1", "--lr")
  from jtransfer.study import flags
  k = flags.parse(cwl_pruning.STUDY, ["--taus", "1,0,1", "--ft-epochs", "30,1.9",
                                      "--ft-lrs", "1e-3,1e-4"]).extra
  assert k.taus == (0.0, 1.0) and k.ft_epochs == (1, 30)
  assert k.ft_lrs == (1e-4, 1e-3)
  with pytest.raises(InputError, match="--ft-epochs '0.5': values must be finite and >= 1"):
    flags.parse(cwl_pruning.STUDY, ["--ft-epochs", "0.5"])
  assert sparse_runs.floats_in("0.5,0,0.5", "--lam", 0.0, 1.0) == [0.0, 0.5]
  with pytest.raises(InputError, match=re.escape("--lrs '0': values must lie in (0.0, 10.0]")):
    sparse_runs.floats_in("0", "--lrs", 0.0, 10.0, open_lo=True)
  assert compact_transfer._grid("--t", lambda v: v > 0, "bad")("4,2") == (2.0, 4.0)
  with pytest.raises(InputError, match="values must be distinct"):
    compact_transfer._grid("--t", lambda v: v > 0, "bad")("2,2")


def test_unwritable_output_directory(tmp_path, capsys):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  argv = ["--arch", "vgg_s", "--out", str(blocker / "sub"), "--quiet"]
  assert fewshot.main(argv) == 2
  err = capsys.readouterr().err
  assert "is not writable" in err and "Traceback" not in err


def test_a_line_cut_by_a_kill_is_dropped_before_the_next_append(tmp_path):
  """A kill mid-write leaves a partial last line; reopening the directory truncates it, so
  records appended by the resume stay whole (they would join the cut line and be lost)."""
  from jtransfer.study.results import ResultsDir
  out = str(tmp_path / "r")
  ResultsDir(out).add_many([{"a": 1}, {"a": 2}])
  with open(os.path.join(out, "results.jsonl"), "a") as f:
    f.write('{"a": 3, "cut')  # killed here
  again = ResultsDir(out, resume=True)
  assert again.records == [{"a": 1}, {"a": 2}]
  again.add({"a": 3})
  again.add_many([{"a": 4}, {"a": 5}])
  assert ResultsDir(out, resume=True).records == [{"a": i} for i in range(1, 6)]
  assert ResultsDir(out, resume=True, writer=False).records == [{"a": i} for i in range(1, 6)]


def test_nan_run_is_marked_failed_and_grid_continues(tiny_source_dir, tmp_path):
  def build(source, num_classes, total_steps):
    setup = transfer.rule_setup(source, num_classes, [(".*", "all")],
                                {"all": transfer.optim.adam(1.0)})
    base = setup.loss_fn

    def poisoned(params, stats, batch, rng):
      loss, (terms, st) = base(params, stats, batch, rng)
      reg = jnp.where(batch["label"].shape[0] > 3, jnp.nan, 0.0)  # NaN for k=2 (6 images)
      return loss + reg, ({**terms, "reg": reg}, st)

    setup.loss_fn = poisoned
    return setup

  transfer.register(transfer.Strategy("test_nan", (1e-3,), build))
  try:
    out = tmp_path / "o"
    assert fewshot.main(["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}",
                         "--strategies", "test_nan,freeze", "--out", str(out), *TINY]) == 0
  finally:
    del transfer.STRATEGIES["test_nan"]
  from jtransfer.study.records import rows
  records = rows(json.loads((out / "results.json").read_text()))
  failed = [r for r in records if r["status"] == "failed"]
  assert failed and all(r["shots"] == 2 and r["arm"] == "test_nan" for r in failed)
  assert "non-finite reg at step 0" in failed[0]["error"]
  assert sum(r["status"] == "ok" for r in records) == len(records) - len(failed)
  assert "run(s) failed" in (out / "report.md").read_text()


def test_same_seed_gives_identical_results_json(tiny_source_dir, tmp_path):
  argv = ["--arch", "resnet_s", "--source", f"ckpt:{tiny_source_dir('resnet_s')}", *TINY]
  assert fewshot.main([*argv, "--out", str(tmp_path / "a")]) == 0
  assert fewshot.main([*argv, "--out", str(tmp_path / "b")]) == 0
  assert (tmp_path / "a" / "results.json").read_bytes() == \
      (tmp_path / "b" / "results.json").read_bytes()


def test_grid_killed_and_resumed_equals_uninterrupted(tiny_source_dir, tmp_path):
  argv = [sys.executable, "-m", "experiments.fewshot", "--arch", "vgg_s", "--source",
          f"ckpt:{tiny_source_dir('vgg_s')}", "--strategies", "freeze,finetune", *TINY]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  subprocess.run([*argv, "--out", str(tmp_path / "ref")], check=True, env=env, cwd=ROOT,
                 capture_output=True, timeout=300)
  out = tmp_path / "killed"
  proc = subprocess.Popen([*argv, "--out", str(out)], env=env, cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  jsonl = out / "results.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 2:
      break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the grid finished before it could be killed"
  assert not (out / "results.json").exists()
  subprocess.run([*argv, "--out", str(out), "--resume"], check=True, env=env, cwd=ROOT,
                 capture_output=True, timeout=300)
  assert (out / "results.json").read_bytes() == (tmp_path / "ref" / "results.json").read_bytes()


def test_the_cache_root_is_read_when_a_path_is_made(monkeypatch, tmp_path):
  """$JTRANSFER_CACHE is followed when a source's folder is named, not frozen at import; an
  explicit root wins over it."""
  from jtransfer import sources
  key = hashlib.sha1(b"vgg_s|digits|2.0|0").hexdigest()[:10]
  monkeypatch.delenv("JTRANSFER_CACHE", raising=False)
  assert sources.cache_dir("vgg_s", "digits", 2.0, 0) == os.path.join(
      ".cache", "sources", f"vgg_s-{key}")
  monkeypatch.setenv("JTRANSFER_CACHE", str(tmp_path / "a"))
  assert sources.cache_root() == str(tmp_path / "a")
  assert sources.cache_dir("vgg_s", "digits", 2.0, 0) == str(tmp_path / "a" / "sources" /
                                                             f"vgg_s-{key}")
  assert sources.cache_dir("vgg_s", "digits", 2.0, 0, root=str(tmp_path / "b")).startswith(
      str(tmp_path / "b" / "sources"))


def test_a_source_at_chance_is_retrained_at_half_the_lr_then_refused(monkeypatch, tmp_path):
  """vgg_s (no BN) pretrained at lr 0.05 on fmnist:1,5,7,8,9 ended at chance (0.2): the grid
  used it silently. Now a dead pretraining is retried at half the lr, and a dead cached source
  is refused."""
  from jtransfer import sources as pretrain
  from jtransfer.errors import InputError
  from jtransfer.methods import transfer
  calls = []

  def fake(arch, spec, *, epochs, seed, progress, lr, optimizer):
    assert optimizer == "sgd"  # a CNN's recipe (a transformer's is AdamW: test_source_recipe)
    calls.append(lr)
    acc = 0.2 if len(calls) < 3 else 0.9
    return transfer.Source(arch, {}, {}, (28, 28, 1), (0.0,), (1.0,),
                           dict(source_test_acc=acc, class_names=list("abcde"), train_seconds=1))

  saved = {}
  monkeypatch.setattr(pretrain, "pretrain", fake)
  monkeypatch.setenv("JTRANSFER_CACHE", str(tmp_path))
  monkeypatch.setattr(transfer, "save_source", lambda path, s: saved.update({path: s}))
  source = pretrain.source_for("vgg_s", "fmnist:1,5,7,8,9", progress=False)
  assert calls == [0.05, 0.025, 0.0125] and source.meta["lr"] == 0.0125
  assert list(saved.values()) == [source]
  # never learning: refused with one sentence, nothing cached
  saved.clear()
  dead = transfer.Source("vgg_s", {}, {}, (28, 28, 1), (0.,), (1.,),
                         dict(source_test_acc=0.21, class_names=list("abcde")))
  monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: dead)
  with pytest.raises(InputError, match="never learned"):
    pretrain.source_for("vgg_s", "fmnist:0,1", progress=False, seed=1)
  assert not saved
  # a cached source at chance is refused
  path = pretrain.cache_dir("vgg_s", "fmnist:0,1", 2.0, 2)
  os.makedirs(path)
  monkeypatch.setattr(transfer, "load_source", lambda p: dead)
  with pytest.raises(InputError, match="at chance accuracy"):
    pretrain.source_for("vgg_s", "fmnist:0,1", progress=False, seed=2)
