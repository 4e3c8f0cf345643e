"""A target of base-model selection: a seeded draw of labelled training images (what the
scores read and the ground truth fine-tunes on), validation images disjoint from it, and a
capped test split."""
from __future__ import annotations

import dataclasses

from jtransfer.data import ImageSet, load_spec, sample_kshot
from jtransfer.data.fewshot import cap_per_class


@dataclasses.dataclass(frozen=True)
class TargetTask:
  """A target: labelled training images (fine-tuning and metrics), test images, and (for
  converged fine-tuning) validation images disjoint from both."""
  spec: str
  train: ImageSet
  test: ImageSet
  val: ImageSet | None = None

  @property
  def num_classes(self) -> int:
    """Classes of the target (of its training draw)."""
    return self.train.num_classes


def load_target(spec: str, image_shape, train_per_class: int, test_per_class: int,
                seed: int = 0, data_dir: str | None = None,
                val_per_class: int = 0) -> TargetTask:
  """Loads `spec`, draws `train_per_class` training images per class (and `val_per_class`
  disjoint validation images from the train split), caps the test split at `test_per_class`
  images per class (`cap_per_class`; 0 keeps all).

  Raises:
    InputError: a bad spec, or a class with fewer than `train_per_class` training images.
  """
  data = load_spec(spec, tuple(image_shape), flag="--target", data_dir=data_dir)
  idx, val = sample_kshot(data.train.labels, train_per_class, seed,
                          val_per_class=val_per_class, num_classes=data.train.num_classes)
  return TargetTask(spec, data.train.take(idx), cap_per_class(data.test, test_per_class),
                    data.train.take(val) if val_per_class else None)
