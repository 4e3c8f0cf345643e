"""One generic jit-compiled train step: it knows a `loss_fn` and an `Optimizer`, nothing else.

`loss_fn(params, batch_stats, batch, rng) -> (loss, (terms, new_batch_stats))`, where `terms` is
a dict of named scalar loss terms (e.g. {'ce': ..., 'reg': ...}) reported as metrics and named
when one is not finite.

Only the trainable partition is differentiated: the step splits params into (trainable,
frozen), closes over the frozen part, and takes `jax.grad` with respect to the trainable part,
so frozen parameters get no gradient, no optimiser state and no update, by construction.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jtransfer import surgery
from jtransfer.train import parallel
from jtransfer.train.optim import Optimizer
from jtransfer.train.state import TrainState

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, tuple[dict, Any]]]


def init_state(params, batch_stats, optimizer: Optimizer, seed: int,
               lr: float | None = None) -> TrainState:
  """A fresh TrainState at step 0 (`lr` for optimizers built with `injected_lr`).

  Params and stats are copied into buffers the state owns: the jitted step donates the state,
  which would otherwise delete arrays the caller still holds (e.g. a shared initialisation).
  """
  own = lambda tree: jax.tree.map(lambda x: jnp.array(x, copy=True), tree)
  params = own(params)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=own(batch_stats) if batch_stats is not None else {},
                    opt_state=optimizer.init(params, lr), rng=jax.random.PRNGKey(seed))


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step_fn(loss_fn: LossFn, optimizer: Optimizer):
  """The un-jitted step `(state, batch) -> (state, metrics)`; see `make_train_step`."""

  def step(state: TrainState, batch) -> tuple[TrainState, dict]:
    rng, step_rng = jax.random.split(state.rng)
    trainable, frozen = surgery.split(state.params, optimizer.trainable)

    def loss_of(trainable_params):
      return loss_fn(surgery.combine(trainable_params, frozen), state.batch_stats, batch,
                     step_rng)

    (loss, (terms, new_stats)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    updates, opt_state = optimizer.tx.update(grads, state.opt_state, trainable)
    trained = optax.apply_updates(trainable, updates)
    grads_finite = _all_finite(grads)
    finite = jnp.isfinite(loss) & grads_finite
    new = TrainState(step=state.step + 1, params=surgery.combine(trained, frozen),
                     batch_stats=new_stats, opt_state=opt_state, rng=rng)
    # A non-finite step leaves the state as it was, so the last good state survives to be
    # checkpointed; the loop stops and names the offending term.
    kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics = {"loss": loss, **terms, "grads_finite": grads_finite, "finite": finite}
    return kept, metrics

  return step


def make_train_step(loss_fn: LossFn, optimizer: Optimizer, donate: bool = True,
                    mesh: Optional[Mesh] = None):
  """Jit-compiles the generic step for `loss_fn` and `optimizer`.

  Args:
    loss_fn: `(params, batch_stats, batch, rng) -> (loss, (terms, new_batch_stats))`.
    optimizer: from `make_optimizer`; its `trainable` tree decides what is differentiated.
    donate: donate the input state's buffers (in-place update; the caller must not reuse it).
    mesh: data-parallel mesh (`parallel.make_mesh`); default `parallel.default_mesh()`, which
      the experiment modules' `--devices` flag sets. With more than one device the batch is
      split over the 'data' axis and the state replicated (see `jtransfer.train.parallel`).

  Returns:
    `step(state, batch) -> (state, metrics)`, metrics holding 'loss', each term, 'finite'.
  """
  mesh = parallel.default_mesh() if mesh is None else mesh
  donate_argnums = (0,) if donate else ()
  fn = train_step_fn(loss_fn, optimizer)
  if mesh is None or mesh.size == 1:
    return jax.jit(fn, donate_argnums=donate_argnums)
  rep = parallel.replicated(mesh)
  jitted = jax.jit(fn, donate_argnums=donate_argnums, out_shardings=(rep, rep))

  def sharded_step(state: TrainState, batch):
    # A state from this step is already replicated; a fresh one (one device) is placed once.
    if not parallel.is_replicated_on(state.step, mesh):
      state = parallel.replicate(state, mesh)
    return jitted(state, parallel.shard_batch(batch, mesh))

  sharded_step.jitted = jitted
  sharded_step.mesh = mesh
  return sharded_step
