"""Pure-function application of a model: variables in, logits (+ new BN stats, taps) out."""
from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from jtransfer.errors import InputError


def init_model(model: nn.Module, rng: jax.Array, input_shape: Sequence[int]) -> dict[str, Any]:
  """Initialises variables ({'params', maybe 'batch_stats'}) for inputs of `input_shape` (HWC)."""
  if len(input_shape) != 3:
    raise InputError(f"input_shape must be (H, W, C), got {tuple(input_shape)}")
  return dict(_init_fn(model, tuple(input_shape))(rng))


@functools.lru_cache(maxsize=64)
def _init_fn(model: nn.Module, input_shape: tuple[int, ...]):
  # One compiled init per (model config, shape): grids re-initialise heads for every run.
  return jax.jit(lambda r: model.init(r, jnp.zeros((1, *input_shape)), train=False))


@functools.lru_cache(maxsize=64)
def abstract_variables(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
  """Shapes and dtypes of `init_model`'s result, without computing anything."""
  return dict(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                                jnp.zeros((1, *input_shape)), train=False)))


def init_params_subset(model: nn.Module, rng: jax.Array, input_shape: Sequence[int],
                       paths: Sequence[str]) -> dict[str, Any]:
  """Initialises only the params at `paths` (e.g. a new head) with `init_model`'s values.

  The jitted init returns just those leaves, so XLA drops every other initialiser and the
  forward pass Flax's init runs: for ResNet-50 this takes 1.5 s instead of 8.5 s to compile.
  """
  return _subset_fn(model, tuple(input_shape), tuple(paths))(rng)


@functools.lru_cache(maxsize=64)
def _subset_fn(model: nn.Module, input_shape: tuple[int, ...], paths: tuple[str, ...]):
  from jtransfer import surgery
  wanted = set(paths)

  def init(rng):
    params = model.init(rng, jnp.zeros((1, *input_shape)), train=False)["params"]
    keep = surgery.map_with_path(lambda p, _: p in wanted, params)
    return surgery.split(params, keep)[0]

  return jax.jit(init)


def _flat_taps(intermediates) -> dict[str, jax.Array]:
  flat = traverse_util.flatten_dict(intermediates, sep="/")
  # A module's own output is sown as 'out': the tap is named after the module.
  return {k[:-len("/out")] if k.endswith("/out") else k: v for k, v in flat.items()}


def apply_model(model: nn.Module, params, batch_stats, x: jax.Array, *, train: bool = False,
                taps: Optional[Sequence[str]] = None, rng: Optional[jax.Array] = None):
  """Applies `model` as a pure function.

  Args:
    model: a Flax module from `jtransfer.models`.
    params: the 'params' tree.
    batch_stats: the 'batch_stats' tree, or None/{} for models without BN.
    x: inputs (N, H, W, C), already normalised.
    train: BN uses batch statistics (and returns updated running stats); dropout is active.
    taps: names of feature taps to return (see `available_taps`); None returns none.
    rng: key for dropout when `train` is set.

  Returns:
    (logits, new_batch_stats, taps): new_batch_stats is the input tree unless `train` and the
    model has BN; taps is a dict name -> array (empty when `taps` is None).
  """
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  mutable = []
  if train and batch_stats:
    mutable.append("batch_stats")
  if taps:
    mutable.append("intermediates")
  rngs = {"dropout": rng} if (train and rng is not None) else None
  if mutable:
    logits, updates = model.apply(variables, x, train=train, mutable=mutable, rngs=rngs)
  else:
    logits, updates = model.apply(variables, x, train=train, rngs=rngs), {}
  new_stats = updates.get("batch_stats", batch_stats)
  got = {}
  if taps:
    flat = _flat_taps(updates["intermediates"])
    missing = [t for t in taps if t not in flat]
    if missing:
      raise InputError(f"unknown tap name(s) {missing} for {type(model).__name__}; "
                       f"available: {sorted(flat)}")
    got = {t: flat[t] for t in taps}
  return logits, new_stats, got


def available_taps(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
  """Names and shapes (batch 1) of every feature tap of `model` for inputs of `input_shape`."""
  def run():
    variables = model.init(jax.random.key(0), jnp.zeros((1, *input_shape)), train=False)
    _, updates = model.apply(variables, jnp.zeros((1, *input_shape)), train=False,
                             mutable=["intermediates"])
    return _flat_taps(updates["intermediates"])
  return {k: tuple(v.shape) for k, v in jax.eval_shape(run).items()}
