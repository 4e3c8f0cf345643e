"""scikit-learn's bundled 8x8 digits, upsampled to the source resolution.

Digits has no official split: a fixed stratified half (seed 0, independent of the run seed) is
the test split, so every repeat and every k is measured on the same test images.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from jtransfer.data.base import Dataset, ImageSet

CLASS_NAMES = tuple(str(d) for d in range(10))


def _upsample(images8: np.ndarray, size: int) -> np.ndarray:
  # sklearn digits are 0..16; map to 0..255 before bilinear resizing.
  scaled = np.clip(np.round(images8 * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  out = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR))
                  for im in scaled])
  return out[..., None]


def load_digits(image_size: int = 28, test_fraction: float = 0.5) -> Dataset:
  """Loads sklearn digits as uint8 (N, size, size, 1) with a fixed stratified test split."""
  from sklearn.datasets import load_digits as sk_load
  raw = sk_load()
  images = _upsample(raw.images, image_size)
  labels = raw.target.astype(np.int32)
  rng = np.random.default_rng(0)
  test = np.zeros(len(labels), bool)
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    test[idx[:int(round(len(idx) * test_fraction))]] = True
  return Dataset("digits", ImageSet(images[~test], labels[~test], CLASS_NAMES),
                 ImageSet(images[test], labels[test], CLASS_NAMES))
