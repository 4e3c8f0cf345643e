"""Optimisers built from regex rules: per-group transforms, lr multipliers, frozen groups.

As big_vision's `schedule=[('img/.*', None), ('.*', 'default')]`: rules label every parameter
path; each label names a group transform; the reserved label 'frozen' means not trained. The
train step differentiates only the non-frozen sub-tree, so `tx` is built for that sub-tree;
`full_tx` (with `optax.set_to_zero` for frozen) is there for code that updates the whole tree.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from jtransfer import surgery
from jtransfer.errors import InputError

FROZEN = "frozen"
Schedule = Union[float, Callable[[Any], Any]]


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """Attributes:
    tx: transform over the trainable sub-tree (what the train step uses).
    full_tx: the same over the whole tree, frozen leaves updated by zero.
    labels: label per parameter path.
    trainable: bool tree, False where the label is 'frozen'.
    injected_lr: see `make_optimizer`.
    groups: the transforms of the labels in use.
  """
  tx: optax.GradientTransformation
  full_tx: optax.GradientTransformation
  labels: Any
  trainable: Any
  injected_lr: bool = False
  groups: Mapping[str, optax.GradientTransformation] = dataclasses.field(default_factory=dict)

  def init(self, params, lr: float | None = None):
    """Optimiser state for the trainable sub-tree of `params`.

    Args:
      params: the full parameter tree.
      lr: the run's learning rate, for an optimiser built with `injected_lr=True` (its group
        transforms use unit learning rates and this value scales all of them).
    """
    state = self.tx.init(surgery.split(params, self.trainable)[0])
    if self.injected_lr:
      if lr is None:
        raise InputError("this optimizer takes its learning rate at init: pass lr=")
      inner, scale = state
      scale.hyperparams["step_size"] = jnp.asarray(lr, jnp.float32)
      state = (inner, scale)
    elif lr is not None:
      raise InputError("lr given to init() of an optimizer built without injected_lr")
    return state


def make_optimizer(params, rules: Sequence[tuple[str, str]],
                   groups: Mapping[str, optax.GradientTransformation],
                   injected_lr: bool = False) -> Optimizer:
  """Builds an `Optimizer` from path rules and group transforms.

  Args:
    params: the parameter tree (only its paths are used).
    rules: (regex, label) pairs, first match wins; every path must be labelled.
    groups: label -> transform, for every label except 'frozen'.
    injected_lr: the groups use unit learning rates (lr multipliers stay) and a global scale
      held in the optimiser state multiplies every update; `init(params, lr)` sets it. One
      compiled train step then serves a whole learning-rate grid (the scale commutes with
      SGD, momentum, weight decay and Adam, which all end in a multiply by the lr).

  Raises:
    InputError: an unlabelled path, a rule matching nothing, or a label without a transform.
  """
  labels = surgery.label_tree(params, rules)
  used = set(jax.tree.leaves(labels))
  unknown = sorted(used - set(groups) - {FROZEN})
  if unknown:
    raise InputError(f"optimizer labels {unknown} have no transform; groups: {sorted(groups)}")
  trainable = jax.tree.map(lambda l: l != FROZEN, labels)
  if not any(jax.tree.leaves(trainable)):
    raise InputError("optimizer rules freeze every parameter: nothing would train")
  train_labels, _ = surgery.split(labels, trainable)
  live = {k: v for k, v in groups.items() if k in used}
  tx = optax.partition(live, train_labels)
  full_tx = optax.partition({**live, FROZEN: optax.set_to_zero()}, labels)
  if injected_lr:
    scale = optax.inject_hyperparams(optax.scale)(step_size=1.0)
    tx, full_tx = optax.chain(tx, scale), optax.chain(full_tx, scale)
  return Optimizer(tx, full_tx, labels, trainable, injected_lr, dict(live))


def sgd(lr: Schedule, momentum: float = 0.9, weight_decay: float = 0.0,
        lr_mult: float = 1.0, nesterov: bool = False) -> optax.GradientTransformation:
  """SGD with momentum, optional coupled L2 weight decay (as torch's SGD) and lr multiplier."""
  parts = []
  if weight_decay:
    parts.append(optax.add_decayed_weights(weight_decay))
  parts.append(optax.sgd(_scaled(lr, lr_mult), momentum=momentum or None, nesterov=nesterov))
  return optax.chain(*parts)


def adam(lr: Schedule, lr_mult: float = 1.0, weight_decay: float = 0.0
         ) -> optax.GradientTransformation:
  """Adam (decoupled weight decay when `weight_decay` > 0, i.e. AdamW)."""
  if weight_decay:
    return optax.adamw(_scaled(lr, lr_mult), weight_decay=weight_decay)
  return optax.adam(_scaled(lr, lr_mult))


def _scaled(lr: Schedule, mult: float) -> Schedule:
  if mult == 1.0:
    return lr
  if callable(lr):
    return lambda count: lr(count) * mult
  return lr * mult
