"""Tests for jtransfer.methods.cwl: the reparametrisation against explicit per-channel layers."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import cwl, transfer
from jtransfer.train import init_state, make_train_step

SHAPE = (16, 16, 1)


# ----------------------------------------------------------------------------- hand-written nets
def _conv(x, kernel, stride, pad):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), [(pad, pad), (pad, pad)],
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _maxpool2(x):
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def vgg_hand(params, scales, x):
  """vgg_s with an explicit CWL: sigma times each conv's (conv + bias) output, before ReLU."""
  for s in (1, 2, 3):
    for i in (1, 2):
      u = f"conv{s}_{i}"
      y = _conv(x, params[u]["conv"]["kernel"], 1, 1) + params[u]["conv"]["bias"]
      x = jax.nn.relu(y * scales[u])
    x = _maxpool2(x)
  x = x.reshape(x.shape[0], -1)
  for name in ("fc6", "fc7"):
    if name in params:
      x = jax.nn.relu(x @ params[name]["kernel"] + params[name]["bias"])
  return x @ params["head"]["kernel"] + params["head"]["bias"]


def _unit(params, stats, scales, u, x, stride, pad, relu, train):
  """conv -> BN (running or batch stats) -> explicit CWL multiply -> optional ReLU."""
  p, y = surgery.flatten(params), None
  y = _conv(x, p[f"{u}/conv/kernel"], stride, pad)
  if train:
    mean, var = y.mean(axis=(0, 1, 2)), y.var(axis=(0, 1, 2))
  else:
    st = surgery.flatten(stats)
    mean, var = st[f"{u}/bn/mean"], st[f"{u}/bn/var"]
  y = (y - mean) / jnp.sqrt(var + 1e-5) * p[f"{u}/bn/scale"] + p[f"{u}/bn/bias"]
  y = y * scales[u]
  return jax.nn.relu(y) if relu else y


def resnet_hand(params, stats, scales, x, train=False):
  """resnet_s (3x3/2 stem, 3 stages x 2 basic blocks) with an explicit CWL after each BN."""
  x = _unit(params, stats, scales, "stem", x, 2, 1, True, train)
  for s in range(3):
    for b in range(2):
      blk, stride = f"stage{s + 1}/block{b}", (2 if (b == 0 and s > 0) else 1)
      y = _unit(params, stats, scales, f"{blk}/conv1", x, stride, 1, True, train)
      y = _unit(params, stats, scales, f"{blk}/conv2", y, 1, 1, False, train)
      if f"{blk}/downsample" in scales:
        x = _unit(params, stats, scales, f"{blk}/downsample", x, stride, 0, False, train)
      x = jax.nn.relu(x + y)
  x = x.mean(axis=(1, 2))
  return x @ params["head"]["kernel"] + params["head"]["bias"]


# ----------------------------------------------------------------------------- fixtures
def _random_scales(params, seed):
  rng = np.random.default_rng(seed)
  # Include negative and near-zero scales: the reparametrisation must hold for any sigma.
  return {u: jnp.asarray(rng.uniform(-0.5, 1.8, v.shape), jnp.float32)
          for u, v in cwl.init_scales(params).items()}


def _random_stats(stats, seed):
  rng = np.random.default_rng(seed)
  def fn(path, v):
    return jnp.asarray(rng.uniform(0.5, 2.0, v.shape) if path.endswith("var")
                       else rng.normal(0, 0.3, v.shape), jnp.float32)
  return surgery.map_with_path(fn, stats)


@functools.lru_cache(maxsize=None)
def _model(arch):
  m = models.get_model(arch, 4)
  v = _random_variables(m)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(3, *SHAPE)), jnp.float32)
  return m, v, x


def _random_variables(model, seed=1, shape=SHAPE):
  """Random variables without compiling the model's init (shapes from eval_shape).

  The jitted Flax init costs ~8 CPU-s per resnet_s config (threefry RNG compile); these
  tests only need some weights.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
  rng = np.random.default_rng(seed)
  def fill(path, a):
    if path.endswith("var"):
      return np.ones(a.shape, np.float32)
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 1
    return (rng.normal(size=a.shape) / np.sqrt(fan_in)).astype(np.float32)
  return {k: surgery.map_with_path(fill, t) for k, t in shapes.items()}


def _ce(logits):
  labels = jnp.array([0, 1, 3])
  return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


# ----------------------------------------------------------------------------- tests
def test_init_scales_one_vector_per_unit():
  _, v, _ = _model("resnet_s")
  scales = cwl.init_scales(v["params"])
  assert sorted(scales) == sorted(surgery.conv_units(v["params"]))
  assert len(scales) == 15  # stem + 6 blocks x 2 convs + 2 downsamples
  assert scales["stage3/block1/conv2"].shape == (128,)
  assert all(np.all(np.asarray(s) == 1) for s in scales.values())


def test_apply_cwl_folds_into_the_right_leaves():
  for arch in ("vgg_s", "resnet_s"):
    _, v, _ = _model(arch)
    scales = _random_scales(v["params"], 0)
    eff = surgery.flatten(cwl.apply_cwl(v["params"], scales))
    flat = surgery.flatten(v["params"])
    for path, leaf in flat.items():
      unit = next((u for u in scales if path.startswith(u + "/")), None)
      s = None if unit is None else np.asarray(scales[unit])
      if unit is not None and arch == "vgg_s" and path.endswith(("conv/kernel", "conv/bias")):
        want = np.array(leaf)
        for k in range(want.shape[-1]):  # explicit loop over output channels
          want[..., k] = want[..., k] * s[k]
      elif unit is not None and path.endswith(("bn/scale", "bn/bias")):
        want = np.asarray(leaf) * s
      else:
        want = np.asarray(leaf)  # conv kernels of BN units, dense layers: untouched
      np.testing.assert_allclose(np.asarray(eff[path]), want, rtol=1e-6, err_msg=path)


def test_vgg_outputs_and_gradients_match_explicit_layer():
  m, v, x = _model("vgg_s")
  params, scales = v["params"], _random_scales(v["params"], 3)

  def ours(params, scales):
    return _ce(models.apply_model(m, cwl.apply_cwl(params, scales), None, x)[0])

  def hand(params, scales):
    return _ce(vgg_hand(params, scales, x))

  np.testing.assert_allclose(
      models.apply_model(m, cwl.apply_cwl(params, scales), None, x)[0],
      vgg_hand(params, scales, x), rtol=1e-4, atol=1e-5)
  g_ours = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, scales)
  g_hand = jax.jit(jax.grad(hand, argnums=(0, 1)))(params, scales)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_hand)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=1e-5)
  assert float(jnp.abs(g_ours[1]["conv1_1"]).sum()) > 0  # scales really get gradients


def test_resnet_train_mode_bn_matches_explicit_layer():
  # In train mode BN uses batch statistics; sigma after BN must still be exact.
  m, v, x = _model("resnet_s")
  params, scales = v["params"], _random_scales(v["params"], 7)
  stats = _random_stats(v["batch_stats"], 8)
  ours = jax.jit(lambda p, s: models.apply_model(m, cwl.apply_cwl(p, s), stats, x,
                                                 train=True)[0])
  hand = jax.jit(lambda p, s: resnet_hand(p, stats, s, x, True))
  np.testing.assert_allclose(ours(params, scales), hand(params, scales), rtol=1e-3, atol=1e-4)


def test_resnet_outputs_and_gradients_match_explicit_layer():
  train = False
  m, v, x = _model("resnet_s")
  params, scales = v["params"], _random_scales(v["params"], 4)
  stats = _random_stats(v["batch_stats"], 5)

  def ours(params, scales):
    return _ce(models.apply_model(m, cwl.apply_cwl(params, scales), stats, x, train=train)[0])

  def hand(params, scales):
    return _ce(resnet_hand(params, stats, scales, x, train))

  np.testing.assert_allclose(
      models.apply_model(m, cwl.apply_cwl(params, scales), stats, x, train=train)[0],
      resnet_hand(params, stats, scales, x, train), rtol=1e-3, atol=1e-4)
  g_ours = jax.jit(jax.grad(ours, argnums=(0, 1)))(params, scales)
  g_hand = jax.jit(jax.grad(hand, argnums=(0, 1)))(params, scales)
  flat_o, flat_h = surgery.flatten(g_ours[0]), surgery.flatten(g_hand[0])
  assert flat_o.keys() == flat_h.keys()
  for k in flat_o:
    np.testing.assert_allclose(flat_o[k], flat_h[k], rtol=5e-3, atol=1e-4, err_msg=k)
  for u in scales:
    np.testing.assert_allclose(g_ours[1][u], g_hand[1][u], rtol=5e-3, atol=1e-4, err_msg=u)


def test_unit_scales_reproduce_the_base_model_exactly():
  for arch in ("vgg_s", "resnet_s"):
    m, v, x = _model(arch)
    ones = cwl.init_scales(v["params"])
    eff = cwl.apply_cwl(v["params"], ones)
    for a, b in zip(jax.tree.leaves(eff), jax.tree.leaves(v["params"])):
      np.testing.assert_array_equal(a, b)
    stats = v.get("batch_stats")
    np.testing.assert_array_equal(models.apply_model(m, eff, stats, x)[0],
                                  models.apply_model(m, v["params"], stats, x)[0])


def test_apply_cwl_jits():
  _, v, _ = _model("resnet_s")
  scales = _random_scales(v["params"], 6)
  a = jax.jit(cwl.apply_cwl)(v["params"], scales)
  b = cwl.apply_cwl(v["params"], scales)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6)


@pytest.mark.parametrize("arch,units", [("resnet50", 53), ("vgg16", 13)])
def test_full_size_models_by_shape(arch, units):
  m = models.get_model(arch, 10)
  v = jax.eval_shape(lambda: models.init_model(m, jax.random.PRNGKey(0), (224, 224, 3)))
  scales = cwl.init_scales(v["params"])
  assert len(scales) == units
  eff = jax.eval_shape(cwl.apply_cwl, v["params"], scales)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), eff) == \
      jax.tree.map(lambda a: (a.shape, a.dtype), v["params"])
  full = cwl.with_scales(v["params"], scales)
  logits = jax.eval_shape(
      lambda p, s, x: models.apply_model(m, cwl.effective_params(p), s, x)[0],
      full, v.get("batch_stats"), jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert logits.shape == (2, 10)


def test_bad_scales_raise():
  _, v, _ = _model("vgg_s")
  with pytest.raises(InputError, match="names no conv unit"):
    cwl.apply_cwl(v["params"], {"fc6": jnp.ones(256)})
  with pytest.raises(InputError, match="output channels"):
    cwl.apply_cwl(v["params"], {"conv1_1": jnp.ones(3)})
  with pytest.raises(InputError, match="no 'cwl'"):
    cwl.split_cwl(v["params"])


# ----------------------------------------------------------------------------- strategies
def _source(arch):
  m = models.get_model(arch, 3, **({"dense_widths": (32,)} if arch == "vgg_s" else {}))
  return transfer.Source(arch, models.model_config(m), _random_variables(m, 0), SHAPE,
                         (0.5,), (0.25,))


def _one_step(name, arch, lr):
  source = _source(arch)
  setup = transfer.get_strategy(name).build(source, 4, 1)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (8, *SHAPE), dtype=np.uint8)
  labels = np.arange(8, dtype=np.int32) % 4
  params, stats = setup.init(0, images, labels)
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state = init_state(params, stats, setup.optimizer, 0, lr)
  new, _ = step(state, {"image": images, "label": labels})
  before, after = surgery.flatten(params), surgery.flatten(new.params)
  return setup, before, after


def test_freeze_cwl_trains_only_scales_and_head():
  setup, before, after = _one_step("freeze_cwl", "resnet_s", 1e-2)
  assert "cwl/stem" in before and "cwl/stage1/block0/conv1" in before
  for path in before:
    moved = not np.array_equal(before[path], after[path])
    assert moved == path.startswith(("cwl/", "head/")), path
  # forward of the setup uses the scales: zeroing them changes the logits
  params = {**jax.tree.map(jnp.asarray, setup.init(0)[0])}
  x = np.zeros((2, *SHAPE), np.uint8)
  base = setup.forward(params, setup.init(0)[1], x)
  params["cwl"] = jax.tree.map(jnp.zeros_like, params["cwl"])
  assert not np.allclose(base, setup.forward(params, setup.init(0)[1], x))


def test_finetune_cwl_trains_everything():
  setup = transfer.get_strategy("finetune_cwl").build(_source("vgg_s"), 4, 1)
  trainable = surgery.flatten(setup.optimizer.trainable)
  assert "cwl/conv1_1" in trainable and "conv1_1/conv/kernel" in trainable
  assert "fc6/kernel" not in trainable  # the target drops the source's hidden dense layers
  assert all(trainable.values())


def test_lowconv_lr_multiplier():
  lr = 1e-2
  _, before, after = _one_step("finetune_lowconv", "vgg_s", lr)
  # Adam's first step moves each weight with a nonzero gradient by lr * mult (up to eps).
  conv = np.abs(after["conv3_2/conv/kernel"] - before["conv3_2/conv/kernel"])
  head = np.abs(after["head/kernel"] - before["head/kernel"])
  scale = np.abs(after["cwl/conv3_2"] - before["cwl/conv3_2"])
  assert np.max(conv) == pytest.approx(lr * cwl.LOWCONV_LR_MULT, rel=1e-3)
  assert np.max(head) == pytest.approx(lr, rel=1e-3)
  assert np.max(scale) == pytest.approx(lr, rel=1e-3)
  assert all(not np.array_equal(before[p], after[p]) for p in before)  # nothing frozen


def test_strategies_registered_with_paper_grids():
  assert transfer.get_strategy("freeze_cwl").paper_lrs == transfer.FREEZE_LRS
  assert transfer.get_strategy("finetune_cwl").paper_lrs == transfer.FINETUNE_LRS
  assert not transfer.get_strategy("freeze_cwl").head_only


@pytest.mark.parametrize("arch", ["vgg_s", "resnet_s"])
def test_scales_as_layers_equal_folded_params_in_outputs_taps_and_gradients(arch):
  """apply_model_cwl (output scaling) == apply_model(effective_params) (kernel folding)."""
  m = models.get_model(arch, num_classes=5)
  v = models.init_model(m, jax.random.PRNGKey(0), (28, 28, 1))
  p = cwl.with_scales(v["params"])
  p["cwl"] = {k: jax.random.uniform(jax.random.PRNGKey(i), s.shape, minval=0.2, maxval=2.0)
              for i, (k, s) in enumerate(p["cwl"].items())}
  stats = v.get("batch_stats")
  x = jax.random.normal(jax.random.PRNGKey(3), (4, 28, 28, 1))
  taps = ["last_conv", sorted(p["cwl"])[0]]
  want, _, want_taps = models.apply_model(m, cwl.effective_params(p), stats, x, taps=taps)
  got, _, got_taps = cwl.apply_model_cwl(m, p, stats, x, taps=taps)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  for t in taps:
    np.testing.assert_allclose(got_taps[t], want_taps[t], rtol=1e-5, atol=1e-5)

  def loss(apply, s):
    return jnp.sum(apply({**p, "cwl": s}) ** 2)
  g_want = jax.grad(lambda s: loss(lambda q: models.apply_model(
      m, cwl.effective_params(q), stats, x)[0], s))(p["cwl"])
  g_got = jax.grad(lambda s: loss(lambda q: cwl.apply_model_cwl(m, q, stats, x)[0], s))(p["cwl"])
  for k in g_want:
    np.testing.assert_allclose(g_got[k], g_want[k], rtol=1e-4, atol=1e-5)
