"""DELTA's losses: the regularisers (L2, L2-SP, feature-map and attention-weighted distances),
the tapped layers, the frozen source's maps, and the `loss_fn` of the generic train step.

The formulas follow the authors' code (see `jtransfer.methods.delta` for the recipe).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models, surgery
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import delta_tokens, transfer
from jtransfer.methods.delta_config import FROZEN_KEY, Config
from jtransfer.models import mobilenet
from jtransfer.train import evaluate


# ----------------------------------------------------------------------------- regularisers
def l2(params) -> jax.Array:
  """0.5 * sum of squares of every leaf (SGD weight decay wd is the gradient of wd * this)."""
  return 0.5 * sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params))


def starting_point(source_params, target_params, exclude: Sequence[str] = ("head/.*",)) -> dict:
  """w0: the source values of every target param the source initialised.

  Params matching `exclude` (the new head) and the per-run constants under 'frozen' are left
  out; BN running statistics live in 'batch_stats', never in params, so they are excluded by
  construction. What remains (conv kernels and biases, BN scale and bias) is what L2-SP pulls
  back to the source.
  """
  net = _network(target_params)
  dropped = set(surgery.select(net, exclude, what="L2-SP exclude"))
  keep, _ = surgery.split(net, surgery.map_with_path(lambda p, _: p not in dropped, net))
  return surgery.restrict_to(source_params, keep)


def private_subtree(params, w0) -> dict:
  """The target's own params, those not in the source's starting point w0: the new head."""
  have = set(surgery.paths(w0))
  own, _ = surgery.split(_network(params),
                         surgery.map_with_path(lambda p, _: p not in have, _network(params)))
  return own


def private_l2(params, w0) -> jax.Array:
  """0.5 * ||w||^2 over the params the source does not have (the paper's Omega'')."""
  return l2(private_subtree(params, w0))


def l2sp(params, w0) -> jax.Array:
  """L2-SP: 0.5 * sum over the paths of w0 of ||w - w0||^2 (w0 under stop_gradient)."""
  flat, ref = surgery.flatten(params), surgery.flatten(w0)
  missing = [p for p in ref if p not in flat]
  if missing:
    raise InputError(f"L2-SP starting point has params the target lacks: {missing[:4]}")
  return 0.5 * sum(jnp.sum(jnp.square(flat[p] - jax.lax.stop_gradient(ref[p]))) for p in ref)


def feature_distance(target_maps: Mapping[str, jax.Array], source_maps: Mapping[str, jax.Array]
                     ) -> jax.Array:
  """DELTA w/o ATT: 0.5 * sum over layers of ||FM_t - FM_s||^2 (no C, no H*W, batch summed)."""
  _check_maps(target_maps, source_maps)
  return sum(0.5 * jnp.sum(jnp.square(target_maps[k] - jax.lax.stop_gradient(source_maps[k])))
             for k in target_maps)


def attention_distance(target_maps: Mapping[str, jax.Array], source_maps: Mapping[str, jax.Array],
                       weights: Mapping[str, jax.Array]) -> jax.Array:
  """DELTA: sum_l 0.5 * sum_{b,c} C * w_c * ||FM_t[b,:,:,c] - FM_s[b,:,:,c]||^2 / (H*W).

  Maps are NHWC; `weights[l]` has one entry per channel of layer l (they sum to 1, so C * w_c
  is 1 on average). A transformer's token maps (N, T, C) take T for H*W
  (`delta_tokens`): the sum and the division run over every axis between batch and channel.
  """
  _check_maps(target_maps, source_maps)
  total = 0.0
  for k, t in target_maps.items():
    c, inner = t.shape[-1], tuple(range(1, t.ndim - 1))
    wk = jax.lax.stop_gradient(jnp.asarray(weights[k]))
    if wk.shape != (c,):
      raise InputError(f"attention weights of {k!r} have shape {wk.shape}, expected ({c},)")
    per_channel = jnp.sum(jnp.square(t - jax.lax.stop_gradient(source_maps[k])), axis=inner)
    positions = int(np.prod([t.shape[a] for a in inner]))
    total = total + 0.5 * jnp.sum(c * wk * per_channel / positions)
  return total


def _check_maps(target_maps, source_maps) -> None:
  if set(target_maps) != set(source_maps):
    raise InputError(f"target taps {sorted(target_maps)} differ from source taps "
                     f"{sorted(source_maps)}")
  for k in target_maps:
    if target_maps[k].shape != source_maps[k].shape:
      raise InputError(f"tap {k!r}: target {target_maps[k].shape} vs source "
                       f"{source_maps[k].shape}")


def source_maps(model, source_params, source_stats, x: jax.Array, taps: Sequence[str]) -> dict:
  """Tapped maps of the frozen source (eval mode, running BN stats) under stop_gradient."""
  _, _, maps = models.apply_model(model, source_params, source_stats, x, taps=tuple(taps))
  return jax.lax.stop_gradient(maps)


def _network(params) -> dict:
  """params without the per-run constants."""
  return {k: v for k, v in params.items() if k != FROZEN_KEY}


# ----------------------------------------------------------------------------- taps
def default_taps(arch: str, config: Mapping[str, Any]) -> tuple[str, ...]:
  """The last conv of the last block of each ResNet stage, the last conv of each VGG stage, or
  for MobileNet / EfficientNet the unit before each stride-2 block and the final 1x1 `top`.

  ResNet-50: stage{1..4}/block{2,3,5,2}/conv3 (torchvision layer1.2 ... layer4.2 conv3).
  ViT and Swin: block outputs, `delta_tokens.default_taps`.
  """
  from jtransfer.models import convnext, densenet
  if delta_tokens.is_token_model(config):
    return delta_tokens.default_taps(config)
  for family in (densenet, convnext):
    if family.is_config(config):
      return family.delta_taps(config)
  if "stage_sizes" in config:
    last = "conv3" if config.get("block") == "bottleneck" else "conv2"
    return tuple(f"stage{s}/block{n - 1}/{last}"
                 for s, n in enumerate(config["stage_sizes"], start=1))
  if "conv_widths" in config:
    return tuple(f"conv{s}_{len(ws)}" for s, ws in enumerate(config["conv_widths"], start=1))
  if mobilenet.is_config(config):  # the unit before each stride-2 block, and `top`
    return tuple(mobilenet.stage_ends(config))
  if "mixed_5" in config:  # Inception-V3: see inception.default_taps
    from jtransfer.models import inception
    return inception.default_taps(config)
  raise InputError(f"no default DELTA taps for arch {arch!r}; pass taps= (conv unit names)")


def resolve_taps(source: transfer.Source, model, config: Config) -> tuple[str, ...]:
  """Configured or default taps, checked against the conv units (a transformer's blocks) the
  target model has."""
  params = jax.eval_shape(
      lambda: models.init_model(model, jax.random.PRNGKey(0), source.input_shape))["params"]
  units = set(delta_tokens.block_names(params) if delta_tokens.is_token_model(source.config)
              else surgery.conv_units(params))
  configured = config.taps.get(source.arch)
  # A truncated model lacks the later stages: their default taps are dropped.
  taps = (tuple(configured) if configured else
          tuple(t for t in default_taps(source.arch, source.config) if t in units))
  bad = [t for t in taps if t not in units]
  if bad or not taps:
    raise InputError(f"DELTA taps {list(bad or taps)} are not conv units (blocks) of this "
                     f"{source.arch}; expected names from {sorted(units)}")
  return taps


KINDS = ("l2", "l2sp", "fm", "att")


@functools.lru_cache(maxsize=16)
def _maps_fn(model, mean: tuple, std: tuple, taps: tuple) -> Callable:
  """Jitted source maps of uint8 images, shared by every setup of the model."""
  return jax.jit(lambda params, stats, images: source_maps(
      model, params, stats, normalize(images, mean, std), taps))


class SourceMaps:
  """The frozen source's tapped maps, live or looked up from a run's training images.

  The source is frozen, in eval mode, and the pipeline has no augmentation, so the maps of a
  training image never change: `table` computes them once per run (a per-run constant kept in
  params['frozen']) and `__call__` gathers them by image instead of running the source
  forward each step. A batch holding any image not in the table (matched exactly, pixel for
  pixel) takes the live forward instead, so the numbers are those of the live forward always.
  """

  def __init__(self, model, source: transfer.Source, params, stats, taps: Sequence[str],
               budget_mb: float):
    self.taps, self.budget = tuple(taps), budget_mb * 2 ** 20
    self.params = jax.tree.map(jnp.asarray, params)
    self.stats = jax.tree.map(jnp.asarray, stats)
    self.live = lambda x: source_maps(model, self.params, self.stats, x, self.taps)
    shapes = jax.eval_shape(self.live, jnp.zeros((1, *source.input_shape)))
    self.floats_per_image = sum(int(np.prod(v.shape)) for v in shapes.values())
    # Images are matched by a random projection, then checked pixel for pixel.
    self.proj = np.random.default_rng(0).normal(
        size=(int(np.prod(source.input_shape)), 8)).astype(np.float32)
    self._maps = _maps_fn(model, tuple(source.mean), tuple(source.std), self.taps)

  def keys(self, images):
    """(N, 8) projections of uint8 images (numpy or traced)."""
    return (images.reshape(images.shape[0], -1).astype(np.float32) / 255.0) @ self.proj

  def table(self, images: np.ndarray) -> Optional[dict]:
    """{'images', 'keys', 'maps'} for `images`, or None when over the memory budget."""
    if len(images) * self.floats_per_image * 4 > self.budget:
      return None
    maps = [self._maps(self.params, self.stats, images[i:i + 256])
            for i in range(0, len(images), 256)]
    return {"images": np.asarray(images), "keys": np.asarray(self.keys(images)),
            "maps": {t: np.concatenate([np.asarray(m[t]) for m in maps]) for t in self.taps}}

  def __call__(self, table: Optional[dict], images, x) -> dict:
    if table is None:
      return self.live(x)
    d = jnp.sum(jnp.square(self.keys(images)[:, None] - table["keys"][None]), axis=-1)
    idx = jnp.argmin(d, axis=1)
    exact = jnp.all(table["images"][idx] == images)
    return jax.lax.stop_gradient(jax.lax.cond(
        exact, lambda: {t: table["maps"][t][idx] for t in self.taps}, lambda: self.live(x)))


def make_loss_fn(model, source: transfer.Source, kind: str, w0, taps: Sequence[str],
                 config: Config, source_fn: Optional[SourceMaps] = None) -> Callable:
  """loss_fn for the generic train step: CE (+ alpha * Omega + beta * 0.5 ||head||^2).

  Args:
    model: the target model.
    source: the source (its BN running stats feed the frozen source forward).
    kind: 'l2' (CE only; weight decay is in the optimizer), 'l2sp', 'fm' (DELTA w/o ATT) or
      'att' (DELTA; reads params['frozen']['attention']).
    w0: the starting point (`starting_point`), closed over as constants.
    taps: conv units whose raw outputs are regularised.
    config: alpha (alpha_noatt for 'fm'), beta, bn_train.
    source_fn: the source maps ('fm', 'att'); built from `source` and `w0` when not given.
      It reads params['frozen']['source'] (a `SourceMaps.table`) when there is one.
  """
  if kind not in KINDS:
    raise InputError(f"DELTA loss kind {kind!r}: expected one of {', '.join(KINDS)}")
  w0 = jax.tree.map(jnp.asarray, w0)
  mean, std, taps = source.mean, source.std, tuple(taps)
  feature_kind = kind in ("fm", "att")
  alpha = (config.alpha_noatt if kind == "fm" and config.alpha_noatt is not None
           else config.alpha)
  if feature_kind and source_fn is None:
    source_fn = _source_maps_for(model, source, w0, taps, config)

  def loss_fn(params, batch_stats, batch, rng):
    net = _network(params)
    x = normalize(batch["image"], mean, std)
    logits, new_stats, maps = models.apply_model(
        model, net, batch_stats, x, train=config.bn_train,
        taps=taps if feature_kind else None, rng=rng)
    ce = evaluate.cross_entropy(logits, batch["label"])
    terms = {"ce": ce}
    if kind == "l2":
      return ce, (terms, new_stats)
    if kind == "l2sp":
      reg = l2sp(net, w0)
    else:
      src = source_fn(params.get(FROZEN_KEY, {}).get("source"), batch["image"], x)
      reg = (feature_distance(maps, src) if kind == "fm" else
             attention_distance(maps, src, params[FROZEN_KEY]["attention"]))
    head = private_l2(net, w0)
    terms.update(reg=reg, head=head)
    return ce + alpha * reg + config.beta * head, (terms, new_stats)

  return loss_fn


def _source_maps_for(model, source: transfer.Source, w0, taps, config: Config) -> SourceMaps:
  # The source forward runs the full model, so it needs the target's own layers (the head,
  # at its seed-0 init); their output is unused and compiled away. init_target loads the
  # source's running BN stats: they are the frozen source's statistics.
  params, stats = transfer.init_target(source, model, 0)
  full = surgery.combine(w0, private_subtree(params, w0))
  return SourceMaps(model, source, full, stats, taps, config.source_cache_mb)
