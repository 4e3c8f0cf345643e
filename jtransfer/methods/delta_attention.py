"""DELTA's attention: per tapped channel, how much the target loss rises when that channel is
ablated, through a linear probe trained on the frozen source (L2-FE), z-scored and softmaxed.

`AttentionComputer` computes it per run from that run's training images only and caches it per
(source, images, labels); BatchNorm follows `Config.att_bn` (see `jtransfer.methods.delta`).
"""
from __future__ import annotations

import functools
import hashlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models, surgery
from jtransfer.data import Batches
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import delta_tokens, transfer
from jtransfer.methods.delta_config import Config
from jtransfer.methods.delta_loss import l2
from jtransfer.train import evaluate


# ----------------------------------------------------------------------------- attention
def attention_from_losses(increase: np.ndarray, temperature: float = 5.0) -> np.ndarray:
  """softmax(zscore(increase) / temperature), z-score with ddof=0 (uniform if all equal)."""
  d = np.asarray(increase, np.float64)
  std = d.std()
  z = (d - d.mean()) / std if std > 0 else np.zeros_like(d)
  e = np.exp(z / temperature - np.max(z / temperature))
  return (e / e.sum()).astype(np.float32)


def _weighted_ce(logits, labels, weights):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
  return jnp.sum(ce * weights) / jnp.sum(weights)


def _ablate_output(tap: str, mask: jax.Array, bias: Optional[jax.Array]):
  """A Flax method interceptor zeroing the kernel slices of `tap`'s conv where mask is 0.

  Zeroing output channel j's kernel slice leaves that channel's conv output at its bias (0
  without one) and changes nothing before the layer, so the ablation is applied to the conv's
  output instead: `y * mask + bias * (1 - mask)`. Under `jax.vmap` over masks, the network up
  to and including this conv then does not depend on the mask and runs once; only the rest
  (the suffix) runs once per ablated channel.
  """
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (context.method_name != "__call__" or not isinstance(module, nn.Conv)
        or module.path[-1] != "conv" or "/".join(module.path[:-1]) != tap):
      return out
    m = mask.astype(out.dtype)
    kept = out * m
    return kept if bias is None else kept + bias.astype(out.dtype) * (1 - m)
  return interceptor


@functools.lru_cache(maxsize=64)
def ablation_fn(model, tap: str, bn_train: bool = False, tokens: bool = False) -> Callable:
  """Jitted `(params, stats, x, labels, weights, masks (M, C)) -> (M,)` CE increases.

  Row m of `masks` multiplies the output channels of `tap`'s conv kernel (0 = the channel
  ablated: its kernel slice zeroed, as channel_eval.py does). The M ablated forwards are one
  vmapped call whose prefix, up to the tap's conv output, runs once (`_ablate_output`); the
  cost per channel is one forward of the suffix after the tap (bench/bench_delta.py measures
  it). Cached per (model, tap, BN mode): one compile serves every run. With `bn_train`, BN
  normalises every forward (base and ablated) with the batch's own statistics (and
  `weights` should be all 1: padding would enter the statistics). With `tokens` (a ViT or
  Swin), `tap` is a block and channel c of its output is set to 0 at every token instead
  (`delta_tokens.ablate_block_output`).
  """
  def ce_of(params, stats, x, labels, weights):
    logits, _, _ = models.apply_model(model, params, stats, x, train=bn_train)
    return _weighted_ce(logits, labels, weights)

  @jax.jit
  def fn(params, stats, x, labels, weights, masks):
    base = ce_of(params, stats, x, labels, weights)
    bias = surgery.flatten(params).get(f"{tap}/conv/bias")

    def ablated(mask):
      ablate = (delta_tokens.ablate_block_output(tap, mask) if tokens
                else _ablate_output(tap, mask, bias))
      with nn.intercept_methods(ablate):
        return ce_of(params, stats, x, labels, weights)

    return jax.vmap(ablated)(masks) - base

  return fn


def channel_chunk(channels: int, batch: int, max_images: int, map_bytes: int = 0,
                  max_mb: float = float("inf")) -> int:
  """Channels per vectorised ablation call: (chunk x batch) <= max_images and
  (chunk x batch x map_bytes) <= max_mb MB, split evenly.

  Equal chunks (the last one padded) keep one compiled shape per tap; choosing the chunk as
  ceil(C / calls) rather than the largest that fits keeps the padding under one chunk
  (C=256, room for 204: two calls of 128, not 204 + 52 real and 152 wasted).
  """
  images = max_images
  if map_bytes > 0 and np.isfinite(max_mb):
    images = min(images, int(max_mb * 2 ** 20 // map_bytes))
  room = int(max(1, min(channels, images // max(1, batch))))
  calls = -(-channels // room)
  return -(-channels // calls)


def channel_loss_increase(fn: Callable, params, stats, x, labels, weights, channels: int,
                          max_images: int, map_bytes: int = 0,
                          max_mb: float = float("inf")) -> np.ndarray:
  """CE increase per ablated channel on one batch, in chunks of equal shape (one compile)."""
  chunk = channel_chunk(channels, x.shape[0], max_images, map_bytes, max_mb)
  out = []
  for start in range(0, channels, chunk):
    idx = np.arange(start, start + chunk)
    masks = np.ones((chunk, channels), np.float32)
    valid = idx < channels
    masks[np.flatnonzero(valid), idx[valid]] = 0.0  # padded rows ablate nothing
    out.append(np.asarray(fn(params, stats, x, labels, weights, masks))[valid])
  return np.concatenate(out)


def tap_map_shapes(model, params, stats, image_shape: Sequence[int],
                   taps: Sequence[str]) -> dict[str, tuple[int, ...]]:
  """Each tap's map shape for one image, batch axis included (nothing is computed)."""
  maps = jax.eval_shape(lambda x: models.apply_model(model, params, stats, x, taps=taps)[2],
                        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return {t: tuple(maps[t].shape) for t in taps}


def tap_map_bytes(model, params, stats, image_shape: Sequence[int],
                  taps: Sequence[str]) -> dict[str, int]:
  """float32 bytes of each tap's map for one image (shapes only: nothing is computed)."""
  return {t: int(np.prod(s)) * 4
          for t, s in tap_map_shapes(model, params, stats, image_shape, taps).items()}


def attention_weights(model, params, stats, batches: Sequence[tuple[np.ndarray, np.ndarray,
                                                                    np.ndarray]],
                      taps: Sequence[str], *, temperature: float = 5.0, max_images: int = 4096,
                      max_mb: float = float("inf"),
                      bn_train: bool = False) -> dict[str, np.ndarray]:
  """DELTA's supervised attention per tapped layer.

  Args:
    model: the target model (source backbone + the L2-FE head in `params`).
    params, stats: its variables (running BN stats, used unless `bn_train`).
    batches: (normalised images, labels, per-image weights) triples; weights are 0 on padding.
    taps: conv unit names; the kernel `<tap>/conv/kernel` of each is ablated channel by channel
      (on a ViT or Swin: block names, whose output channels are zeroed one by one).
    temperature: softmax temperature.
    max_images: bound on (channels per call) x (batch size).
    max_mb: bound on (channels per call) x (batch size) x (the tap's map, bytes per image).
    bn_train: BN uses each batch's statistics (pass unpadded batches) instead of `stats`.

  Returns:
    tap -> float32 (C,) weights summing to 1.
  """
  flat = surgery.flatten(params)
  tokens = delta_tokens.is_token_model(models.model_config(model))
  for tap in taps:
    if not tokens and f"{tap}/conv/kernel" not in flat:
      raise InputError(f"DELTA tap {tap!r} has no kernel {tap}/conv/kernel")
  shapes = tap_map_shapes(model, params, stats, batches[0][0].shape[1:], taps)
  out = {}
  for tap in taps:
    fn, channels = ablation_fn(model, tap, bool(bn_train), tokens), shapes[tap][-1]
    map_bytes = int(np.prod(shapes[tap])) * 4
    increase = np.mean([channel_loss_increase(fn, params, stats, x, y, w, channels, max_images,
                                              map_bytes, max_mb)
                        for x, y, w in batches], axis=0)
    out[tap] = attention_from_losses(increase, temperature)
  return out


def _attention_batches(images: np.ndarray, labels: np.ndarray, mean, std, config: Config,
                       pad: bool = True) -> list[tuple]:
  """At most `att_batches` batches of `att_batch_size` training images (seeded order), each
  padded to the full batch size with zero-weight copies so one compiled shape serves all
  (unless not `pad`: with BN in train mode copies would change the batch statistics)."""
  n = len(labels)
  bs = min(config.att_batch_size, n)
  order = np.random.default_rng(0).permutation(n)[:bs * config.att_batches]
  out = []
  for start in range(0, len(order), bs):
    idx = order[start:start + bs]
    pad = bs - len(idx) if pad else 0
    weights = np.concatenate([np.ones(len(idx)), np.zeros(pad)]).astype(np.float32)
    idx = np.concatenate([idx, np.repeat(idx[:1], pad)])
    out.append((normalize(images[idx], mean, std), labels[idx].astype(np.int32), weights))
  return out


@functools.lru_cache(maxsize=8)
def _probe_step(momentum: float, weight_decay: float):
  @jax.jit
  def step(head, velocity, feats, labels, lr):
    def loss(h):
      logits = feats @ h["kernel"] + h["bias"]
      return evaluate.cross_entropy(logits, labels) + weight_decay * l2(h)
    grads = jax.grad(loss)(head)
    velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
    return jax.tree.map(lambda p, v: p - lr * v, head, velocity), velocity
  return step


def train_probe(head, feats: np.ndarray, labels: np.ndarray, config: Config) -> dict:
  """The L2-FE head of the attention (channel_eval.py's train_classifier): SGD lr 0.01,
  momentum 0.9, weight decay 1e-4, batch `att_batch_size`, `att_head_epochs` epochs (at least
  `att_head_min_steps` steps), lr x0.1 at 60% of them, exponentially."""
  step = _probe_step(0.9, 1e-4)
  batches = Batches(feats, labels.astype(np.int32), config.att_batch_size, seed=0)
  total = max(config.att_head_epochs * batches.steps_per_epoch, config.att_head_min_steps)
  head = jax.tree.map(jnp.asarray, head)
  velocity = jax.tree.map(jnp.zeros_like, head)
  for t in range(total):
    b = batches.at(t)
    lr = 0.01 * 0.1 ** (t / (0.6 * total))
    head, velocity = step(head, velocity, b["image"], b["label"], jnp.float32(lr))
  return head


@functools.lru_cache(maxsize=16)
def _train_features_fn(model, mean: tuple, std: tuple) -> Callable:
  @jax.jit
  def features(params, stats, images):
    _, new_stats, t = models.apply_model(model, params, stats, normalize(images, mean, std),
                                         train=True, taps=("features",))
    return t["features"], new_stats
  return features


def train_probe_bn_train(model, params, stats, images: np.ndarray, labels: np.ndarray,
                         mean: tuple, std: tuple, config: Config) -> tuple[dict, Any]:
  """`train_probe` with the frozen backbone in train mode, as channel_eval.py's
  train_classifier (`model.train()` with every non-head parameter frozen): each probe step
  reads features normalised with its own batch's statistics, and each forward updates the BN
  running statistics (Flax momentum 0.9 = torch's 0.1; Flax's running variance takes the
  biased batch variance, torch's the unbiased one). Same batches, steps and SGD as
  `train_probe`.

  Returns:
    (trained head, running BN statistics after the probe's forwards).
  """
  features = _train_features_fn(model, tuple(mean), tuple(std))
  batches = Batches(images, labels.astype(np.int32), config.att_batch_size, seed=0)
  total = max(config.att_head_epochs * batches.steps_per_epoch, config.att_head_min_steps)
  if batches.batch_size == len(labels) and not config.att_probe_loop:
    return _probe_one_batch(features, params, stats, images, labels, total, config)
  step = _probe_step(0.9, 1e-4)
  head = jax.tree.map(jnp.asarray, params["head"])
  velocity = jax.tree.map(jnp.zeros_like, head)
  for t in range(total):
    b = batches.at(t)
    feats, stats = features(params, stats, b["image"])
    lr = 0.01 * 0.1 ** (t / (0.6 * total))
    head, velocity = step(head, velocity, feats, b["label"], jnp.float32(lr))
  return head, stats


def _probe_one_batch(features, params, stats, images, labels, total: int, config: Config):
  """`train_probe_bn_train` when every probe batch holds all the images (few-shot sets).

  Each of the `total` steps then normalises the same image set with the same batch
  statistics, so its features are the same and its running-statistics update is the same
  affine map s -> m * s + (1 - m) * batch_stat. One forward gives the features (the head then
  trains on them as `train_probe` does, same batch order); a second, from stats + 1, gives the
  momentum m of every statistic (its derivative), and the T-fold map is applied in closed
  form: s_T = m^T s_0 + (s_1 - m s_0) (1 - m^T) / (1 - m). Equal to the step-by-step loop up
  to float rounding (tested), at 2 forwards instead of `total`.
  """
  feats, s1 = features(params, stats, images)
  _, shifted = features(params, jax.tree.map(lambda v: v + 1.0, stats), images)

  def closed_form(s0, s1, s1_shifted):
    m = s1_shifted - s1
    mt = m ** total
    gain = jnp.where(m < 1.0, (1.0 - mt) / jnp.where(m < 1.0, 1.0 - m, 1.0), float(total))
    return mt * s0 + (s1 - m * s0) * gain

  stats = jax.tree.map(closed_form, stats, s1, shifted)
  head = train_probe(params["head"], np.asarray(feats), labels, config)
  return head, stats


_ATTENTION_CACHE: dict[str, dict[str, np.ndarray]] = {}
_CACHE_SIZE = 256


def _digest(*arrays) -> str:
  h = hashlib.sha1()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    h.update(str((a.shape, a.dtype.str)).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def source_fingerprint(source: transfer.Source) -> str:
  """A content hash of the source's variables (the attention cache key)."""
  flat = surgery.flatten(source.variables)
  return _digest(*[np.frombuffer(p.encode(), np.uint8) for p in flat], *flat.values())


@functools.lru_cache(maxsize=16)
def _features_fn(model, mean: tuple, std: tuple) -> Callable:
  @jax.jit
  def features(params, stats, images):
    _, _, t = models.apply_model(model, params, stats, normalize(images, mean, std),
                                 taps=("features",))
    return t["features"]
  return features


class AttentionComputer:
  """Computes (and caches) DELTA's attention for one (source, target model, taps).

  BatchNorm follows `Config.att_bn` (default 'authors': probe trained in train mode, which
  moves the running statistics to the target images; ablation in eval mode with them).

  Built once per Setup: the feature extractor, the probe step and the ablation functions are
  compiled once and reused by every run.
  """

  def __init__(self, source: transfer.Source, model, taps: Sequence[str], config: Config):
    self.source, self.model, self.taps, self.config = source, model, tuple(taps), config
    self.params, self.stats = transfer.init_target(source, model, 0)
    self.fingerprint = source_fingerprint(source)
    self._features = _features_fn(model, tuple(source.mean), tuple(source.std))

  def key(self, images: np.ndarray, labels: np.ndarray) -> str:
    c = self.config
    return "|".join([self.fingerprint, _digest(images, labels), str(self.taps),
                     str(jax.tree.leaves(self.params["head"])[0].shape),
                     str((c.temperature, c.att_batch_size, c.att_batches, c.att_head_epochs,
                          c.att_head_min_steps, c.att_bn))])

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    key = self.key(images, labels)
    if key not in _ATTENTION_CACHE:
      mode = self.config.att_bn if self.stats else "eval"    # no BN: the modes coincide
      stats = self.stats
      if mode == "eval":
        feats = evaluate.predict_logits(self._features, self.params, self.stats, images)
        head = train_probe(self.params["head"], feats, labels, self.config)
      else:
        head, stats = train_probe_bn_train(self.model, self.params, self.stats, images, labels,
                                           self.source.mean, self.source.std, self.config)
      params = dict(self.params, head=head)
      batches = _attention_batches(images, labels, self.source.mean, self.source.std,
                                   self.config, pad=mode != "train")
      weights = attention_weights(self.model, params, stats, batches, self.taps,
                                  temperature=self.config.temperature,
                                  max_images=self.config.att_max_images,
                                  max_mb=self.config.att_max_mb,
                                  bn_train=mode == "train")
      if len(_ATTENTION_CACHE) >= _CACHE_SIZE:
        _ATTENTION_CACHE.pop(next(iter(_ATTENTION_CACHE)))
      _ATTENTION_CACHE[key] = weights
    return {k: v.copy() for k, v in _ATTENTION_CACHE[key].items()}
