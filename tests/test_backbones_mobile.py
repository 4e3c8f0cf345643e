"""MobileNetV2, MobileNetV3 (large, small) and EfficientNet-B0: torchvision equivalence and the
methods (CWL, DELTA taps, pruning, sparsity, truncation, few-shot) on tiny configs.

torchvision's own models (random weights and random BN running stats, `tests/tv_import.py`)
are the reference: their state dicts are imported and logits and conv taps compared.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError
from jtransfer.methods import cwl, delta, prune, sparsity
from jtransfer.models import mobilenet
from model_helpers import random_variables, tiny_fewshot_run

ARCHS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0")
# torchvision's documented parameter counts (1000 classes).
PARAMS = {"mobilenet_v2": 3_504_872, "mobilenet_v3_large": 5_483_032,
          "mobilenet_v3_small": 2_542_856, "efficientnet_b0": 5_288_548}

# Tiny configs with every block kind: no expand (depthwise on the stream) + SE + residual,
# expand without SE (stride 2), expand + SE + residual, no expand + SE on a projected stream.
TINY_BLOCKS = ((3, 1, 0, 8, 4, 1, "relu"), (3, 2, 16, 12, 0, 0, "hardswish"),
               (5, 1, 24, 12, 8, 1, "hardswish"), (3, 2, 0, 16, 4, 0, "relu"))
TINY = {
    # MobileNetV3-style: hardsigmoid gate, hidden classifier layer fc1
    "mobilenet_v3_small": dict(blocks=TINY_BLOCKS, stem_width=8, top_width=24, hidden_width=16),
    # EfficientNet-style: SiLU, sigmoid gate, no hidden layer
    "efficientnet_b0": dict(blocks=tuple(b[:6] + ("silu",) for b in TINY_BLOCKS), stem_width=8,
                            top_width=24),
    # MobileNetV2-style: no SE
    "mobilenet_v2": dict(blocks=((3, 1, 0, 8, 0, 0, "relu6"), (3, 2, 16, 12, 0, 0, "relu6"),
                                 (3, 1, 24, 12, 0, 1, "relu6")), stem_width=8, top_width=24),
}
SHAPE = (16, 16, 1)


def _random_variables(model, shape=SHAPE, seed=0):
  return random_variables(model, shape, seed)


# ----------------------------------------------------------------------------- torchvision
def _torch_model(arch):
  from tv_import import torchvision_models
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  tm = getattr(torchvision_models(), arch)(weights=None).eval()
  with torch.no_grad():  # random BN affine and running stats, so eval mode is exercised
    for m in tm.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
  return tm


def _check_torchvision(arch, size, tap_units):
  torch = pytest.importorskip("torch")
  tm = _torch_model(arch)
  sd = {k: v.numpy() for k, v in tm.state_dict().items()}
  assert sum(p.numel() for p in tm.parameters()) == PARAMS[arch]
  variables = weights.import_torchvision(arch, sd)
  assert surgery.count(variables["params"]) == PARAMS[arch]
  model = models.get_model(arch, 1000)
  # raw conv outputs of the tapped units, by forward hooks on torchvision's Conv2d modules
  keys = {e.path[:-2]: e.key[:-len(".weight")] for e in weights.name_map(arch, model)
          if e.path[-2:] == ("conv", "kernel")}
  modules = dict(tm.named_modules())
  got_torch = {}
  for unit in tap_units:
    # a copy: torchvision applies some activations in place (EfficientNet's SE SiLU)
    modules[keys[tuple(unit.split("/"))]].register_forward_hook(
        lambda m, i, o, unit=unit: got_torch.__setitem__(unit, o.numpy().copy()))
  x = np.random.default_rng(1).normal(size=(2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want = tm(torch.from_numpy(x)).numpy()
  names = list(tap_units) + ["last_conv", "features"]
  # jitted: one compile costs less than eager op-by-op dispatch's many small ones
  logits, taps = jax.jit(lambda p, s, x: _drop_stats(models.apply_model(model, p, s, x,
                                                                        taps=names)))(
      variables["params"], variables["batch_stats"], x.transpose(0, 2, 3, 1))
  scale = np.abs(want).max()
  assert np.abs(np.asarray(logits) - want).max() / scale < 1e-4
  for unit in tap_units:
    ref = got_torch[unit].transpose(0, 2, 3, 1)
    err = np.abs(np.asarray(taps[unit]) - ref).max() / np.abs(ref).max()
    assert err < 1e-4, (unit, err)
  assert taps["features"].shape == (2, model.hidden_width or model.top_width)


def _drop_stats(out):
  return out[0], out[2]


def _apply(model, params, stats, x):
  return np.asarray(jax.jit(lambda p, s, x: models.apply_model(model, p, s, x)[0])(
      params, stats, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_params_logits_and_taps(arch):
  config = models.model_config(models.get_model(arch, 1000))
  _check_torchvision(arch, 32, delta.default_taps(arch, config))


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_equivalence_224(arch):
  model = models.get_model(arch, 1000)
  units = surgery.conv_units(jax.eval_shape(
      lambda: models.init_model(model, jax.random.PRNGKey(0), (224, 224, 3)))["params"])
  _check_torchvision(arch, 224, units)


def test_torchvision_stages_and_taps():
  v2 = models.model_config(models.get_model("mobilenet_v2", 10))
  assert delta.default_taps("mobilenet_v2", v2) == (
      "block1/project", "block3/project", "block6/project", "block13/project", "top")
  small = models.model_config(models.get_model("mobilenet_v3_small", 10))
  assert delta.default_taps("mobilenet_v3_small", small) == (
      "stem", "block1/project", "block3/project", "block8/project", "top")
  b0 = models.get_model("efficientnet_b0", 10)
  assert len(b0.blocks) == 16 and [b[mobilenet.SE] for b in b0.blocks][:3] == [8, 4, 6]
  assert mobilenet.make_divisible(72 // 4) == 24 and mobilenet.make_divisible(10) == 16


@pytest.mark.parametrize("override,match", [
    (dict(blocks=((3, 1, 0, 8, 0, 1),)), "block1 is"),
    (dict(blocks=((3, 1, 0, 8, 0, 1, "tanh"),)), "block1 is"),
    (dict(blocks=((3, 2, 0, 8, 0, 1, "relu"),)), "residual block needs stride 1"),
    (dict(se_gate="softmax"), "se_gate"),
])
def test_bad_configs_are_named(override, match):
  model = models.get_model("mobilenet_v2", 3, **{**TINY["mobilenet_v2"], **override})
  with pytest.raises(InputError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *SHAPE))))


def test_import_refuses_a_wrong_state_dict():
  model = models.get_model("mobilenet_v3_small", 10, **TINY["mobilenet_v3_small"])
  entries = weights.name_map("mobilenet_v3_small", model)
  sd = {e.key: np.zeros(weights.torchvision.torch_shape(e, (1, 1, 1, 1) if e.kind == "conv"
                                                           else (1,) * (2 if e.kind == "dense"
                                                                        else 1)))
        for e in entries}
  with pytest.raises(InputError, match="mismatched"):
    weights.import_torchvision("mobilenet_v3_small", sd, config=TINY["mobilenet_v3_small"])


# ----------------------------------------------------------------------------- CWL
@pytest.mark.parametrize("arch", sorted(TINY))
def test_cwl_layers_equal_reparametrisation(arch):
  model = models.get_model(arch, 3, **TINY[arch])
  v = _random_variables(model)
  rng = np.random.default_rng(2)
  scales = {u: rng.uniform(0.2, 1.8, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(v["params"]).items()}
  units = set(scales)
  assert {"block1/dw", "block3/se/fc1", "block3/se/fc2", "top"} <= units or arch == "mobilenet_v2"
  x = rng.normal(size=(2, *SHAPE)).astype(np.float32)
  params = cwl.with_scales(v["params"], scales)
  got = jax.jit(lambda p, s, x: cwl.apply_model_cwl(model, p, s, x)[0])(
      params, v["batch_stats"], x)
  apply = jax.jit(lambda p, s, x: models.apply_model(model, p, s, x)[0])
  want = apply(cwl.effective_params(params), v["batch_stats"], x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  base = apply(v["params"], v["batch_stats"], x)
  assert np.abs(np.asarray(base) - np.asarray(want)).max() > 1e-3  # the scales do something


# ----------------------------------------------------------------------------- pruning
def _logits(arch, config, params, stats, x):
  return _apply(models.from_config(arch, config), params, stats, x)


def _prune_check(arch, config, params, stats, scales, x, tau, residual="group"):
  res = prune.prune_by_sigma(params, stats, config, scales, tau, residual)
  masked = {u: s * res.masks[u] for u, s in scales.items()}
  want = _logits(arch, config, cwl.apply_cwl(params, masked), stats, x)
  got = _logits(arch, res.config, res.params, res.batch_stats, x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  rebuilt = models.from_config(arch, res.config)
  assert models.model_config(rebuilt) == res.config  # the pruned config round-trips
  return res


@pytest.mark.parametrize("arch", sorted(TINY))
def test_pruned_equals_masked(arch):
  model = models.get_model(arch, 3, **TINY[arch])
  config = models.model_config(model)
  v = _random_variables(model, seed=3)
  rng = np.random.default_rng(4)
  scales = {u: rng.uniform(0.0, 1.5, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(v["params"]).items()}
  groups = {g.name: g for g in prune.channel_groups(v["params"], config)}
  # make every group lose a channel: all its units below tau there
  for g in groups.values():
    for u in g.units:
      scales[u][[0]] = 0.01
  x = rng.normal(size=(2, *SHAPE)).astype(np.float32)
  res = _prune_check(arch, config, v["params"], v["batch_stats"], scales, x, 0.6)
  # couplings: depthwise (+ SE gate) follow their producer; residual blocks join the stream
  if arch != "mobilenet_v2":
    assert groups["stem"].units == ["stem", "block1/dw", "block1/se/fc2", "block1/project"]
    assert groups["block3/expand"].units == ["block3/expand", "block3/dw", "block3/se/fc2"]
    assert ("conv", "block3/se/fc1") in groups["block3/expand"].consumers
    assert groups["block2/project"].units == ["block2/project", "block3/project", "block4/dw",
                                              "block4/se/fc2"]
    assert groups["block3/se/fc1"].consumers == [("conv", "block3/se/fc2")]
    assert ("gap", "fc1" if "hidden_width" in TINY[arch] else "head") in groups["top"].consumers
  for g in groups.values():
    for u in g.units:
      np.testing.assert_array_equal(res.masks[u], res.masks[g.units[0]])
      assert res.kept[u][0] < res.kept[u][1]
  assert res.params_kept < res.params_total


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_full_torchvision_configs(arch):
  """The torchvision configs prune (random sigmas) to params that fit the rebuilt model."""
  model = models.get_model(arch, 10)
  v = _random_variables(model, (32, 32, 3))
  rng = np.random.default_rng(0)
  scales = {u: rng.uniform(0, 1, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(v["params"]).items()}
  res = prune.prune_by_sigma(v["params"], v["batch_stats"], models.model_config(model), scales,
                             0.6)
  fresh = jax.eval_shape(lambda: models.init_model(models.from_config(arch, res.config),
                                                   jax.random.PRNGKey(0), (32, 32, 3)))
  surgery.merge_params(fresh["params"], res.params)  # raises on any shape mismatch
  surgery.merge_params(fresh["batch_stats"], res.batch_stats)
  assert res.params_kept < res.params_total


def test_pruning_residual_keep_and_truncated():
  arch = "efficientnet_b0"
  model = models.get_model(arch, 3, **TINY[arch], truncate_after="block3")
  config = models.model_config(model)
  v = _random_variables(model, seed=5)
  rng = np.random.default_rng(6)
  scales = {u: rng.uniform(0.0, 1.5, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(v["params"]).items()}
  x = rng.normal(size=(2, *SHAPE)).astype(np.float32)
  res = _prune_check(arch, config, v["params"], v["batch_stats"], scales, x, 0.6, "keep")
  assert res.kept["stem"] == (8, 8) and res.kept["block2/project"] == (12, 12)
  assert res.kept["block2/expand"][0] < 16 or res.kept["block3/expand"][0] < 24


def test_channel_groups_refuses_mismatched_params():
  model = models.get_model("mobilenet_v2", 3, **TINY["mobilenet_v2"])
  v = _random_variables(model)
  config = models.model_config(model)
  config["blocks"] = config["blocks"][:2]
  with pytest.raises(InputError, match="do not match the config"):
    prune.channel_groups(v["params"], config)


# ----------------------------------------------------------------------------- taps, DELTA
def test_truncation_points_and_features():
  arch = "mobilenet_v3_small"
  model = models.get_model(arch, 3, **TINY[arch])
  assert model.unit_names() == ["stem", "block1", "block2", "block3", "block4"]
  x = np.zeros((1, *SHAPE), np.float32)
  for name in model.unit_names():
    cut = models.get_model(arch, 3, **TINY[arch], truncate_after=name)
    v = _random_variables(cut)
    # shapes only (abstract evaluation): the blocks' values are tested above
    logits, _, taps = jax.eval_shape(lambda p, s: models.apply_model(
        cut, p, s, x, taps=["last_conv", "features"]), v["params"], v["batch_stats"])
    assert logits.shape == (1, 3) and taps["features"].shape[-1] == taps["last_conv"].shape[-1]
    assert "top" not in v["params"] and "fc1" not in v["params"]
    assert delta.default_taps(arch, models.model_config(cut))  # resolve_taps drops absent ones
  # selection's last-conv-output pseudo-tap is the cut block's output (the stem's for 'stem')
  from jtransfer.methods import selection
  cut = models.get_model(arch, 3, **TINY[arch], truncate_after="block2")
  v = _random_variables(cut)
  _, got = jax.eval_shape(lambda p, s: selection.apply_with_taps(
      cut, p, s, x, [selection.LAST_CONV_OUTPUT, "last_conv"]), v["params"], v["batch_stats"])
  assert got[selection.LAST_CONV_OUTPUT].shape == got["last_conv"].shape == (1, 4, 4, 12)
  with pytest.raises(InputError, match="truncate_after"):
    models.get_model(arch, 3, **TINY[arch], truncate_after="top").init(
        jax.random.PRNGKey(0), x)


def test_delta_taps_and_attention():
  from jtransfer.methods import transfer
  arch = "mobilenet_v3_small"
  model = models.get_model(arch, 2, **TINY[arch])
  v = _random_variables(model)
  source = transfer.Source(arch, models.model_config(model), v, SHAPE, (0.4,), (0.3,))
  taps = delta.resolve_taps(source, model, delta.Config())
  assert taps == ("block1/project", "block3/project", "top")
  images = np.random.default_rng(0).integers(0, 256, (6, *SHAPE), dtype=np.uint8)
  labels = np.array([0, 1, 0, 1, 1, 0])
  config = delta.Config(att_batch_size=3, att_batches=2, att_max_images=6)
  batches = delta._attention_batches(images, labels, source.mean, source.std, config)
  # one tap inside a block (each tap compiles its own ablation)
  att = delta.attention_weights(model, v["params"], v["batch_stats"], batches, taps[1:2],
                                max_images=6)
  for t in taps[1:2]:
    assert att[t].shape == (model_width(v["params"], t),)
    np.testing.assert_allclose(att[t].sum(), 1.0, rtol=1e-5)


def model_width(params, unit):
  return surgery.flatten(params)[f"{unit}/conv/kernel"].shape[-1]


def test_sparsity_masks_on_depthwise_kernels():
  arch = "efficientnet_b0"
  v = _random_variables(models.get_model(arch, 3, **TINY[arch]))
  for scope in ("layer", "global", "erk"):
    masks = sparsity.magnitude_masks(v["params"], 0.5, scope=scope)
    flat = surgery.flatten(masks)
    assert flat["block1/dw/conv/kernel"].shape == (3, 3, 1, 8)
    report = sparsity.mask_sparsity(masks)
    assert 0.45 < report["sparsity"] < 0.55, (scope, report)
    pruned = surgery.flatten(sparsity.apply_masks(v["params"], masks))
    dw = pruned["block1/dw/conv/kernel"]
    assert dw.shape == (3, 3, 1, 8) and np.array_equal(dw != 0, flat["block1/dw/conv/kernel"])


# ----------------------------------------------------------------------------- few-shot
@pytest.mark.parametrize("arch,strategies", [("mobilenet_v2", "freeze"),
                                             ("mobilenet_v3_large", "freeze"),
                                             ("mobilenet_v3_small", "freeze"),
                                             ("efficientnet_b0", "freeze")])
def test_fewshot_end_to_end(arch, strategies, tmp_path):
  """A tiny random source of each arch (28x28 grayscale, width-reduced) through fewshot."""
  # two blocks: the few-shot machinery is under test here, the blocks are tested above
  tiny = dict(TINY[_tiny_of(arch)])
  tiny["blocks"] = tiny["blocks"][:2]
  records = tiny_fewshot_run(tmp_path, arch, tiny, strategies, "digits:0,1,2", classes=5,
                             mean=(0.5,), std=(0.25,))
  assert len(records) == len(strategies.split(","))


def _tiny_of(arch):
  return "mobilenet_v3_small" if arch.startswith("mobilenet_v3") else arch


# ----------------------------------------------------------------------------- distillation
@pytest.mark.slow  # ~30 s on 2 loaded cores: teacher and student train steps, costs, latency
def test_compact_transfer_resnet_teacher_mobilenet_student(tmp_path, monkeypatch):
  """experiments.compact_transfer: a resnet_s teacher distilled into the compact MobileNetV2
  (`--student-arch`, `distill.COMPACT_CONFIGS`)."""
  import json
  import os

  # random values from shapes instead of compiling Flax's initialisers (as
  # tests/test_compact_experiment.py does): only the flow is under test
  monkeypatch.setattr(models, "init_model", lambda m, rng, shape: _random_variables(m, shape))

  from experiments import compact_transfer as ct
  from jtransfer.methods import distill, transfer
  shape = (28, 28, 1)
  teacher = models.get_model("resnet_s", 5, stage_sizes=(1, 1), stage_widths=(8, 16),
                             stem_width=8)
  transfer.save_source(str(tmp_path / "src"), transfer.Source(
      "resnet_s", models.model_config(teacher), _random_variables(teacher, shape), shape,
      (0.5,), (0.25,)))
  out = str(tmp_path / "out")
  argv = ["--arch", "resnet_s", "--student-arch", "mobilenet_v2", "--source",
          f"ckpt:{tmp_path / 'src'}", "--target", "digits", "--shots", "2", "--repeats", "1",
          "--strategies", "teacher,distill", "--teacher-steps", "2", "--student-steps", "2",
          "--patience", "2", "--eval-every", "1", "--val-per-class", "1", "--tune-repeats", "1",
          "--tune-extend", "0", "--teacher-lr", "1e-3", "--student-lr", "2e-3", "--ft-lr",
          "1e-3", "--temperature", "4", "--lam", "0.7", "--latency-batches", "1",
          "--latency-runs", "1", "--test-per-class", "2", "--quiet", "--out", out]
  assert ct.main(argv) == 0
  from jtransfer.study import records as rec
  records = [r for r in rec.rows(json.load(open(os.path.join(out, "results.json"))))
             if r["role"] == "eval"]
  student = next(r for r in records if r["arm"] == "distill")
  assert student["config"]["blocks"] == distill.COMPACT_CONFIGS["mobilenet_v2"]["blocks"]
  assert student["status"] == "ok" and 0 <= student["agreement"] <= 1
  assert "compact student mobilenet_v2" in open(os.path.join(out, "report.md")).read()
