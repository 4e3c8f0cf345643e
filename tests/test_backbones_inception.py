"""Inception-V3 (jtransfer.models.inception) against torchvision's own model, and the methods
(CWL, pruning, DELTA taps, truncation, few-shot) on a narrow config at 28-32 px."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError
from jtransfer.methods import cwl, delta, prune, selection
from jtransfer.models import inception
from jtransfer.weights import torchvision_inception
from tv_import import torchvision_models

torch = pytest.importorskip("torch")

TV_PARAMS = 27_161_264  # torchvision Inception3(), aux_logits=True (its default, IMAGENET1K_V1)
TV_PARAMS_NO_AUX = 23_834_568
SMALL = inception.SMALL_CONFIG
SMALL_SHAPE = (28, 28, 1)


# ------------------------------------------------------------------ torchvision reference
@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
  """torch on one thread: on 2 shared cores its thread pool made the reference 10x slower."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _torchvision_model(aux_logits=True, transform_input=False, seed=0):
  """torchvision Inception3 with He-normal convs, random BN affine AND running stats, eval."""
  tv = torchvision_models()
  torch.manual_seed(seed)
  net = tv.inception_v3(weights=None, aux_logits=aux_logits, transform_input=transform_input,
                        init_weights=False)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.Conv2d):
        fan_in = m.weight[0].numel()
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
      elif isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        m.bias.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
      elif isinstance(m, torch.nn.Linear):
        m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.weight.shape[1] ** 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
  return net.eval()


def _state_dict(net):
  return {k: v.numpy() for k, v in net.state_dict().items()}


def _hooked_forward(net, x):
  """Logits and intermediate outputs: raw conv outputs by unit path, Mixed block outputs."""
  taps, handles = {}, []

  def keep(name):
    return lambda module, args, out: taps.__setitem__(name, out.detach())

  for name, m in net.named_modules():
    if name.endswith(".conv") and isinstance(m, torch.nn.Conv2d):
      handles.append(m.register_forward_hook(keep(name[:-len(".conv")].replace(".", "/"))))
    elif name.startswith("Mixed_") and "." not in name:
      handles.append(m.register_forward_hook(keep(name)))
  handles.append(net.avgpool.register_forward_hook(
      lambda module, args, out: taps.update(last_conv=args[0].detach(),
                                            features=torch.flatten(out, 1).detach())))
  with torch.no_grad():
    logits = net(x)
  for h in handles:
    h.remove()
  return logits, taps


def _close(ours, ref, what):
  ref = ref.numpy()
  if ref.ndim == 4:
    ref = ref.transpose(0, 2, 3, 1)  # NCHW -> NHWC
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, f"{what}: {ours.shape} vs {ref.shape}"
  scale = float(np.abs(ref).max())
  assert scale > 1e-3, f"{what}: degenerate reference"
  assert float(np.abs(ours - ref).max()) <= 1e-4 * scale, what


def _compare(size, taps, aux_logits=True, transform_input=True, net=None):
  net = net or _torchvision_model(aux_logits=aux_logits, transform_input=transform_input)
  config = dict(aux_logits=aux_logits, transform_input=transform_input)
  variables = weights.import_torchvision("inception_v3", _state_dict(net), config=config)
  model = models.get_model("inception_v3", 1000, **config)
  x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
  ref_logits, ref_taps = _hooked_forward(net, x)
  forward = jax.jit(lambda p, s, x: models.apply_model(model, p, s, x, taps=taps))
  logits, _, got = forward(variables["params"], variables["batch_stats"],
                           x.numpy().transpose(0, 2, 3, 1))
  _close(logits, ref_logits, "logits")
  for t in taps:
    _close(got[t], ref_taps[t], f"tap {t}")
  return net, variables


def _delta_taps():
  return delta.default_taps("inception_v3", models.model_config(
      models.get_model("inception_v3", 1000)))


@pytest.fixture(scope="module")
def tv_net():
  """torchvision's IMAGENET1K_V1 layout: aux_logits=True, transform_input=True."""
  return _torchvision_model(aux_logits=True, transform_input=True)


def test_param_counts_match_torchvision(tv_net):
  aux_count = sum(p.numel() for n, p in tv_net.named_parameters() if n.startswith("AuxLogits."))
  total = sum(p.numel() for p in tv_net.parameters())
  for aux, want in ((True, total), (False, total - aux_count)):
    assert want == (TV_PARAMS if aux else TV_PARAMS_NO_AUX)
    state = {k: v for k, v in tv_net.state_dict().items()
             if aux or not k.startswith("AuxLogits.")}
    # the config and shape import_torchvision traces, so the 75 px test reuses the trace
    model = models.get_model("inception_v3", 1000, aux_logits=aux, transform_input=True)
    shapes = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0),
                                                      (224, 224, 3)))
    assert surgery.count(shapes["params"]) == want
    # the map uses every torchvision key (num_batches_tracked aside) exactly once
    keys = [e.key for e in weights.name_map("inception_v3", model)]
    assert len(keys) == len(set(keys))
    assert set(keys) == {k for k in state if not k.endswith("num_batches_tracked")}


def test_matches_torchvision_75px_with_aux_and_transform_input(tv_net):
  """75 px (torchvision's minimum; Mixed_7 at 1x1), torchvision's IMAGENET1K_V1 layout
  (aux_logits=True, transform_input=True); eval logits and every conv and block tap."""
  stem = list(inception.STEM_UNITS)
  blocks = [name for name, _, _ in inception.block_layout(inception.Inception3(1000))]
  taps = tuple(stem + blocks + list(_delta_taps()) + ["Mixed_6a/branch3x3", "last_conv",
                                                       "features"])
  net, variables = _compare(75, taps, net=tv_net)
  # drop_aux: the same state dict imports into the default aux-free model, same params
  sd = _state_dict(net)
  with pytest.raises(InputError, match="AuxLogits"):
    weights.import_torchvision("inception_v3", sd, config={"transform_input": True})
  plain = weights.import_torchvision("inception_v3", torchvision_inception.drop_aux(sd),
                                     config={"transform_input": True})
  aux_free = {k: v for k, v in variables["params"].items() if k != "AuxLogits"}
  jax.tree.map(np.testing.assert_array_equal, plain["params"], aux_free)
  assert surgery.count(plain["params"]) == TV_PARAMS_NO_AUX


@pytest.mark.slow
def test_matches_torchvision_299px():
  _compare(299, ("Mixed_5d", "Mixed_6e", "last_conv", *_delta_taps()))
  _compare(299, ("last_conv",), aux_logits=False, transform_input=False)


# ------------------------------------------------------------------ small config: the methods
def _variables(model, shape=SMALL_SHAPE, seed=0):
  """Random weights and BN stats from eval_shape (no slow jitted Flax init)."""
  tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if path.endswith("var"):
      return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
    if path.endswith("scale"):
      return rng.uniform(0.5, 1.5, a.shape).astype(np.float32)
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 10
    return (rng.normal(size=a.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

  return {k: surgery.map_with_path(fill, t) for k, t in tree.items()}


def _small(num_classes=4, **overrides):
  return models.get_model("inception_v3", num_classes, **{**SMALL, **overrides})


BLOCKS = tuple(name for name, _, _ in inception.block_layout(SMALL))


def _apply(model, params, stats, x, taps=BLOCKS, fn=models.apply_model):
  """`fn` jitted (one XLA compile beats thousands of eager op dispatches), compiled once per
  (model, taps, fn): the tests share the full small model's forward with every block tapped."""
  return _jitted(model, taps, fn)(params, stats, x)


@functools.lru_cache(maxsize=None)
def _jitted(model, taps, fn):
  return jax.jit(lambda p, s, x: fn(model, p, s, x, taps=taps))


def _x(n=2, shape=SMALL_SHAPE, seed=1):
  return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def test_small_config_shapes_and_truncation():
  model = _small()
  shapes = models.available_taps(model, SMALL_SHAPE)
  assert shapes["Mixed_5b"][1:3] == (9, 9) and shapes["Mixed_6b"][1:3] == (4, 4)
  assert shapes["last_conv"] == (1, 1, 1, 136) and shapes["features"] == (1, 136)
  v = _variables(model)
  x = _x()
  full = _apply(model, v["params"], v["batch_stats"], x)[2]
  for name in model.unit_names():
    cut = _small(truncate_after=name)
    fresh = _variables(cut)
    params = {**surgery.restrict_to(v["params"], fresh["params"]), "head": fresh["params"]["head"]}
    stats = surgery.restrict_to(v["batch_stats"], fresh["batch_stats"])
    # every cut traces (shapes); one also runs, its cut map equal to the full model's
    if name == "Mixed_5b":  # through selection's features: the last conv output is the cut's
      logits, got = jax.jit(lambda p, s, x: selection.apply_with_taps(
          cut, p, s, x, ("last_conv", selection.LAST_CONV_OUTPUT)))(params, stats, x)
      np.testing.assert_allclose(got["last_conv"], full[name], rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(got[selection.LAST_CONV_OUTPUT], got["last_conv"])
    else:
      logits, _, got = jax.eval_shape(
          lambda: models.apply_model(cut, params, stats, x, taps=("last_conv",)))
    assert logits.shape == (2, 4) and got["last_conv"].shape[0] == 2
  with pytest.raises(InputError, match="truncate_after 'Mixed_6f'"):
    jax.eval_shape(lambda: _small(truncate_after="Mixed_6f").init(
        jax.random.PRNGKey(0), jnp.zeros((1, *SMALL_SHAPE))))


def _init_shapes(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))


def test_bad_config_or_input_is_named():
  with pytest.raises(InputError, match="Mixed_6a .*needs 4 widths"):
    _init_shapes(_small(mixed_6a=(8, 8)), SMALL_SHAPE)
  with pytest.raises(InputError, match="too small .*before Mixed_7a.*SMALL_CONFIG"):
    _init_shapes(models.get_model("inception_v3", 10), (64, 64, 3))
  with pytest.raises(InputError, match="transform_input re-normalises RGB"):
    _init_shapes(_small(transform_input=True), SMALL_SHAPE)


def test_mixed_precision_gives_float32_logits():
  model = _small(dtype="bfloat16")
  v = _variables(model)
  logits = jax.eval_shape(lambda: models.apply_model(model, v["params"], v["batch_stats"],
                                                     _x()))[0]
  assert logits.dtype == jnp.float32 and logits.shape == (2, 4)


def test_cwl_layers_equal_reparametrisation_on_every_block_type():
  model = _small()
  v = _variables(model)
  rng = np.random.default_rng(3)
  scales = {u: rng.uniform(0.2, 1.8, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(v["params"]).items()}
  kinds = {kind for _, kind, _ in inception.block_layout(SMALL)}
  assert kinds == set("ABCDE")
  assert all(any(u.startswith(f"{name}/") for u in scales)
             for name, _, _ in inception.block_layout(SMALL))
  params = cwl.with_scales(v["params"], scales)
  taps = BLOCKS
  x = _x()
  got = _apply(model, params, v["batch_stats"], x, taps, fn=cwl.apply_model_cwl)
  want = _apply(model, cwl.effective_params(params), v["batch_stats"], x, taps)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  for t in taps:
    np.testing.assert_allclose(got[2][t], want[2][t], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got[0])).max() > 1e-3


def test_sparse_masks_on_every_kernel():
  """Magnitude masks (ERK allotment: its shapes include the 1x7 / 7x1 / 1x3 kernels) zero
  half the kernels; the masked net still runs (the shared compiled forward)."""
  from jtransfer.methods import sparsity
  model = _small()
  v = _variables(model)
  masks = sparsity.magnitude_masks(v["params"], 0.5, scope="erk")
  masked = sparsity.apply_masks(v["params"], masks)
  report = sparsity.sparsity_report(masked)
  assert abs(report["sparsity"] - 0.5) < 0.01
  assert "Mixed_6b/branch7x7dbl_2/conv/kernel" in report["layers"]
  assert report["layers"]["Mixed_7b/branch3x3_2a/conv/kernel"]["zeros"] > 0
  logits = _apply(model, masked, v["batch_stats"], _x())[0]
  assert np.isfinite(np.asarray(logits)).all()


# ------------------------------------------------------------------ pruning
def _pruned_equals_masked(tau=0.5, seed=0, **overrides):
  """The pruned smaller net's logits equal the full net's with removed channels' sigma at 0."""
  model = _small(**overrides)
  v = _variables(model, seed=seed)
  rng = np.random.default_rng(seed + 100)
  scales = {u: rng.uniform(0.0, 1.5, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(v["params"]).items()}
  config = models.model_config(model)
  res = prune.prune_by_sigma(v["params"], v["batch_stats"], config, scales, tau)
  masked = {u: s * res.masks[u] for u, s in scales.items()}
  x = _x()
  taps = BLOCKS if not overrides else None  # the untruncated net reuses the shared compile
  want = _apply(model, cwl.apply_cwl(v["params"], masked), v["batch_stats"], x, taps)[0]
  got = _apply(models.from_config("inception_v3", res.config), res.params, res.batch_stats,
               x, None)[0]
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  assert np.abs(np.asarray(want)).max() > 1e-3
  for u, s in scales.items():  # every unit is its own group
    np.testing.assert_array_equal(res.masks[u], np.abs(s) >= tau)
  assert res.params_kept < res.params_total
  return res


def test_pruned_equals_masked_through_concats_passthroughs_and_forks():
  res = _pruned_equals_masked()
  kept = {u: k for u, (k, _) in res.kept.items()}
  # Mixed_6a (B) passes Mixed_5b's output through its max pool: Mixed_6b reads both
  mixed_5b = sum(kept[f"Mixed_5b/{u}"] for u in ("branch1x1", "branch5x5_2", "branch3x3dbl_3",
                                                  "branch_pool"))
  mixed_6a = kept["Mixed_6a/branch3x3"] + kept["Mixed_6a/branch3x3dbl_3"] + mixed_5b
  assert res.params["Mixed_6b"]["branch1x1"]["conv"]["kernel"].shape[2] == mixed_6a
  assert res.config["mixed_6a"][0] == kept["Mixed_6a/branch3x3"]
  # Mixed_7b (E): both forks of branch3x3_1 read it; the head reads the 6-way concat
  assert res.params["Mixed_7b"]["branch3x3_2b"]["conv"]["kernel"].shape[2] == \
      kept["Mixed_7b/branch3x3_1"]
  assert res.params["head"]["kernel"].shape[0] == sum(
      kept[f"Mixed_7b/{u}"] for u in inception.UNITS["E"] if u not in
      ("branch3x3_1", "branch3x3dbl_1", "branch3x3dbl_2"))


@pytest.mark.parametrize("cut", ["Mixed_6a", "Conv2d_4a_3x3"])  # 6a: a pass-through to the head
def test_pruned_equals_masked_truncated(cut):
  res = _pruned_equals_masked(tau=0.6, seed=1, truncate_after=cut)
  assert res.config["truncate_after"] == cut


def test_pruning_refuses_the_aux_head():
  model = models.get_model("inception_v3", 10, aux_logits=True)
  params = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0),
                                                    (75, 75, 3)))["params"]
  with pytest.raises(InputError, match="aux_logits=False"):
    prune.channel_groups(params, models.model_config(model))


# ------------------------------------------------------------------ DELTA, few-shot
def _source(**overrides):
  from jtransfer.methods import transfer
  model = _small(num_classes=5, **overrides)
  return transfer.Source("inception_v3", models.model_config(model), _variables(model),
                         SMALL_SHAPE, (0.5,), (0.25,), {"origin": "random test weights"})


def test_delta_default_taps_resolve_and_attention_computes():
  full = _delta_taps()
  assert full[:4] == ("Mixed_5d/branch1x1", "Mixed_5d/branch5x5_2", "Mixed_5d/branch3x3dbl_3",
                      "Mixed_5d/branch_pool")
  assert full[-6:] == tuple(f"Mixed_7c/{u}" for u in ("branch1x1", "branch3x3_2a",
                                                      "branch3x3_2b", "branch3x3dbl_3a",
                                                      "branch3x3dbl_3b", "branch_pool"))
  assert len(full) == 14
  source = _source()
  taps = delta.resolve_taps(source, source.model, delta.Config())
  # the last block of each stage in the small config: Mixed_5b (A), Mixed_6b (C), Mixed_7b (E)
  assert {t.split("/")[0] for t in taps} == {"Mixed_5b", "Mixed_6b", "Mixed_7b"}
  shapes = models.available_taps(source.model, SMALL_SHAPE)
  # the taps' channels together are the stage's last block output
  for block in ("Mixed_5b", "Mixed_6b", "Mixed_7b"):
    assert sum(shapes[t][-1] for t in taps if t.startswith(block)) == shapes[block][-1]
  cut = _source(truncate_after="Mixed_6a")
  assert delta.resolve_taps(cut, cut.model, delta.Config()) == taps[:4]
  rng = np.random.default_rng(0)
  batches = [(_x(4), rng.integers(0, 5, 4), np.ones(4, np.float32))]
  chosen = ("Mixed_7b/branch3x3_2b",)  # one of E's forks: a unit inside a concat
  params, stats = source.variables["params"], source.variables["batch_stats"]
  att = delta.attention_weights(source.model, params, stats, batches, chosen, max_images=64)
  for t in chosen:
    assert att[t].shape == (shapes[t][-1],) and abs(float(att[t].sum()) - 1) < 1e-5
    assert np.ptp(att[t]) > 0  # channels matter unequally


def _fewshot(tmp_path, strategies):
  import json
  from experiments import fewshot
  from jtransfer.methods import transfer
  src = str(tmp_path / "src")
  transfer.save_source(src, _source())
  out = tmp_path / "out"
  argv = ["--arch", "inception_v3", "--source", f"ckpt:{src}", "--target", "digits:0,1,2",
          "--strategies", ",".join(strategies), "--shots", "1", "--repeats", "1", "--steps",
          "2", "--test-per-class", "4", "--val-per-class", "2", "--lrs", "0.001", "--quiet",
          "--cv-folds", "0",
          "--out", str(out)]
  assert fewshot.main(argv) == 0
  from jtransfer.study.records import rows
  records = rows(json.loads((out / "results.json").read_text()))
  assert {r["arm"] for r in records} == set(strategies)
  assert all(r["arch"] == "inception_v3" for r in records)
  assert all(0 <= r["test_acc"] <= 1 for r in records if r["role"] == "eval")


def test_fewshot_end_to_end_small_config(tmp_path):
  _fewshot(tmp_path, ["freeze"])


@pytest.mark.slow
def test_fewshot_finetune_cwl_and_delta_small_config(tmp_path):
  """Strategies that differentiate through the backbone; DELTA's attention on the concat
  taps, its alpha tuning draws (~4 min on 2 shared cores, mostly compiles)."""
  _fewshot(tmp_path, ["finetune_cwl", "delta"])


def test_convert_weights_drops_the_aux_head(tv_net, tmp_path, capsys):
  # torchvision's Inception-V3 checkpoint layout (aux head included) converts to a source
  # without it by default, as a user with IMAGENET1K_V1 weights would run it.
  import torch
  from jtransfer import sources as convert_weights
  pth = tmp_path / "inception_v3.pth"
  torch.save(tv_net.state_dict(), pth)
  source = convert_weights.convert("inception_v3", str(pth), input_shape=(75, 75, 3))
  assert "dropped the" in capsys.readouterr().out
  assert not any(k.startswith("AuxLogits") for k in source.variables["params"])
  assert source.config["aux_logits"] is False
