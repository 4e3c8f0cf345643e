"""CWL on a transformer's linear maps: one learned scale per output channel of every
attention `qkv` and `proj` and every MLP `fc1` and `fc2` Dense layer, folded into the kernel.

The transformer counterpart of `methods/cwl.py`'s conv units: sigma_k multiplies output
channel k of the layer, y_k = sigma_k * (x W + b)_k, which is exactly the layer with
kernel[:, k] and bias[k] times sigma_k, so the model code is untouched (as for the CNNs).
The scales live under params['cwl'] keyed by the layer's path (`block0/attn/qkv`, ...), so the
strategies' optimizer rules ('cwl/.*') are the CNNs'. `cwl.cwl_setup` dispatches here for
a transformer config; the patch conv, the head and CLIP's `proj` get no scale.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jtransfer import models, surgery
from jtransfer.errors import InputError

LINEAR_LAYERS = ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")


def linear_units(params: Mapping[str, Any]) -> list[str]:
  """Paths of the scaled Dense layers (`<block>/attn/qkv`, ...), in tree order."""
  return [p[:-len("/kernel")] for p, v in surgery.flatten(params).items()
          if p.endswith("/kernel") and len(v.shape) == 2
          and p[:-len("/kernel")].endswith(LINEAR_LAYERS)]


def init_scales(params: Mapping[str, Any]) -> dict[str, jax.Array]:
  """{layer path: ones(output channels)} for every scaled Dense layer."""
  flat = surgery.flatten(params)
  units = linear_units(params)
  if not units:
    raise InputError("CWL on linear maps: the params hold no attn/qkv, attn/proj, mlp/fc1 or "
                     "mlp/fc2 Dense layer")
  return {u: jnp.ones((flat[f"{u}/kernel"].shape[-1],), jnp.float32) for u in units}


def apply_scales(params: Mapping[str, Any], scales: Mapping[str, Any]) -> dict:
  """Effective params: kernel[:, k] and bias[k] of each scaled layer times sigma_k."""
  flat = surgery.flatten(params)
  for unit, sigma in scales.items():
    kernel = flat.get(f"{unit}/kernel")
    if kernel is None or tuple(jnp.shape(sigma)) != (kernel.shape[-1],):
      raise InputError(f"CWL scale {unit!r} fits no Dense layer of the model (shape "
                       f"{tuple(jnp.shape(sigma))})")

  def fold(path: str, leaf):
    unit, _, name = path.rpartition("/")
    if unit in scales and name in ("kernel", "bias"):
      return leaf * jnp.asarray(scales[unit], leaf.dtype)  # broadcasts over the last axis
    return leaf

  return surgery.map_with_path(fold, params)


def apply_fn(key: str) -> Callable:
  """`models.apply_model` reading the scales from params[key] (identity without them)."""
  def apply(model, params, batch_stats, x, **kwargs):
    if key in params:
      rest = {k: v for k, v in params.items() if k != key}
      params = apply_scales(rest, params[key])
    return models.apply_model(model, params, batch_stats, x, **kwargs)
  return apply
