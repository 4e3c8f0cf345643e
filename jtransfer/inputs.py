"""Inputs of the Python API (`jtransfer.api`): a `Source` from a model in memory, and images
as the data layer takes them (uint8 NHWC; float in [0, 1] rounded to uint8).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import transfer


def source_from_model(arch: str, model, variables: Mapping[str, Any],
                      input_shape: Sequence[int], mean: Optional[Sequence[float]] = None,
                      std: Optional[Sequence[float]] = None,
                      meta: Optional[dict] = None) -> transfer.Source:
  """A `Source` from a model and its variables in memory (no checkpoint directory).

  Args:
    arch: the registered architecture `model` was built as (`models.names()`).
    model: the Flax module (`models.get_model(arch, num_classes, ...)`).
    variables: {'params', maybe 'batch_stats'} (jax or numpy arrays).
    input_shape: (H, W, C) the model takes.
    mean, std: per-channel normalisation in [0, 1] units; default 0.5 and 0.5.
    meta: anything to keep with it.

  Raises:
    InputError: an unknown arch, or variables that do not fit the model.
  """
  if arch not in models.names():
    raise InputError(f"unknown arch {arch!r}; expected one of {', '.join(models.names())}")
  shape = tuple(int(v) for v in input_shape)
  channels = shape[-1]
  mean = tuple(float(v) for v in (mean if mean is not None else (0.5,) * channels))
  std = tuple(float(v) for v in (std if std is not None else (0.5,) * channels))
  host = {k: jax.tree.map(np.asarray, dict(v)) for k, v in variables.items() if v}
  source = transfer.Source(arch, models.model_config(model), host, shape, mean, std,
                           dict(meta or {}))
  # The same check as `transfer.load_source`: every param the model has, with its shape.
  fresh = jax.eval_shape(lambda: models.init_model(source.model, jax.random.PRNGKey(0), shape))
  surgery.merge_params(fresh["params"], host.get("params", {}), what="source variables")
  return source


def random_source(arch: str, input_shape: Sequence[int], num_classes: int = 10, seed: int = 0,
                  **config) -> transfer.Source:
  """A randomly initialised source of `arch` (tests, examples, a from-scratch baseline)."""
  model = models.get_model(arch, num_classes, **config)
  variables = models.init_model(model, jax.random.PRNGKey(seed), tuple(input_shape))
  return source_from_model(arch, model, variables, input_shape)


def as_images(images, what: str = "images") -> np.ndarray:
  """uint8 (N, H, W, C) images: uint8 as given; float in [0, 1] rounded to uint8.

  Raises:
    InputError: another dtype, or float values outside [0, 1] (or not finite).
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    if images.size and not (np.all(np.isfinite(images)) and images.min() >= 0
                            and images.max() <= 1):
      raise InputError(f"{what}: float pixels must lie in [0, 1]")
    return np.round(images * 255).astype(np.uint8)
  raise InputError(f"{what}: expected uint8 pixels or floats in [0, 1], got dtype {images.dtype}")
