"""FiLM on transformers (`methods/film.py` through `methods/cwl_linear.py`'s units): the fold
equals scaling and shifting the Dense outputs, only FiLM and the head get gradients, the
parameter count is the hand formula, and FiLM with shift 0 is CWL. Tiny ViT and Swin."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery
from jtransfer.data import normalize
from jtransfer.methods import cwl_linear, film, transfer
from model_helpers import random_variables

# (arch, config, input shape): depth 2, width 16, 8-14 px inputs.
CASES = {
    "vit": ("vit_s28", dict(dim=16, depth=2, heads=2, patch_size=4, pos_grid=(3, 3)),
            (12, 12, 1)),
    "swin": ("swin_t", dict(patch_size=2, dim=16, depths=(2,), heads=(2,), window=2),
             (8, 8, 3)),
}


def _source(case):
  arch, config, shape = CASES[case]
  model = models.get_model(arch, 4, **config)
  channels = shape[-1]
  return transfer.Source(arch, models.model_config(model), random_variables(model, shape),
                         shape, (0.5,) * channels, (0.25,) * channels)


def _random_film(params, seed=1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda v: jnp.asarray(rng.normal(1.0, 0.4, v.shape), jnp.float32),
                      film.init_film(params))


@pytest.mark.parametrize("case", sorted(CASES))
def test_fold_equals_scaled_and_shifted_dense_outputs(case):
  """Logits with FiLM folded into kernel and bias equal the unfolded model whose qkv / proj /
  fc1 / fc2 outputs are multiplied by gamma and shifted by beta (a Flax interceptor), to 1e-5;
  the train path (`apply_model_film`) and `effective_params` give the same logits."""
  source = _source(case)
  setup = film.build_freeze_film(source, 3, 10)
  params, stats = setup.init(0)
  rest = {k: v for k, v in params.items() if k != film.FILM_KEY}
  fp = _random_film(rest)
  depth = 2
  assert len(fp["scale"]) == 4 * depth and set(fp["scale"]) == set(fp["shift"])
  x = normalize(np.random.default_rng(2).integers(0, 255, (3, *source.input_shape),
                                                  dtype=np.uint8), source.mean, source.std)

  def layered(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    unit = "/".join(context.module.path)
    if isinstance(context.module, nn.Dense) and unit in fp["scale"]:
      out = out * fp["scale"][unit] + fp["shift"][unit]
    return out

  with nn.intercept_methods(layered):
    want, _, _ = models.apply_model(setup.model, rest, stats, x)
  folded, _, _ = models.apply_model(setup.model, film.apply_film(rest, fp), stats, x)
  np.testing.assert_allclose(folded, want, rtol=1e-5, atol=1e-5)
  used, _, _ = film.apply_model_film(setup.model, {film.FILM_KEY: fp, **rest}, stats, x)
  np.testing.assert_allclose(used, want, rtol=1e-5, atol=1e-5)
  eff, _, _ = models.apply_model(setup.model,
                                 film.effective_params({film.FILM_KEY: fp, **rest}), stats, x)
  np.testing.assert_allclose(eff, want, rtol=1e-5, atol=1e-5)
  plain, _, _ = models.apply_model(setup.model, rest, stats, x)
  assert np.abs(np.asarray(plain) - np.asarray(want)).max() > 1e-3  # FiLM changed something


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradients_reach_film_and_head_only(case):
  """The loss's gradient is nonzero on FiLM's scale and shift and on the head; the optimizer
  trains exactly those leaves: a whole-tree update (`full_tx`) moves them and nothing else."""
  source = _source(case)
  setup = film.build_freeze_film(source, 3, 10)
  params, stats = setup.init(0)
  batch = {"image": np.random.default_rng(3).integers(0, 255, (4, *source.input_shape),
                                                      dtype=np.uint8),
           "label": np.array([0, 1, 2, 0])}
  grads = jax.jit(jax.grad(lambda p: setup.loss_fn(p, stats, batch, None)[0]))(params)
  flat = surgery.flatten(grads)
  trained = {p for p, t in surgery.flatten(setup.optimizer.trainable).items() if t}
  assert trained == {p for p in flat if p.startswith(("film/", "head/"))}
  for path in trained:
    assert np.abs(np.asarray(flat[path])).max() > 0, path
  state = setup.optimizer.full_tx.init(params)
  updates, _ = setup.optimizer.full_tx.update(grads, state, params)
  moved = {p for p, u in surgery.flatten(updates).items() if np.abs(np.asarray(u)).max() > 0}
  assert moved == trained


def _hand_count(case, classes=3):
  """2 x (3d + d + h + d) per block (gamma and beta on qkv, proj, fc1, fc2; h = 4 d), plus the
  head's d x classes + classes, on the final width."""
  arch, config, _ = CASES[case]
  if arch == "swin_t":  # one stage: every block at width dim
    widths = [config["dim"]] * sum(config["depths"])
  else:
    widths = [config["dim"]] * config["depth"]
  film_count = sum(2 * (3 * d + d + 4 * d + d) for d in widths)
  return film_count + widths[-1] * classes + classes


@pytest.mark.parametrize("case", sorted(CASES))
def test_trained_parameter_count_is_the_hand_formula(case):
  """The trained leaves count 2 x 9 d per block plus the head; `peft_cost` agrees and, FiLM
  folding away, reports no extra inference FLOPs."""
  from jtransfer.methods import peft_cost
  source = _source(case)
  setup = film.build_freeze_film(source, 3, 10)
  params, stats = setup.init(0)
  trainable = surgery.flatten(setup.optimizer.trainable)
  count = sum(int(np.size(v)) for p, v in surgery.flatten(params).items() if trainable[p])
  assert count == _hand_count(case) == 2 * 2 * 9 * 16 + 16 * 3 + 3
  cost = peft_cost.peft_cost(setup, params, stats, source.input_shape)
  assert cost.trained_params == count and cost.extra_flops == 0


@pytest.mark.parametrize("case", sorted(CASES))
def test_film_with_zero_shift_is_cwl(case):
  """FiLM whose shifts are zero folds to the same params as CWL with the same scales."""
  source = _source(case)
  params = source.variables["params"]
  fp = _random_film(params)
  fp["shift"] = jax.tree.map(jnp.zeros_like, fp["shift"])
  got = surgery.flatten(film.apply_film(params, fp))
  want = surgery.flatten(cwl_linear.apply_scales(params, fp["scale"]))
  assert got.keys() == want.keys()
  for path in want:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=path)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("strategy", ["freeze_cwl", "finetune_cwl"])
def test_cwl_folds_on_a_transformer_for_its_cost(case, strategy):
  """CWL's scales on the Dense layers fold (`cwl.effective_params`, as `peft_cost` deploys a
  run): kernel[:, k] and bias[k] times sigma_k, checked by hand, and no extra inference FLOPs.
  (The study runner records every run's cost: a transformer's CWL run once stopped here.)"""
  from jtransfer.methods import cwl, peft_cost
  source = _source(case)
  setup = transfer.get_strategy(strategy).build(source, 3, 10)
  params, stats = setup.init(0)
  rng = np.random.default_rng(2)
  params = dict(params, cwl={u: jnp.asarray(rng.normal(1.0, 0.3, np.shape(s)), jnp.float32)
                             for u, s in params["cwl"].items()})
  folded = surgery.flatten(cwl.effective_params(params))
  flat = surgery.flatten({k: v for k, v in params.items() if k != "cwl"})
  assert folded.keys() == flat.keys()
  for path, value in flat.items():
    unit, _, name = path.rpartition("/")
    sigma = params["cwl"].get(unit)
    want = np.asarray(value) * np.asarray(sigma) if sigma is not None and name in (
        "kernel", "bias") else np.asarray(value)
    np.testing.assert_allclose(np.asarray(folded[path]), want, rtol=1e-6, err_msg=path)
  assert peft_cost.peft_cost(setup, params, stats, source.input_shape).extra_flops == 0
