"""Class subsets and stratified, seeded k-shot sampling."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jtransfer.data import stream
from jtransfer.data.base import Dataset, ImageSet
from jtransfer.errors import InputError


def subset_classes(data: Dataset, classes: Sequence[int | str]) -> Dataset:
  """Keeps `classes` (indices or names) and relabels them 0..K-1 in the order given."""
  names = data.class_names
  index = []
  for c in classes:
    if isinstance(c, str) and not c.lstrip("-").isdigit():
      if c not in names:
        raise InputError(f"dataset {data.name!r} has no class {c!r}; classes: {list(names)}")
      index.append(names.index(c))
    else:
      c = int(c)
      if not 0 <= c < len(names):
        raise InputError(f"dataset {data.name!r} has classes 0..{len(names) - 1}, got {c}")
      index.append(c)
  if len(set(index)) != len(index):
    raise InputError(f"class list {list(classes)} repeats a class")
  lookup = np.full(len(names), -1, np.int64)
  lookup[index] = np.arange(len(index))
  new_names = tuple(names[i] for i in index)

  def pick(s: ImageSet) -> ImageSet:
    keep = lookup[s.labels] >= 0
    return ImageSet(stream.take(s.images, keep), lookup[s.labels[keep]].astype(np.int32),
                    new_names)

  return Dataset(data.name, pick(data.train), pick(data.test), data.notes)


def cap_per_class(s: ImageSet, n: int) -> ImageSet:
  """The first `n` images of each class (deterministic, in split order), or all when n <= 0."""
  if n <= 0:
    return s
  keep = np.concatenate([np.flatnonzero(s.labels == c)[:n] for c in range(s.num_classes)])
  return s.take(np.sort(keep))


def sample_kshot(labels: np.ndarray, shots: int, seed: int, *, val_per_class: int = 0,
                 num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Draws `shots` training and `val_per_class` disjoint validation indices per class.

  Args:
    labels: int labels of the pool to sample from.
    shots: images per class for training (k).
    seed: the draw is a pure function of (labels, shots, seed, val_per_class).
    val_per_class: validation images per class, disjoint from the k-shot set; fewer are taken
      when a class has fewer than shots + val_per_class images (never an error).
    num_classes: classes expected (default: max label + 1); each must be present.

  Returns:
    (train_idx, val_idx), sorted by class then draw order.

  Raises:
    InputError: shots < 1, or a class with fewer than `shots` images.
  """
  if shots < 1:
    raise InputError(f"shots must be >= 1, got {shots}")
  num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
  rng = np.random.default_rng(seed)
  train, val = [], []
  for c in range(num_classes):
    idx = np.flatnonzero(labels == c)
    if len(idx) < shots:
      raise InputError(f"k-shot {shots} is larger than class {c}, which has {len(idx)} "
                       "image(s) in the training pool")
    perm = rng.permutation(idx)
    train.append(perm[:shots])
    val.append(perm[shots:shots + val_per_class])
  return np.concatenate(train), np.concatenate(val)
