"""Training-time augmentation on device, per example, seeded from the train step's rng.

Recipes (`parse`): 'none'; 'flip' (horizontal flip, p = 0.5); 'crop' (resize the shorter side
to `resize` x the input size, then a random crop of the input size: the classic
"Resize(256) + RandomCrop(224)" at 28 px, 32 -> 28); 'rrc' (random-resized crop: area fraction
in `scale`, aspect ratio in `ratio` log-uniform, resized to the input size, as torchvision's
RandomResizedCrop: ten candidate boxes, the first that fits, else the whole image); joined with
'+' ('crop+flip', 'rrc+flip').

Crops are bilinear resamplings of the stored pixels (`jax.image.scale_and_translate`), so a
crop box need not be whole pixels. The rng is the train step's (split per step from the
state's, which checkpoints hold), so a resumed run sees the same stream as an uninterrupted one.
At test time the images are used as stored (stored size = input size here: the centre crop of
'Resize + CenterCrop' is the identity).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from jtransfer.errors import InputError

KINDS = ("none", "crop", "rrc")
ATTEMPTS = 10  # torchvision's RandomResizedCrop tries ten boxes


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What `augment` does.

  Attributes:
    kind: 'none', 'crop' or 'rrc'.
    flip: horizontal flip with probability 0.5.
    resize: 'crop': the shorter side is resized to this multiple of the input size.
    scale: 'rrc': range of the crop's area as a fraction of the image's.
    ratio: 'rrc': range of the crop's aspect ratio (width / height).
  """
  kind: str = "none"
  flip: bool = False
  resize: float = 32 / 28
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)

  @property
  def active(self) -> bool:
    return self.kind != "none" or self.flip

  def __str__(self) -> str:
    parts = [p for p in (self.kind if self.kind != "none" else "", "flip" if self.flip else "")
             if p]
    return "+".join(parts) or "none"


def parse(text: str) -> Recipe:
  """'none', 'flip', 'crop', 'rrc', 'crop+flip' or 'rrc+flip' -> Recipe.

  Raises:
    InputError: anything else.
  """
  parts = [p.strip() for p in str(text).split("+") if p.strip()]
  kinds = [p for p in parts if p in ("crop", "rrc")]
  bad = [p for p in parts if p not in ("crop", "rrc", "flip", "none")]
  if bad or len(kinds) > 1 or not parts or ("none" in parts and len(parts) > 1):
    raise InputError(f"--augment {text!r}: expected none, flip, crop, rrc, crop+flip or "
                     "rrc+flip")
  return Recipe(kind=kinds[0] if kinds else "none", flip="flip" in parts)


def crop_boxes(rng: jax.Array, n: int, h: int, w: int, recipe: Recipe) -> jax.Array:
  """(n, 4) boxes (y0, x0, height, width) in stored-pixel units, one per example."""
  if recipe.kind == "none":
    return jnp.tile(jnp.array([0.0, 0.0, h, w], jnp.float32), (n, 1))
  if recipe.kind == "crop":
    f = recipe.resize  # the shorter side resized to resize x the input size
    bh, bw = h / f, w / f
    u = jax.random.uniform(rng, (n, 2))
    return jnp.stack([u[:, 0] * (h - bh), u[:, 1] * (w - bw), jnp.full((n,), bh),
                      jnp.full((n,), bw)], axis=1)
  k_area, k_ratio, k_pos = jax.random.split(rng, 3)
  area = h * w * jax.random.uniform(k_area, (n, ATTEMPTS), minval=recipe.scale[0],
                                    maxval=recipe.scale[1])
  log_r = jax.random.uniform(k_ratio, (n, ATTEMPTS), minval=math.log(recipe.ratio[0]),
                             maxval=math.log(recipe.ratio[1]))
  aspect = jnp.exp(log_r)
  bw, bh = jnp.sqrt(area * aspect), jnp.sqrt(area / aspect)
  fits = (bw <= w) & (bh <= h)
  first = jnp.argmax(fits, axis=1)
  any_fit = fits.any(axis=1)
  pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
  bh = jnp.where(any_fit, pick(bh), float(h))
  bw = jnp.where(any_fit, pick(bw), float(w))
  u = jax.random.uniform(k_pos, (n, 2))
  return jnp.stack([u[:, 0] * (h - bh), u[:, 1] * (w - bw), bh, bw], axis=1)


def _resample(image: jax.Array, box: jax.Array) -> jax.Array:
  """The box of one (H, W, C) image resampled (bilinear) to (H, W, C)."""
  h, w = image.shape[:2]
  scale = jnp.array([h / box[2], w / box[3]])
  return jax.image.scale_and_translate(image, image.shape, (0, 1), scale, -box[:2] * scale,
                                       method="linear", antialias=False)


def augment(images: jax.Array, rng: jax.Array, recipe: Recipe) -> jax.Array:
  """Augmented float32 copies of (N, H, W, C) images (uint8 or float, values kept in range)."""
  x = images.astype(jnp.float32)
  if not recipe.active:
    return x
  n, h, w = x.shape[:3]
  k_box, k_flip = jax.random.split(rng)
  if recipe.kind != "none":
    x = jax.vmap(_resample)(x, crop_boxes(k_box, n, h, w, recipe))
  if recipe.flip:
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  return x


def wrap_loss(loss_fn: Callable, recipe: Recipe) -> Callable:
  """A loss_fn that augments its batch's images first, with a key split from the step's rng."""
  if not recipe.active:
    return loss_fn

  def augmented(params, batch_stats, batch, rng):
    rng = jax.random.PRNGKey(0) if rng is None else rng
    k_aug, k_loss = jax.random.split(rng)
    return loss_fn(params, batch_stats, dict(batch, image=augment(batch["image"], k_aug, recipe)),
                   k_loss)

  return augmented
