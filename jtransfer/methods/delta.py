"""DELTA (Li et al., ICLR 2019) and its baselines L2, L2-SP, L2-FE: regularisers and strategies.

Faithful to the authors' PyTorch code (github.com/lixingjian/DELTA, train.py, channel_eval.py):
  * every strategy but L2 minimises CE + alpha * Omega + beta * 0.5 * ||head||^2, with no
    weight decay; L2 is plain SGD with weight decay 1e-4 on every parameter;
  * Omega: L2-SP `0.5 * ||w - w0||^2` over every source-initialised parameter (BN scale and
    bias included; BN running stats are not parameters; the new head is excluded);
    DELTA w/o ATT `0.5 * sum_l ||FM_t - FM_s||^2`; DELTA
    `sum_l 0.5 * sum_{b,c} C * w_c * ||FM_t[b,c] - FM_s[b,c]||^2 / (H*W)` (summed over the
    batch, not averaged);
  * FM = the raw conv output (before BN) of the last conv of the last block of each stage;
    source maps come from the frozen source (running BN stats) under stop_gradient;
  * attention w (one vector per tapped layer): a linear head trained on frozen source features
    (L2-FE), then per channel the CE increase when that channel's kernel slice is zeroed,
    averaged over a few training batches, z-scored (ddof=0), softmax(z / 5); BatchNorm as
    channel_eval.py by default (Config.att_bn 'authors': the head trains with the backbone in
    train mode, whose passes move the running statistics to the target images; the ablation
    runs in eval mode with those statistics);
  * SGD momentum 0.9; lr decays x0.1 at 67% of training, exponentially (explr, default) or in
    one step (steplr); the target trains with BN in train mode (batch statistics), as
    `model.train()` does in the authors' code.

Strategies registered here: 'l2fe', 'l2', 'l2sp', 'delta_noatt', 'delta'. The attention weights
are per-run constants in params['frozen']['attention'], computed in `Setup.init` from that run's
training images only, and cached per (source, images, labels). `configure()` (or the
JTRANSFER_DELTA_ALPHA / _BETA / _SCHEDULE environment variables) overrides the defaults.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models, surgery
from jtransfer.data import Batches
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.models import mobilenet
from jtransfer.train import evaluate, optim, schedules

FROZEN_KEY = "frozen"  # top-level params key of per-run constants (never trained)
SCHEDULES = ("exp", "step", "constant")
# BatchNorm during the attention probe (Config.att_bn); see `AttentionComputer`.
ATT_BN_MODES = ("authors", "eval", "train")


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class Config:
  """Hyper-parameters of the DELTA family (defaults: the paper and the authors' code).

  Attributes:
    alpha: weight of Omega (0.01; the authors use 0.1 on Stanford Dogs; the paper picks it
      per experiment by 5-fold cross-validation).
    alpha_noatt: alpha of DELTA w/o ATT when set (None: `alpha`). Its plain sum over batch,
      positions and channels is about H*W times DELTA's per-element weight, so the same alpha
      makes it far stiffer (at lr 0.01 it diverges on the small nets here).
    beta: weight of 0.5 * ||head||^2.
    weight_decay: the L2 baseline's SGD weight decay.
    schedule: 'exp' (lr x exp(log 0.1 / D) per epoch), 'step' (x0.1 at D) or 'constant',
      with D = int(decay_fraction * epochs) + 1 as the authors.
    decay_fraction: where the lr reaches x0.1 (0.67: 6000 of 9000 iterations).
    steps_per_epoch: train steps per epoch for the schedules (1: a k-shot set fits a batch).
    momentum: SGD momentum.
    bn_train: the target's BN uses batch statistics while training (the authors' code).
    taps: arch -> tapped conv-unit names, overriding `default_taps`.
    temperature: softmax temperature of the attention.
    att_batch_size, att_batches: the attention averages over at most this many batches.
    att_head_epochs, att_head_min_steps: the L2-FE probe trains this many epochs (SGD lr
      0.01, momentum 0.9, weight decay 1e-4, x0.1 at 60%), but at least this many steps: on a
      k-shot set an epoch is one step, and 10 steps leave the head at its random init.
    att_max_images: channels ablated per vectorised call times batch size stays below this
      (the suffix after a tap runs on that many images at once).
    att_max_mb: and (channels per call) x (batch size) x (the tap's map, bytes per image)
      stays below this many MB: the ablation's memory follows the suffix's activations, which
      grow with the map (resnet50 at 224 px, 4 images: 17.0 GB peak at 4096 images per call,
      docs/decisions.md, "DELTA"), so this bound, not the image count, keeps large inputs in memory.
    att_probe_loop: run the 'authors' probe step by step even when every batch holds all the
      images (the closed form of `_probe_one_batch` gives the same result in 2 forwards).
    att_bn: BatchNorm in the attention probe (no effect on models without BN):
      'authors' (default), as the authors' channel_eval.py: the L2-FE head trains with the
        backbone in train mode (`model.train()`: features from each probe batch's own
        statistics, and those forward passes update the running statistics, torch momentum
        0.1), then the channel ablation runs in eval mode (`model.eval()` in feature_weight)
        with the running statistics so updated on the target images;
      'eval': source running statistics throughout (probe features and ablation);
      'train': batch statistics throughout: the probe as 'authors', and each ablation forward
        normalises with its own attention batch's statistics (batches are not padded then).
    source_cache_mb: the source maps of a run's training images are computed once and looked
      up in the loss when they fit in this many MB (0: a live source forward every step).
  """
  alpha: float = 0.01
  alpha_noatt: Optional[float] = None
  beta: float = 0.01
  weight_decay: float = 1e-4
  schedule: str = "exp"
  decay_fraction: float = 0.67
  steps_per_epoch: int = 1
  momentum: float = 0.9
  bn_train: bool = True
  taps: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  temperature: float = 5.0
  att_batch_size: int = 32
  att_batches: int = 4
  att_head_epochs: int = 10
  att_head_min_steps: int = 200
  att_max_images: int = 4096
  att_max_mb: float = 512.0
  att_probe_loop: bool = False
  att_bn: str = "authors"
  source_cache_mb: float = 256.0

  def validate(self) -> "Config":
    weights = {"alpha": self.alpha, "alpha_noatt": self.alpha_noatt, "beta": self.beta,
               "weight_decay": self.weight_decay}
    for name, value in weights.items():
      if value is not None and not value >= 0:
        raise InputError(f"DELTA {name} must be a number >= 0, got {value!r}")
    if self.schedule not in SCHEDULES:
      raise InputError(f"DELTA schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if not 0 < self.decay_fraction <= 1:
      raise InputError(f"DELTA decay_fraction must be in (0, 1], got {self.decay_fraction}")
    if self.att_bn not in ATT_BN_MODES:
      raise InputError(f"DELTA att_bn {self.att_bn!r}: expected one of {', '.join(ATT_BN_MODES)}")
    if self.temperature <= 0:
      raise InputError(f"DELTA temperature must be > 0, got {self.temperature}")
    for name in ("steps_per_epoch", "att_batch_size", "att_batches", "att_head_epochs",
                 "att_max_images"):
      if int(getattr(self, name)) < 1:
        raise InputError(f"DELTA {name} must be an integer >= 1, got {getattr(self, name)}")
    if not self.att_max_mb > 0:
      raise InputError(f"DELTA att_max_mb must be > 0, got {self.att_max_mb}")
    return self


def _from_env() -> Config:
  env = {}
  for field, cast in (("alpha", float), ("beta", float), ("schedule", str)):
    value = os.environ.get(f"JTRANSFER_DELTA_{field.upper()}")
    if value is not None:
      try:
        env[field] = cast(value)
      except ValueError:
        raise InputError(f"JTRANSFER_DELTA_{field.upper()}={value!r} is not a number") from None
  return Config(**env).validate()


_CONFIG = _from_env()


def configure(**changes: Any) -> Config:
  """Changes the module defaults used by the registered strategies; returns the old Config.

  Example: `old = delta.configure(alpha=0.1, schedule='step')`, later `delta.set_config(old)`.
  Strategies read the config when a Setup is built.
  """
  global _CONFIG
  unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(Config)})
  if unknown:
    raise InputError(f"delta.configure: unknown option(s) {unknown}")
  old, _CONFIG = _CONFIG, dataclasses.replace(_CONFIG, **changes).validate()
  return old


def set_config(config: Config) -> None:
  """Restores a Config returned by `configure`."""
  global _CONFIG
  _CONFIG = config.validate()


def get_config() -> Config:
  return _CONFIG


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
  is 1 on average).
  """
  _check_maps(target_maps, source_maps)
  total = 0.0
  for k, t in target_maps.items():
    _, h, w, c = t.shape
    wk = jax.lax.stop_gradient(jnp.asarray(weights[k]))
    if wk.shape != (c,):
      raise InputError(f"attention weights of {k!r} have shape {wk.shape}, expected ({c},)")
    per_channel = jnp.sum(jnp.square(t - jax.lax.stop_gradient(source_maps[k])), axis=(1, 2))
    total = total + 0.5 * jnp.sum(c * wk * per_channel / (h * w))
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
  """
  from jtransfer.models import convnext, densenet
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
  """Configured or default taps, checked against the conv units the target model has."""
  units = set(surgery.conv_units(jax.eval_shape(
      lambda: models.init_model(model, jax.random.PRNGKey(0), source.input_shape))["params"]))
  configured = config.taps.get(source.arch)
  # A truncated model lacks the later stages: their default taps are dropped.
  taps = (tuple(configured) if configured else
          tuple(t for t in default_taps(source.arch, source.config) if t in units))
  bad = [t for t in taps if t not in units]
  if bad or not taps:
    raise InputError(f"DELTA taps {list(bad or taps)} are not conv units of this "
                     f"{source.arch}; expected names from {sorted(units)}")
  return taps


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
def ablation_fn(model, tap: str, bn_train: bool = False) -> Callable:
  """Jitted `(params, stats, x, labels, weights, masks (M, C)) -> (M,)` CE increases.

  Row m of `masks` multiplies the output channels of `tap`'s conv kernel (0 = the channel
  ablated: its kernel slice zeroed, as channel_eval.py does). The M ablated forwards are one
  vmapped call whose prefix, up to the tap's conv output, runs once (`_ablate_output`); the
  cost per channel is one forward of the suffix after the tap (bench/bench_delta.py measures
  it). Cached per (model, tap, BN mode): one compile serves every run. With `bn_train`, BN
  normalises every forward (base and ablated) with the batch's own statistics (and
  `weights` should be all 1: padding would enter the statistics).
  """
  def ce_of(params, stats, x, labels, weights):
    logits, _, _ = models.apply_model(model, params, stats, x, train=bn_train)
    return _weighted_ce(logits, labels, weights)

  @jax.jit
  def fn(params, stats, x, labels, weights, masks):
    base = ce_of(params, stats, x, labels, weights)
    bias = surgery.flatten(params).get(f"{tap}/conv/bias")

    def ablated(mask):
      with nn.intercept_methods(_ablate_output(tap, mask, bias)):
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


def tap_map_bytes(model, params, stats, image_shape: Sequence[int],
                  taps: Sequence[str]) -> dict[str, int]:
  """float32 bytes of each tap's map for one image (shapes only: nothing is computed)."""
  maps = jax.eval_shape(lambda x: models.apply_model(model, params, stats, x, taps=taps)[2],
                        jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  return {t: int(np.prod(maps[t].shape)) * 4 for t in taps}


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
    taps: conv unit names; the kernel `<tap>/conv/kernel` of each is ablated channel by channel.
    temperature: softmax temperature.
    max_images: bound on (channels per call) x (batch size).
    max_mb: bound on (channels per call) x (batch size) x (the tap's map, bytes per image).
    bn_train: BN uses each batch's statistics (pass unpadded batches) instead of `stats`.

  Returns:
    tap -> float32 (C,) weights summing to 1.
  """
  flat = surgery.flatten(params)
  for tap in taps:
    if f"{tap}/conv/kernel" not in flat:
      raise InputError(f"DELTA tap {tap!r} has no kernel {tap}/conv/kernel")
  sizes = tap_map_bytes(model, params, stats, batches[0][0].shape[1:], taps)
  out = {}
  for tap in taps:
    fn, channels = ablation_fn(model, tap, bool(bn_train)), flat[f"{tap}/conv/kernel"].shape[-1]
    map_bytes = sizes[tap]
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


# ----------------------------------------------------------------------------- strategies
KINDS = ("l2", "l2sp", "fm", "att")


def lr_schedule(config: Config, total_steps: int) -> optim.Schedule:
  """The unit-lr schedule (the run's lr multiplies it): x0.1 at `decay_fraction` of training."""
  epochs = max(1, total_steps // config.steps_per_epoch)
  decay_epochs = int(config.decay_fraction * epochs) + 1
  if config.schedule == "exp":
    return schedules.exponential_per_epoch(1.0, config.steps_per_epoch, decay_epochs)
  if config.schedule == "step":
    return schedules.milestones(1.0, [decay_epochs * config.steps_per_epoch])
  return schedules.constant(1.0)


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


@functools.lru_cache(maxsize=16)
def _eval_forward(model, mean: tuple, std: tuple) -> Callable:
  return transfer.eval_forward(model, mean, std)


def _forward(model, source: transfer.Source) -> Callable:
  """Eval forward without the per-run constants, so every setup of the model (and every run,
  whatever its constants' shapes) shares one compiled function per input shape."""
  jitted = _eval_forward(model, tuple(source.mean), tuple(source.std))
  return lambda params, batch_stats, images: jitted(_network(params), batch_stats, images)


def build_setup(source: transfer.Source, num_classes: int, total_steps: int, kind: str,
                config: Optional[Config] = None) -> transfer.Setup:
  """A Setup for 'l2', 'l2sp', 'fm' (DELTA w/o ATT) or 'att' (DELTA) with `config`.

  `init(seed, images, labels)` loads the source, seeds the head and, for 'att' and 'fm', puts
  the run's constants under params['frozen'] (never trained): 'attention' (computed from the
  run's training images only) and 'source' (their source maps, see `SourceMaps`).
  """
  config = (config or _CONFIG).validate()
  if kind in ("fm", "att"):  # L2 and L2-SP need no feature maps
    models.attention.refuse_transformer(source.config, source.arch, "DELTA's feature-map taps")
  model = transfer.target_model(source, num_classes)
  params, _ = transfer.init_target(source, model, 0)
  w0 = starting_point(source.variables["params"], params)
  taps = resolve_taps(source, model, config) if kind in ("fm", "att") else ()
  sgd = optim.sgd(lr_schedule(config, total_steps), momentum=config.momentum,
                  weight_decay=config.weight_decay if kind == "l2" else 0.0)
  source_fn = _source_maps_for(model, source, w0, taps, config) if taps else None
  attention = AttentionComputer(source, model, taps, config) if kind == "att" else None

  def init(seed, images, labels):
    p, stats = transfer.init_target(source, model, seed)
    frozen = {}
    if attention is not None:
      frozen["attention"] = attention(images, labels)
    table = source_fn.table(images) if source_fn is not None else None
    if table is not None:
      frozen["source"] = table
    return (dict(p, **{FROZEN_KEY: frozen}) if frozen else p), stats

  rules = [(".*", "all")]
  if taps:
    # Every path the per-run constants can have, so the 'frozen' rule matches; their shapes
    # depend on the run and do not matter to the labels.
    rules.insert(0, (f"{FROZEN_KEY}/.*", optim.FROZEN))
    frozen = {"source": {"images": np.zeros(0, np.uint8), "keys": np.zeros(0, np.float32),
                         "maps": {t: np.zeros(0, np.float32) for t in taps}}}
    if attention is not None:
      frozen["attention"] = {t: np.zeros(0, np.float32) for t in taps}
    params = dict(params, **{FROZEN_KEY: frozen})
  optimizer = optim.make_optimizer(params, rules, {"all": sgd}, injected_lr=True)
  loss_fn = make_loss_fn(model, source, kind, w0, taps, config, source_fn)
  return transfer.Setup(model, init, optimizer, loss_fn, _forward(model, source))


def build_l2fe(source: transfer.Source, num_classes: int, total_steps: int,
               config: Optional[Config] = None) -> transfer.Setup:
  """L2-FE: frozen source features (BN running stats), a linear head trained by SGD with
  CE + beta * 0.5 * ||head||^2, the beta term as coupled weight decay (the same gradient)."""
  config = (config or _CONFIG).validate()
  sgd = optim.sgd(lr_schedule(config, total_steps), momentum=config.momentum,
                  weight_decay=config.beta)
  return transfer.rule_setup(source, num_classes, [("head/.*", "head"), (".*", optim.FROZEN)],
                             {"head": sgd})


PAPER_LRS = (0.01,)  # ResNet-101 in the paper and the authors' run.sh
# alpha grids chosen on validation (the paper picks alpha by 5-fold cross-validation). DELTA w/o
# ATT sums its distance over positions and channels without DELTA's per-channel weights, about
# H*W times stiffer at the same alpha, so its grid sits lower (at 0.01 it diverges at lr 0.01).
ALPHAS = (1e-3, 1e-2, 1e-1)
ALPHAS_NOATT = (1e-5, 1e-4, 1e-3)
CV_FOLDS = 5


def _build(kind: str):
  def build(source, num_classes, total_steps, alpha=None):
    if kind == "l2":
      return build_setup(source, num_classes, total_steps, kind, _CONFIG)
    alpha = _alpha_default(kind) if alpha is None else float(alpha)
    config = dataclasses.replace(_CONFIG, **{"alpha_noatt" if kind == "fm" else "alpha": alpha})
    return build_setup(source, num_classes, total_steps, kind, config)
  return build


def _alpha_default(kind: str) -> float:
  if kind == "fm":
    return _CONFIG.alpha_noatt if _CONFIG.alpha_noatt is not None else ALPHAS_NOATT[1]
  return _CONFIG.alpha


transfer.register(transfer.Strategy(
    "l2fe", PAPER_LRS, build_l2fe, head_only=True,
    description="L2-FE: frozen features, linear head, SGD, beta * 0.5 ||head||^2"))
transfer.register(transfer.Strategy(
    "l2", PAPER_LRS, _build("l2"),
    description="L2: all layers, SGD weight decay 1e-4, BN batch stats"))
transfer.register(transfer.Strategy(
    "l2sp", PAPER_LRS, _build("l2sp"), knobs={"alpha": ALPHAS},
    knob_defaults={"alpha": _alpha_default("l2sp")}, cv_folds=CV_FOLDS,
    description="L2-SP: CE + alpha 0.5||w - w0||^2 + beta 0.5||head||^2, SGD"))
transfer.register(transfer.Strategy(
    "delta_noatt", PAPER_LRS, _build("fm"), knobs={"alpha": ALPHAS_NOATT},
    knob_defaults={"alpha": _alpha_default("fm")}, cv_folds=CV_FOLDS,
    description="DELTA w/o ATT: CE + alpha 0.5 sum ||FM_t - FM_s||^2 + beta head term, SGD"))
transfer.register(transfer.Strategy(
    "delta", PAPER_LRS, _build("att"), knobs={"alpha": ALPHAS},
    knob_defaults={"alpha": _alpha_default("att")}, cv_folds=CV_FOLDS,
    description="DELTA: attention-weighted feature-map distance + beta head term, SGD"))
