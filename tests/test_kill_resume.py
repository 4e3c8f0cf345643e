"""Kill tests: SIGKILL a training run at a random moment (also mid-checkpoint), resume it, and
check the final params equal an uninterrupted run's, bit for bit (CPU XLA is deterministic for a
fixed program and thread count)."""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = '{"stage_widths": [8, 8, 16], "stem_width": 8}'


def _cmd(out, ckpt, augment="none"):
  return [sys.executable, "-m", "experiments.pretrain", "--arch", "resnet_s", "--source",
          "digits", "--epochs", "8", "--batch-size", "32", "--max-train", "256", "--config",
          CONFIG, "--ckpt-dir", str(ckpt), "--ckpt-every", "2", "--quiet", "--out", str(out),
          "--augment", augment]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _final_params(out):
  from jtransfer.train import load_model
  variables, _ = load_model(str(out))
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(variables)]


def _reference(tmp_path_factory, augment="none"):
  d = tmp_path_factory.mktemp("ref")
  subprocess.run(_cmd(d / "model", d / "ckpt", augment), check=True, env=_env(), cwd=ROOT,
                 capture_output=True, timeout=300)
  return _final_params(d / "model")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return _reference(tmp_path_factory)


@pytest.fixture(scope="module")
def reference_augmented(tmp_path_factory):
  return _reference(tmp_path_factory, "rrc+flip")


def _kill_and_resume(tmp_path, reference, seed, augment="none"):
  rng = random.Random(seed)
  cmd = _cmd(tmp_path / "model", tmp_path / "ckpt", augment)
  proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # Wait until training has started saving (a checkpoint directory appears), then kill at a
  # random moment: before, between, or during saves.
  deadline = time.time() + 120
  while not (tmp_path / "ckpt").exists() and time.time() < deadline and proc.poll() is None:
    time.sleep(0.05)
  time.sleep(rng.uniform(0.0, 1.5))
  proc.send_signal(signal.SIGKILL)
  assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
  assert not (tmp_path / "model").exists(), "the killed run had already finished"
  subprocess.run(cmd, check=True, env=_env(), cwd=ROOT, capture_output=True, timeout=300)
  got = _final_params(tmp_path / "model")
  assert len(got) == len(reference)
  for a, b in zip(got, reference):
    np.testing.assert_array_equal(a, b)


# One trial in the default suite; the others (and trials 3-19) behind -m slow.
# 76 s each (subprocess grids); test_reliability kills and resumes a grid in the default suite
@pytest.mark.parametrize("trial", [pytest.param(t, marks=pytest.mark.slow) for t in (0, 1, 2)])
def test_kill_resume_bitwise(tmp_path, reference, trial):
  _kill_and_resume(tmp_path, reference, trial)


@pytest.mark.slow  # 53 s; test_reliability kills and resumes a grid in the default suite
def test_kill_resume_augmented_bitwise(tmp_path, reference_augmented, reference):
  # Augmented training (random-resized crops and flips drawn from each step's rng, which the
  # checkpoint holds) resumes to the same params as its uninterrupted run, which differ from
  # the unaugmented one's.
  _kill_and_resume(tmp_path, reference_augmented, 100, "rrc+flip")
  assert any(not np.array_equal(a, b) for a, b in zip(reference_augmented, reference))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(3, 20))
def test_kill_resume_bitwise_many(tmp_path, reference, trial):
  _kill_and_resume(tmp_path, reference, trial)
