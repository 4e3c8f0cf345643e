"""Pruning a transformer's attention heads and MLP hidden units by |sigma| (`prune_heads`): the
pruned ViT and Swin equal the unpruned ones with the removed scales set to 0, the parameter
count follows the hand formula, the keep rule (value channels decide a head, at least one kept,
rounding to a multiple), and `prune.prune_by_sigma` dispatching to it."""
import jax
import numpy as np
import pytest

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import cwl_linear, prune, prune_heads
from model_helpers import random_variables

CASES = {"vit_s28": (dict(dim=32, depth=2, heads=4), (28, 28, 1)),
         "swin_t": (dict(dim=8, depths=(1, 1), heads=(2, 4), window=2), (16, 16, 3))}


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _case(arch, seed=0):
  config, shape = CASES[arch]
  model = models.get_model(arch, 3, **config)
  params = random_variables(model, shape, seed)["params"]
  rng = np.random.default_rng(seed)
  scales = {k: rng.uniform(0.0, 1.0, np.shape(v)).astype(np.float32)
            for k, v in cwl_linear.init_scales(params).items()}
  for block, stage in prune_heads.blocks(params):  # even heads' values all below 0.3
    w = prune_heads.head_width(models.model_config(model), stage)
    qkv = scales[f"{block}/attn/qkv"].reshape(3, -1, w)
    qkv[2, 0::2] *= 0.3
    scales[f"{block}/attn/qkv"] = qkv.reshape(-1)
  x = rng.normal(size=(2, *shape)).astype(np.float32)
  return model, params, scales, x


def _forward(model, params, x):
  return np.asarray(jax.jit(lambda p: models.apply_model(model, p, None, x)[0])(params))


@pytest.mark.parametrize("arch", ["vit_s28", "swin_t"])
def test_pruned_equals_masked_unpruned_and_counts(arch):
  model, params, scales, x = _case(arch)
  config = models.model_config(model)
  new_params, new_config, kept, masks = prune_heads.prune_by_sigma(params, config, scales, 0.4)
  # Something of both kinds went, and something of each block stayed.
  assert any(k < t for b, (k, t) in kept.items() if b.endswith("/attn"))
  assert all(0 < k for k, _ in kept.values()) and any(k < t for k, t in kept.values())
  small = models.from_config(arch, new_config)
  masked = cwl_linear.apply_scales(
      params, prune_heads.masked_scales(scales, masks, config, params))
  assert _rel(_forward(small, new_params, x), _forward(model, masked, x)) <= 1e-5
  # The pruned tree is exactly what the smaller config builds.
  abstract = jax.eval_shape(lambda: small.init(jax.random.PRNGKey(0), x[:1]))["params"]
  assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, new_params)
  # Hand count: a head of width w in a block of width D has 3 w D + 3 w (qkv) + w D (proj)
  # parameters, plus (2w-1)^2 relative position biases in Swin; a hidden unit D + 1 + D.
  removed = 0
  for block, stage in prune_heads.blocks(params):
    w = prune_heads.head_width(config, stage)
    d = np.shape(surgery.flatten(params)[f"{block}/attn/qkv/kernel"])[0]
    per_head = 4 * w * d + 3 * w + (9 if arch == "swin_t" else 0)  # window 2: 3^2 biases
    k, t = kept[f"{block}/attn"]
    removed += (t - k) * per_head
    k, t = kept[f"{block}/mlp"]
    removed += (t - k) * (2 * d + 1)
  assert surgery.count(new_params) == surgery.count(params) - removed


def test_keep_rule_value_channels_decide_and_multiple():
  model, params, _, _ = _case("vit_s28")
  config = models.model_config(model)
  scales = {k: np.ones(np.shape(v), np.float32)
            for k, v in cwl_linear.init_scales(params).items()}
  qkv = scales["block0/attn/qkv"].reshape(3, 4, 8)
  qkv[:2, 0] = 0.0    # head 0: queries and keys tiny, values large: kept
  qkv[2, 1] = 0.0     # head 1: every value channel tiny: removed
  qkv[2, 2, 1:] = 0.0  # head 2: one value channel large: kept
  scales["block0/attn/qkv"] = qkv.reshape(-1)
  scales["block1/attn/qkv"] = np.zeros(96, np.float32)   # nothing passes: the largest stays
  fc1 = np.zeros(128, np.float32)
  fc1[[3, 7, 9]] = [0.9, 0.8, 0.7]
  fc1[11] = 0.05
  scales["block0/mlp/fc1"] = fc1
  masks = prune_heads.masks_by_sigma(params, config, scales, 0.1)
  assert masks["block0/attn"].tolist() == [True, False, True, True]
  assert masks["block1/attn"].sum() == 1
  assert np.flatnonzero(masks["block0/mlp"]).tolist() == [3, 7, 9]
  # Rounded up to 4: the next largest score (unit 11) comes back.
  masks = prune_heads.masks_by_sigma(params, config, scales, 0.1, multiple=4)
  assert np.flatnonzero(masks["block0/mlp"]).tolist() == [3, 7, 9, 11]
  # tau = 0 keeps everything and changes no shape.
  _, new_config, kept, _ = prune_heads.prune_by_sigma(params, config, scales, 0.0)
  assert all(k == t for k, t in kept.values())
  assert new_config["block_heads"] == [4, 4] and new_config["block_hidden"] == [128, 128]


def test_prune_by_sigma_dispatches_for_transformers():
  model, params, scales, x = _case("vit_s28", seed=1)
  config = models.model_config(model)
  result = prune.prune_by_sigma(dict(params, cwl=scales), {}, config, None, 0.5, multiple=2)
  assert result.params_total == surgery.count(params)
  assert result.params_kept == surgery.count(result.params) < result.params_total
  assert all(k % 2 == 0 for b, (k, _) in result.kept.items() if b.endswith("/mlp"))
  small = models.from_config("vit_s28", result.config)
  masked = cwl_linear.apply_scales(
      params, prune_heads.masked_scales(scales, result.masks, config, params))
  assert _rel(_forward(small, result.params, x), _forward(model, masked, x)) <= 1e-5
  with pytest.raises(InputError, match="tau"):
    prune.prune_by_sigma(params, {}, config, scales, -1.0)
  with pytest.raises(InputError, match="multiple"):
    prune_heads.prune_by_sigma(params, config, scales, 0.5, multiple=0)
  with pytest.raises(InputError, match="one width"):
    models.abstract_variables(
        models.get_model("vit_s28", 3, dim=32, depth=2, heads=4, block_heads=(1,)), (28, 28, 1))
