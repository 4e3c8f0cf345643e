"""k-shot draws of a cell: evaluation and tuning draw seeds, the draws, CV folds.

One draw per (shots, role, index) is shared by every arch, arm and knob value (a paired
comparison, docs/protocol.md): its seed depends on the study's seed, k and the draw only.
Tuning draws are never evaluation draws (their seeds use negative repeats, -1 - index) and
never see the test split. Under `--disjoint-tuning` they are drawn from the pool images no
evaluation draw of the cell uses, when every class keeps enough of them; `overlap` measures
what each evaluation draw shares with the tuning draws either way. Nested tuning runs
(`--tuning nested`, role 'nested') train on an evaluation draw's own labelled pool (its k-shot
and validation images, or CV folds over them) and never see the test split either.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from jtransfer.data import sample_kshot
from jtransfer.protocol import tuning

TUNE, EVAL, NESTED = "tune", "eval", "nested"


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
    (the form published version-1 records and the progress lines use). A nested tuning run's
    is the evaluation draw whose labelled pool it trains on."""
    return self.index if self.role in (EVAL, NESTED) else -1 - self.index

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
               tune_draws: int, val_per_class: int, disjoint: bool = False) -> dict[int, tuple]:
  """repeat -> (seed, k-shot rows, validation rows) of every tuning and evaluation draw.

  `disjoint`: draw the tuning draws from the pool rows no evaluation draw uses, when every
  class keeps at least k + validation images there (else as without it; `overlap` says how
  much they share). Evaluation draws are the same either way.
  """
  out = {}
  for repeat in range(repeats):
    s = draw_seed(seed, shots, repeat)
    out[repeat] = (s, *sample_kshot(labels, shots, s, val_per_class=val_per_class,
                                    num_classes=num_classes))
  rows = np.arange(len(labels))
  if disjoint and tune_draws:
    used = np.concatenate([np.concatenate(out[r][1:]) for r in range(repeats)] or [[]])
    free = np.setdiff1d(rows, used.astype(int))
    counts = np.bincount(labels[free], minlength=num_classes)
    if counts.min() >= shots + val_per_class:
      rows = free
  for repeat in range(-tune_draws, 0):
    s = draw_seed(seed, shots, repeat)
    tr, va = sample_kshot(labels[rows], shots, s, val_per_class=val_per_class,
                          num_classes=num_classes)
    out[repeat] = (s, rows[tr], rows[va])
  return dict(sorted(out.items()))


def overlap(cell: dict[int, tuple]) -> list[float]:
  """Per evaluation draw (repeat 0, 1, ...), the share of its k-shot and validation images
  that sit in some tuning draw's k-shot or validation images (0.0 without tuning draws)."""
  tuned = [np.concatenate(v[1:]) for r, v in cell.items() if r < 0]
  tuned = np.unique(np.concatenate(tuned)) if tuned else np.array([], int)
  out = []
  for r in sorted(r for r in cell if r >= 0):
    mine = np.unique(np.concatenate(cell[r][1:]))
    out.append(float(np.isin(mine, tuned).mean()) if mine.size else 0.0)
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


def tuning_draws(tune_draws: int, folds: int, nested: int | None = None) -> list[Draw]:
  """The draws that score one tuning point: each tuning draw, on each fold when folding; with
  `nested` (an evaluation draw's index), that draw's own labelled pool instead (its
  validation split, or each fold of it)."""
  folds_ = range(folds) if folds else (-1,)
  if nested is not None:
    return [Draw(NESTED, nested, f) for f in folds_]
  return [Draw(TUNE, t, f) for t in range(tune_draws) for f in folds_]
