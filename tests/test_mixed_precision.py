"""Mixed precision: bf16 compute, float32 params and logits, on every registered arch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.train import init_state, make_train_step

# vgg_s behind -m slow (21 s on the suite's cold cache): resnet_s runs the same bf16 path
# through convolutions, dense layers and BatchNorm besides.
CASES = [pytest.param("vgg_s", (28, 28, 1), marks=pytest.mark.slow), ("resnet_s", (28, 28, 1)),
         pytest.param("resnet50", (32, 32, 3), marks=pytest.mark.slow),
         pytest.param("alexnet", (64, 64, 3), marks=pytest.mark.slow)]


@pytest.mark.parametrize("arch,shape", CASES)
def test_bf16_logits_float32_close_to_float32_model(arch, shape):
  m32 = models.get_model(arch, 10)
  m16 = models.get_model(arch, 10, dtype="bfloat16")
  v = models.init_model(m32, jax.random.PRNGKey(0), shape)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, *shape))
  want = models.apply_model(m32, v["params"], v.get("batch_stats"), x)[0]
  got = models.apply_model(m16, v["params"], v.get("batch_stats"), x)[0]
  assert got.dtype == jnp.float32
  scale = float(jnp.abs(want).max())
  assert float(jnp.abs(got - want).max()) < 0.05 * scale  # bf16 keeps 8 bits of mantissa
  hlo = jax.jit(lambda p, s, x: models.apply_model(m16, p, s, x)[0]).lower(
      v["params"], v.get("batch_stats"), x).as_text()
  assert "bf16" in hlo and "convolution" in hlo


def test_bf16_train_step_keeps_float32_params_and_learns():
  model = models.get_model("resnet_s", 5, dtype="bfloat16")
  v = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  source = transfer.Source("resnet_s", models.model_config(model), v, (28, 28, 1), (0.5,),
                           (0.25,))
  setup = transfer.get_strategy("finetune").build(source, 5, 10)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
           "label": (np.arange(16) % 5).astype(np.int32)}
  params, stats = setup.init(0, batch["image"], batch["label"])
  state = init_state(params, stats, setup.optimizer, 0, lr=1e-3)
  step = make_train_step(setup.loss_fn, setup.optimizer)
  losses = []
  for _ in range(8):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_dtype_in_config_round_trips_and_bad_dtype_is_named():
  m = models.get_model("vgg_s", 3, dtype="bfloat16")
  assert models.from_config("vgg_s", models.model_config(m)).dtype == "bfloat16"
  with pytest.raises(InputError, match="dtype 'bf16'"):
    models.get_model("vgg_s", 3, dtype="bf16")
