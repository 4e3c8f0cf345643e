"""Batched, jit-compiled evaluation (running BN statistics, no dropout)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def predict_logits(forward: Callable, params, batch_stats, images: np.ndarray,
                   batch_size: int = 500) -> np.ndarray:
  """Logits of `forward(params, batch_stats, images_batch)` over `images`, in batches.

  The last partial batch is padded to `batch_size`, so one shape compiles once and is reused.
  """
  n = images.shape[0]
  if n == 0:
    raise ValueError("predict_logits: no images")
  bs = min(batch_size, n)
  out = []
  for start in range(0, n, bs):
    chunk = images[start:start + bs]
    pad = bs - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(forward(params, batch_stats, chunk))[:bs - pad])
  return np.concatenate(out)


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy in [0, 1]."""
  return float(np.mean(np.argmax(logits, axis=-1) == labels))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy with integer labels."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1))
