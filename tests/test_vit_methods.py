"""Transformers under the transfer machinery: gradients against torch autograd, the
strategies that run on them (freeze, finetune, l2sp, bitfit through experiments.fewshot) and
the ones that refuse them (CWL, FiLM, DELTA's taps, channel pruning)."""
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


def test_gradients_equal_torch_autograd():
  """d(sum(logits * g)) / d(every param, the input) of a one-block timm ViT with LayerScale
  (random weights) equals torch autograd's, mapped through the import's layouts."""
  import torch
  vt = timm_vit()
  tm = randomize(vt.VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=1,
                                      num_heads=4, num_classes=5, init_values=1e-5), seed=3)
  config = dict(dim=32, depth=1, heads=4, pos_grid=(2, 2), patch_size=16)
  variables = weights.import_torchvision("dinov2_vits14", state_dict(tm), config=config)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)
  g = rng.normal(size=(2, 5)).astype(np.float32)
  xt = torch.from_numpy(x).requires_grad_(True)
  (tm(xt) * torch.from_numpy(g)).sum().backward()
  model = models.get_model("dinov2_vits14", 5, **config)

  def loss(params, x):
    return jnp.sum(models.apply_model(model, params, None, x)[0] * g)

  dp, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(dx), xt.grad.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-4, atol=1e-6)
  flat = surgery.flatten(dp)
  torch_params = dict(tm.named_parameters())
  for e in weights.name_map("dinov2_vits14", model):
    want = weights.torchvision.to_jtransfer(e, torch_params[e.key].grad.numpy())
    got = np.asarray(flat[e.path_str])
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-7, e.key


def test_refusals_name_the_arch():
  from jtransfer.methods import cwl, delta, prune
  model = models.get_model("vit_s28", 3, **TINY)
  shape = (28, 28, 1)
  source = transfer.Source("vit_s28", models.model_config(model),
                           random_variables(model, shape), shape, (0.5,), (0.25,))
  with pytest.raises(InputError, match="CWL works on conv units and arch 'vit_s28'"):
    cwl.cwl_setup(source, 3, "freeze")
  with pytest.raises(InputError, match="DELTA.*'vit_s28' is a transformer"):
    delta.build_setup(source, 3, 10, "att")
  with pytest.raises(InputError, match="pruning works on conv units"):
    prune.channel_groups(source.variables["params"], source.config)
  with pytest.raises(InputError, match="FiLM"):
    transfer.get_strategy("freeze_film").build(source, 3, 10)


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


def test_fewshot_on_vit_s28(tmp_path):
  """experiments.fewshot on a random vit_s28 source: freeze (CLS linear probe), finetune,
  l2sp and bitfit, one shot, two steps, each at its default LR and knobs (no tuning)."""
  records = tiny_fewshot_run(tmp_path, "vit_s28", TINY, "freeze,finetune,l2sp,bitfit",
                             "digits:0,1,2", classes=3, mean=(0.5,), std=(0.25,),
                             extra_args=("--tune-repeats", "0", "--no-paper-grid"))
  assert {r["strategy"] for r in records} == {"freeze", "finetune", "l2sp", "bitfit"}


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
