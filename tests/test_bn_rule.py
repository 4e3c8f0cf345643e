"""BatchNorm's mode as one setting (jtransfer.methods.bn_rule): which strategies follow it, that
they honour it (running statistics move under 'train', stay bit-identical under 'frozen'), and
that `finetune` under 'train' is `finetune_bn`. The study flag and the compatibility of folders
made before it: tests/test_bn_flag.py."""
import jax
import numpy as np
import pytest

from jtransfer import api
from jtransfer.errors import InputError
from jtransfer.methods import bn_rule, delta, transfer
from jtransfer.train import init_state, make_train_step
from delta_helpers import tiny_source

# The rule (bn_rule's docstring, docs/protocol.md): strategies that update the backbone's
# kernels follow the mode asked for; the others keep the source's statistics.
FOLLOW = {"finetune", "finetune_cwl", "finetune_lowconv", "finetune_lrd", "last_k", "surgical",
          "l2", "l2sp", "delta_noatt", "delta", "bss", "lpft", "wise_ft", "cotuning", "lora"}
FROZEN = {"freeze", "freeze_cwl", "freeze_film", "l2fe", "bitfit", "norm_tune", "ssf",
          "conv_adapter", "houlsby", "adaptformer", "vpt_shallow", "vpt_deep"}
# Knobs that fit the tiny two-stage source, and a short DELTA attention probe.
KNOBS = {"last_k": {"k": 1.0}, "surgical": {"block": 0.0}, "lora": {"rank": 1.0},
         **{n: {"config": delta.Config(att_head_min_steps=5, att_batches=1)}
            for n in ("l2", "l2sp", "delta_noatt", "delta")}}


def _batch(source, n=6):
  rng = np.random.default_rng(1)
  return {"image": rng.integers(0, 256, (n, *source.input_shape), dtype=np.uint8),
          "label": np.array([0, 1] * (n // 2), np.int32)}


def _steps(name: str, bn, source, batch, steps: int = 1, lr: float = 1e-3):
  """(initial stats, trained state) of `steps` steps of strategy `name` asked for `bn`."""
  setup = transfer.get_strategy(name).build(source, 2, 10, bn=bn, **KNOBS.get(name, {}))
  params, stats = setup.init(0, batch["image"], batch["label"])
  start = jax.tree.map(np.array, stats)
  state = init_state(params, stats, setup.optimizer, 0, lr)
  step = make_train_step(setup.loss_fn, setup.optimizer)
  for _ in range(steps):
    state, _ = step(state, batch)
  return start, state


def test_the_registry_follows_the_rule():
  transfer._import_methods()
  follow = {n for n, s in transfer.STRATEGIES.items() if bn_rule.follows(s.bn_modes)}
  assert follow == FOLLOW
  assert {n for n, s in transfer.STRATEGIES.items() if s.bn_modes == bn_rule.FROZEN_ONLY} \
      == FROZEN
  bn = transfer.get_strategy("finetune_bn")
  assert bn.bn_modes == bn_rule.TRAIN_ONLY and bn.bn_mode("frozen") == "train"
  assert transfer.get_strategy("freeze").bn_mode("train") == "frozen"
  assert transfer.get_strategy("finetune").bn_mode("train") == "train"
  assert transfer.get_strategy("finetune").bn_mode(None) == "frozen"  # its own recipe
  assert transfer.get_strategy("l2sp").bn_mode(None) == "train"  # delta.Config.bn_train


def test_finetune_in_train_mode_is_finetune_bn():
  source = tiny_source("resnet_s")
  batch = _batch(source)
  _, a = _steps("finetune", "train", source, batch, steps=3)
  _, b = _steps("finetune_bn", None, source, batch, steps=3)
  for x, y in zip(jax.tree.leaves((a.params, a.batch_stats)),
                  jax.tree.leaves((b.params, b.batch_stats))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Behind -m slow: the strategies whose BN mode reaches the loss through a builder another
# default case covers (rule_setup like finetune; DELTA's loss like l2sp/delta; LP-FT's steps
# like wise_ft's). 5-14 s each on the suite's 2 cores, mostly compiling two steps.
_SAME_PATH = {"finetune_lowconv", "finetune_lrd", "last_k", "surgical", "l2", "delta_noatt",
              "wise_ft"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SAME_PATH
                                  else n for n in sorted(FOLLOW)])
def test_following_strategies_honour_the_mode(name):
  """Under 'train' a step moves the running statistics; under 'frozen' they stay the source's,
  bit for bit."""
  source = tiny_source("resnet_s")
  batch = _batch(source)
  start, trained = _steps(name, "train", source, batch)
  moved = [float(np.max(np.abs(np.asarray(x) - y))) for x, y in
           zip(jax.tree.leaves(trained.batch_stats), jax.tree.leaves(start))]
  assert max(moved) > 0
  start, frozen = _steps(name, "frozen", source, batch)
  for x, y in zip(jax.tree.leaves(frozen.batch_stats), jax.tree.leaves(start)):
    np.testing.assert_array_equal(np.asarray(x), y)


def test_bad_modes_are_one_sentence():
  source = tiny_source("resnet_s")
  with pytest.raises(InputError, match="bn must be 'train' or 'frozen', got 'eval'"):
    transfer.get_strategy("finetune").build(source, 2, 10, bn="eval")
  with pytest.raises(InputError, match="has no knob 'bn_train'"):
    transfer.get_strategy("finetune").build(source, 2, 10, bn_train=True)
  x = np.zeros((2, *source.input_shape), np.uint8)
  with pytest.raises(InputError, match="bn must be 'train' or 'frozen'"):
    api.fit(source, "finetune", (x, np.array([0, 1])), lr=1e-3, bn="batch")


def test_api_trains_bn_by_default_and_says_so():
  """`api.fit`'s default is train mode for fine-tuning; a frozen-backbone strategy runs frozen
  whatever is asked, and the result says which mode each trained in."""
  source = tiny_source("resnet_s")
  batch = _batch(source)
  data = (batch["image"], batch["label"])
  ft = api.fit(source, "finetune", data, lr=1e-3, budget=api.FixedSteps(1))
  fr = api.fit(source, "freeze", data, lr=1e-3, budget=api.FixedSteps(1), bn="train")
  assert (ft.bn, fr.bn) == ("train", "frozen")
  src = jax.tree.leaves(source.variables["batch_stats"])
  assert any(np.any(np.asarray(a) != b) for a, b in
             zip(jax.tree.leaves(ft.variables["batch_stats"]), src))
  for a, b in zip(jax.tree.leaves(fr.variables["batch_stats"]), src):
    np.testing.assert_array_equal(a, b)


def test_without_batchnorm_both_modes_are_one_network():
  """vgg_s has no BatchNorm (and no dropout in the target): fine-tuning it in either mode gives
  the same weights, bit for bit."""
  source = tiny_source("vgg_s")
  batch = _batch(source)
  _, a = _steps("finetune", "train", source, batch, steps=2)
  _, b = _steps("finetune", "frozen", source, batch, steps=2)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
