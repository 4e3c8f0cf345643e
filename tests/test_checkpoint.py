"""Checkpoint/resume: a resumed run ends bit-identical to an uninterrupted one (CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models
from jtransfer.data import Batches
from jtransfer.errors import InputError
from jtransfer.train import (RunCheckpointer, adam, evaluate, fit, init_state, load_model,
                             make_optimizer, make_train_step, save_model)


def _run(tmp_path, stop_at=None, ckpt=True):
  model = models.get_model("resnet_s", 3, stage_widths=(8, 16, 16), stem_width=8)
  v = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (40, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, 40).astype(np.int32)
  batches = Batches(images, labels, 16, seed=3)

  def loss_fn(params, stats, batch, key):
    x = batch["image"].astype(jnp.float32) / 255.0
    logits, new_stats, _ = models.apply_model(model, params, stats, x, train=True)
    ce = evaluate.cross_entropy(logits, batch["label"])
    return ce, ({"ce": ce}, new_stats)

  opt = make_optimizer(v["params"], [(".*", "all")], {"all": adam(1e-3)})
  state = init_state(v["params"], v["batch_stats"], opt, 0)
  step = make_train_step(loss_fn, opt)
  ck = RunCheckpointer(str(tmp_path / "ckpt"), every=3) if ckpt else None
  state = fit(state, step, batches.at, stop_at or 10, checkpointer=ck)
  if ck:
    ck.close()
  return state


def test_resume_is_bitwise_identical(tmp_path):
  ref = _run(tmp_path / "a", ckpt=False)
  _run(tmp_path / "b", stop_at=7)  # "killed" after step 7; last checkpoint at 7
  resumed = _run(tmp_path / "b")  # a new process would do exactly this
  assert int(resumed.step) == 10
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_save_load_model_and_corrupt_checkpoint(tmp_path):
  variables = {"params": {"w": np.arange(3.0)}}
  save_model(str(tmp_path / "m"), variables, {"arch": "x"})
  got, meta = load_model(str(tmp_path / "m"))
  np.testing.assert_array_equal(got["params"]["w"], np.arange(3.0))
  assert meta == {"arch": "x"}
  with pytest.raises(InputError, match="does not exist"):
    load_model(str(tmp_path / "nope"))
  (tmp_path / "junk").mkdir()
  with pytest.raises(InputError, match="not a jtransfer model checkpoint"):
    load_model(str(tmp_path / "junk"))
  # Truncate every data file of the saved checkpoint.
  import os
  for root, _, files in os.walk(tmp_path / "m" / "variables"):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(1)
  with pytest.raises(InputError, match="corrupt or unreadable"):
    load_model(str(tmp_path / "m"))
