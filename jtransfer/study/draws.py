"""k-shot draws of a cell: evaluation and tuning draw seeds, the draws, CV folds.

One draw per (shots, role, index) is shared by every arch, arm and knob value (a paired
comparison, docs/protocol.md): its seed depends on the study's seed, k and the draw only.
Tuning draws are never evaluation draws (their seeds use negative repeats, -1 - index) and
never see the test split.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jtransfer.data import sample_kshot
from jtransfer.protocol import tuning

TUNE, EVAL = "tune", "eval"


@dataclasses.dataclass(frozen=True)
class Draw:
  """Which draw a run trains on: `role` 'tune' or 'eval', its `index` among them, and the
  cross-validation `fold` of a tuning draw's labelled pool (-1: no fold)."""
  role: str
  index: int
  fold: int = -1

  @property
  def repeat(self) -> int:
    """The draw as one signed integer: evaluation draws 0, 1, ..., tuning draws -1, -2, ...
    (the form published version-1 records and the progress lines use)."""
    return self.index if self.role == EVAL else -1 - self.index

  @classmethod
  def of_repeat(cls, repeat: int, fold: int = -1) -> "Draw":
    """The inverse of `repeat`."""
    return cls(EVAL, repeat, fold) if repeat >= 0 else cls(TUNE, -1 - repeat, fold)

  def to_dict(self) -> dict:
    """The record's 'draw' field."""
    return {"role": self.role, "index": self.index, "fold": self.fold}


def draw_seed(seed: int, shots: int, repeat: int) -> int:
  """The seed of a k-shot draw. Evaluation draws have repeat >= 0, tuning draws repeat < 0,
  so the two never share a draw."""
  return (seed * 1_000_003 + shots * 1009 + repeat) % (2 ** 31)


def cell_draws(labels: np.ndarray, num_classes: int, shots: int, seed: int, repeats: int,
               tune_draws: int, val_per_class: int) -> dict[int, tuple]:
  """repeat -> (seed, k-shot rows, validation rows) of every tuning and evaluation draw."""
  out = {}
  for repeat in range(-tune_draws, repeats):
    s = draw_seed(seed, shots, repeat)
    out[repeat] = (s, *sample_kshot(labels, shots, s, val_per_class=val_per_class,
                                    num_classes=num_classes))
  return out


def cv_folds(setting: Optional[int], strategy_folds: int) -> int:
  """Cross-validation folds of an arm's tuning: the --cv-folds setting, or with 'auto' (None)
  the folds its paper uses for its knobs (`Strategy.cv_folds`: DELTA, L2-SP 5; others 0)."""
  return strategy_folds if setting is None else int(setting)


def fold_split(pool_labels: np.ndarray, train_idx, val_idx, n_folds: int, fold: int, seed: int,
               shots: int):
  """(train, validation) rows of fold `fold` of a draw's labelled pool (k-shot + validation).

  Stratified k-fold over the pool; each fold's training part is cut to `shots` images per class
  (seeded), so a knob is chosen at the shot count it is evaluated at, not at the 4/5 of
  k + validation images a plain fold would train on. The fold's held-out part validates.
  """
  pool = np.concatenate([train_idx, val_idx])
  tr, va = tuning.kfold(pool_labels[pool], n_folds, seed)[fold]
  rng = np.random.default_rng([seed, fold])
  labels = pool_labels[pool[tr]]
  keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots]
                         for c in np.unique(labels)])
  return np.sort(pool[tr][keep]), pool[va]


def tuning_draws(tune_draws: int, folds: int) -> list[Draw]:
  """The draws that score one tuning point: each tuning draw, on each fold when folding."""
  return [Draw(TUNE, t, f) for t in range(tune_draws) for f in (range(folds) if folds else (-1,))]
