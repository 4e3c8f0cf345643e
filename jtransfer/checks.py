"""Checks of what users hand the library from Python: pixels, labels and a source's features.

Each check raises `InputError` with one sentence naming the input and the fix, or (for
features that are legal but cannot train anything) returns a warning sentence for the log and
the report.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from jtransfer.errors import InputError

# A trained network's penultimate features vary by 0.1-10 between images. Below this largest
# per-feature standard deviation the features differ by less than a millionth of that, close to
# float32's relative resolution (1.2e-7) once the head adds its bias, so no head can tell the
# images apart and every strategy sits at chance.
DEAD_FEATURE_STD = 1e-6


def check_pixels(images, what: str = "images") -> None:
  """Refuses float pixel arrays: the library's images are uint8 in [0, 255].

  Normalisation (`jtransfer.data.preprocess.normalize`) divides by 255 inside the jitted step,
  so a float image in [0, 1] would be divided twice and reach the model as near-black. Floats
  are refused rather than guessed at (a float array in [0, 255] is just as plausible).

  Raises:
    InputError: `images` has a floating dtype.
  """
  dtype = getattr(images, "dtype", None)
  if dtype is not None and np.issubdtype(np.dtype(dtype), np.floating):
    raise InputError(f"{what}: got {np.dtype(dtype).name} pixels, but jtransfer takes uint8 "
                     "images in [0, 255] (it normalises them itself); convert images in [0, 1] "
                     "with np.round(x * 255).astype(np.uint8)")


def check_labels(labels, num_classes: int, what: str = "labels") -> None:
  """Refuses labels that are not integers in [0, num_classes).

  An out-of-range label makes the cross-entropy read past the logits (NaN in JAX, no error),
  so it is caught on the host, before any step.

  Raises:
    InputError: non-integer labels, or a label outside the head's classes.
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise InputError(f"{what}: expected integer class indices, got dtype {labels.dtype}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise InputError(f"{what}: values must lie in [0, {num_classes}) for a head of "
                     f"{num_classes} classes, got range [{labels.min()}, {labels.max()}]")


def dead_features_note(features: np.ndarray, what: str,
                       threshold: float = DEAD_FEATURE_STD) -> Optional[str]:
  """A warning sentence when a source's features do not vary across images, else None.

  Args:
    features: (N, ...) features of N images (the head's input).
    what: the source and data, named in the sentence.
    threshold: the largest per-feature standard deviation over the images below which the
      features count as dead (`DEAD_FEATURE_STD`, see there why).
  """
  flat = np.asarray(features, np.float64).reshape(len(features), -1)
  if not np.all(np.isfinite(flat)):
    return (f"{what}: the source's features are not finite on some train images; every "
            "strategy will fail or sit at chance: check the source checkpoint")
  spread = float(flat.std(axis=0).max()) if len(flat) > 1 else float("inf")
  if spread >= threshold:
    return None
  return (f"{what}: the source's features barely vary across {len(flat)} train images (largest "
          f"per-feature std {spread:.2g}, below {threshold:g}, where a trained network's vary by "
          "0.1-10), so no head can separate the classes and accuracy will sit at chance: check "
          "the source checkpoint and its --mean/--std")
