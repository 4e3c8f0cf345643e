"""Helpers shared by the DELTA tests: a tiny random source with non-trivial BN running
statistics, eval-mode setups built once, and uint8 images."""
from __future__ import annotations

import functools

import jax
import numpy as np

from jtransfer import models, surgery
from jtransfer.methods import delta, transfer

SHAPE = (8, 8, 1)


@functools.lru_cache(maxsize=None)
def tiny_source(arch="resnet_s", classes=2, seed=0) -> transfer.Source:
  """A tiny random source with non-trivial BN running stats (so eval and train modes differ).

  Variables are drawn in numpy from the init's shapes: compiling Flax's random init costs
  seconds. With 2 classes and no hidden dense layer the source is the same Flax model as its
  2-class target, so `init_target` compiles one init per arch.
  """
  config = (dict(stage_sizes=(1, 1), stage_widths=(4, 8), stem_width=4) if arch == "resnet_s"
            else dict(conv_widths=((4, 4), (8,)), dense_widths=()))
  model = models.get_model(arch, classes, **config)
  shapes = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0), SHAPE))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    n = rng.normal(size=leaf.shape)
    if path.endswith("kernel"):
      return n * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    if path.endswith(("scale", "var")):
      return 1.0 + 0.3 * np.abs(n)
    return 0.1 * n

  variables = {k: surgery.map_with_path(lambda p, v: draw(p, v).astype(np.float32), v)
               for k, v in shapes.items()}
  return transfer.Source(arch, models.model_config(model), variables, SHAPE, (0.4,), (0.3,))


EVAL_BN = delta.Config(bn_train=False, att_head_min_steps=20)


@functools.lru_cache(maxsize=None)
def eval_setup(kind):
  """Setups with BN in eval mode, shared by tests (each build compiles)."""
  return delta.build_setup(tiny_source(), 2, 10, kind, config=EVAL_BN)


def uint8_images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)
