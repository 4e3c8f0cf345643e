"""The in-memory dataset types every loader returns.

Images are stored as uint8 NHWC (what image files hold, 4x smaller than float32); conversion to
float and normalisation happen in `jtransfer.data.preprocess` right before the model.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from jtransfer.errors import InputError


@dataclasses.dataclass(frozen=True)
class ImageSet:
  """A labelled set of images.

  Attributes:
    images: uint8 array (N, H, W, C).
    labels: int32 array (N,), values in [0, len(class_names)).
    class_names: one name per label index, in label order.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]

  def __post_init__(self):
    validate_images(self.images, self.labels, len(self.class_names))

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def take(self, index: np.ndarray) -> "ImageSet":
    """Returns the subset at integer `index` (same class names)."""
    from jtransfer.data import stream
    return ImageSet(stream.take(self.images, index), self.labels[index], self.class_names)


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A named dataset with a train and a test split sharing one class list.

  `notes`: sentences about what loading did to the data that a user should know (images
  converted to another size or colour, a split made automatically, files skipped); loaders
  log each one and experiments copy them into their report.
  """
  name: str
  train: ImageSet
  test: ImageSet
  notes: tuple[str, ...] = ()

  def __post_init__(self):
    if self.train.class_names != self.test.class_names:
      raise InputError(f"dataset {self.name!r}: train and test splits have different class lists")
    if self.train.images.shape[1:] != self.test.images.shape[1:]:
      raise InputError(f"dataset {self.name!r}: train images are {self.train.images.shape[1:]} "
                       f"but test images are {self.test.images.shape[1:]}")

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.train.class_names

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train.images.shape[1:])


def validate_images(images, labels, num_classes: int, what: str = "images") -> None:
  """Checks an (images, labels) pair and raises `InputError` naming the problem."""
  from jtransfer.data import stream
  if not isinstance(images, np.ndarray) and not stream.is_lazy(images) or \
      not isinstance(labels, np.ndarray):
    raise InputError(f"{what}: expected numpy arrays, got {type(images).__name__} and "
                     f"{type(labels).__name__}")
  if images.ndim != 4:
    raise InputError(f"{what}: expected images of rank 4 (N, H, W, C), got shape {images.shape}")
  if images.shape[-1] not in (1, 3):
    raise InputError(f"{what}: expected 1 or 3 channels in the last axis, got shape {images.shape}")
  if images.dtype != np.uint8:
    raise InputError(f"{what}: expected uint8 pixels, got dtype {images.dtype}")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise InputError(f"{what}: expected labels of shape ({images.shape[0]},), got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise InputError(f"{what}: expected integer labels, got dtype {labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise InputError(f"{what}: labels must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
