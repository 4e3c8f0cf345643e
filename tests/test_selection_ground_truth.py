"""The ground truth's LR choice under the protocol (`jtransfer.zoo.ground_truth`): diverged LRs,
grid extension past a winning edge, the protocol's checks, resume guards and report text. The
runs are replaced by fakes; the real runs are exercised end to end in test_model_selection.py."""
import dataclasses

import numpy as np
import pytest

from jtransfer.errors import InputError
from jtransfer.zoo import ground_truth as gt, sections
from jtransfer.zoo.targets import TargetTask


def test_ground_truth_lr_choice_skips_a_diverged_lr():
  """An LR whose run goes non-finite leaves the choice (validation picks among the rest); when
  every LR diverges the error propagates (main turns it into one line and exit code 2)."""
  from jtransfer.errors import NonFiniteError
  val = {0.003: 0.6, 0.01: 0.8}

  def fake(source, task, budget, config, compiled, seed, **overrides):
    if config.lr not in val:
      raise NonFiniteError(3, ["grad"])
    return dict(test_acc=val[config.lr] - 0.1, val_acc=val[config.lr], steps=20, best_step=10,
                stopped="patience")

  task = TargetTask("t", None, None, val=[0] * 40)
  protocol = gt.FineTuneProtocol(steps=100, eval_every=10, patience=20, seed=0,
                                 lrs=(0.003, 0.01, 0.03))
  got = gt.finetune_tuned(None, task, protocol, None, run=fake)
  assert got["lr"] == 0.01 and got["test_acc"] == pytest.approx(0.7) and got["n_val"] == 40
  assert got["lr_val"] == {"0.003": 0.6, "0.01": 0.8, "0.03": None}
  assert "0.03: diverged" in "\n".join(sections.runs_table([dict(got, model="m", target="t")],
                                                     ("model", "target")))
  val.clear()
  with pytest.raises(NonFiniteError):
    gt.finetune_tuned(None, task, protocol, None, run=fake)


def test_ground_truth_lr_grid_extends_past_a_winning_edge():
  """--tune-extend N: a best LR on the grid's edge grows the grid on that side (the grid's own
  ratio), at most N times; the record says when the choice is still on an edge."""
  tried = []

  def fake(source, task, budget, config, compiled, seed, **overrides):
    tried.append(round(config.lr, 6))
    acc = 0.9 - abs(np.log10(config.lr) - np.log10(3e-4)) / 10   # peaks at 3e-4: below the grid
    return dict(test_acc=acc - 0.1, val_acc=acc, steps=20, best_step=10, stopped="patience")

  task = TargetTask("t", None, None, val=[0] * 40)
  protocol = gt.FineTuneProtocol(steps=100, eval_every=10, patience=20, seed=0,
                                 lrs=(0.01, 0.003), tune_extend=0)
  got = gt.finetune_tuned(None, task, protocol, None, run=fake)
  assert got["lr"] == 0.003 and "edges" not in got and tried == [0.003, 0.01]  # as before
  tried.clear()
  protocol = dataclasses.replace(protocol, tune_extend=1)
  got = gt.finetune_tuned(None, task, protocol, None, run=fake)
  assert tried == [0.003, 0.01, 0.0009] and got["lr"] == pytest.approx(0.0009)
  assert got["edges"] == ["lr:low"] and list(got["lr_val"]) == ["0.0009", "0.003", "0.01"]
  tried.clear()
  protocol = dataclasses.replace(protocol, tune_extend=3)  # 0.0009, 0.00027 (best), 8.1e-5 loses
  got = gt.finetune_tuned(None, task, protocol, None, run=fake)
  assert tried == [0.003, 0.01, 0.0009, 0.00027, 8.1e-05]
  assert got["lr"] == pytest.approx(0.00027) and got["edges"] == []
  table = "\n".join(sections.runs_table([dict(got, model="m", target="t", edges=["lr:low"])],
                                  ("model", "target")))
  assert "still on an edge of the extended grid" in table and "m t lr:low" in table
  # A diverged LR past the edge scores below any accuracy: the edge stays the choice.
  def diverge_low(source, task, budget, config, compiled, seed, **overrides):
    from jtransfer.errors import NonFiniteError
    if config.lr < 0.002:
      raise NonFiniteError(3, ["grad"])
    return fake(source, task, budget, config, compiled, seed)
  protocol = dataclasses.replace(protocol, tune_extend=1)
  got = gt.finetune_tuned(None, task, protocol, None, run=diverge_low)
  assert got["lr"] == 0.003 and got["lr_val"]["0.0009"] is None and got["tune_extend"] == 1
  # One LR, or no validation images: nothing to extend, refused with the flags named.
  base = dict(val_per_class=20, patience=100, eval_every=10, lrs=(0.003, 0.01), tune_extend=1)
  assert gt.FineTuneProtocol(**base).lrs == (0.003, 0.01)
  for change in (dict(lrs=(0.01,)), dict(lrs=(0.01, 0.01)), dict(val_per_class=0)):
    with pytest.raises(InputError, match="--tune-extend 1 extends an LR grid"):
      gt.FineTuneProtocol(**dict(base, **change))
  with pytest.raises(InputError, match="--patience must be >= 1, got 0"):
    gt.FineTuneProtocol(**dict(base, patience=0))
  # A resume may not mix runs tuned with and without extension.
  plain, extended = dict(lr_val={"0.01": 0.5}), dict(lr_val={"0.01": 0.5}, edges=[])
  gt.check_resume([plain, dict(model="no ground truth")], 0)
  gt.check_resume([extended], 2)
  with pytest.raises(InputError, match="tuned without LR-grid extension, not --tune-extend 1"):
    gt.check_resume([plain], 1)
  with pytest.raises(InputError, match="tuned with LR-grid extension, not --tune-extend 0"):
    gt.check_resume([dict(plain, tune_extend=1)], 0)
  assert "extended by up to 3 LRs" in gt.finetune_text(gt.FineTuneProtocol(
      val_per_class=20, batch_size=50, train_per_class=20, patience=100, eval_every=10,
      steps=1000, lrs=(0.003, 0.01), tune_extend=3))


def test_protocol_text_and_kind_follow_the_protocol():
  fixed = gt.FineTuneProtocol(steps=30, lr=0.02, val_per_class=0, batch_size=8,
                              train_per_class=4)
  assert not fixed.converged and gt.ground_truth_kind(fixed) == (
      "ground-truth fine-tunings (fixed steps)")
  assert gt.finetune_text(fixed).startswith("30 SGD steps of 8 on 4 images/class, lr 0.02 ")
  tuned = gt.FineTuneProtocol(lrs=(3e-3, 0.01, 0.03))
  assert tuned.lrs_text == "0.003,0.01,0.03"          # as the default flag spells it
  assert gt.ground_truth_kind(tuned) == "ground-truth fine-tunings (3 LRs each, converged)"
  assert "from {0.003,0.01,0.03} by validation" in gt.finetune_text(tuned)
  cfg = tuned.train_config(0.03)
  assert (cfg.lr, cfg.batch_size, cfg.bn_train) == (0.03, 50, False)
  assert tuned.budget().eval_every == 10 and gt.FineTuneProtocol(steps=5).budget().eval_every == 5
  with pytest.raises(InputError, match="--train-per-class must be >= 2"):
    gt.FineTuneProtocol(train_per_class=1)
