"""Many runs that share their frozen params, trained as one: vmap over runs, frozen unbatched.

A paper's grid repeats the same small run over learning rates and k-shot draws. When the
conv kernels are frozen (Freeze, Freeze+CWL, heads on features), every run differs only in
its small trainable leaves (head, CWL scales), its optimiser state and its data. `vmap` over
runs with the frozen params *unbatched* (in_axes None) then keeps each convolution a plain
convolution over a batch R times larger, which XLA runs far better than R small ones; only
the trainable leaves, optimiser state, BN stats and RNG carry the run axis.

That is not true when kernels train: vmap turns a convolution with per-run kernels into a
grouped convolution, which measured 4.6x slower than R separate runs on this CPU (issue 10).
`batchable()` says which optimisers qualify; callers run the rest one at a time.

Each run's arithmetic is the single-run step's (`train_step_fn`), so results equal the plain
path up to float summation order (tests/test_batched.py).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import surgery
from jtransfer.errors import InputError
from jtransfer.train.optim import Optimizer
from jtransfer.train.state import TrainState
from jtransfer.train.step import LossFn, train_step_fn


def batchable(optimizer: Optimizer, params) -> bool:
  """Whether runs of this optimiser can share a compiled batched step cheaply.

  True when no trainable leaf has rank >= 3 (no conv kernel trains): batched dense kernels
  are batched matmuls, batched conv kernels would be grouped convolutions.
  """
  trainable, _ = surgery.split(params, optimizer.trainable)
  return all(np.ndim(x) < 3 for x in jax.tree.leaves(trainable))


def make_batched_train_step(loss_fn: LossFn, optimizer: Optimizer) -> Callable:
  """Jit-compiles `step(bstate, frozen, batch) -> (bstate, metrics)` over a leading run axis.

  Args:
    loss_fn: as for `make_train_step`.
    optimizer: its `trainable` tree splits params into the run-specific part (stacked in
      `bstate.params`) and the shared `frozen` part (one copy, passed unbatched).

  Returns:
    The step. `bstate` is a TrainState whose params hold only the trainable sub-tree, every
    leaf with a leading axis of R runs (see `stack_states`); `batch` leaves are (R, B, ...);
    metrics leaves are (R,).
  """
  inner = train_step_fn(loss_fn, optimizer)

  def one_run(bstate: TrainState, frozen, batch):
    state = bstate.replace(params=surgery.combine(bstate.params, frozen))
    new, metrics = inner(state, batch)
    trained, _ = surgery.split(new.params, optimizer.trainable)
    return new.replace(params=trained), metrics

  return jax.jit(jax.vmap(one_run, in_axes=(0, None, 0)), donate_argnums=(0,))


def stack_states(states: Sequence[TrainState], optimizer: Optimizer) -> tuple[TrainState, Any]:
  """(batched state, shared frozen params) from R single-run states.

  Raises:
    InputError: the runs' frozen params differ (they would not share a step), or no states.
  """
  if not states:
    raise InputError("stack_states: no runs")
  splits = [surgery.split(s.params, optimizer.trainable) for s in states]
  frozen = splits[0][1]
  ref = jax.tree.leaves(frozen)
  for i, (_, f) in enumerate(splits[1:], start=1):
    leaves = jax.tree.leaves(f)
    if len(leaves) != len(ref) or not all(
        a is b or np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ref, leaves)):
      raise InputError(f"run {i} has other frozen params than run 0; batched runs must share "
                       "their frozen params (same source and frozen layers)")
  per_run = [s.replace(params=t) for s, (t, _) in zip(states, splits)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_run)
  return stacked, frozen


def unstack_state(bstate: TrainState, frozen, index: int) -> TrainState:
  """Run `index` of a batched state, with its frozen params put back (a full TrainState)."""
  one = jax.tree.map(lambda x: x[index], bstate)
  return one.replace(params=surgery.combine(one.params, frozen))


def stack_batches(batches: Sequence[Any]) -> Any:
  """Stacks R per-run batches (same shapes) on a new leading axis."""
  return jax.tree.map(lambda *xs: np.stack(xs), *batches)
