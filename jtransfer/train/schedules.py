"""Learning-rate schedules used by the papers, as optax schedules of the step count."""
from __future__ import annotations

import math

import optax


def constant(lr: float) -> optax.Schedule:
  return optax.constant_schedule(lr)


def step_decay(lr: float, steps_per_epoch: int, every_epochs: int, factor: float = 0.1
               ) -> optax.Schedule:
  """lr * factor ** floor(epoch / every_epochs) (base-model selection: x0.1 every 7 epochs)."""
  every = max(1, steps_per_epoch * every_epochs)
  return lambda count: lr * factor ** (count // every)


def exponential_per_epoch(lr: float, steps_per_epoch: int, decay_epochs: float
                          ) -> optax.Schedule:
  """DELTA's code: lr * exp(log(0.1) / decay_epochs) ** epoch, stepped once per epoch."""
  gamma = math.exp(math.log(0.1) / decay_epochs)
  return optax.exponential_decay(lr, transition_steps=max(1, steps_per_epoch),
                                 decay_rate=gamma, staircase=True)


def milestones(lr: float, boundaries: list[int], factor: float = 0.1) -> optax.Schedule:
  """lr times `factor` at each step in `boundaries` (DELTA Fig. 2: x0.1 at 6000 of 9000)."""
  return optax.piecewise_constant_schedule(lr, {int(b): factor for b in boundaries})


def cosine(lr: float, total_steps: int, warmup_steps: int = 0) -> optax.Schedule:
  """Linear warm-up then cosine decay to 0 (used for source pretraining)."""
  if warmup_steps:
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, max(total_steps, 1))
  return optax.cosine_decay_schedule(lr, max(total_steps, 1))
