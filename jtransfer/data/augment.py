"""Training-time augmentation on device, per example, seeded from the train step's rng.

Recipes (`parse`): 'none'; 'flip' (horizontal flip, p = 0.5); 'crop' (resize the shorter side
to `resize` x the input size, then a random crop of the input size: the classic
"Resize(256) + RandomCrop(224)" at 28 px, 32 -> 28); 'rrc' (random-resized crop: area fraction
in `scale`, aspect ratio in `ratio` log-uniform, resized to the input size, as torchvision's
RandomResizedCrop: ten candidate boxes, the first that fits, else the whole image); 'pad'
or 'padN' (zero-pad N pixels on each side, default 4, and crop back to the stored size at a
random whole-pixel offset: torchvision's RandomCrop(size, padding=N), the CIFAR recipe; the
crop is a slice, no resampling); joined with '+' ('crop+flip', 'rrc+flip', 'pad2+flip').

Images may be stored larger than the network's input (`out_hw`), e.g. at 256 px for 224 px
inputs, so crops come from real pixels rather than upsampled inputs: crop boxes are in stored
pixels and every crop is resampled to `out_hw`. 'crop' then resizes the stored shorter side to
`resize` x the input's shorter side before its random crop, and the test-time view
(`center_view`, also the training view of unaugmented runs) is torchvision's
Resize(resize x input) + CenterCrop(input): with stored = input size it is the identity.

Crops are bilinear resamplings of the stored pixels (`jax.image.scale_and_translate`, with
antialiasing when a box is larger than the output, as torchvision's antialiased resize), so a
crop box need not be whole pixels. The rng is the train step's (split per step from the
state's, which checkpoints hold), so a resumed run sees the same stream as an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer.errors import InputError

KINDS = ("none", "crop", "rrc", "pad")
ATTEMPTS = 10  # torchvision's RandomResizedCrop tries ten boxes


@dataclasses.dataclass(frozen=True)
class Recipe:
  """What `augment` does.

  Attributes:
    kind: 'none', 'crop', 'rrc' or 'pad'.
    flip: horizontal flip with probability 0.5.
    resize: 'crop': the shorter side is resized to this multiple of the input size.
    scale: 'rrc': range of the crop's area as a fraction of the image's.
    ratio: 'rrc': range of the crop's aspect ratio (width / height).
    pad: 'pad': zero padding on each side, in stored pixels.
  """
  kind: str = "none"
  flip: bool = False
  resize: float = 32 / 28
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3 / 4, 4 / 3)
  pad: int = 4

  @property
  def active(self) -> bool:
    return self.kind != "none" or self.flip

  def __str__(self) -> str:
    kind = {"none": "", "pad": f"pad{self.pad}"}.get(self.kind, self.kind)
    parts = [p for p in (kind, "flip" if self.flip else "") if p]
    return "+".join(parts) or "none"


def parse(text: str) -> Recipe:
  """'none', 'flip', 'crop', 'rrc' or 'pad[N]', alone or joined with '+flip' -> Recipe.

  Raises:
    InputError: anything else.
  """
  parts = [p.strip() for p in str(text).split("+") if p.strip()]
  pads = [p for p in parts if re.fullmatch(r"pad\d*", p)]
  kinds = [p for p in parts if p in ("crop", "rrc")] + pads
  bad = [p for p in parts if p not in ("crop", "rrc", "flip", "none") and p not in pads]
  if bad or len(kinds) > 1 or not parts or ("none" in parts and len(parts) > 1):
    raise InputError(f"--augment {text!r}: expected none, flip, crop, rrc or pad[N] (N pixels "
                     "of zero padding, default 4), each optionally joined with +flip")
  if pads:
    return Recipe(kind="pad", flip="flip" in parts, pad=int(pads[0][3:] or Recipe.pad))
  return Recipe(kind=kinds[0] if kinds else "none", flip="flip" in parts)


def _view_size(h: int, w: int, out_hw, resize: float) -> tuple[float, float]:
  """The (height, width), in stored pixels, of an out_hw crop after the stored shorter side is
  resized to `resize` x the output's shorter side (Resize(resize * out) then a crop of out)."""
  oh, ow = out_hw
  per_pixel = min(h, w) / (resize * min(oh, ow))  # stored pixels per resized pixel
  return oh * per_pixel, ow * per_pixel


def center_boxes(n: int, h: int, w: int, out_hw, resize: float) -> jax.Array:
  """(n, 4) boxes of the test-time view: Resize(resize x out) + CenterCrop(out).

  With stored = output size that is the whole image (the identity view).
  """
  if (h, w) == tuple(out_hw):
    return jnp.tile(jnp.array([0.0, 0.0, h, w], jnp.float32), (n, 1))
  bh, bw = _view_size(h, w, out_hw, resize)
  return jnp.tile(jnp.array([(h - bh) / 2, (w - bw) / 2, bh, bw], jnp.float32), (n, 1))


def crop_boxes(rng: jax.Array, n: int, h: int, w: int, recipe: Recipe,
               out_hw=None) -> jax.Array:
  """(n, 4) boxes (y0, x0, height, width) in stored-pixel units, one per example.

  `out_hw` is the network's input size (default: the stored size (h, w)).
  """
  out_hw = (h, w) if out_hw is None else tuple(out_hw)
  if recipe.kind == "pad":
    raise InputError("a 'pad' augmentation crops at whole-pixel offsets (pad_crop), not boxes")
  if recipe.kind == "none":
    return center_boxes(n, h, w, out_hw, recipe.resize)
  if recipe.kind == "crop":
    bh, bw = _view_size(h, w, out_hw, recipe.resize)
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


def pad_crop(images: jax.Array, offsets: jax.Array, pad: int) -> jax.Array:
  """Zero-pads each (N, H, W, C) image by `pad` pixels and crops it back to (H, W) with its
  top-left corner at `offsets` (N, 2) (row, col in [0, 2 * pad]); dtype kept."""
  n, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets.astype(jnp.int32))


def _resample(image: jax.Array, box: jax.Array, out_hw) -> jax.Array:
  """The box of one (H, W, C) image resampled (bilinear, antialiased) to (*out_hw, C)."""
  scale = jnp.array([out_hw[0] / box[2], out_hw[1] / box[3]])
  return jax.image.scale_and_translate(image, (*out_hw, image.shape[-1]), (0, 1), scale,
                                       -box[:2] * scale, method="linear", antialias=True)


def _resample_all(x: jax.Array, boxes: jax.Array, out_hw) -> jax.Array:
  return jax.vmap(lambda im, b: _resample(im, b, tuple(out_hw)))(x, boxes)


def augment(images: jax.Array, rng: jax.Array, recipe: Recipe, out_hw=None) -> jax.Array:
  """Augmented float32 copies of (N, H, W, C) images (uint8 or float, values kept in range).

  Args:
    images: the stored images.
    rng: this step's key.
    recipe: what to do.
    out_hw: the network's input (height, width); default the stored size. Without a crop
      recipe the images are brought to it by the test-time view (`center_boxes`).
  """
  x = images.astype(jnp.float32)
  n, h, w = x.shape[:3]
  out_hw = (h, w) if out_hw is None else tuple(int(v) for v in out_hw)
  if not recipe.active and out_hw == (h, w):
    return x
  k_box, k_flip = jax.random.split(rng)
  if recipe.kind == "pad":
    if out_hw != (h, w):
      raise InputError(f"augmentation {recipe}: pads and crops back to the stored size "
                       f"{h}x{w}, so it needs inputs of that size, not {out_hw[0]}x{out_hw[1]}")
    x = pad_crop(x, jax.random.randint(k_box, (n, 2), 0, 2 * recipe.pad + 1), recipe.pad)
  elif recipe.kind != "none" or out_hw != (h, w):
    x = _resample_all(x, crop_boxes(k_box, n, h, w, recipe, out_hw), out_hw)
  if recipe.flip:
    flip = jax.random.bernoulli(k_flip, 0.5, (n,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  return x


@functools.partial(jax.jit, static_argnums=(1, 2))
def _center_view_batch(images: jax.Array, out_hw: tuple[int, int], resize: float) -> jax.Array:
  x = images.astype(jnp.float32)
  n, h, w = x.shape[:3]
  y = _resample_all(x, center_boxes(n, h, w, out_hw, resize), out_hw)
  return jnp.clip(jnp.round(y), 0, 255).astype(jnp.uint8)


def center_view(images: np.ndarray, out_hw, resize: float = Recipe.resize,
                batch_size: int = 256) -> np.ndarray:
  """uint8 (N, H, W, C) stored images -> their test-time views (N, *out_hw, C), uint8.

  Resize(resize x out) + CenterCrop(out), computed in batches of `batch_size` (one compile;
  the last batch is padded). Stored = output size returns the images unchanged.
  """
  out_hw = tuple(int(v) for v in out_hw)
  if tuple(images.shape[1:3]) == out_hw:
    return images
  n = len(images)
  out = np.empty((n, *out_hw, images.shape[-1]), np.uint8)
  bs = max(1, min(batch_size, n))
  for start in range(0, n, bs):
    chunk = images[start:start + bs]
    padded = np.concatenate([chunk, np.repeat(chunk[:1], bs - len(chunk), 0)])
    out[start:start + len(chunk)] = np.asarray(_center_view_batch(padded, out_hw,
                                                                  float(resize)))[:len(chunk)]
  return out


def wrap_loss(loss_fn: Callable, recipe: Recipe, out_hw=None) -> Callable:
  """A loss_fn that augments its batch's images first, with a key split from the step's rng.

  `out_hw`: the network's input size when the batches hold larger stored images.
  """
  if not recipe.active and out_hw is None:
    return loss_fn

  def augmented(params, batch_stats, batch, rng):
    rng = jax.random.PRNGKey(0) if rng is None else rng
    k_aug, k_loss = jax.random.split(rng)
    images = augment(batch["image"], k_aug, recipe, out_hw)
    return loss_fn(params, batch_stats, dict(batch, image=images), k_loss)

  return augmented
