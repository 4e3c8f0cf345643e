"""Transformers under the transfer machinery: gradients against torch autograd, the
strategies that run on them (freeze, finetune, l2sp, bitfit through experiments.fewshot) and
CWL on their linear maps, and the one that refuses them (conv-unit channel pruning; FiLM on
transformers is tests/test_vit_film.py, DELTA tests/test_delta_tokens.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from model_helpers import random_variables, tiny_fewshot_run
from vit_reference import randomize, state_dict, timm_vit

TINY = dict(dim=32, depth=1, heads=2)


def _torch_reference(arch):
  if arch == "swin_t":
    from vit_reference import torchvision_module
    sw = torchvision_module("swin_transformer")
    tm = sw.SwinTransformer(patch_size=[2, 2], embed_dim=16, depths=[2], num_heads=[2],
                            window_size=[2, 2], stochastic_depth_prob=0.0, num_classes=5)
    return randomize(tm, seed=3), dict(patch_size=2, dim=16, depths=(2,), heads=(2,),
                                       window=2), (8, 8)
  vt = timm_vit()
  tm = vt.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=4,
                            num_classes=5, init_values=1e-5)
  return randomize(tm, seed=3), dict(dim=32, depth=1, heads=4, pos_grid=(2, 2),
                                     patch_size=16), (32, 32)


@pytest.mark.parametrize("arch", ["dinov2_vits14", pytest.param("swin_t",
                                                                  marks=pytest.mark.slow)])
def test_gradients_equal_torch_autograd(arch):
  """d(sum(logits * g)) / d(every param, the input) of a one-block ViT with LayerScale (a
  shifted and an unshifted Swin block: roll, mask, relative bias) with random weights equals
  torch autograd's, mapped through the import's layouts."""
  import torch
  tm, config, size = _torch_reference(arch)
  variables = weights.import_torchvision(arch, state_dict(tm), config=config)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, *size)).astype(np.float32)
  g = rng.normal(size=(2, 5)).astype(np.float32)
  xt = torch.from_numpy(x).requires_grad_(True)
  (tm(xt) * torch.from_numpy(g)).sum().backward()
  model = models.get_model(arch, 5, **config)

  def loss(params, x):
    return jnp.sum(models.apply_model(model, params, None, x)[0] * g)

  dp, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-4, atol=1e-6)
  flat = surgery.flatten(dp)
  torch_params = dict(tm.named_parameters())
  for e in weights.name_map(arch, model):
    if e.kind == "derived":
      continue
    want = weights.torchvision.to_jtransfer(e, torch_params[e.key].grad.numpy())
    got = np.asarray(flat[e.path_str])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-7, e.key


def test_mixed_precision_shapes():
  """bfloat16 compute: the transformers trace, params stay float32, logits come back float32."""
  for arch, config, shape in [("vit_s28", TINY, (28, 28, 1)),
                              ("swin_t", dict(patch_size=2, dim=8, depths=(1,), heads=(2,),
                                              window=2), (8, 8, 3))]:
    model = models.get_model(arch, 3, dtype="bfloat16", **config)
    v = models.abstract_variables(model, shape)
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(v["params"]))
    out = jax.eval_shape(lambda p: models.apply_model(model, p, None,
                                                      jnp.zeros((2, *shape)))[0], v["params"])
    assert out.shape == (2, 3) and out.dtype == jnp.float32


def test_refusals_name_the_arch():
  from jtransfer.methods import prune
  model = models.get_model("vit_s28", 3, **TINY)
  shape = (28, 28, 1)
  source = transfer.Source("vit_s28", models.model_config(model),
                           random_variables(model, shape), shape, (0.5,), (0.25,))
  with pytest.raises(InputError, match="pruning works on conv units"):
    prune.channel_groups(source.variables["params"], source.config)


def test_bitfit_trains_biases_and_layernorm_shifts_only():
  from jtransfer.methods import bitfit
  model = models.get_model("vit_s28", 3, **TINY)
  shape = (28, 28, 1)
  source = transfer.Source("vit_s28", models.model_config(model),
                           random_variables(model, shape), shape, (0.5,), (0.25,))
  setup = bitfit.build_bitfit(source, 3, 10)
  trainable = surgery.flatten(setup.optimizer.trainable)
  trained = sorted(p for p, t in trainable.items() if t)
  assert {"block0/norm1/bias", "block0/attn/qkv/bias", "block0/mlp/fc2/bias", "norm/bias",
          "patch_embed/bias", "head/kernel"} <= set(trained)
  assert not any(p.endswith(("kernel", "scale", "pos_embed", "cls_token"))
                 for p in trained if not p.startswith("head/"))


@pytest.mark.parametrize("strategies", [
    "freeze,finetune", pytest.param("l2sp,bitfit", marks=pytest.mark.slow)])
def test_fewshot_on_vit_s28(strategies, tmp_path):
  """experiments.fewshot on a random vit_s28 source: freeze (CLS linear probe), finetune,
  l2sp and bitfit (slow: each strategy compiles its own step), one shot, two steps, each at
  its default LR and knobs (no tuning)."""
  records = tiny_fewshot_run(tmp_path, "vit_s28", TINY, strategies, "digits:0,1,2", classes=3,
                             mean=(0.5,), std=(0.25,),
                             extra_args=("--tune-repeats", "0", "--no-paper-grid"))
  assert {r["arm"] for r in records} == set(strategies.split(","))


@pytest.mark.slow  # the import maps are tested above; this adds the CLI, files and prefixes
def test_convert_weights_cli_timm_safetensors_and_clip_pth(tmp_path):
  """experiments.convert_weights on a timm ViT saved as .safetensors and on a whole-CLIP-style
  .pth (image tower under `visual.`), then the saved sources reproduce the torch outputs."""
  import json

  import torch
  from safetensors.numpy import save_file

  from experiments import convert_weights
  from vit_reference import open_clip_transformer
  vt = timm_vit()
  tm = randomize(vt.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1,
                                      num_heads=2, num_classes=4))
  save_file(state_dict(tm), str(tmp_path / "vit.safetensors"))
  oc = open_clip_transformer()
  cm = randomize(oc.VisionTransformer(image_size=32, patch_size=16, width=32, layers=1, heads=2,
                                      mlp_ratio=4.0, output_dim=8, act_layer=oc.QuickGELU))
  torch.save({f"visual.{k}": v for k, v in cm.state_dict().items()}, tmp_path / "clip.pth")
  x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  cases = [("vit_b16", "vit.safetensors", dict(TINY, heads=2, pos_grid=(2, 2)), tm, []),
           ("clip_vit_b16", "clip.pth", dict(TINY, heads=2, pos_grid=(2, 2), proj_dim=8,
                                             act="quick_gelu"), cm, ["--drop-head"])]
  for arch, name, config, ref, extra in cases:
    out = tmp_path / arch
    assert convert_weights.main(["--arch", arch, "--weights", str(tmp_path / name), "--out",
                                 str(out), "--input-shape", "32,32,3", "--config",
                                 json.dumps(config), *extra]) == 0
    source = transfer.load_source(str(out))
    _, _, taps = models.apply_model(source.model, source.variables["params"], None,
                                    x.transpose(0, 2, 3, 1), taps=["features", "cls"])
    with torch.no_grad():
      want = ref(torch.from_numpy(x)).numpy()
    got = taps["features"] if arch == "clip_vit_b16" else models.apply_model(
        source.model, source.variables["params"], None, x.transpose(0, 2, 3, 1))[0]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_pool_mean_feeds_the_head_the_mean_patch_token():
  """pool='mean' (the linear probe's other choice): `features` is the mean of the normed
  patch tokens, and the head reads it."""
  model = models.get_model("vit_s28", 3, pool="mean", **TINY)
  v = random_variables(model, (28, 28, 1))
  x = np.random.default_rng(0).normal(size=(2, 28, 28, 1)).astype(np.float32)
  logits, _, taps = jax.jit(lambda p, x: models.apply_model(
      model, p, None, x, taps=["features", "mean", "norm"]))(v["params"], x)
  np.testing.assert_allclose(taps["features"], np.asarray(taps["norm"])[:, 1:].mean(1),
                             rtol=1e-5, atol=1e-6)
  head = v["params"]["head"]
  np.testing.assert_allclose(logits, np.asarray(taps["mean"]) @ head["kernel"] + head["bias"],
                             rtol=1e-5, atol=1e-5)


def test_cwl_on_linear_maps_equals_scaled_layer_outputs():
  """Folding sigma into qkv / proj / fc1 / fc2 kernels and biases equals multiplying those
  layers' outputs by sigma (a Flax interceptor on the Dense calls), and freeze_cwl's setup
  trains the scales, not the kernels."""
  import flax.linen as nn

  from jtransfer.methods import cwl, cwl_linear
  model = models.get_model("vit_s28", 3, **TINY)
  shape = (28, 28, 1)
  v = random_variables(model, shape)
  scales = {u: np.random.default_rng(1).uniform(0.2, 1.8, s.shape).astype(np.float32)
            for u, s in cwl_linear.init_scales(v["params"]).items()}
  assert sorted(scales) == ["block0/attn/proj", "block0/attn/qkv", "block0/mlp/fc1",
                            "block0/mlp/fc2"]
  x = np.random.default_rng(2).normal(size=(2, *shape)).astype(np.float32)

  def scale_outputs(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    unit = "/".join(context.module.path)
    if isinstance(context.module, nn.Dense) and unit in scales:
      out = out * scales[unit]
    return out

  def intercepted(p, x):
    with nn.intercept_methods(scale_outputs):
      return models.apply_model(model, p, None, x)[0]

  apply = jax.jit(lambda p, x: models.apply_model(model, p, None, x)[0])
  want = jax.jit(intercepted)(v["params"], x)
  got = apply(cwl_linear.apply_scales(v["params"], scales), x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want) - np.asarray(apply(v["params"], x))).max() > 1e-3

  source = transfer.Source("vit_s28", models.model_config(model), v, shape, (0.5,), (0.25,))
  setup = cwl.cwl_setup(source, 3, "freeze")
  params, stats = setup.init(0, None, None)
  assert set(params[cwl.CWL_KEY]) == set(scales)
  batch = {"image": np.zeros((4, *shape), np.uint8), "label": np.array([0, 1, 2, 0])}
  # the strategy's loss reads the scales (traced, not compiled: the values are checked above)
  grads = jax.eval_shape(jax.grad(lambda p: setup.loss_fn(p, stats, batch, None)[0]), params)
  assert grads[cwl.CWL_KEY]["block0/mlp/fc1"].shape == scales["block0/mlp/fc1"].shape
  trainable = surgery.flatten(setup.optimizer.trainable)
  assert trainable["cwl/block0/attn/qkv"] and not trainable["block0/attn/qkv/kernel"]
