"""ViT (timm, torchvision, DINOv2, open_clip CLIP layouts) and Swin-T (torchvision): weight
import and equivalence against the PyTorch libraries' own models with random weights, taps,
parameter counts of the full-size configs, a block's gradient against torch autograd, position
embedding resampling against timm, and the refusals.

Tolerance: max |jax - torch| / max |torch| <= 1e-5 in float32.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError
from jtransfer.models import attention, swin
from vit_reference import (hooks, open_clip_transformer, randomize, state_dict, timm_vit,
                           torchvision_module)

TOL = 1e-5
SMALL = dict(dim=64, depth=2, heads=4)


def _rel(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, (got.shape, want.shape)
  return float(np.abs(got - want).max() / np.abs(want).max())


def _run(arch, config, variables, x_nchw, taps, num_classes):
  model = models.get_model(arch, num_classes, **config)
  logits, _, got = jax.jit(lambda p, x: models.apply_model(model, p, None, x, taps=taps))(
      variables["params"], x_nchw.transpose(0, 2, 3, 1))
  return np.asarray(logits), {k: np.asarray(v) for k, v in got.items()}


def _input(size, batch=2, seed=1):
  h, w = (size, size) if isinstance(size, int) else size
  return np.random.default_rng(seed).normal(size=(batch, 3, h, w)).astype(np.float32)


def _check_vit(arch, config, tm, size, torch_taps, num_classes=10, want_key="logits"):
  """Imports `tm`'s state dict, compares logits (or `features`) and the tapped tokens."""
  import torch
  sd = state_dict(tm)
  variables = weights.import_torchvision(arch, sd, config=config,
                                         keep_head=want_key == "logits",
                                         num_classes=num_classes)
  assert surgery.count(variables["params"]) == sum(p.numel() for p in tm.parameters())
  if want_key != "logits":  # the image tower has no classifier: a random one, unchecked
    width = config.get("proj_dim") or config["dim"]
    variables["params"]["head"] = {"kernel": np.ones((width, num_classes), np.float32),
                                   "bias": np.zeros(num_classes, np.float32)}
  got_torch = hooks(tm, torch_taps)
  x = _input(size)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  names = list(torch_taps) + ["features", "cls", "mean"]
  logits, got = _run(arch, config, variables, x, names, num_classes)
  assert _rel(logits if want_key == "logits" else got["features"], want) <= TOL
  for name in torch_taps:
    ref = got_torch[name]
    if name == "patch_embed":  # torch's NCHW conv output
      ref = ref.transpose(0, 2, 3, 1)
    assert _rel(got[name], ref) <= TOL, name
  return got


def _timm_taps(depth):
  return {"patch_embed": "patch_embed.proj", "norm": "norm",
          **{f"block{i}": f"blocks.{i}" for i in range(depth)}}


# ----------------------------------------------------------------------------- timm ViT
def test_timm_vit_logits_and_taps():
  vt = timm_vit()
  tm = randomize(vt.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2,
                                      num_heads=4, num_classes=10))
  config = dict(SMALL, pos_grid=(2, 2))
  got = _check_vit("vit_b16", config, tm, 32, _timm_taps(2))
  np.testing.assert_array_equal(got["features"], got["cls"])
  np.testing.assert_allclose(got["mean"], got["norm"][:, 1:].mean(1), rtol=1e-6)


@pytest.mark.parametrize("registers", [pytest.param(0, marks=pytest.mark.slow), 4])
def test_timm_dinov2_layer_scale_and_registers(registers):
  vt = timm_vit()
  kw = dict(reg_tokens=registers, no_embed_class=True) if registers else {}
  tm = randomize(vt.VisionTransformer(img_size=28, patch_size=14, embed_dim=64, depth=2,
                                      num_heads=4, num_classes=10, init_values=1e-5, **kw))
  config = dict(SMALL, pos_grid=(2, 2), num_registers=registers, no_embed_class=bool(registers))
  got = _check_vit("dinov2_vits14", config, tm, 28, _timm_taps(2))
  # the mean excludes the class and register tokens
  np.testing.assert_allclose(got["mean"], got["norm"][:, 1 + registers:].mean(1), rtol=1e-6)


@pytest.mark.slow  # test_resample_pos_embed_equals_timm checks the resampling itself
def test_timm_vit_at_another_input_size_resamples_pos_embed():
  """A 2x2-grid checkpoint applied to 48 px (3x3) and 16 px (1x1) inputs equals timm's
  `dynamic_img_size`, which resamples with `resample_abs_pos_embed`."""
  import torch
  vt = timm_vit()
  tm = randomize(vt.VisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2,
                                      num_heads=4, num_classes=10, dynamic_img_size=True))
  config = dict(SMALL, pos_grid=(2, 2))
  variables = weights.import_torchvision("vit_b16", state_dict(tm), config=config)
  for size in ((48, 16),):  # a 3x1 grid: both sides resampled
    x = _input(size)
    with torch.no_grad():
      want = tm(torch.from_numpy(x)).numpy()
    logits, _ = _run("vit_b16", config, variables, x, [], 10)
    assert _rel(logits, want) <= TOL, size


@pytest.mark.parametrize("old,new,prefix", [((7, 7), (10, 12), 1), ((7, 7), (4, 4), 1),
                                            ((3, 5), (6, 2), 0)])
def test_resample_pos_embed_equals_timm(old, new, prefix):
  torch = pytest.importorskip("torch")
  timm_vit()
  from timm.layers import resample_abs_pos_embed
  pos = np.random.default_rng(0).normal(size=(1, prefix + old[0] * old[1], 8)).astype(
      np.float32)
  want = resample_abs_pos_embed(torch.from_numpy(pos), list(new), list(old),
                                num_prefix_tokens=prefix).numpy()
  got = attention.resample_pos_embed(jnp.asarray(pos), old, new, prefix)
  assert got.shape == (1, prefix + new[0] * new[1], 8)
  assert _rel(got, want) <= TOL


# ----------------------------------------------------------------------------- torchvision
def test_torchvision_vit_logits_and_taps():
  tv = torchvision_module("vision_transformer")
  import torch
  torch.manual_seed(0)
  tm = randomize(tv.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4,
                                      hidden_dim=64, mlp_dim=256, num_classes=10))
  taps = {"patch_embed": "conv_proj", "norm": "encoder.ln",
          **{f"block{i}": f"encoder.layers.encoder_layer_{i}" for i in range(2)}}
  _check_vit("vit_b_16", dict(SMALL, pos_grid=(2, 2)), tm, 32, taps)


# ----------------------------------------------------------------------------- open_clip
@pytest.mark.parametrize("quick_gelu", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_open_clip_image_tower(quick_gelu):
  oc = open_clip_transformer()
  import torch
  act = oc.QuickGELU if quick_gelu else torch.nn.GELU
  tm = randomize(oc.VisionTransformer(image_size=32, patch_size=16, width=64, layers=2,
                                      heads=4, mlp_ratio=4.0, output_dim=32, act_layer=act))
  config = dict(SMALL, pos_grid=(2, 2), proj_dim=32, act="quick_gelu" if quick_gelu else "gelu")
  taps = {"patch_embed": "conv1", "norm": "ln_post",
          **{f"block{i}": f"transformer.resblocks.{i}" for i in range(2)}}
  _check_vit("clip_vit_b16", config, tm, 32, taps, num_classes=5, want_key="features")
  # a whole CLIP checkpoint: the image tower under `visual.`, other keys dropped
  sd = {f"visual.{k}": v for k, v in state_dict(tm).items()}
  sd["text_projection"] = np.zeros((3, 3), np.float32)
  v = weights.import_torchvision("clip_vit_b16", sd, config=config, keep_head=False)
  assert "head" not in v["params"] and v["params"]["proj"]["kernel"].shape == (64, 32)
  with pytest.raises(InputError, match="drop-head"):
    weights.import_torchvision("clip_vit_b16", sd, config=config)


# ----------------------------------------------------------------------------- Swin
SWIN_SMALL = dict(patch_size=2, dim=16, depths=(2, 2), heads=(2, 4), window=2)


def _swin_torch(**kw):
  sw = torchvision_module("swin_transformer")
  config = dict(SWIN_SMALL, **kw)
  return randomize(sw.SwinTransformer(
      patch_size=[config["patch_size"]] * 2, embed_dim=config["dim"],
      depths=list(config["depths"]), num_heads=list(config["heads"]),
      window_size=[config["window"]] * 2, stochastic_depth_prob=0.0, num_classes=10)), config


@pytest.mark.parametrize("size", [(8, 16), pytest.param(8, marks=pytest.mark.slow)])
def test_torchvision_swin_logits_and_taps(size):
  """Two stages at 8x16 px: shifted windows with the mask in stage 1 (4x8), and in stage 2
  (2x4) along the width only: the window covers the height, so torchvision does not shift it
  (8x8: stage 2 is one unshifted window)."""
  import torch
  tm, config = _swin_torch()
  variables = weights.import_torchvision("swin_t", state_dict(tm), config=config)
  assert surgery.count(variables["params"]) == sum(p.numel() for p in tm.parameters())
  blocks = {f"stage{s}/block{b}": f"features.{2 * s - 1}.{b}" for s in (1, 2)
            for b in range(2)}
  got_torch = hooks(tm, {"patch_embed": "features.0.0", "norm": "norm", **blocks})
  x = _input(size)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  logits, got = _run("swin_t", config, variables, x, ["patch_embed", "norm", "features",
                                                      *blocks], 10)
  assert _rel(logits, want) <= TOL
  got_torch["patch_embed"] = got_torch["patch_embed"].transpose(0, 2, 3, 1)
  for name, ref in got_torch.items():
    assert _rel(got[name], ref) <= TOL, name
  np.testing.assert_allclose(got["features"], got["norm"].mean((1, 2)), rtol=1e-6)


def test_swin_mask_and_index_against_hand_cases():
  # 2x2 windows: index (dy + 1) * 3 + (dx + 1) for token pairs in row-major order
  np.testing.assert_array_equal(swin.relative_position_index(2),
                                [[4, 3, 1, 0], [5, 4, 2, 1], [7, 6, 4, 3], [8, 7, 5, 4]])
  # a 4x4 map rolled by 1: the last window holds tokens of 4 regions, the first one of 1
  mask = swin.shift_mask(4, 4, 2, (1, 1))
  assert mask.shape == (4, 4, 4) and not mask[0].any()
  np.testing.assert_array_equal(mask[3] == 0, np.eye(4, dtype=bool))
  np.testing.assert_array_equal(mask[1] == 0, [[1, 0, 1, 0], [0, 1, 0, 1], [1, 0, 1, 0],
                                               [0, 1, 0, 1]])


def test_swin_refuses_inputs_off_the_window_grid():
  model = models.get_model("swin_t", 3, **SWIN_SMALL)
  with pytest.raises(InputError, match="not a multiple of 8"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 12, 16, 3))))
  vit = models.get_model("vit_s28", 3)
  with pytest.raises(InputError, match="patch size 4"):
    jax.eval_shape(lambda: vit.init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 28, 1))))


# ----------------------------------------------------------------------------- full size
def _full_size_reference(arch):
  """The library's full-size model on the meta device (shapes only: no memory, no forward)."""
  import torch
  with torch.device("meta"):
    if arch == "vit_b_16":
      return torchvision_module("vision_transformer").vit_b_16()
    if arch == "swin_t":
      return torchvision_module("swin_transformer").swin_t()
    if arch == "clip_vit_b16":
      oc = open_clip_transformer()
      return oc.VisionTransformer(224, 16, 768, 12, 12, 4.0, output_dim=512,
                                  act_layer=oc.QuickGELU)
    import timm
    name = {"vit_ti16": "vit_tiny_patch16_224", "vit_s16": "vit_small_patch16_224",
            "vit_b16": "vit_base_patch16_224", "dinov2_vits14": "vit_small_patch14_dinov2",
            "dinov2_vitb14": "vit_base_patch14_dinov2"}[arch]
    timm_vit()
    return timm.create_model(name, pretrained=False, num_classes=1000)


# the same graphs at other widths are slow-marked: tracing a full-size model takes seconds
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow)
                                  for a in ("vit_ti16", "vit_s16", "dinov2_vitb14")] +
                         ["vit_b16", "vit_b_16", "dinov2_vits14", "clip_vit_b16", "swin_t"])
def test_full_size_parameter_counts_and_key_shapes(arch):
  """Equal parameter counts, and every state-dict key mapped to a leaf of the torch shape."""
  tm = _full_size_reference(arch)
  torch_shapes = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
  torch_count = sum(p.numel() for p in tm.parameters())
  model = models.get_model(arch, 1000)
  abstract = surgery.flatten(models.abstract_variables(model, (224, 224, 3))["params"])
  entries = [e for e in weights.name_map(arch, model) if e.kind != "derived"]
  if arch == "clip_vit_b16":  # the image tower has no head
    entries = [e for e in entries if e.path[0] != "head"]
    abstract = {k: v for k, v in abstract.items() if not k.startswith("head/")}
  assert sum(int(np.prod(v.shape)) for v in abstract.values()) == torch_count
  assert {e.key for e in entries} == {k for k in torch_shapes
                                      if not k.endswith("relative_position_index")}
  for e in entries:
    want = weights.torchvision.torch_shape(e, abstract[e.path_str].shape)
    assert torch_shapes[e.key] == want, e.key


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_b16", "swin_t"])
def test_full_model_forward_224(arch):
  """The full-size models at 224 px with random weights equal timm's / torchvision's."""
  import torch
  if arch == "swin_t":
    tm = randomize(torchvision_module("swin_transformer").swin_t())
  else:
    timm_vit()
    import timm
    tm = randomize(timm.create_model("vit_base_patch16_224", pretrained=False))
  variables = weights.import_torchvision(arch, state_dict(tm))
  x = _input(224, batch=1)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  logits, _ = _run(arch, {}, variables, x, [], 1000)
  assert _rel(logits, want) <= TOL
