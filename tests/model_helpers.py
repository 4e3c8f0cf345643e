"""Helpers shared by the model, method and study tests: random variables without Flax's jitted
init, a tiny few-shot run on a random source of any architecture, and a poisoned test split."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models, surgery


def random_variables(model, shape, seed: int = 0, gain: float = 1.0) -> dict:
  """Random weights (gain x normal / sqrt(fan in)) and BN running variances in [0.5, 2], drawn
  in numpy on `jax.eval_shape`'s shapes: compiling Flax's random init costs seconds per model."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if path.endswith("var"):
      return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 4
    return (gain * rng.normal(size=a.shape) / np.sqrt(fan_in)).astype(np.float32)

  return {k: surgery.map_with_path(fill, t) for k, t in shapes.items()}


def small_variables(model, rng, shape) -> dict:
  """`models.init_model`'s signature without compiling Flax's initialisers: weights 0.1 x
  normal, BN running variances 1 (tests where only shapes and finite values matter)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
  gen = np.random.default_rng(0)
  fill = lambda p, a: (np.ones(a.shape, np.float32) if p.endswith("var") else
                       (0.1 * gen.normal(size=a.shape)).astype(np.float32))
  return {k: surgery.map_with_path(fill, t) for k, t in shapes.items()}


def tiny_fewshot_run(tmp_path, arch: str, config: dict, strategies: str, target: str,
                     classes: int = 3, mean=(0.3,), std=(0.3,),
                     extra_args: tuple[str, ...] = ()) -> list[dict]:
  """`experiments.fewshot` (1 shot, 2 steps) from a random 28x28x1 source of `arch` with
  `config`; returns the evaluation records, each checked 'ok' and of `arch`."""
  from experiments import fewshot
  from jtransfer.methods import transfer
  shape = (28, 28, 1)
  model = models.get_model(arch, classes, **config)
  source = transfer.Source(arch, models.model_config(model), random_variables(model, shape),
                           shape, tuple(mean), tuple(std), {"source_spec": "random"})
  transfer.save_source(str(tmp_path / "src"), source)
  out = tmp_path / "out"
  argv = ["--arch", arch, "--source", f"ckpt:{tmp_path / 'src'}", "--target", target,
          "--strategies", strategies, "--out", str(out), "--shots", "1", "--repeats", "1",
          "--steps", "2", "--test-per-class", "2", "--val-per-class", "1", "--lrs", "0.001",
          "--quiet", *extra_args]
  assert fewshot.main(argv) == 0
  from jtransfer.study.records import rows
  records = [r for r in rows(json.loads((out / "results.json").read_text()))
             if r["role"] == "eval"]
  assert records and all(r["status"] == "ok" and r["arch"] == arch for r in records)
  return records


def poison_test_split(monkeypatch) -> None:
  """Replaces every target's test split (`jtransfer.study.target.cap_per_class`) by random
  images with permuted labels, so a study whose choices read no test image chooses the same
  with and without it."""
  from jtransfer.data.base import ImageSet
  from jtransfer.study import target
  original = target.cap_per_class

  def poisoned(s, n):
    t = original(s, n)
    rng = np.random.default_rng(1)
    return ImageSet(rng.integers(0, 256, t.images.shape, dtype=np.uint8),
                    rng.permutation(t.labels), t.class_names)

  monkeypatch.setattr(target, "cap_per_class", poisoned)
