"""Tests for the transformer adapters (Houlsby, AdaptFormer) and LoRA's transformer rule on a
toy transformer whose module paths follow the planned ViT names (`blockN/attn/qkv`,
`blockN/mlp/fc1`), against a forward written by hand in numpy."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import adapters, lora

SHAPE, D = (4, 4, 3), 8


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(D, name="fc2")(nn.relu(nn.Dense(2 * D, name="fc1")(x)))


class _Attn(nn.Module):  # a stand-in with the planned kernel names, not real attention
  @nn.compact
  def __call__(self, x):
    q, k, v = jnp.split(nn.Dense(3 * D, name="qkv")(x), 3, axis=-1)
    return nn.Dense(D, name="proj")(v * jax.nn.sigmoid(q * k))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = x + _Attn(name="attn")(x)
    return x + _Mlp(name="mlp")(x)


class _Toy(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(D, name="patch_embed")(x.reshape(x.shape[0], -1, x.shape[-1]))
    for i in range(2):
      x = _Block(name=f"block{i}")(x)
    return nn.Dense(self.num_classes, name="head")(x.mean(axis=1))


def _hand(params, ad, kind, x):
  """The toy forward with its adapters, in numpy."""
  dense = lambda p, v: v @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
  x = dense(params["patch_embed"], x.reshape(x.shape[0], -1, x.shape[-1]))
  for i in range(2):
    b = params[f"block{i}"]
    q, k, v = np.split(dense(b["attn"]["qkv"], x), 3, axis=-1)
    x = x + dense(b["attn"]["proj"], v / (1 + np.exp(-q * k)))
    m = dense(b["mlp"]["fc2"], np.maximum(dense(b["mlp"]["fc1"], x), 0))
    e = {n: np.asarray(a) for n, a in ad[f"block{i}/mlp"].items()}
    if kind == "houlsby":
      h = m @ e["down"] + e["down_bias"]
      m = m + (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ e["up"] + e["up_bias"]
    else:
      m = m + 0.1 * (np.maximum(x @ e["down"] + e["down_bias"], 0) @ e["up"] + e["up_bias"])
    x = x + m
  return dense(params["head"], x.mean(axis=1))


@pytest.fixture(scope="module")
def toy():
  model = _Toy()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE)))["params"]
  x = np.random.default_rng(0).normal(size=(2, *SHAPE)).astype(np.float32)
  return model, jax.tree.map(np.asarray, params), x


@pytest.mark.parametrize("kind", adapters.KINDS)
def test_adapters_source_at_init_and_hand_forward(toy, kind):
  model, params, x = toy
  ad = adapters.init_adapters(model, SHAPE, 4, seed=0)
  assert sorted(ad) == ["block0/mlp", "block1/mlp"]
  plain, _, _ = models.apply_model(model, params, {}, x)
  at_init, _, _ = adapters.apply_model_adapters(model, {"tadapter": ad, **params}, {}, x,
                                                kind=kind)
  np.testing.assert_allclose(at_init, plain, rtol=0, atol=1e-6)  # zero up projection
  rng = np.random.default_rng(1)
  ad = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32), ad)
  got, _, _ = adapters.apply_model_adapters(model, {"tadapter": ad, **params}, {}, x, kind=kind)
  want = _hand(params, ad, kind, x)
  assert not np.allclose(want, plain, atol=1e-3)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # 2 D h + h + D per block, h = D / 4.
  assert adapters.trained_count(model, SHAPE, 4) == 2 * (2 * D * 2 + 2 + D)


def test_adapters_refuse_cnns_and_bad_reduction(toy):
  model, _, _ = toy
  with pytest.raises(InputError, match="reduction"):
    adapters.init_adapters(model, SHAPE, 0.5, seed=0)
  cnn = models.get_model("resnet_s", 3, stage_widths=(4, 4, 4), stem_width=4)
  with pytest.raises(InputError, match="no module path"):
    adapters.init_adapters(cnn, (16, 16, 1), 4, seed=0)


def test_lora_default_rule_on_the_toy_transformer(toy):
  model, params, x = toy
  entries = lora.init_lora(params, 2, 2.0, seed=0)
  assert sorted(entries) == [f"block{i}/attn/{n}/kernel" for i in (0, 1)
                             for n in ("proj", "qkv")]
  rng = np.random.default_rng(2)
  entries = {k: dict(v, b=rng.normal(size=v["b"].shape).astype(np.float32))
             for k, v in entries.items()}
  merged = lora.merge_lora(params, entries)
  flat, ref = surgery.flatten(merged), surgery.flatten(params)
  for path, e in entries.items():
    np.testing.assert_allclose(flat[path], ref[path] + 1.0 * e["a"] @ e["b"], rtol=1e-5,
                               atol=1e-6)
  got, _, _ = lora.apply_model_lora(model, {"lora": entries, **params}, {}, x)
  want, _, _ = models.apply_model(model, merged, {}, x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


class _Grouped(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=2,
                name="conv")(x)
    x = nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), name="plain")(x)
    return nn.Dense(3, name="head")(x.mean(axis=(1, 2)))


def test_lora_branch_form_on_grouped_and_strided_convs():
  model = _Grouped()
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 6, 6, 4)))["params"])
  entries = lora.init_lora(params, 2, 2.0, seed=0, rules=("conv/kernel", "plain/kernel"))
  assert entries["conv/kernel"]["a"].shape == (3 * 3 * 2, 2)  # C_in / groups rows
  rng = np.random.default_rng(3)
  entries = {k: dict(v, b=rng.normal(size=v["b"].shape).astype(np.float32))
             for k, v in entries.items()}
  x = rng.normal(size=(2, 6, 6, 4)).astype(np.float32)
  got, _, _ = lora.apply_model_lora_branch(model, {"lora": entries, **params}, {}, x)
  want, _, _ = models.apply_model(model, lora.merge_lora(params, entries), {}, x)
  plain, _, _ = models.apply_model(model, params, {}, x)
  assert not np.allclose(want, plain, atol=1e-3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_peft_strategies_on_vit_s28():
  """On the library's ViT: each reparametrisation equals the source at init and its merge /
  fold equals its training forward once its params are moved."""
  from jtransfer.methods import peft_cost, ssf, transfer
  from model_helpers import random_variables
  shape = (28, 28, 1)
  vit = models.get_model("vit_s28", 5)
  src = transfer.Source("vit_s28", models.model_config(vit), random_variables(vit, shape), shape,
                        (0.3,), (0.3,))
  x = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
  rng = np.random.default_rng(4)
  for name, key, apply, deployed in (
      ("lora", "lora", lora.apply_model_lora_branch, lora.effective_params),
      ("ssf", "ssf", ssf.apply_model_ssf, ssf.effective_params),
      ("houlsby", "tadapter", lambda *a, **k: adapters.apply_model_adapters(
          *a, kind="houlsby", **k), None)):
    setup = transfer.get_strategy(name).build(src, 3, 1)
    params, stats = setup.init(0, None, None)
    base = {k: v for k, v in params.items() if k != key}
    plain, _, _ = models.apply_model(setup.model, base, stats, x)
    at_init, _, _ = apply(setup.model, params, stats, x)
    np.testing.assert_allclose(at_init, plain, rtol=0, atol=1e-5, err_msg=name)
    moved = dict(params, **{key: jax.tree.map(
        lambda a: a + 0.2 * rng.normal(size=np.shape(a)).astype(np.float32), params[key])})
    out, _, _ = apply(setup.model, moved, stats, x)
    assert not np.allclose(out, plain, atol=1e-3), name
    if deployed is not None:  # merged / folded: the source's tree, the same outputs
      merged = deployed(moved)
      assert jax.tree.map(np.shape, merged) == jax.tree.map(np.shape, base)
      got, _, _ = models.apply_model(setup.model, merged, stats, x)
      np.testing.assert_allclose(got, out, rtol=1e-4, atol=1e-4, err_msg=name)
      assert peft_cost.peft_cost(setup, params, stats, shape).extra_flops == 0
  assert sorted(lora.init_lora(base, 2, 2.0, 0))[:2] == ["block0/attn/proj/kernel",
                                                          "block0/attn/qkv/kernel"]
