"""VPT shallow and deep: the prompted forward and its gradient against timm's ViT and
open_clip's image tower run by hand in torch with the prompts inserted as the authors' code
does, the DINOv2 register layout with mean pooling, what trains, the parameter count, the
zero-prompt case, the shapes, the extra FLOPs against the hand formula, and the refusals."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError
from jtransfer.methods import peft_cost, transfer, vpt
from jtransfer.train import init_state, make_train_step
from model_helpers import random_variables
from vit_reference import randomize, state_dict, timm_vit

TINY = dict(dim=32, depth=2, heads=2)
SHAPE = (28, 28, 1)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _torch_prompted(tm, x, prompts, prefix, pool="token"):
  """timm's ViT forward with VPT inserted by hand (KMnP/vpt's PromptedTransformer): prompts
  after the prefix tokens at block 0, overwritten before every later block when deep, dropped
  at the end (the class token or the patch-token mean read after the final norm)."""
  import torch
  p = prompts.shape[1]
  h = tm._pos_embed(tm.patch_embed(x))
  batch = h.shape[0]
  for i, block in enumerate(tm.blocks):
    if i == 0 or prompts.shape[0] > 1:
      rest = h[:, prefix:] if i == 0 else h[:, prefix + p:]
      h = torch.cat([h[:, :prefix], prompts[i].expand(batch, -1, -1), rest], dim=1)
    h = block(h)
  h = tm.norm(h)
  feats = h[:, 0] if pool == "token" else h[:, prefix + p:].mean(dim=1)
  return feats


@pytest.fixture(scope="module")
def timm_case():
  vt = timm_vit()
  tm = randomize(vt.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=3,
                                      num_heads=2, num_classes=5))
  config = dict(dim=32, depth=3, heads=2, pos_grid=(2, 2))
  variables = weights.import_torchvision("vit_b16", state_dict(tm), config=config,
                                         keep_head=True, num_classes=5)
  return tm, models.get_model("vit_b16", 5, **config), variables


@pytest.mark.parametrize("deep", [False, True])
def test_prompted_logits_and_gradient_equal_timm_by_hand(timm_case, deep):
  import torch
  tm, model, variables = timm_case
  x = np.random.default_rng(1).normal(size=(2, 3, 32, 32)).astype(np.float32)
  prompts = vpt.init_prompts(model, (32, 32, 3), 3, deep, seed=0)["prompts"] * 20
  assert prompts.shape == ((3 if deep else 1), 3, 32)
  tp = torch.tensor(prompts, requires_grad=True)
  want_feats = _torch_prompted(tm, torch.from_numpy(x), tp, prefix=1)
  want = tm.head(want_feats)
  (want ** 2).sum().backward()

  params = dict(variables["params"], vpt={"prompts": jnp.asarray(prompts)})
  xh = jnp.asarray(x.transpose(0, 2, 3, 1))

  def loss(prompts_):
    logits, _, _ = vpt.apply_model_vpt(model, dict(params, vpt={"prompts": prompts_}), None, xh)
    return jnp.sum(logits ** 2), logits

  (_, logits), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(prompts))
  assert _rel(logits, want.detach().numpy()) <= 1e-5
  assert _rel(grad, tp.grad.numpy()) <= 1e-4
  # Without prompts the logits move: the prompts take part in every block's attention.
  plain, _, _ = jax.jit(models.apply_model, static_argnums=0)(model, variables["params"], None,
                                                               xh)
  assert not np.allclose(plain, logits, atol=1e-3)


def test_registers_and_mean_pool_equal_timm_by_hand():
  """DINOv2's layout (2 register tokens, no_embed_class, LayerScale) with pool='mean': the
  prompts go after the registers and stay out of the mean."""
  import torch
  vt = timm_vit()
  tm = randomize(vt.VisionTransformer(img_size=28, patch_size=14, embed_dim=32, depth=2,
                                      num_heads=2, num_classes=0, reg_tokens=2,
                                      no_embed_class=True, init_values=1e-5))
  config = dict(dim=32, depth=2, heads=2, pos_grid=(2, 2), num_registers=2,
                no_embed_class=True, layer_scale=1e-5, pool="mean")
  variables = weights.import_torchvision("dinov2_vits14", state_dict(tm), config=config,
                                         keep_head=False, num_classes=4)
  model = models.get_model("dinov2_vits14", 4, **config)
  params = dict(random_variables(model, (28, 28, 3))["params"], **variables["params"])
  x = np.random.default_rng(2).normal(size=(2, 3, 28, 28)).astype(np.float32)
  prompts = vpt.init_prompts(model, (28, 28, 3), 4, True, seed=1)["prompts"] * 20
  with torch.no_grad():
    want = _torch_prompted(tm, torch.from_numpy(x), torch.from_numpy(prompts), prefix=3,
                           pool="mean").numpy()
  _, _, taps = jax.jit(lambda p: vpt.apply_model_vpt(
      model, p, None, x.transpose(0, 2, 3, 1), taps=("features", "block0", "norm")))(
          dict(params, vpt={"prompts": prompts}))
  assert _rel(taps["features"], want) <= 1e-5
  assert taps["block0"].shape == (2, 3 + 4 + 4, 32)  # prefix, prompts, patches
  assert taps["norm"].shape == (2, 3 + 4, 32)  # prompts dropped before the final norm


@pytest.fixture(scope="module")
def source():
  model = models.get_model("vit_s28", 3, **TINY)
  return transfer.Source("vit_s28", models.model_config(model), random_variables(model, SHAPE),
                         SHAPE, (0.5,), (0.25,))


@pytest.mark.parametrize("name,layers", [("vpt_shallow", 1), ("vpt_deep", 2)])
def test_trains_only_prompts_and_head_and_counts(source, name, layers):
  setup = transfer.get_strategy(name).build(source, 3, 3, num_tokens=5)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (4, *SHAPE), dtype=np.uint8),
           "label": np.array([0, 1, 2, 0], np.int32)}
  params, stats = setup.init(0, batch["image"], batch["label"])
  assert params["vpt"]["prompts"].shape == (layers, 5, 32)
  before = surgery.flatten(jax.tree.map(np.array, params))
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state = init_state(params, stats, setup.optimizer, 0, 1e-2)
  state, metrics = step(state, batch)
  assert bool(metrics["finite"])
  after = surgery.flatten(state.params)
  for path, old in before.items():
    trains = re.fullmatch(r"vpt/prompts|head/.*", path) is not None
    assert np.array_equal(np.asarray(after[path]), old) != trains, path
  # Trained parameters: L * P * D prompts plus the head; extra FLOPs > 0 (more tokens).
  head = 32 * 3 + 3
  assert vpt.trained_count(setup.model, 5, layers > 1) == layers * 5 * 32
  cost = peft_cost.peft_cost(setup, params, stats, SHAPE)
  assert cost.trained_params == layers * 5 * 32 + head


def test_extra_flops_against_the_hand_formula(source):
  """XLA's count of the prompted forward minus the plain one, against the matrix-product
  formula; the rest is elementwise (LayerNorm, softmax, GELU on the P extra tokens), which the
  formula leaves out: measured 27% above it at this width (D 32) and 8.5% at D 128, a share that
  falls as D grows (the matrix products grow as D^2, the elementwise work as D)."""
  for name in ("vpt_shallow", "vpt_deep"):
    setup = transfer.get_strategy(name).build(source, 3, 3, num_tokens=8)
    params, stats = setup.init(0)
    cost = peft_cost.peft_cost(setup, params, stats, SHAPE)
    analytic = vpt.extra_flops(setup.model, SHAPE, 8)
    # 2 blocks, D 32, H 128, T 1 + 49, P 8: 2 * (2*8*(4*1024 + 2*32*128) + 4*32*(58^2 - 50^2))
    assert analytic == 2 * (2 * 8 * (4 * 1024 + 2 * 32 * 128) + 4 * 32 * (58 ** 2 - 50 ** 2))
    assert analytic <= cost.extra_flops <= 1.35 * analytic, (name, cost.extra_flops, analytic)


def test_zero_prompts_equal_the_plain_model_and_zero_valued_ones_do_not(source):
  model = models.get_model("vit_s28", 3, **TINY)
  params = source.variables["params"]
  x = np.random.default_rng(3).normal(size=(2, *SHAPE)).astype(np.float32)
  run = jax.jit(lambda p: vpt.apply_model_vpt(model, p, None, x, taps=("norm",)))
  plain, _, plain_taps = run(params)
  for layers in (1, 2):
    empty = dict(params, vpt={"prompts": np.zeros((layers, 0, 32), np.float32)})
    logits, _, taps = run(empty)
    np.testing.assert_array_equal(logits, plain)
    np.testing.assert_array_equal(taps["norm"], plain_taps["norm"])
  # P > 0 tokens of zeros still enter every softmax (their keys are the qkv bias): no identity.
  logits, _, _ = run(dict(params, vpt={"prompts": np.zeros((1, 2, 32), np.float32)}))
  assert not np.allclose(logits, plain, atol=1e-4)


def test_clip_tower_equals_open_clip_by_hand():
  """open_clip's image tower (ln_pre, QuickGELU, ln_post, projection) with deep prompts
  inserted by hand after ln_pre: features and the prompts' gradient."""
  import torch
  from vit_reference import open_clip_transformer
  oc = open_clip_transformer()
  tm = randomize(oc.VisionTransformer(image_size=32, patch_size=16, width=32, layers=2,
                                      heads=2, mlp_ratio=4.0, output_dim=8,
                                      act_layer=oc.QuickGELU))
  config = dict(TINY, pos_grid=(2, 2), proj_dim=8, act="quick_gelu")
  variables = weights.import_torchvision("clip_vit_b16", state_dict(tm), config=config,
                                         keep_head=False)
  model = models.get_model("clip_vit_b16", 4, **config)
  params = dict(random_variables(model, (32, 32, 3))["params"], **variables["params"])
  prompts = vpt.init_prompts(model, (32, 32, 3), 2, True, seed=0)["prompts"] * 20
  x = np.random.default_rng(4).normal(size=(2, 3, 32, 32)).astype(np.float32)
  tp = torch.tensor(prompts, requires_grad=True)
  h = tm._embeds(torch.from_numpy(x))  # class token, position embedding, ln_pre
  for i, block in enumerate(tm.transformer.resblocks):
    rest = h[:, 1:] if i == 0 else h[:, 1 + 2:]
    h = torch.cat([h[:, :1], tp[i].expand(2, -1, -1), rest], dim=1)
    h = block(h) if tm.transformer.batch_first else block(h.transpose(0, 1)).transpose(0, 1)
  want = tm.ln_post(h)[:, 0] @ tm.proj
  (want ** 2).sum().backward()

  def loss(p):
    _, _, taps = vpt.apply_model_vpt(model, dict(params, vpt={"prompts": p}), None,
                                     x.transpose(0, 2, 3, 1), taps=("features", "block1"))
    return jnp.sum(taps["features"] ** 2), taps

  (_, taps), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(prompts)
  assert taps["block1"].shape == (2, 1 + 2 + 4, 32)
  assert _rel(taps["features"], want.detach().numpy()) <= 1e-5
  assert _rel(grad, tp.grad.numpy()) <= 1e-4


def test_refusals(source):
  swin = models.get_model("swin_t", 3, dim=8, depths=(1,), heads=(2,), window=2)
  with pytest.raises(InputError, match="Swin"):
    vpt.init_prompts(swin, (8, 8, 3), 2, False, 0)
  with pytest.raises(InputError, match="not one"):
    vpt.init_prompts(models.get_model("resnet_s", 3), SHAPE, 2, False, 0)
  model = source.model
  with pytest.raises(InputError, match="num_tokens"):
    vpt.init_prompts(model, SHAPE, 0, False, 0)
  bad = dict(source.variables["params"], vpt={"prompts": np.zeros((3, 2, 32), np.float32)})
  with pytest.raises(InputError, match="fit no ViT"):
    vpt.apply_model_vpt(model, bad, None, np.zeros((1, *SHAPE), np.float32))
  with pytest.raises(InputError, match="no knob"):
    transfer.get_strategy("vpt_deep").build(source, 3, 3, rank=2)


@pytest.mark.slow
def test_fewshot_runs_vpt_on_vit_s28(tmp_path):
  """experiments.fewshot runs both strategies on a random vit_s28 source, records each."""
  from model_helpers import tiny_fewshot_run
  records = tiny_fewshot_run(tmp_path, "vit_s28", TINY, "vpt_shallow,vpt_deep",
                             "digits:0,1,2", classes=3)
  assert {r["strategy"] for r in records} == {"vpt_shallow", "vpt_deep"}
