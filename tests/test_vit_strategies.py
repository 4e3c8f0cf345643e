"""Every few-shot strategy of issue 30's item 3 on a tiny ViT and a tiny Swin (docs/transformers.md
lists which test covers what): the setup builds, initialises from the run's images, and its
train step and eval forward trace to the right shapes (default suite: traced, not compiled,
since one compile of a step costs about a minute on the shared CPU; five cases by default, the
rest slow); behind -m slow, two real steps each with finite losses. Selection scores on both families' features and token grids."""
import jax
import numpy as np
import pytest

from jtransfer import models, scoring, surgery
from jtransfer.methods import selection, transfer
from jtransfer.train import init_state, make_train_step
from model_helpers import random_variables

CASES = {
    "vit": ("vit_s28", dict(dim=16, depth=2, heads=2, patch_size=4, pos_grid=(3, 3)),
            (12, 12, 1)),
    "swin": ("swin_t", dict(patch_size=2, dim=16, depths=(2,), heads=(2,), window=2),
             (8, 8, 3)),
}
# Item 3's strategies (PEFT, VPT, pruning and DELTA with attention have their own tests).
STRATEGIES = ("freeze", "finetune", "finetune_bn", "l2", "l2sp", "l2fe", "bitfit", "lpft",
              "wise_ft", "bss", "cotuning", "freeze_cwl", "finetune_cwl", "finetune_lowconv",
              "freeze_film", "delta_noatt")
# Strategies whose init runs the source on the images (probe heads, source features,
# co-tuning's relationship): compiled even when traced, so the default suite skips them.
_INIT_COMPILES = ("lpft", "wise_ft", "cotuning", "l2fe", "delta_noatt")


def _source(case):
  arch, config, shape = CASES[case]
  model = models.get_model(arch, 4, **config)
  channels = shape[-1]
  return transfer.Source(arch, models.model_config(model), random_variables(model, shape),
                         shape, (0.5,) * channels, (0.25,) * channels)


def _batch(shape):
  images = np.random.default_rng(0).integers(0, 256, (6, *shape), dtype=np.uint8)
  return {"image": images, "label": np.array([0, 1, 2, 0, 1, 2], np.int32)}


def _setup(case, name):
  source = _source(case)
  batch = _batch(source.input_shape)
  setup = transfer.get_strategy(name).build(source, 3, 4)
  params, stats = setup.init(0, batch["image"], batch["label"])
  return setup, params, stats, batch


# Traced in the default suite: a few cases no other default test covers on a transformer;
# the rest behind -m slow (6-20 s each at load ~15, the whole set ~150 s).
_DEFAULT = {("vit", "l2"), ("vit", "bss"), ("vit", "finetune_lowconv"), ("swin", "freeze"),
            ("swin", "freeze_cwl")}


@pytest.mark.parametrize("case,name", [
    pytest.param(c, n, marks=() if (c, n) in _DEFAULT else pytest.mark.slow)
    for c in sorted(CASES) for n in STRATEGIES if n not in _INIT_COMPILES])
def test_strategy_traces_on_transformers(case, name):
  """Build, init, then the train step and the eval forward traced (`jax.eval_shape`): the
  params keep their shapes, the logits are (batch, classes), something trains."""
  setup, params, stats, batch = _setup(case, name)
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state = init_state(params, stats, setup.optimizer, 0, 1e-3)
  new_state, metrics = jax.eval_shape(step, state, batch)
  assert jax.tree.map(np.shape, new_state.params) == jax.tree.map(np.shape, state.params)
  assert metrics["finite"].shape == ()
  logits = jax.eval_shape(setup.forward, params, stats, batch["image"])
  assert logits.shape == (6, 3)
  assert any(jax.tree.leaves(setup.optimizer.trainable))


@pytest.mark.slow  # about a minute per (family, strategy) on the shared 2-core CPU
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_trains_on_transformers(case, name):
  """Two real steps: finite, the trained leaves moved, the eval forward gives finite logits
  (and WiSE-FT's / the others' finalize, when the strategy has one, keeps the tree)."""
  setup, params, stats, batch = _setup(case, name)
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state = init_state(params, stats, setup.optimizer, 0, 1e-2)
  for _ in range(2):
    state, metrics = step(state, batch)
  assert bool(metrics["finite"])
  trained = surgery.flatten(setup.optimizer.trainable)
  before, after = surgery.flatten(params), surgery.flatten(state.params)
  assert any(trained[p] and not np.allclose(before[p], after[p]) for p in before)
  kept = state.params if setup.finalize is None else setup.finalize(state.params, params)
  assert jax.tree.map(np.shape, kept) == jax.tree.map(np.shape, params)
  logits = setup.forward(kept, state.batch_stats, batch["image"])
  assert logits.shape == (6, 3) and np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_selection_scores_on_transformer_features(case):
  """LogME, H-score, TransRate, SFDA on the pooled features, LEEP and NCE on the source head's
  logits, S1..S6 on the normed token grid (`last_conv`, what `selection.LAST_CONV_OUTPUT`
  reads on a transformer): every score finite."""
  source = _source(case)
  x = np.random.default_rng(1).normal(size=(12, *source.input_shape)).astype(np.float32)
  labels = np.arange(12) % 3
  logits, taps = jax.jit(lambda p, x: selection.apply_with_taps(
      source.model, p, None, x, [selection.LAST_CONV_OUTPUT, "features"]))(
          source.variables["params"], x)
  grid = taps[selection.LAST_CONV_OUTPUT]
  assert grid.ndim == 4 and grid.shape[-1] == taps["features"].shape[-1]
  scores = scoring.score_outputs(labels, np.asarray(grid), np.asarray(taps["features"]),
                                 np.asarray(logits))
  assert set(scores) >= set(selection.METRIC_NAMES) | {"LogME", "H-score", "TransRate", "SFDA",
                                                       "LEEP", "NCE"}
  assert all(np.isfinite(v) for v in scores.values()), scores
