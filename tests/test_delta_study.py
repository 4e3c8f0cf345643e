"""Tests for jtransfer.methods.delta_study: alpha grids as knobs, DELTA's recorded settings,
where a learning curve's knobs come from, and the learning curve itself."""
import dataclasses

import numpy as np
import pytest

from jtransfer import models
from jtransfer.data.base import ImageSet
from jtransfer.errors import InputError
from jtransfer.methods import delta, delta_study, transfer
from jtransfer.train import accuracy, make_train_step, predict_logits
from model_helpers import random_variables


def test_parse_alphas():
  assert delta_study.parse_alphas(None, "--alpha") is None
  assert delta_study.parse_alphas("0.1,1e-3, 0.01", "--alpha") == (1e-3, 0.01, 0.1)
  for bad in ("", "x", "-1", "0.1,0.1", "inf", "1e-4,nan"):
    with pytest.raises(InputError, match="--alpha"):
      delta_study.parse_alphas(bad, "--alpha")


def test_alpha_knobs_one_value_fixes_the_default_several_keep_it():
  s = transfer.get_strategy("l2sp")
  assert delta_study.alpha_knobs(s, (0.02,)) == ({"alpha": (0.02,)}, {"alpha": 0.02})
  grids, defaults = delta_study.alpha_knobs(s, (0.001, 0.1))
  assert grids == {"alpha": (0.001, 0.1)} and defaults == s.knob_defaults
  assert s.knobs["alpha"] == delta.ALPHAS  # the registered strategy is untouched


def test_settings_of_and_with_schedule():
  config = delta.Config(beta=0.3, taps={"vgg_s": ("conv3_2",)})
  got = delta_study.settings_of(config)
  assert got == dict(beta=0.3, schedule=config.schedule, att_bn=config.att_bn,
                     weight_decay=config.weight_decay, bn_train=config.bn_train,
                     taps={"vgg_s": ["conv3_2"]})
  assert delta_study.with_schedule(config, "step") == dataclasses.replace(config,
                                                                           schedule="step")
  with pytest.raises(InputError):
    delta_study.with_schedule(config, "cosine")


def test_curve_knob_origin():
  s = transfer.get_strategy("delta")
  fixed = dataclasses.replace(s, knobs={"alpha": (0.02,)})
  assert delta_study.curve_knob_origin(fixed, "alpha=0.1") == dict(hp="alpha=0.02",
                                                                   origin="fixed")
  assert delta_study.curve_knob_origin(s, "alpha=0.1") == dict(hp="alpha=0.1", origin="tuned")
  assert delta_study.curve_knob_origin(s, None) == dict(
      hp=transfer.hp_string(s.knob_defaults), origin="paper")


def test_learning_curve_steps_and_evaluations():
  """Every step's CE, test accuracy at every `every` and the last step, the last one equal to
  a forward of the returned params."""
  model = models.get_model("vgg_s", 5, conv_widths=((4,), (6,)), dense_widths=())
  config = models.model_config(model)
  source = transfer.Source("vgg_s", config, random_variables(model, (16, 16, 1), 0),
                           (16, 16, 1), (0.3,), (0.3,), {})
  setup = transfer.get_strategy("finetune").build(source, 3, 5)
  step = make_train_step(setup.loss_fn, setup.optimizer)
  rng = np.random.default_rng(0)
  names = ("a", "b", "c")
  train = ImageSet(rng.integers(0, 256, (6, 16, 16, 1), dtype=np.uint8), np.arange(6) % 3,
                   names)
  test = ImageSet(rng.integers(0, 256, (9, 16, 16, 1), dtype=np.uint8), np.arange(9) % 3,
                  names)
  curve, params = delta_study.learning_curve(setup, step, setup.optimizer, train, test, 0,
                                             1e-3, steps=5, every=2, batch_size=4)
  assert curve["step"] == [1, 2, 3, 4, 5] and len(curve["ce"]) == 5
  assert curve["eval_step"] == [2, 4, 5] and "failed_at" not in curve
  assert all(np.isfinite(curve["ce"]))
  # no BN in this vgg: the initial stats are the final ones
  stats = setup.init(0, train.images, train.labels)[1]
  want = accuracy(predict_logits(setup.forward, params, stats, test.images), test.labels)
  assert curve["test_acc"][-1] == pytest.approx(want)


def test_plots_write_both_figures(tmp_path):
  curve = dict(step=[1, 2], ce=[1.0, 0.5], loss=[1.0, 0.5], eval_step=[2], test_acc=[0.5])
  curves = dict(config=dict(schedules=["exp"], arch="vgg_s", target="digits", shots=5,
                            lr=0.01), curves={"exp|l2sp": curve, "exp|delta": curve})
  delta_study.plot_curves(curves, str(tmp_path / "c.png"), {"delta": "DELTA"})
  distances = {"l2sp": {"stage1": [2.0, 1.0]}, "delta": {"stage1": [3.0, 0.5]}}
  delta_study.plot_distances(distances, str(tmp_path / "d.png"), {})
  assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "d.png").stat().st_size > 0
