"""Inception-V3 (jtransfer.models.inception) against torchvision's own model, and the methods
(CWL, pruning, DELTA taps, truncation, few-shot) on a narrow config at 28-32 px."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError
from jtransfer.methods import cwl, delta, prune
from jtransfer.models import inception
from jtransfer.weights import torchvision_inception
from tv_import import torchvision_models

torch = pytest.importorskip("torch")

TV_PARAMS = 27_161_264  # torchvision Inception3(), aux_logits=True (its default, IMAGENET1K_V1)
TV_PARAMS_NO_AUX = 23_834_568
SMALL = inception.SMALL_CONFIG
SMALL_SHAPE = (28, 28, 1)


# ------------------------------------------------------------------ torchvision reference
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


def _compare(size, taps, aux_logits=True, transform_input=True):
  net = _torchvision_model(aux_logits=aux_logits, transform_input=transform_input)
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


def test_param_counts_match_torchvision():
  tv = torchvision_models()
  for aux, want in ((True, TV_PARAMS), (False, TV_PARAMS_NO_AUX)):
    net = tv.inception_v3(weights=None, aux_logits=aux, init_weights=False)
    assert sum(p.numel() for p in net.parameters()) == want
    model = models.get_model("inception_v3", 1000, aux_logits=aux)
    shapes = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0),
                                                      (75, 75, 3)))
    assert surgery.count(shapes["params"]) == want
    # the map uses every torchvision key (num_batches_tracked aside) exactly once
    keys = [e.key for e in weights.name_map("inception_v3", model)]
    assert len(keys) == len(set(keys))
    assert set(keys) == {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}


def test_matches_torchvision_75px_with_aux_and_transform_input():
  """75 px (torchvision's minimum; Mixed_7 at 1x1), torchvision's IMAGENET1K_V1 layout
  (aux_logits=True, transform_input=True); eval logits and every conv and block tap."""
  stem = list(inception.STEM_UNITS)
  blocks = [name for name, _, _ in inception.block_layout(inception.Inception3(1000))]
  taps = tuple(stem + blocks + list(_delta_taps()) + ["Mixed_6a/branch3x3", "last_conv",
                                                       "features"])
  net, variables = _compare(75, taps)
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


def _apply(model, params, stats, x, taps=None, fn=models.apply_model):
  """`fn` jitted (one XLA compile beats thousands of eager op dispatches)."""
  return jax.jit(lambda p, s, x: fn(model, p, s, x, taps=taps))(params, stats, x)


def _x(n=2, shape=SMALL_SHAPE, seed=1):
  return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


def test_small_config_shapes_and_truncation():
  model = _small()
  shapes = models.available_taps(model, SMALL_SHAPE)
  assert shapes["Mixed_5c"][1:3] == (9, 9) and shapes["Mixed_6c"][1:3] == (4, 4)
  assert shapes["last_conv"] == (1, 1, 1, 136) and shapes["features"] == (1, 136)
  v = _variables(model)
  x = _x()
  full = _apply(model, v["params"], v["batch_stats"], x,
                taps=tuple(n for n, _, _ in inception.block_layout(SMALL)))[2]
  for name in model.unit_names():
    cut = _small(truncate_after=name)
    fresh = _variables(cut)
    params = {**surgery.restrict_to(v["params"], fresh["params"]), "head": fresh["params"]["head"]}
    stats = surgery.restrict_to(v["batch_stats"], fresh["batch_stats"])
    # every cut traces (shapes); two also run, their cut map equal to the full model's
    if name in ("Mixed_6a", "Mixed_7a"):
      logits, _, got = _apply(cut, params, stats, x, taps=("last_conv",))
      np.testing.assert_allclose(got["last_conv"], full[name], rtol=1e-5, atol=1e-5)
    else:
      logits, _, got = jax.eval_shape(
          lambda: models.apply_model(cut, params, stats, x, taps=("last_conv",)))
    assert logits.shape == (2, 4) and got["last_conv"].shape[0] == 2
  with pytest.raises(InputError, match="truncate_after 'Mixed_6f'"):
    jax.eval_shape(lambda: _small(truncate_after="Mixed_6f").init(
        jax.random.PRNGKey(0), jnp.zeros((1, *SMALL_SHAPE))))


def test_bad_widths_are_named():
  with pytest.raises(InputError, match="Mixed_6a .*needs 4 widths"):
    jax.eval_shape(lambda: _small(mixed_6a=(8, 8)).init(jax.random.PRNGKey(0),
                                                        jnp.zeros((1, *SMALL_SHAPE))))


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
  taps = ("Mixed_5c", "Mixed_6a", "Mixed_6b", "Mixed_7a", "Mixed_7b")
  x = _x()
  got = _apply(model, params, v["batch_stats"], x, taps, fn=cwl.apply_model_cwl)
  want = _apply(model, cwl.effective_params(params), v["batch_stats"], x, taps)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
  for t in taps:
    np.testing.assert_allclose(got[2][t], want[2][t], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(got[0])).max() > 1e-3


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
  x = _x(3)
  want = _apply(model, cwl.apply_cwl(v["params"], masked), v["batch_stats"], x)[0]
  got = _apply(models.from_config("inception_v3", res.config), res.params, res.batch_stats,
               x)[0]
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
  assert np.abs(np.asarray(want)).max() > 1e-3
  for u, s in scales.items():  # every unit is its own group
    np.testing.assert_array_equal(res.masks[u], np.abs(s) >= tau)
  assert res.params_kept < res.params_total
  return res


def test_pruned_equals_masked_through_concats_passthroughs_and_forks():
  res = _pruned_equals_masked()
  kept = {u: k for u, (k, _) in res.kept.items()}
  # Mixed_6a (B) passes Mixed_5c's output through its max pool: Mixed_6b reads both
  mixed_5c = sum(kept[f"Mixed_5c/{u}"] for u in ("branch1x1", "branch5x5_2", "branch3x3dbl_3",
                                                  "branch_pool"))
  mixed_6a = kept["Mixed_6a/branch3x3"] + kept["Mixed_6a/branch3x3dbl_3"] + mixed_5c
  assert res.params["Mixed_6b"]["branch1x1"]["conv"]["kernel"].shape[2] == mixed_6a
  assert res.config["mixed_6a"][0] == kept["Mixed_6a/branch3x3"]
  # Mixed_7b (E): both forks of branch3x3_1 read it; the head reads the 6-way concat
  assert res.params["Mixed_7b"]["branch3x3_2b"]["conv"]["kernel"].shape[2] == \
      kept["Mixed_7b/branch3x3_1"]
  assert res.params["head"]["kernel"].shape[0] == sum(
      kept[f"Mixed_7b/{u}"] for u in inception.UNITS["E"] if u not in
      ("branch3x3_1", "branch3x3dbl_1", "branch3x3dbl_2"))


@pytest.mark.parametrize("cut", ["Mixed_7a", "Conv2d_4a_3x3"])
def test_pruned_equals_masked_truncated(cut):
  res = _pruned_equals_masked(tau=0.6, seed=1, truncate_after=cut)
  assert res.config["truncate_after"] == cut


def test_pruning_refuses_the_aux_head():
  model = models.get_model("inception_v3", 10, aux_logits=True)
  params = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0),
                                                    (75, 75, 3)))["params"]
  with pytest.raises(InputError, match="aux_logits=False"):
    prune.channel_groups(params, models.model_config(model))
