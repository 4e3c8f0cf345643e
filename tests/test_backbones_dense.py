"""ResNeXt-50 32x4d, Wide ResNet-50-2, DenseNet-121, ConvNeXt-Tiny: torchvision equivalence,
parameter counts, CWL, pruning, DELTA taps, truncation and a tiny few-shot run per family.

Equivalence: a torchvision model with random weights, random BN running statistics (and
random norm affines / layer scales, so every path is exercised), its state dict imported with
`weights.import_torchvision`; logits and DELTA taps compared with the torch model in eval mode.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError
from jtransfer.methods import cwl, delta, prune, selection
from tv_import import torchvision_models
from model_helpers import random_variables, tiny_fewshot_run

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  """One intra-op thread here: on 2 shared cores torch's pool spins (40 ms per tiny conv)."""
  before = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(before)


ARCHS = ("resnext50_32x4d", "wide_resnet50_2", "densenet121", "convnext_tiny")
PARAMS = {"resnext50_32x4d": 25_028_904, "wide_resnet50_2": 68_883_240,
          "densenet121": 7_978_856, "convnext_tiny": 28_589_128}

# Width-reduced configs of each family for the method tests (a few thousand params).
TINY = {
    "resnext50_32x4d": dict(stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8,
                            groups=4, width_per_group=32),
    "wide_resnet50_2": dict(stage_sizes=(1, 2), stage_widths=(4, 8), stem_width=8),
    "densenet121": dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2),
    "convnext_tiny": dict(stage_sizes=(1, 2), stage_widths=(8, 16)),
}


# ----------------------------------------------------------------------------- torchvision
def _torch_model(arch, seed=0):
  """torchvision's model, random weights, random BN stats / norm affines / layer scales."""
  tvm = torchvision_models()
  torch.manual_seed(seed)
  net = getattr(tvm, arch)(weights=None).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, m in net.named_modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
      if hasattr(m, "layer_scale"):
        m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) * 0.5 + 0.25)
  return net


def _torch_taps(arch, net, names):
  """{jtransfer tap: torch module} for DELTA taps (raw conv / Linear outputs)."""
  out = {}
  for name in names:
    if arch.startswith(("resnext", "wide")):
      s, b, conv = name.split("/")
      out[name] = getattr(net, f"layer{s[5:]}")[int(b[5:])].conv3
    elif arch == "densenet121":
      if name.startswith("transition"):
        out[name] = getattr(net.features, name.split("/")[0]).conv
      else:
        block, layer, _ = name.split("/")
        out[name] = getattr(getattr(net.features, block), f"denselayer{layer[5:]}").conv2
    else:
      s, b, _ = name.split("/")
      out[name] = net.features[2 * int(s[5:]) - 1][int(b[5:])].block[5]
  return out


# One jitted call, compiled without XLA's expensive CPU passes: several times faster to build
# than DenseNet's ~600 eager ops (each its own compile) or a fully optimised compile.
_FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


_COMPILED = {}


def _fast_jit(fn, *args, key=None):
  """`jax.jit(fn)(*args)` compiled with `_FAST`; with a `key`, the executable is reused."""
  if key is None or key not in _COMPILED:
    compiled = jax.jit(fn).lower(*args).compile(_FAST)
    if key is None:
      return compiled(*args)
    _COMPILED[key] = compiled
  return _COMPILED[key](*args)


def _compare(arch, size, seed=0):
  net = _torch_model(arch, seed)
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  variables = weights.import_torchvision(arch, sd)
  # Parameter count (1000 classes): torchvision's, the literal, and the imported tree's.
  assert sum(p.numel() for p in net.parameters()) == PARAMS[arch]
  assert surgery.count(variables["params"]) == PARAMS[arch]
  model = models.get_model(arch, 1000)
  taps = delta.default_taps(arch, models.model_config(model))
  hooks, got_torch = [], {}
  for name, module in _torch_taps(arch, net, taps).items():
    hooks.append(module.register_forward_hook(
        lambda m, i, o, name=name: got_torch.__setitem__(name, o.detach().numpy())))
  x = np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x)).numpy()
  for h in hooks:
    h.remove()
  logits, got = _fast_jit(lambda p, s, x: models.apply_model(model, p, s, x, taps=taps)[::2],
                          variables["params"], variables.get("batch_stats"),
                          jnp.asarray(x.transpose(0, 2, 3, 1)))
  errors = {"logits": np.abs(np.asarray(logits) - want).max() / np.abs(want).max()}
  assert errors["logits"] < 1e-4
  for name in taps:
    # ConvNeXt's pwconv2 is a Linear on the channels-last permuted map: already NHWC.
    t = got_torch[name] if arch == "convnext_tiny" else got_torch[name].transpose(0, 2, 3, 1)
    errors[name] = np.abs(np.asarray(got[name]) - t).max() / np.abs(t).max()
    assert errors[name] < 1e-4, (name, errors[name])
  return errors


@pytest.mark.parametrize("arch", ARCHS)
def test_param_count_logits_and_taps_equal_torchvision_small(arch):
  _compare(arch, 32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_taps_equal_torchvision_224(arch):
  _compare(arch, 224)


# ----------------------------------------------------------------------------- tiny configs
SHAPE = (32, 32, 3)


def _variables(model, seed=0, shape=SHAPE):
  return random_variables(model, shape, seed)


def _tiny(arch, num_classes=5, **extra):
  model = models.get_model(arch, num_classes, **{**TINY[arch], **extra})
  v = _variables(model)
  x = np.random.default_rng(7).normal(size=(2, *SHAPE)).astype(np.float32)
  return model, v["params"], v.get("batch_stats", {}), x


def _forward(model, params, stats, x, taps=None, interceptor=None):
  def run(p, s, x):
    if interceptor is None:
      return models.apply_model(model, p, s, x, taps=taps)[::2]
    with nn.intercept_methods(interceptor):
      return models.apply_model(model, p, s, x, taps=taps)[::2]
  key = None if interceptor is not None else (model, tuple(taps or ()), x.shape)
  return _fast_jit(run, params, stats, x, key=key)


def _explicit_cwl(scales, flat):
  """The CWL as a layer: multiplies the unit's norm output (bn / LayerNorm `norm`) when it has
  one, else its conv output, by sigma; an independent reference for the folding."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = context.module.path
    if context.method_name != "__call__" or not path:
      return out
    unit, child = "/".join(path[:-1]), path[-1]
    if unit not in scales:
      return out
    has_norm = f"{unit}/bn/scale" in flat or f"{unit}/norm/scale" in flat
    if (child in ("bn", "norm")) == has_norm and child in ("bn", "norm", "conv"):
      return out * jnp.asarray(scales[unit], out.dtype)
    return out
  return interceptor


# Wide ResNet-50-2's blocks are ResNet-50's (only the inner width differs, which the
# equivalence and pruning tests cover): the per-block-type method tests run the other three.
BLOCK_TYPES = ("resnext50_32x4d", "densenet121", "convnext_tiny")


@pytest.mark.parametrize("arch", BLOCK_TYPES)
def test_cwl_layers_equal_reparametrisation(arch):
  model, params, stats, x = _tiny(arch)
  rng = np.random.default_rng(3)
  scales = {u: rng.uniform(0.2, 2.0, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(params).items()}
  kinds = {u.rsplit("/", 1)[-1] for u in scales}
  want_kinds = {"densenet121": {"stem", "conv1", "conv2", "conv"},
                "convnext_tiny": {"stem", "dwconv", "pwconv1", "pwconv2", "downsample"}}
  assert want_kinds.get(arch, {"stem", "conv1", "conv2", "conv3", "downsample"}) <= kinds
  taps = ["last_conv", *delta.default_taps(arch, models.model_config(model))]
  want, want_taps = _forward(model, params, stats, x, taps,
                             _explicit_cwl(scales, surgery.flatten(params)))
  folded, folded_taps = _forward(model, cwl.apply_cwl(params, scales), stats, x, taps)
  layers, _ = _fast_jit(lambda p, s, x: cwl.apply_model_cwl(model, p, s, x, taps=taps)[::2],
                        cwl.with_scales(params, scales), stats, x)
  tol = 1e-5 * float(np.abs(want).max())
  np.testing.assert_allclose(folded, want, atol=tol, rtol=1e-5)
  np.testing.assert_allclose(layers, want, atol=tol, rtol=1e-5)
  np.testing.assert_allclose(folded_taps["last_conv"], want_taps["last_conv"], rtol=1e-4,
                             atol=1e-5 * float(np.abs(want_taps["last_conv"]).max()))
  # the folded model must differ from the base one (the scales do something)
  base, _ = _forward(model, params, stats, x)
  assert np.abs(np.asarray(base) - np.asarray(want)).max() > 10 * tol


# ----------------------------------------------------------------------------- pruning
def _pruned_equals_masked(arch, model, params, stats, x, scales, tau):
  config = models.model_config(model)
  res = prune.prune_by_sigma(params, stats, config, scales, tau)
  masked = {u: s * res.masks[u] for u, s in scales.items()}
  want, _ = _forward(model, cwl.apply_cwl(params, masked), stats, x)
  small = models.from_config(arch, res.config)
  got, _ = _forward(small, res.params, res.batch_stats, x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * float(np.abs(want).max()))
  assert res.params_kept < res.params_total
  return res


def _scales(params, seed=1):
  rng = np.random.default_rng(seed)
  return {u: rng.uniform(0.0, 1.5, s.shape).astype(np.float32)
          for u, s in cwl.init_scales(params).items()}


@pytest.mark.parametrize("cut", [None, "transition1", "denseblock2"])
def test_densenet_pruned_equals_masked(cut):
  """Every coupling kind: stem / growth / transition channels read at offsets by later
  pre-norms, the 1x1 bottleneck, norm5 + head (or a truncated GAP head)."""
  model, params, stats, x = _tiny("densenet121", truncate_after=cut)
  res = _pruned_equals_masked("densenet121", model, params, stats, x, _scales(params), 0.6)
  assert res.kept["stem"][0] < 8 and res.kept["denseblock1/layer1/conv2"][0] < 4
  # A mask on one unit only: the other widths come from the config's defaults.
  config = models.model_config(model)
  new_params, _, new_config = prune.prune_channels(
      params, stats, config, {"denseblock1/layer2/conv2": np.arange(4) != 1})
  assert new_config["layer_widths"][0][1] == [8, 3]
  shapes = models.abstract_variables(models.from_config("densenet121", new_config), SHAPE)
  surgery.merge_params(shapes["params"], new_params)  # raises unless every shape fits
  if cut is None:
    assert new_config["transition_widths"] == [8]  # (8 + 2 * 4) // 2, unpruned
    assert res.kept["transition1/conv"][0] < res.kept["transition1/conv"][1]
    assert np.asarray(res.params["denseblock2/layer2"]["norm1"]["scale"]).shape[0] == (
        res.config["transition_widths"][0] + res.config["layer_widths"][1][0][1])


def test_convnext_prunes_hidden_widths_only():
  model, params, stats, x = _tiny("convnext_tiny")
  res = _pruned_equals_masked("convnext_tiny", model, params, stats, x, _scales(params), 0.6)
  for unit, (kept, total) in res.kept.items():
    assert (kept < total) == unit.endswith("pwconv1"), unit
  assert res.config["stage_widths"] == [8, 16]
  assert res.config["hidden_widths"][1][1] == res.kept["stage2/block1/pwconv1"][0]


def test_resnext_pruning_keeps_equal_counts_per_group():
  model, params, stats, x = _tiny("resnext50_32x4d")
  res = _pruned_equals_masked("resnext50_32x4d", model, params, stats, x, _scales(params), 0.6)
  for unit in ("stage1/block0/conv1", "stage1/block0/conv2", "stage2/block0/conv2"):
    counts = res.masks[unit].reshape(4, -1).sum(axis=1)
    assert (counts == counts[0]).all() and counts[0] < res.masks[unit].size // 4, unit
  keep = {"stage1/block0/conv1": np.arange(16) != 0}  # one group loses a channel, the others not
  with pytest.raises(InputError, match="same number of channels kept in each of its 4 groups"):
    prune.prune_channels(params, stats, models.model_config(model), keep)


def test_wide_resnet_pruned_equals_masked():
  model, params, stats, x = _tiny("wide_resnet50_2")
  assert surgery.flatten(params)["stage1/block0/conv2/conv/kernel"].shape == (3, 3, 8, 8)
  _pruned_equals_masked("wide_resnet50_2", model, params, stats, x, _scales(params), 0.6)
  # Units left whole keep the model's doubled inner width in the new config.
  keep = {"stage1/block0/conv1": np.arange(8) % 2 == 0}
  new_params, _, config = prune.prune_channels(params, stats, models.model_config(model), keep)
  assert config["inner_widths"] == [[[4, 8]], [[16, 16], [16, 16]]]
  shapes = models.abstract_variables(models.from_config("wide_resnet50_2", config), SHAPE)
  surgery.merge_params(shapes["params"], new_params)  # raises unless every shape fits


# ----------------------------------------------------------------------------- DELTA, truncation
@pytest.mark.parametrize("arch", BLOCK_TYPES)
def test_delta_default_taps_resolve_and_attention_computes(arch):
  from jtransfer.methods import transfer
  model, params, stats, _ = _tiny(arch, num_classes=2)
  config = models.model_config(model)
  source = transfer.Source(arch, config, {"params": params, "batch_stats": stats}, SHAPE,
                           (0.5,) * 3, (0.25,) * 3)
  taps = delta.resolve_taps(source, model, delta.Config())
  assert taps == delta.default_taps(arch, config) and len(taps) == 2
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, *SHAPE), dtype=np.uint8)
  batches = delta._attention_batches(images, np.array([0, 1, 0, 1]), source.mean, source.std,
                                     delta.Config(att_batch_size=4, att_batches=1))
  att = delta.attention_weights(model, params, stats, batches, taps[-1:], max_images=64)
  w = att[taps[-1]]
  assert w.shape == (surgery.flatten(params)[f"{taps[-1]}/conv/kernel"].shape[-1],)
  assert np.isfinite(w).all() and abs(float(w.sum()) - 1) < 1e-5


def test_default_taps_full_size():
  def taps(arch):
    return delta.default_taps(arch, models.model_config(models.get_model(arch, 5)))
  assert taps("densenet121") == ("transition1/conv", "transition2/conv", "transition3/conv",
                                 "denseblock4/layer16/conv2")
  assert taps("convnext_tiny") == tuple(f"stage{s}/block{b}/pwconv2"
                                        for s, b in ((1, 2), (2, 2), (3, 8), (4, 2)))
  assert taps("resnext50_32x4d") == taps("resnet50") == taps("wide_resnet50_2")


@pytest.mark.parametrize("arch", BLOCK_TYPES)
def test_truncation_at_every_unit_pools_the_cut_map(arch):
  model, params, stats, x = _tiny(arch)
  names = model.unit_names()
  assert names[0] == "stem" and len(names) >= 3
  _, full_taps = _forward(model, params, stats, x, taps=names)
  for name in names:
    cut = models.get_model(arch, 5, **{**TINY[arch], "truncate_after": name})
    shapes = models.abstract_variables(cut, SHAPE)
    cut_params = surgery.restrict_to(params, shapes["params"])
    head = np.asarray(shapes["params"]["head"]["kernel"].shape)
    rng = np.random.default_rng(0)
    cut_params["head"] = {"kernel": rng.normal(size=head).astype(np.float32),
                          "bias": np.zeros(head[1], np.float32)}
    _, got = _forward(cut, cut_params, surgery.restrict_to(stats, shapes.get("batch_stats", {})),
                      x, taps=["features"])
    if name == "stem":  # the unit's tap is its raw conv output, the cut is after its norm
      assert got["features"].shape == (2, full_taps[name].shape[-1])
      continue
    np.testing.assert_allclose(got["features"], np.asarray(full_taps[name]).mean(axis=(1, 2)),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", BLOCK_TYPES)
def test_selection_taps_and_mixed_precision_shapes(arch):
  """`last_conv` (the map before pooling) and `features` (the head's input) exist, and a
  bfloat16 model returns float32 logits (shapes only: no compile)."""
  model = models.get_model(arch, 5, **TINY[arch])
  taps = models.available_taps(model, SHAPE)
  head_in = models.abstract_variables(model, SHAPE)["params"]["head"]["kernel"].shape[0]
  assert taps["features"] == (1, head_in) and taps["last_conv"][-1] == head_in
  assert len(taps["last_conv"]) == 4
  half = models.get_model(arch, 5, dtype="bfloat16", **TINY[arch])
  v = models.abstract_variables(half, SHAPE)
  out = jax.eval_shape(lambda v: half.apply(v, jnp.zeros((2, *SHAPE))), v)
  assert out.dtype == jnp.float32 and out.shape == (2, 5)


def test_too_small_input_and_grouped_basic_blocks_are_named():
  for arch in ("densenet121", "convnext_tiny"):
    with pytest.raises(InputError, match="input is too small"):
      models.abstract_variables(models.get_model(arch, 5), (28, 28, 1))
  with pytest.raises(InputError, match="groups and width_per_group need block='bottleneck'"):
    models.abstract_variables(models.get_model("resnet_s", 5, groups=2), (16, 16, 1))


# ----------------------------------------------------------------------------- few-shot
@pytest.mark.parametrize("arch,strategy", [
    *[(a, "freeze") for a in ARCHS],
    # fine-tuning (backprop through each block type): slow
    *[pytest.param(a, "finetune", marks=pytest.mark.slow) for a in ARCHS]])
def test_fewshot_tiny_run_28px_grayscale(arch, strategy, tmp_path):
  """fmnist is 28x28x1: the full-size DenseNet / ConvNeXt maps vanish there (see
  test_too_small_input_is_named), the width- and depth-reduced configs run."""
  tiny_fewshot_run(tmp_path, arch, TINY[arch], strategy, "fmnist:1,5,7")


@pytest.mark.parametrize("arch", [pytest.param("densenet121", marks=pytest.mark.slow),  # 13 s
                                  "convnext_tiny"])
def test_selection_conv_map_is_the_map_before_pooling(arch):
  """Base-model selection's default map (`LAST_CONV_OUTPUT`) is the map the head pools
  (DenseNet's final norm5 + ReLU included): the `last_conv` tap, whose spatial mean is the
  pooled vector (ConvNeXt's final LayerNorm comes after the pool)."""
  model = models.get_model(arch, 5, **TINY[arch])
  v = models.init_model(model, jax.random.PRNGKey(0), SHAPE)
  x = np.random.default_rng(1).normal(size=(2, *SHAPE)).astype(np.float32)
  _, got = selection.apply_with_taps(model, v["params"], v.get("batch_stats", {}), x,
                                     [selection.LAST_CONV_OUTPUT, "features"])
  _, _, want = models.apply_model(model, v["params"], v.get("batch_stats", {}), x,
                                  taps=("last_conv",))
  np.testing.assert_allclose(got[selection.LAST_CONV_OUTPUT], want["last_conv"], rtol=1e-6)
  if arch == "densenet121":
    np.testing.assert_allclose(np.asarray(want["last_conv"]).mean(axis=(1, 2)), got["features"],
                               rtol=1e-5, atol=1e-6)
