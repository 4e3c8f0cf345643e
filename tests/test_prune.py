"""Tests for jtransfer.methods.prune: structural channel pruning by CWL scales."""
import jax
import numpy as np
import pytest

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import cwl, prune
from model_helpers import random_variables

SHAPE = (16, 16, 1)


def _variables(model, seed=0, shape=SHAPE):
  return random_variables(model, shape, seed)


def _setup(arch, seed=0, shape=SHAPE, **cfg):
  model = models.get_model(arch, 4, **cfg)
  v = _variables(model, seed, shape)
  rng = np.random.default_rng(seed + 100)
  scales = {u: rng.uniform(0.0, 1.5, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(v["params"]).items()}
  x = rng.normal(size=(3, *shape)).astype(np.float32)
  return model, v["params"], v.get("batch_stats", {}), scales, x


def _logits(arch, config, params, stats, x):
  model = models.from_config(arch, config)
  return np.asarray(jax.jit(lambda p, s, x: models.apply_model(model, p, s, x)[0])(
      params, stats, x))


def _check_equivalent(arch, model, params, stats, scales, x, tau, residual="group"):
  """The pruned model's outputs equal the unpruned model with removed channels' sigma at 0."""
  config = models.model_config(model)
  res = prune.prune_by_sigma(params, stats, config, scales, tau, residual)
  masked = {u: s * res.masks[u] for u, s in scales.items()}
  want = _logits(arch, config, cwl.apply_cwl(params, masked), stats, x)
  got = _logits(arch, res.config, res.params, res.batch_stats, x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  return res


@pytest.mark.parametrize("dense", [(), (32,)])
def test_vgg_pruned_equals_masked(dense):
  model, params, stats, scales, x = _setup("vgg_s", dense_widths=dense)
  res = _check_equivalent("vgg_s", model, params, stats, scales, x, 0.6)
  # every unit is its own group: exactly the channels with |sigma| >= tau are kept
  for u, s in scales.items():
    np.testing.assert_array_equal(res.masks[u], np.abs(s) >= 0.6)
    assert res.kept[u] == (int(np.sum(np.abs(s) >= 0.6)), s.size)
  assert res.config["conv_widths"][0][0] == res.kept["conv1_1"][0]
  assert res.params_kept < res.params_total


def test_vgg_truncated_gap_head():
  model, params, stats, scales, x = _setup("vgg_s", dense_widths=(), truncate_after="conv2_2")
  _check_equivalent("vgg_s", model, params, stats, scales, x, 0.5)


def _group_small(scales, units, channels):
  for u in units:
    scales[u][channels] = 0.01  # all coupled units below tau on these channels


def test_resnet_pruned_equals_masked_and_groups():
  model, params, stats, scales, x = _setup("resnet_s", seed=1)
  stage2 = ["stage2/block0/conv2", "stage2/block0/downsample", "stage2/block1/conv2"]
  _group_small(scales, stage2, [3, 10, 11])
  res = _check_equivalent("resnet_s", model, params, stats, scales, x, 0.6)
  # free units (conv1 of each block): exactly |sigma| >= tau
  np.testing.assert_array_equal(res.masks["stage3/block1/conv1"],
                                np.abs(scales["stage3/block1/conv1"]) >= 0.6)
  # a stage channel goes only when every coupled unit is below tau (OR of keeps)
  want = np.any([np.abs(scales[u]) >= 0.6 for u in stage2], axis=0)
  np.testing.assert_array_equal(res.masks["stage2/block0/downsample"], want)
  assert not want[[3, 10, 11]].any() and res.config["stage_widths"][1] == int(want.sum())
  # the stem writes into stage 1's channels (identity shortcut): same group, same width
  np.testing.assert_array_equal(res.masks["stem"], res.masks["stage1/block0/conv2"])
  assert res.config["stem_width"] == res.config["stage_widths"][0]


def test_resnet_residual_keep_mode():
  model, params, stats, scales, x = _setup("resnet_s", seed=2)
  _group_small(scales, ["stage3/block0/conv2", "stage3/block0/downsample",
                        "stage3/block1/conv2"], [0, 1])
  res = _check_equivalent("resnet_s", model, params, stats, scales, x, 0.6, residual="keep")
  assert res.config["stage_widths"] == [32, 64, 128]
  assert res.kept["stage3/block1/conv2"] == (128, 128)
  assert res.kept["stage3/block1/conv1"][0] < 128


def test_bottleneck_rounds_to_multiple_of_four_and_keeps_downsample():
  cfg = dict(stage_sizes=(2, 1), stage_widths=(4, 8), stem_width=8, stem_kernel=3,
             stem_stride=1, stem_pool=False)
  model, params, stats, scales, x = _setup("resnet50", seed=3, **cfg)
  # stage 1 (16 channels): leave exactly 5 above tau -> rounds up to 8, equal to the stem's 8
  s1 = ["stage1/block0/conv3", "stage1/block0/downsample", "stage1/block1/conv3"]
  for u in s1:
    scales[u][:] = 0.01
  scales["stage1/block0/conv3"][:5] = 1.0
  scales["stem"][:] = 1.0
  res = _check_equivalent("resnet50", model, params, stats, scales, x, 0.6)
  n1 = res.kept["stage1/block0/conv3"][0]
  assert n1 % 4 == 0 and n1 >= 8
  # with 8 stage channels the stride-1 first block would lose its downsample: not allowed
  assert n1 != res.kept["stem"][0]
  assert res.config["stage_widths"][0] == n1 // 4


def test_tau_zero_changes_nothing():
  for arch in ("vgg_s", "resnet_s"):
    model, params, stats, scales, x = _setup(arch, dense_widths=()) if arch == "vgg_s" else \
        _setup(arch)
    res = prune.prune_by_sigma(params, stats, models.model_config(model), scales, 0.0)
    folded = surgery.flatten(cwl.apply_cwl(params, scales))
    got = surgery.flatten(res.params)
    assert folded.keys() == got.keys()
    for k in folded:
      np.testing.assert_array_equal(np.asarray(folded[k]), got[k])
    for k, v in surgery.flatten(stats).items():
      np.testing.assert_array_equal(v, surgery.flatten(res.batch_stats)[k])
    assert res.params_kept == res.params_total
    assert res.feature_maps_kept[0] == res.feature_maps_kept[1]


def test_param_count_by_hand_vgg():
  model = models.get_model("vgg_s", 4, dense_widths=())
  params = _variables(model)["params"]
  keep = {"conv1_1": np.arange(32) >= 5, "conv3_2": np.arange(128) % 2 == 0}
  new, _, cfg = prune.prune_channels(params, {}, models.model_config(model), keep)
  a, b = 27, 64  # conv1_1 keeps 27 of 32, conv3_2 keeps 64 of 128
  # head: 16 px -> 2x2 last map, so P=4 flatten rows per kept channel, 4 classes
  want = (9 * 1 * a + a) + (9 * a * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64) \
      + (9 * 64 * 128 + 128) + (9 * 128 * b + b) + (4 * b * 4 + 4)
  assert surgery.count(new) == want
  assert cfg["conv_widths"] == [[a, 32], [64, 64], [128, b]]
  # flatten rows: channel c at position p is row p*C + c
  w = np.asarray(params["head"]["kernel"]).reshape(4, 128, 4)
  np.testing.assert_array_equal(new["head"]["kernel"], w[:, ::2].reshape(-1, 4))


def test_param_count_by_hand_resnet():
  model = models.get_model("resnet_s", 4)
  v = _variables(model)
  keep = {"stage1/block1/conv1": np.arange(32) < 20}
  full = surgery.count(v["params"])
  new, stats, cfg = prune.prune_channels(v["params"], v["batch_stats"],
                                         models.model_config(model), keep)
  # 12 channels of a 3x3 conv (32 in) + BN (2 per channel), and 12 inputs of the next 3x3 conv
  assert surgery.count(new) == full - 12 * (9 * 32 + 2) - 12 * 9 * 32
  assert stats["stage1/block1"]["conv1"]["bn"]["mean"].shape == (20,)
  assert cfg["inner_widths"][0][1] == [20]


def test_bad_inputs():
  model = models.get_model("vgg_s", 4, dense_widths=())
  params = _variables(model)["params"]
  config = models.model_config(model)
  with pytest.raises(InputError, match="unknown conv unit"):
    prune.prune_channels(params, {}, config, {"conv9_9": np.ones(3, bool)})
  with pytest.raises(InputError, match="shape"):
    prune.prune_channels(params, {}, config, {"conv1_1": np.ones(3, bool)})
  with pytest.raises(InputError, match="at least"):
    prune.prune_channels(params, {}, config, {"conv1_1": np.zeros(32, bool)})
  with pytest.raises(InputError, match="fold them"):
    prune.prune_channels(cwl.with_scales(params), {}, config, {})
  with pytest.raises(InputError, match="tau"):
    prune.prune_by_sigma(params, {}, config, cwl.init_scales(params), -1.0)
  with pytest.raises(InputError, match="residual"):
    prune.prune_channels(params, {}, config, {}, residual="sometimes")


def test_empty_unit_keeps_its_best_channel():
  model = models.get_model("vgg_s", 4, dense_widths=())
  params = _variables(model)["params"]
  scales = {u: np.full(s.shape, 0.1, np.float32) for u, s in cwl.init_scales(params).items()}
  scales["conv2_1"][17] = 0.3
  res = prune.prune_by_sigma(params, {}, models.model_config(model), scales, 1.0)
  assert all(k == 1 for k, _ in res.kept.values())
  assert np.flatnonzero(res.masks["conv2_1"]).tolist() == [17]


@pytest.mark.parametrize("arch", ["vgg_s", "resnet_s"])
def test_multiple_rounds_kept_counts_up_by_sigma(arch):
  model, params, stats, scales, x = _setup(arch, seed=3)
  config = models.model_config(model)
  tau = 0.7
  plain = prune.prune_by_sigma(params, stats, config, scales, tau)
  res = prune.prune_by_sigma(params, stats, config, scales, tau, multiple=8)
  for u, s in scales.items():
    kept, total = res.kept[u]
    assert kept % 8 == 0 or kept == total, (u, kept)
    # a superset of the plain rule's channels, the extras being the largest |sigma| removed
    assert np.all(res.masks[u] >= plain.masks[u])
    extra = res.masks[u] & ~plain.masks[u]
    if extra.any():
      dropped = ~res.masks[u]
      group_score = np.abs(s)  # vgg units are their own group; resnet groups share masks
      if arch == "vgg_s" and dropped.any():
        assert group_score[extra].min() >= group_score[dropped].max()
  # still exactly the masked model
  masked = {u: s * res.masks[u] for u, s in scales.items()}
  want = _logits(arch, config, cwl.apply_cwl(params, masked), stats, x)
  got = _logits(arch, res.config, res.params, res.batch_stats, x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_multiple_must_be_positive_int():
  model, params, stats, scales, _ = _setup("vgg_s")
  with pytest.raises(InputError, match="multiple"):
    prune.prune_by_sigma(params, stats, models.model_config(model), scales, 0.5, multiple=0)
