"""The vgg_s forward pass as a list of layers that can start and stop at any layer, for the
branches of Hybrid-TransferNet (`jtransfer.methods.hybrid`, which re-exports these names).

A pure re-implementation over plain param trees, checked against `models.apply_model` in the
tests.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from jax import lax

from jtransfer.errors import InputError
from jtransfer.models.common import max_pool


def layer_plan(config: Mapping[str, Any]) -> list[tuple[str, str]]:
  """The vgg_s layers in order as (name, kind).

  Kinds: 'conv' (conv + ReLU), 'conv_pool' (then the stage's 2x2 max pool), 'conv_flat' (the
  last conv: pool, then flatten in NHWC order), 'dense' (Dense + ReLU), 'head' (Dense).

  Raises:
    InputError: a config this forward pass does not cover (avg pooling, adaptive pooling,
      truncation, dropout).
  """
  for key, ok in (("pool", "flatten"), ("adaptive_pool", None), ("truncate_after", None)):
    if config.get(key, ok) != ok:
      raise InputError(f"hybrid forward supports vgg_s with {key}={ok!r}, got "
                       f"{config.get(key)!r}")
  if config.get("dropout", 0.0):
    raise InputError("hybrid forward supports vgg_s without dropout (dropout=0)")
  plan = []
  stages = config["conv_widths"]
  for s, stage in enumerate(stages, start=1):
    for i in range(1, len(stage) + 1):
      kind = "conv" if i < len(stage) else ("conv_pool" if s < len(stages) else "conv_flat")
      plan.append((f"conv{s}_{i}", kind))
  plan += [(f"fc{6 + i}", "dense") for i in range(len(config.get("dense_widths", ())))]
  return plan + [("head", "head")]


def _layer(params, x, name: str, kind: str):
  p = params[name]
  if kind.startswith("conv"):
    x = lax.conv_general_dilated(x, p["conv"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + p["conv"]["bias"])
    if kind != "conv":
      x = max_pool(x, 2, 2)
    return x.reshape(x.shape[0], -1) if kind == "conv_flat" else x
  x = x @ p["kernel"] + p["bias"]
  return x if kind == "head" else jax.nn.relu(x)


def run_layers(params, x: jax.Array, plan: Sequence[tuple[str, str]]) -> jax.Array:
  """Applies the layers of `plan` (a slice of `layer_plan`) in order to `x`.

  `params` needs only those layers; widths come from the arrays, so sliced (neuron-pruned)
  layers run unchanged. Eval semantics (vgg_s has no BN and, here, no dropout).
  """
  for name, kind in plan:
    x = _layer(params, x, name, kind)
  return x
