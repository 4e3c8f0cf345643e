"""The train state: everything a step reads and writes, as one pytree (checkpointed whole)."""
from __future__ import annotations

from typing import Any

import jax
from flax import struct


@struct.dataclass
class TrainState:
  """Attributes:
    step: optimiser steps taken (int32 scalar array).
    params: the full parameter tree (trainable and frozen).
    batch_stats: BN running statistics ({} for models without BN).
    opt_state: optimiser state over the trainable sub-tree only.
    rng: a raw uint32[2] key (raw keys checkpoint as plain arrays), split once per step.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
