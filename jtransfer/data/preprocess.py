"""Normalisation applied inside the jitted step: uint8 in, float32 (x - mean) / std out."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
  """Per-channel mean and std of uint8 images in [0, 1] units (stored with a source model)."""
  x = images.astype(np.float64) / 255.0
  return x.mean(axis=(0, 1, 2)).tolist(), x.std(axis=(0, 1, 2)).tolist()


def normalize(images, mean: Sequence[float], std: Sequence[float]):
  """(images / 255 - mean) / std as float32; works on numpy or jax arrays."""
  x = jnp.asarray(images).astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
