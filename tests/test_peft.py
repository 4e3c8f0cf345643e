"""Tests for the parameter-efficient methods: LoRA, SSF, norm_tune, last_k, surgical,
finetune_lrd, Conv-Adapter, and `peft_cost` (trained params, extra FLOPs after merging)."""
import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import conv_adapter, lora, partial, peft_cost, peft_paths, ssf, transfer
from jtransfer.train import init_state, make_train_step
from model_helpers import random_variables, tiny_fewshot_run

SHAPE = (16, 16, 1)
MEAN, STD = (0.4,), (0.3,)
CLASSES = 3
# Narrow configs: every test compiles a train step or a forward, which dominates their time.
CONFIGS = {"resnet_s": dict(stage_widths=(8, 8, 16), stem_width=8),
           "vgg_s": dict(conv_widths=((4, 4), (6, 6), (8, 8)), dense_widths=(8,))}


def _live_bn(variables):
  """BN near identity (mean 0, scale 1, small shifts): random BN shifts and negative scales
  leave whole narrow layers dead after their ReLU, and dead layers get no gradient."""
  rng = np.random.default_rng(1)
  fix = {"mean": lambda a: np.zeros_like(a), "scale": lambda a: np.ones_like(a),
         "bias": lambda a: (0.1 * rng.normal(size=a.shape)).astype(np.float32)}

  def fill(path, a):
    unit, _, name = path.rpartition("/")
    return fix[name](a) if unit.endswith("/bn") and name in fix else a

  return {k: surgery.map_with_path(fill, t) for k, t in variables.items()}


@pytest.fixture(scope="module")
def sources():
  out = {}
  for arch in ("resnet_s", "vgg_s"):
    model = models.get_model(arch, 5, **CONFIGS[arch])
    out[arch] = transfer.Source(arch, models.model_config(model),
                                _live_bn(random_variables(model, SHAPE)), SHAPE, MEAN, STD)
  return out


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (8, *SHAPE), dtype=np.uint8),
          "label": rng.integers(0, CLASSES, 8).astype(np.int32)}


def _x(images):
  return (images.astype(np.float32) / 255.0 - MEAN[0]) / STD[0]


def _randomise(tree, seed):
  """Every leaf replaced by random values (trained-looking LoRA / SSF / adapter params)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (rng.normal(size=np.shape(a)) * 0.3).astype(np.float32)
                      + (1.0 if np.ndim(a) == 1 else 0.0), tree)


def _size(flat, paths):
  return int(sum(np.size(flat[p]) for p in paths))


# ----------------------------------------------------------------------------- what trains
# strategy, arch, regex of the leaves that must train (everything else must stay bit-identical)
TRAINS = [
    ("lora", "resnet_s", r"lora/.*/(a|b)|head/.*"),
    ("lora", "vgg_s", r"lora/.*/(a|b)|head/.*"),
    ("ssf", "resnet_s", r"ssf/.*|head/.*"),
    ("ssf", "vgg_s", r"ssf/.*|head/.*"),
    ("norm_tune", "resnet_s", r".*/bn/(scale|bias)|head/.*"),
    ("last_k", "resnet_s", r"stage3/block1/.*|head/.*"),
    ("surgical", "vgg_s", r"conv1_1/.*|head/.*"),
    ("conv_adapter", "resnet_s", r"adapter/.*|head/.*"),
]


@pytest.mark.parametrize("name,arch,rule", TRAINS)
def test_trains_only_what_it_says(sources, batch, name, arch, rule):
  setup = transfer.get_strategy(name).build(sources[arch], CLASSES, 3)
  params, stats = setup.init(0, batch["image"], batch["label"])
  before = jax.tree.map(np.array, params)
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state = init_state(params, stats, setup.optimizer, 0, 1e-2)
  for _ in range(3):
    state, metrics = step(state, batch)
    assert bool(metrics["finite"])
  after, ref = surgery.flatten(state.params), surgery.flatten(before)
  trained = [p for p in ref if re.fullmatch(rule, p)]
  assert trained and len(trained) < len(ref)
  for path, old in ref.items():
    new = np.asarray(after[path])
    if path in trained:
      assert not np.array_equal(new, old), f"{path} did not train"
    else:
      assert np.array_equal(new, old), f"{path} changed but must be frozen"
  # The optimizer's own labels agree with the rule.
  flags = surgery.flatten(setup.optimizer.trainable)
  assert sorted(p for p, t in flags.items() if t) == sorted(trained)


# ----------------------------------------------------------------------------- LoRA
def _two_conv_branch(entries):
  """Independent LoRA form: each adapted conv gets a parallel kxk conv to r channels (A) then a
  1x1 conv r -> out (B), scaled by alpha / r, added to its output (loralib's ConvLoRA)."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = "/".join(context.module.path) + "/kernel"
    if context.method_name != "__call__" or path not in entries:
      return out
    e, m = entries[path], context.module
    kh, kw = m.kernel_size
    a = e["a"].reshape(kh, kw, -1, e["a"].shape[-1])
    dn = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(args[0], a, m.strides, m.padding, dimension_numbers=dn)
    y = jax.lax.conv_general_dilated(y, e["b"][None, None], (1, 1), "VALID",
                                     dimension_numbers=dn)
    return out + e["scale"] * y
  return interceptor


@pytest.mark.parametrize("arch", ["resnet_s", "vgg_s"])
def test_lora_merged_equals_two_conv_form_and_source_at_init(sources, batch, arch):
  setup = lora.build_lora(sources[arch], CLASSES, 3, rank=3, alpha=6.0)
  params, stats = setup.init(0, None, None)
  x = _x(batch["image"])
  base = {k: v for k, v in params.items() if k != lora.LORA_KEY}
  plain, _, _ = models.apply_model(setup.model, base, stats, x)
  at_init, _, _ = lora.apply_model_lora(setup.model, params, stats, x)
  np.testing.assert_allclose(at_init, plain, rtol=0, atol=1e-6)  # B = 0: the source
  trained = {k: {"a": v["a"], "b": _randomise(v["b"], 1), "scale": v["scale"]}
             for k, v in params[lora.LORA_KEY].items()}
  assert all(float(v["scale"]) == 2.0 for v in trained.values())  # alpha / r
  merged = lora.merge_lora(base, trained)
  assert jax.tree.structure(merged) == jax.tree.structure(base)  # the source's tree shape
  assert jax.tree.map(np.shape, merged) == jax.tree.map(np.shape, base)
  got, _, _ = models.apply_model(setup.model, merged, stats, x)
  with nn.intercept_methods(_two_conv_branch(trained)):
    want, _, _ = models.apply_model(setup.model, base, stats, x)
  assert not np.allclose(want, plain, atol=1e-3)  # the update matters
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The training forward (LoRA as branches), in eval and in train mode, against the merged one.
  for train in (False, True):
    branch, _, _ = lora.apply_model_lora_branch(setup.model, dict(base, lora=trained), stats, x,
                                                train=train)
    merged_out, _, _ = models.apply_model(setup.model, merged, stats, x, train=train)
    np.testing.assert_allclose(branch, merged_out, rtol=1e-5, atol=1e-5)


def test_lora_param_count_and_rules(sources):
  src = sources["resnet_s"]
  setup = lora.build_lora(src, CLASSES, 3, rank=2)
  params, stats = setup.init(0, None, None)
  base = {k: v for k, v in params.items() if k != lora.LORA_KEY}
  flat = surgery.flatten(base)
  convs = [p for p in flat if p.endswith("/conv/kernel")]
  # r * (kh*kw*cin + cout) per conv kernel, plus the head.
  want = sum(2 * (int(np.prod(flat[p].shape[:3])) + flat[p].shape[3]) for p in convs)
  head = _size(flat, ["head/kernel", "head/bias"])
  assert lora.trained_count(base, 2) == want
  assert peft_cost.peft_cost(setup, params, stats, SHAPE) == peft_cost.PeftCost(want + head, 0)
  assert lora.default_rules({"block0": {"attn": {"qkv": {"kernel": np.zeros((4, 12))}}}}) == \
      lora.TRANSFORMER_RULES
  with pytest.raises(InputError, match="rank"):
    lora.init_lora(base, 0, 1.0, 0)
  with pytest.raises(InputError, match="select no"):
    lora.init_lora(base, 2, 1.0, 0, rules=("nothing/.*",))


def test_lora_on_dense_kernels_of_a_transformer_like_tree():
  rng = np.random.default_rng(0)
  params = {"block0": {"attn": {"qkv": {"kernel": rng.normal(size=(8, 24)).astype(np.float32)},
                                "proj": {"kernel": rng.normal(size=(8, 8)).astype(np.float32)}},
                       "mlp": {"fc1": {"kernel": rng.normal(size=(8, 16)).astype(np.float32)}}}}
  entries = _randomise(lora.init_lora(params, 2, 4.0, 0), 2)
  entries = {k: dict(v, scale=np.float32(2.0)) for k, v in entries.items()}
  assert sorted(entries) == ["block0/attn/proj/kernel", "block0/attn/qkv/kernel"]
  merged = surgery.flatten(lora.merge_lora(params, entries))
  e = entries["block0/attn/qkv/kernel"]
  np.testing.assert_allclose(merged["block0/attn/qkv/kernel"],
                             params["block0"]["attn"]["qkv"]["kernel"] + 2.0 * e["a"] @ e["b"],
                             rtol=1e-6)
  np.testing.assert_array_equal(merged["block0/mlp/fc1/kernel"],
                                params["block0"]["mlp"]["fc1"]["kernel"])


# ----------------------------------------------------------------------------- SSF
@pytest.mark.parametrize("arch", ["resnet_s", "vgg_s"])
@pytest.mark.parametrize("train", [False, True])
def test_ssf_folded_equals_unfolded(sources, batch, arch, train):
  setup = ssf.build_ssf(sources[arch], CLASSES, 3)
  params, stats = setup.init(0, None, None)
  x = _x(batch["image"])
  base = {k: v for k, v in params.items() if k != ssf.SSF_KEY}
  plain, _, _ = models.apply_model(setup.model, base, stats, x, train=train)
  at_init, _, _ = ssf.apply_model_ssf(setup.model, params, stats, x, train=train)
  np.testing.assert_allclose(at_init, plain, rtol=0, atol=1e-6)
  trained = dict(params, ssf=_randomise(params[ssf.SSF_KEY], 3))
  unfolded, _, _ = ssf.apply_model_ssf(setup.model, trained, stats, x, train=train)
  folded_params = ssf.effective_params(trained)
  assert jax.tree.map(np.shape, folded_params) == jax.tree.map(np.shape, base)
  folded, _, _ = models.apply_model(setup.model, folded_params, stats, x, train=train)
  assert not np.allclose(unfolded, plain, atol=1e-3)
  np.testing.assert_allclose(folded, unfolded, rtol=1e-5, atol=1e-5)


def test_ssf_targets_follow_bn_and_count(sources):
  setup = ssf.build_ssf(sources["resnet_s"], CLASSES, 3)
  params, stats = setup.init(0, None, None)
  base = {k: v for k, v in params.items() if k != ssf.SSF_KEY}
  where = ssf.targets(base, params[ssf.SSF_KEY])
  assert where["stem/conv"] == "stem/bn"  # after BN, as CWL
  assert "head" not in where
  flat = surgery.flatten(base)
  want = sum(2 * flat[p].shape[-1] for p in flat if p.endswith("/conv/kernel"))
  assert ssf.trained_count(base) == want
  head = _size(flat, ["head/kernel", "head/bias"])
  assert peft_cost.peft_cost(setup, params, stats, SHAPE).trained_params == want + head
  no_bias = {"fc": {"kernel": np.ones((3, 4), np.float32)}}
  with pytest.raises(InputError, match="bias"):
    ssf.init_ssf(no_bias)


# ----------------------------------------------------------------------------- depth
def test_blocks_in_forward_order(sources):
  groups, tail = partial.model_blocks(sources["resnet_s"], CLASSES)
  assert groups == [("stem",)] + [(f"stage{s}/block{b}",) for s in (1, 2, 3) for b in (0, 1)]
  assert tail == ()
  assert partial.model_blocks(sources["vgg_s"], CLASSES) == (
      [(f"conv{s}_{i}",) for s in (1, 2, 3) for i in (1, 2)], ())
  # A ViT: the embeddings are depth 0 (BEiT's layer 0), the final norm trains with the head.
  vit = models.get_model("vit_s28", CLASSES)
  shape = (28, 28, 1)
  groups, tail = peft_paths.depth_groups(models.abstract_variables(vit, shape)["params"],
                                         peft_paths.forward_order(vit, shape))
  assert sorted(groups[0]) == ["cls_token", "patch_embed", "pos_embed"]
  assert groups[1:] == [(f"block{i}",) for i in range(len(groups) - 1)] and tail == ("norm",)
  assert peft_paths.block_of("block3/attn/qkv/kernel") == "block3"
  assert peft_paths.block_of("cls_token") == "cls_token"
  assert re.fullmatch(peft_paths.block_rule("stage1/block1"), "stage1/block10/x") is None


def test_lr_decay_first_adam_step_scales_by_depth(sources, batch):
  """Adam's first update is lr * mult * sign(grad) (up to eps): the per-block multipliers are
  visible in the size of each block's first step."""
  lr, decay = 1e-3, 0.5
  setup = partial.build_finetune_lrd(sources["resnet_s"], CLASSES, 3, lr_decay=decay)
  params, stats = setup.init(0, None, None)
  before = surgery.flatten(jax.tree.map(np.array, params))
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state, _ = step(init_state(params, stats, setup.optimizer, 0, lr), batch)
  after = surgery.flatten(state.params)
  names = [g[0] for g in partial.model_blocks(sources["resnet_s"], CLASSES)[0]]
  for path in ("stem/conv/kernel", "stage2/block0/conv1/conv/kernel",
               "stage3/block1/conv2/conv/kernel", "head/kernel"):
    block = "head" if path.startswith("head") else peft_paths.block_of(path)
    depth = len(names) if block == "head" else names.index(block)
    want = lr * decay ** (len(names) - depth)
    moved = np.abs(np.asarray(after[path]) - before[path])
    np.testing.assert_allclose(np.median(moved[moved > 0]), want, rtol=1e-2)


def test_partial_knobs_checked(sources):
  with pytest.raises(InputError, match="block"):
    partial.build_surgical(sources["vgg_s"], CLASSES, 3, block=6)
  with pytest.raises(InputError, match="k must"):
    partial.build_last_k(sources["resnet_s"], CLASSES, 3, k=0)
  with pytest.raises(InputError, match="lr_decay"):
    partial.build_finetune_lrd(sources["resnet_s"], CLASSES, 3, lr_decay=1.5)
  with pytest.raises(InputError, match="no BatchNorm"):
    transfer.get_strategy("norm_tune").build(sources["vgg_s"], CLASSES, 3)


# ----------------------------------------------------------------------------- Conv-Adapter
def test_conv_adapter_source_at_init_count_and_flops(sources, batch):
  src = sources["resnet_s"]
  setup = conv_adapter.build_conv_adapter(src, CLASSES, 3, reduction=4)
  params, stats = setup.init(0, None, None)
  x = _x(batch["image"])
  base = {k: v for k, v in params.items() if k != conv_adapter.ADAPTER_KEY}
  plain, _, _ = models.apply_model(setup.model, base, stats, x)
  at_init, _, _ = conv_adapter.apply_model_adapter(setup.model, params, stats, x)
  np.testing.assert_allclose(at_init, plain, rtol=0, atol=1e-6)  # zero up projection
  trained = dict(params, adapter=_randomise(params[conv_adapter.ADAPTER_KEY], 4))
  moved, _, _ = conv_adapter.apply_model_adapter(setup.model, trained, stats, x)
  assert not np.allclose(moved, plain, atol=1e-3)
  # Hand count for this resnet_s (stem 8; stages 8, 8, 16 x 2 basic blocks), h = C_out / 4.
  dims = [(8, 8), (8, 8), (8, 8), (8, 8), (8, 16), (16, 16)]
  want = sum(9 * ci + ci * (co // 4) + co // 4 + (co // 4) * co + co for ci, co in dims)
  assert conv_adapter.trained_count(setup.model, SHAPE, 4) == want
  cost = peft_cost.peft_cost(setup, params, stats, SHAPE)
  head = _size(surgery.flatten(base), ["head/kernel", "head/bias"])
  assert cost.trained_params == want + head
  # The analytic FLOPs against XLA's cost analysis of the two forwards.
  analytic = conv_adapter.extra_flops(setup.model, SHAPE, 4)
  assert analytic > 0
  np.testing.assert_allclose(cost.extra_flops, analytic, rtol=0.1)


def test_peft_cost_of_existing_strategies(sources):
  src = sources["resnet_s"]
  flat = surgery.flatten(src.variables["params"])
  head = 16 * CLASSES + CLASSES  # the last stage's width
  convs = [p for p in flat if p.endswith("/conv/kernel")]
  channels = sum(flat[p].shape[-1] for p in convs)
  bn_biases = channels  # every resnet_s unit has BN: one shift per channel, no conv bias
  total = sum(np.size(v) for p, v in flat.items() if not p.startswith("head/")) + head
  want = {"freeze": head, "finetune": total, "bitfit": bn_biases + head,
          "freeze_cwl": channels + head, "freeze_film": 2 * channels + head}
  for name, n in want.items():
    setup = transfer.get_strategy(name).build(src, CLASSES, 3)
    params, stats = setup.init(0, None, None)
    assert peft_cost.peft_cost(setup, params, stats, SHAPE) == peft_cost.PeftCost(n, 0), name


def test_trained_counts_of_norm_and_partial_tuning(sources):
  src = sources["resnet_s"]
  flat = surgery.flatten(src.variables["params"])
  head = 16 * CLASSES + CLASSES
  under = lambda *prefixes: sum(np.size(v) for p, v in flat.items() if p.startswith(prefixes))
  bn = sum(flat[p].shape[-1] for p in flat if p.endswith("/bn/scale"))
  want = {("norm_tune", ()): 2 * bn + head,
          ("last_k", (("k", 2.0),)): under("stage3/block0/", "stage3/block1/") + head,
          ("surgical", (("block", 2.0),)): under("stage1/block1/") + head,
          ("surgical", (("block", 0.0),)): under("stem/") + head}
  for (name, knobs), n in want.items():
    setup = transfer.get_strategy(name).build(src, CLASSES, 3, **dict(knobs))
    params, stats = setup.init(0, None, None)
    assert peft_cost.peft_cost(setup, params, stats, SHAPE) == peft_cost.PeftCost(n, 0), name


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow  # one compile per strategy and arch: slow on a shared CPU
def test_fewshot_smoke_peft_strategies(tmp_path):
  records = tiny_fewshot_run(tmp_path / "r", "resnet_s", CONFIGS["resnet_s"],
                             "lora,ssf,norm_tune,conv_adapter", "fmnist:1,5,7")
  assert {r["arm"] for r in records} == {"lora", "ssf", "norm_tune", "conv_adapter"}
  records = tiny_fewshot_run(tmp_path / "v", "vgg_s", CONFIGS["vgg_s"],
                             "lora,ssf,surgical,last_k,finetune_lrd", "fmnist:1,5,7")
  assert {r["arm"] for r in records} == {"lora", "ssf", "surgical", "last_k",
                                              "finetune_lrd"}
