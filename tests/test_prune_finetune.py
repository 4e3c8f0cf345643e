"""Tests for jtransfer.methods.prune_finetune: pruning at a set of taus, what was removed,
the finetuning LR chosen per epoch count on validation, and finetuning itself."""
import numpy as np
import pytest

from jtransfer import models
from jtransfer.data.base import ImageSet
from jtransfer.methods import cwl, prune, prune_finetune, transfer
from jtransfer.train import accuracy, predict_logits
from model_helpers import random_variables


def _cwl_model(seed=0):
  model = models.get_model("vgg_s", 4, dense_widths=())
  v = random_variables(model, (16, 16, 1), seed)
  rng = np.random.default_rng(seed)
  scales = {u: rng.uniform(0.0, 1.5, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(v["params"]).items()}
  return model, {**v["params"], cwl.CWL_KEY: scales}, scales


def test_prune_at_taus_and_removed_by_hand():
  model, params, scales = _cwl_model()
  config = models.model_config(model)
  out = prune_finetune.prune_at_taus(params, {}, config, [0.0, 0.6, 1.2])
  assert list(out) == [0.0, 0.6, 1.2]
  total_maps = sum(s.size for s in scales.values())
  for tau, res in out.items():
    m = prune_finetune.removed(res)
    # counted here from the scales alone: every vgg unit is its own group
    kept = {u: int(np.sum(np.abs(s) >= tau)) for u, s in scales.items()}
    assert m["kept"] == {u: [kept[u], s.size] for u, s in scales.items()}
    assert m["feat_frac"] == pytest.approx(sum(kept.values()) / total_maps)
    assert m["params_frac"] == pytest.approx(res.params_kept / res.params_total)
  assert prune_finetune.removed(out[0.0])["params_frac"] == 1.0
  assert prune_finetune.removed(out[1.2])["params"] < prune_finetune.removed(out[0.6])["params"]


def test_removed_fractions_of_a_hand_made_result():
  res = prune.PruneResult({}, {}, {}, {"a": (2, 4), "b": (1, 4)}, {}, 30, 120)
  assert prune_finetune.removed(res) == dict(params=30, params_frac=0.25, feat_frac=3 / 8,
                                             kept={"a": [2, 4], "b": [1, 4]})


def test_choose_per_epochs_picks_on_validation_and_runs_each_lr_once():
  # validation prefers 1e-3 after 1 epoch and 1e-4 after 30; test says the opposite, and must
  # not reach the choice.
  val = {1e-4: {1: 0.5, 30: 0.9}, 1e-3: {1: 0.7, 30: 0.6}}
  calls = []

  def curve(lr):
    calls.append(lr)
    return {e: dict(val_acc=val[lr][e], test_acc=1 - val[lr][e]) for e in (1, 30)}

  got = prune_finetune.choose_per_epochs(curve, [1, 30], [1e-4, 1e-3], extend=0)
  assert sorted(calls) == [1e-4, 1e-3]
  assert got["ft"]["1"]["lr"] == 1e-3 and got["ft"]["1"]["test_acc"] == pytest.approx(0.3)
  assert got["ft"]["30"]["lr"] == 1e-4 and got["ft"]["30"]["test_acc"] == pytest.approx(0.1)
  assert [g[0] for g in got["ft_grid"]] == [1e-4, 1e-3]
  assert got["ft_grid"][0][1]["30"]["val_acc"] == 0.9


def test_choose_per_epochs_extends_an_edge_and_without_validation_takes_the_first():
  calls = []

  def curve(lr):  # validation rises with lr: the top edge extends by the grid's ratio
    calls.append(lr)
    return {1: dict(val_acc=min(lr, 0.05), test_acc=0.0)}

  got = prune_finetune.choose_per_epochs(curve, [1], [1e-3, 1e-2], extend=1)
  assert got["ft"]["1"]["lr"] == pytest.approx(0.1) and sorted(calls) == pytest.approx(
      [1e-3, 1e-2, 0.1])
  calls.clear()
  # one LR: nothing to choose, but it still runs once (tuning scores no one-point grid)
  got = prune_finetune.choose_per_epochs(curve, [1], [1e-3])
  assert calls == [1e-3] and got["ft"]["1"]["val_acc"] == 1e-3
  calls.clear()
  got = prune_finetune.choose_per_epochs(curve, [1], [1e-3, 1e-2], validated=False)
  assert calls == [1e-3] and got["ft"]["1"]["lr"] == 1e-3 and got["ft"]["1"]["edges"] == []


def test_finetuner_curve_at_lr_zero_is_the_model_as_it_is():
  """Adam at lr 0 leaves the params: accuracies equal a forward of the unfinetuned model."""
  model = models.get_model("vgg_s", 3, conv_widths=((4,), (6,)), dense_widths=())
  config = models.model_config(model)
  v = random_variables(model, (16, 16, 1), 0)
  source = transfer.Source("vgg_s", config, v, (16, 16, 1), (0.3,), (0.3,), {})
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 16, 16, 1), dtype=np.uint8)
  labels = np.arange(12) % 3
  names = ("a", "b", "c")
  splits = prune_finetune.Splits(ImageSet(images[:6], labels[:6], names),
                                 ImageSet(images[6:9], labels[6:9], names),
                                 ImageSet(images[9:], labels[9:], names))
  ft = prune_finetune.Finetuner(source, batch_size=4)
  stats = v.get("batch_stats", {})
  got = ft.curve(config, v["params"], stats, splits, 0, [1, 2], 0.0)
  fwd = transfer.eval_forward(model, source.mean, source.std)
  want = accuracy(predict_logits(fwd, v["params"], stats, images[9:]), labels[9:])
  assert set(got) == {1, 2} and got[2]["test_acc"] == pytest.approx(want)
  assert ft.accs(config, v["params"], stats, splits)["test_acc"] == pytest.approx(want)
  assert splits._replace(val=None).accs(fwd, v["params"], stats)["val_acc"] is None
  m = prune_finetune.measure(ft, config, v["params"], stats, splits, 0, [1], [0.0])
  assert m["acc"] == pytest.approx(want) and m["ft"]["1"]["test_acc"] == pytest.approx(want)
  assert m["ft"]["1"]["lr"] == 0.0 and [g[0] for g in m["ft_grid"]] == [0.0]


def test_claim_rows_pair_by_draw_tau_and_epochs():
  ft = lambda a: {"1": dict(test_acc=a)}
  records = [dict(tau=None, repeat=0, acc=0.9, ft=ft(0.95)),
             dict(tau=0.5, repeat=0, acc=0.7, ft=ft(0.85)),
             dict(tau=0.5, repeat=1, acc=0.6, ft=ft(0.8))]  # draw 1 has no unpruned run
  got = prune_finetune.claim_rows(records)
  cell = dict(tau=0.5, epochs=1, repeat=0)
  assert got == [dict(cell, arm="pruned_ft", test_acc=0.85),
                 dict(cell, arm="unpruned", test_acc=0.9),
                 dict(cell, arm="unpruned_ft", test_acc=0.95)]
