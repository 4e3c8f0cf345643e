"""Registered models: shapes, param counts (published figures), taps, truncation, configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery
from jtransfer.errors import InputError

PUBLISHED = {"vgg16": 138_357_544, "resnet50": 25_557_032, "resnet18": 11_689_512,
             "resnet101": 44_549_160, "alexnet": 61_100_840}


def _abstract_init(model, shape):
  return jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0), shape))


@pytest.mark.parametrize("arch", sorted(PUBLISHED))
def test_full_size_param_counts_match_torchvision(arch):
  variables = _abstract_init(models.get_model(arch, 1000), (224, 224, 3))
  assert surgery.count(variables["params"]) == PUBLISHED[arch]


@pytest.mark.parametrize("arch,count", [("vgg_s", 649_962), ("resnet_s", 696_042)])
def test_small_models_shapes_and_counts(arch, count):
  model = models.get_model(arch, 10)
  variables = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert surgery.count(variables["params"]) == count
  x = jnp.ones((3, 28, 28, 1))
  logits, stats, taps = models.apply_model(model, variables["params"],
                                           variables.get("batch_stats"), x,
                                           taps=("last_conv", "features"))
  assert logits.shape == (3, 10)
  assert taps["features"].shape[0] == 3 and taps["last_conv"].ndim == 4


def test_resnet_s_taps_name_units_and_blocks():
  taps = models.available_taps(models.get_model("resnet_s", 5), (28, 28, 1))
  assert taps["stem"] == (1, 14, 14, 32)
  assert taps["stage1/block1"] == (1, 14, 14, 32)
  assert taps["stage3/block1/conv2"] == (1, 4, 4, 128)
  assert taps["last_conv"] == (1, 4, 4, 128) and taps["features"] == (1, 128)


def test_unit_tap_is_raw_conv_output_before_bn():
  model = models.get_model("resnet_s", 5)
  v = models.init_model(model, jax.random.PRNGKey(1), (28, 28, 1))
  x = jax.random.normal(jax.random.PRNGKey(2), (2, 28, 28, 1))
  _, _, taps = models.apply_model(model, v["params"], v["batch_stats"], x, taps=("stem",))
  k = v["params"]["stem"]["conv"]["kernel"]
  ref = jax.lax.conv_general_dilated(x, k, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(taps["stem"], ref, rtol=1e-5, atol=1e-5)


def test_unknown_tap_lists_available():
  model = models.get_model("vgg_s", 5)
  v = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  with pytest.raises(InputError, match="unknown tap.*nope.*available"):
    models.apply_model(model, v["params"], None, jnp.ones((1, 28, 28, 1)), taps=("nope",))


def test_registry_errors_and_config_round_trip():
  with pytest.raises(InputError, match="unknown arch 'resnet7'"):
    models.get_model("resnet7", 10)
  with pytest.raises(InputError, match="does not take config"):
    models.get_model("vgg_s", 10, no_such_field=1)
  model = models.get_model("resnet_s", 7, stage_widths=(16, 32, 64))
  cfg = models.model_config(model)
  assert cfg["stage_widths"] == [16, 32, 64]
  assert models.from_config("resnet_s", cfg) == model


@pytest.mark.parametrize("arch,cut,width", [("vgg_s", "conv2_1", 64),
                                            ("resnet_s", "stage2/block0", 64),
                                            ("resnet_s", "stem", 32)])
def test_truncation_pools_the_cut_map(arch, cut, width):
  model = models.get_model(arch, 4, truncate_after=cut)
  v = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  assert v["params"]["head"]["kernel"].shape == (width, 4)
  assert cut in surgery.conv_units(v["params"]) or any(
      p.startswith(cut + "/") for p in surgery.conv_units(v["params"]))


def test_truncation_unknown_layer_is_named():
  model = models.get_model("vgg_s", 4, truncate_after="conv9_9")
  with pytest.raises(InputError, match="truncate_after 'conv9_9' is not a layer"):
    models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))


def test_adaptive_avg_pool_matches_torch_cells():
  from jtransfer.models.common import adaptive_avg_pool
  x = np.arange(2 * 5 * 3 * 1, dtype=np.float32).reshape(2, 5, 3, 1)
  out = np.asarray(adaptive_avg_pool(jnp.asarray(x), (3, 2)))
  # torch cells: rows [0,2),[1,4),[3,5); cols [0,2),[1,3)
  rows, cols = [(0, 2), (1, 4), (3, 5)], [(0, 2), (1, 3)]
  for i, (r0, r1) in enumerate(rows):
    for j, (c0, c1) in enumerate(cols):
      np.testing.assert_allclose(out[:, i, j, 0], x[:, r0:r1, c0:c1, 0].mean(axis=(1, 2)))


def _numpy_max_pool(x, g, kernel, stride, padding):
  """Max pool and its gradient by loops: each window's gradient goes to its first maximum."""
  n, h, w, c = x.shape
  xp = np.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
              constant_values=-np.inf)
  oh, ow = (h + 2 * padding - kernel) // stride + 1, (w + 2 * padding - kernel) // stride + 1
  out = np.empty((n, oh, ow, c), x.dtype)
  dxp = np.zeros(xp.shape, x.dtype)
  for b in range(n):
    for i in range(oh):
      for j in range(ow):
        for ch in range(c):
          win = xp[b, i * stride:i * stride + kernel, j * stride:j * stride + kernel, ch]
          a = np.argmax(win)  # first maximum in row-major order
          out[b, i, j, ch] = win.flat[a]
          dxp[b, i * stride + a // kernel, j * stride + a % kernel, ch] += g[b, i, j, ch]
  return out, dxp[:, padding:padding + h, padding:padding + w]


@pytest.mark.parametrize("shape,kernel,stride,padding",
                         [((2, 6, 6, 3), 2, 2, 0), ((2, 7, 5, 2), 2, 2, 0),
                          ((2, 9, 9, 2), 3, 2, 1), ((1, 8, 7, 2), 3, 2, 0)])
def test_max_pool_values_and_first_max_gradient_with_ties(shape, kernel, stride, padding):
  from jtransfer.models.common import max_pool
  rng = np.random.default_rng(0)
  x = rng.integers(-1, 2, shape).astype(np.float32)  # three values: most windows have ties
  out = np.asarray(max_pool(jnp.asarray(x), kernel, stride, padding))
  g = rng.normal(size=out.shape).astype(np.float32)
  want_out, want_dx = _numpy_max_pool(x, g, kernel, stride, padding)
  dx = jax.grad(lambda x: (max_pool(x, kernel, stride, padding) * g).sum())(jnp.asarray(x))
  np.testing.assert_array_equal(out, want_out)
  np.testing.assert_allclose(np.asarray(dx), want_dx, atol=1e-6)
  # the same as Flax's select_and_scatter pooling, which it replaces
  from jtransfer.models.common import max_pool_reduce_window
  ref = jax.grad(lambda x: (max_pool_reduce_window(x, kernel, stride, padding) * g).sum())
  np.testing.assert_allclose(np.asarray(dx), np.asarray(ref(jnp.asarray(x))), atol=1e-6)


def test_max_pool_rejects_bad_input():
  from jtransfer.models.common import max_pool
  with pytest.raises(ValueError, match="NHWC"):
    max_pool(jnp.zeros((4, 4, 3)), 2, 2)
  with pytest.raises(ValueError, match="kernel 5"):
    max_pool(jnp.zeros((1, 3, 3, 1)), 5, 1)
