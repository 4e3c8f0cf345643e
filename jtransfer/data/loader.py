"""A numpy batch iterator whose batch is a pure function of (seed, step): resumable exactly."""
from __future__ import annotations

import numpy as np


class Batches:
  """Shuffled epochs over (images, labels); `at(step)` returns the batch of a given step.

  Each epoch is a fresh permutation drawn from (seed, epoch); batches never straddle epochs
  (the last partial batch of an epoch is dropped when the set is larger than a batch, and a set
  smaller than a batch is used whole every step).

  It batches any arrays (uint8 pixels, pre-normalised float images, cached features): the pixel
  check (`jtransfer.checks.check_pixels`) belongs to the entry points that read raw images
  (`Setup.init`, a setup's forward, `jtransfer.api.fit`), not to the iterator.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int):
    if len(labels) == 0:
      raise ValueError("Batches: empty dataset")
    self.images, self.labels, self.seed = images, labels, seed
    self.batch_size = min(batch_size, len(labels))
    self.steps_per_epoch = max(1, len(labels) // self.batch_size)
    self._cache: tuple[int, np.ndarray] | None = None

  def _perm(self, epoch: int) -> np.ndarray:
    if self._cache is None or self._cache[0] != epoch:
      rng = np.random.default_rng([self.seed, epoch])
      self._cache = (epoch, rng.permutation(len(self.labels)))
    return self._cache[1]

  def at(self, step: int) -> dict[str, np.ndarray]:
    epoch, i = divmod(step, self.steps_per_epoch)
    idx = self._perm(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
    return {"image": self.images[idx], "label": self.labels[idx]}
