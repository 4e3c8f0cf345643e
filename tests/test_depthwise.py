"""Depthwise convolutions as shifted sums (models.common.depthwise_conv): the same function,
gradients, params and models as XLA's grouped convolution, which it replaces on the CPU."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models
from jtransfer.methods.distill import COMPACT_CONFIGS
from jtransfer.models import common


def _grouped(x, kernel, stride, padding):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1])


@pytest.mark.parametrize("k,stride,padding,hw", [
    (3, 1, ((1, 1), (1, 1)), (9, 9)), (3, 2, ((1, 1), (1, 1)), (9, 8)),
    (5, 2, ((2, 2), (2, 2)), (11, 10)), (7, 1, ((3, 3), (3, 3)), (8, 8)),
    (3, 2, ((0, 1), (1, 0)), (7, 7)), (3, 1, ((0, 0), (0, 0)), (5, 6)),
])
def test_shifted_sums_equal_the_grouped_conv_and_its_gradients(k, stride, padding, hw):
  g = np.random.default_rng(k + stride)
  x = jnp.asarray(g.normal(size=(3, *hw, 6)), jnp.float32)
  kernel = jnp.asarray(g.normal(size=(k, k, 1, 6)), jnp.float32)
  want = _grouped(x, kernel, stride, padding)
  got = common.depthwise_conv(x, kernel, stride, padding)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(g.normal(size=want.shape), jnp.float32)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w, stride, padding) * cot)
  for a, b in zip(jax.grad(loss(common.depthwise_conv), (0, 1))(x, kernel),
                  jax.grad(loss(_grouped), (0, 1))(x, kernel)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_bfloat16_inputs_accumulate_in_float32():
  g = np.random.default_rng(0)
  x = jnp.asarray(g.normal(size=(2, 8, 8, 4)), jnp.bfloat16)
  kernel = jnp.asarray(g.normal(size=(7, 7, 1, 4)), jnp.bfloat16)
  pad = ((3, 3), (3, 3))
  got = common.depthwise_conv(x, kernel, 1, pad)
  assert got.dtype == jnp.bfloat16
  want = _grouped(x.astype(jnp.float32), kernel.astype(jnp.float32), 1, pad)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_module_params_and_init_equal_nn_conv():
  """Same param names, shapes and initial values as the nn.Conv it stands in for."""
  x = jnp.ones((1, 6, 6, 5))
  dw = common.DepthwiseConv(5, (3, 3), (2, 2), ((1, 1), (1, 1)), use_bias=True)
  ref = nn.Conv(5, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=5,
                kernel_init=common.conv_init)
  key = jax.random.PRNGKey(3)
  a, b = dw.init(key, x), ref.init(key, x)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  np.testing.assert_allclose(dw.apply(a, x), ref.apply(b, x), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="input channels"):
    dw.init(key, jnp.ones((1, 6, 6, 4)))


@pytest.mark.parametrize("arch,config,shape", [
    # Whole models behind -m slow (25 s for mobilenet_v2): the layer tests above cover every
    # depthwise shape.
    pytest.param("mobilenet_v2", COMPACT_CONFIGS["mobilenet_v2"], (28, 28, 1),
                 marks=pytest.mark.slow),
    pytest.param("efficientnet_b0", COMPACT_CONFIGS["efficientnet_b0"], (28, 28, 1),
                 marks=pytest.mark.slow),
    pytest.param("mobilenet_v3_small", COMPACT_CONFIGS["mobilenet_v3_small"], (28, 28, 1),
                 marks=pytest.mark.slow),
    pytest.param("convnext_tiny", {"stage_sizes": (1, 1, 1, 1), "stage_widths": (8, 16, 24, 32)},
                 (32, 32, 3), marks=pytest.mark.slow),
])
def test_models_equal_under_both_implementations(arch, config, shape, monkeypatch):
  model = models.get_model(arch, 7, **config)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *shape)), jnp.float32)
  outs = {}
  for impl in ("conv", "shift"):
    monkeypatch.setattr(common, "DEPTHWISE_IMPL", impl)
    v = models.init_model(model, jax.random.PRNGKey(0), shape)
    outs[impl] = (v, models.apply_model(model, v["params"], v.get("batch_stats", {}), x,
                                        train=True)[0])
  jax.tree.map(np.testing.assert_array_equal, outs["conv"][0], outs["shift"][0])
  np.testing.assert_allclose(outs["shift"][1], outs["conv"][1], rtol=1e-4, atol=1e-4)


def test_auto_uses_shifts_on_cpu_only_for_depthwise(monkeypatch):
  monkeypatch.setattr(common, "DEPTHWISE_IMPL", "auto")
  assert common.use_shifted_depthwise() == (jax.default_backend() == "cpu")
  # a grouped conv that is not depthwise (ResNeXt) keeps nn.Conv: no DepthwiseConv is built
  monkeypatch.setattr(common, "DEPTHWISE_IMPL", "shift")
  unit = common.ConvUnit(8, 3, 1, 1, groups=4)
  v = unit.init(jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 8)))
  assert v["params"]["conv"]["kernel"].shape == (3, 3, 2, 8)
  monkeypatch.setattr(common, "DEPTHWISE_IMPL", "fast")
  with pytest.raises(ValueError, match="DEPTHWISE_IMPL"):
    common.use_shifted_depthwise()
