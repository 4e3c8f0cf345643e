"""Hyper-parameter selection on validation data, never on test.

`tune` evaluates a grid of hyper-parameter points with a caller's score (mean validation accuracy
over tuning draws, or over cross-validation folds), picks the best, and when the best sits on
the edge of a geometric axis extends that axis one step outward and scores the new points, up
to `max_extend` times per side; an axis whose choice is still on an edge is reported, so the
report can say so (protocol rule 2, docs/protocol.md).

`kfold` gives the stratified folds for cross-validation on a training pool (DELTA's paper picks
alpha by 5-fold cross-validation).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Mapping, Sequence

import numpy as np

from jtransfer.errors import InputError


@dataclasses.dataclass
class Tuned:
  """What `tune` chose and why.

  Attributes:
    choice: axis name -> chosen value.
    score: the chosen point's score (None for a one-point grid, which is never scored).
    scores: every scored point (a tuple of values in axis order) -> score.
    grid: axis name -> values, as extended.
    edges: axes whose chosen value is still the first or last of the (extended) grid:
      'lr:low' or 'lr:high'.
  """
  choice: dict
  score: float
  scores: dict
  grid: dict
  edges: list

  def to_dict(self) -> dict:
    return dict(choice=self.choice, score=self.score, grid=self.grid, edges=self.edges,
                scores=[[list(k), v] for k, v in self.scores.items()])


def _extend(values: Sequence[float], side: str) -> float:
  """One more value past the low or high end of a geometric (or arithmetic at 0) axis."""
  lo, hi = values[0], values[-1]
  if side == "low":
    ratio = values[1] / values[0] if values[0] > 0 else math.nan
    return lo / ratio if ratio > 1 else lo - (values[1] - values[0])
  ratio = values[-1] / values[-2] if values[-2] > 0 else math.nan
  return hi * ratio if ratio > 1 else hi + (values[-1] - values[-2])


Scale = tuple[Callable[[float], float], Callable[[float], float]]


def odds_scale(digits: int = 6) -> Scale:
  """(forward, inverse) of the odds scale w / (1 - w) of a weight w in (0, 1), for `tune`'s
  `scales`: a geometric extension on it never leaves (0, 1) (odds 1, 4 -> 16: w 0.5, 0.8 ->
  0.941). The inverse rounds to `digits` significant digits, so a point's value reads the same
  in a record's text field (6 digits, `transfer.hp_string`)."""
  return (lambda w: float(f"{w / (1 - w):.12g}"),
          lambda o: float(f"{o / (1 + o):.{digits}g}"))


def _scaled(grid, score, max_extend, bounds, scales) -> Tuned:
  """`tune` with some axes searched on another scale (see `tune`'s `scales`)."""
  fwd = {n: f for n, (f, _) in scales.items()}
  inv = {n: i for n, (_, i) in scales.items()}
  back = lambda n, v: inv[n](v) if n in inv else v
  names = list(grid)
  inner = tune({n: [fwd[n](float(v)) for v in grid[n]] if n in fwd else grid[n] for n in names},
               lambda point: score({n: back(n, v) for n, v in point.items()}), max_extend,
               {n: b for n, b in (bounds or {}).items() if n not in scales})
  return Tuned({n: back(n, v) for n, v in inner.choice.items()}, inner.score,
               {tuple(back(n, v) for n, v in zip(names, k)): s for k, s in inner.scores.items()},
               {n: [back(n, v) for v in vs] for n, vs in inner.grid.items()}, inner.edges)


def tune(grid: Mapping[str, Sequence[float]], score: Callable[[dict], float],
         max_extend: int = 2, bounds: Mapping[str, tuple[float, float]] | None = None,
         scales: Mapping[str, Scale] | None = None) -> Tuned:
  """Picks the point of `grid` with the highest score, extending axes whose best is an edge.

  Args:
    grid: axis name -> candidate values, sorted ascending. Axes with one value are fixed;
      axes with two or more are extended geometrically (by the ratio of the two end values).
    score: point (axis name -> value) -> validation score; higher is better. It must not
      read test data: this function only ever sees what it returns.
    max_extend: how many extra values each side of each axis may receive.
    bounds: axis -> (low, high): an extension never goes below low or above high (e.g. a
      mixing weight in (0, 1]).
    scales: axis -> (forward, inverse): the axis is searched and extended on the forward
      scale (e.g. `odds_scale()` for a weight in (0, 1)) and scored and reported at the
      inverse; applies to axes of two or more values (a fixed value may lie outside the
      forward's domain); such an axis takes no `bounds`.

  Returns:
    A `Tuned`. Ties go to the point first in grid order (smaller values first); an edge is
    extended only when it scores strictly higher than its neighbour on that axis. A grid of
    one point is returned as chosen without calling `score`.
  """
  scales = {n: sc for n, sc in (scales or {}).items() if n in grid and len(grid[n]) > 1}
  if scales:
    return _scaled(grid, score, max_extend, bounds, scales)
  names = list(grid)
  axes = {n: sorted(float(v) for v in grid[n]) for n in names}
  for n, v in axes.items():
    if not v or len(set(v)) != len(v) or not all(math.isfinite(x) for x in v):
      raise InputError(f"tuning grid {n!r} must hold distinct finite values, got {grid[n]!r}")
  if all(len(v) == 1 for v in axes.values()):  # nothing to choose: score nothing, train nothing
    return Tuned({n: v[0] for n, v in axes.items()}, None, {}, axes, [])
  scores: dict = {}
  extended = {(n, s): 0 for n in names for s in ("low", "high")}
  while True:
    for point in itertools.product(*(axes[n] for n in names)):
      if point not in scores:
        scores[point] = float(score(dict(zip(names, point))))
    order = list(itertools.product(*(axes[n] for n in names)))
    best = max(order, key=lambda p: (scores[p], -order.index(p)))
    grew = False
    for i, n in enumerate(names):
      values = axes[n]
      if len(values) < 2:
        continue
      for side, at, inner in (("low", values[0], values[1]), ("high", values[-1], values[-2])):
        # Extend only when the edge beats its neighbour: a tie says nothing about beyond it.
        neighbour = best[:i] + (inner,) + best[i + 1:]
        if best[i] == at and extended[(n, side)] < max_extend and \
            scores[best] > scores[neighbour]:
          new = float(f"{_extend(values, side):.12g}")  # 1e-3 / 10 is 1e-4, not 1.0000000000000002e-4
          lo, hi = (bounds or {}).get(n, (-math.inf, math.inf))
          if math.isfinite(new) and (new > 0 or values[0] <= 0) and lo <= new <= hi:
            axes[n] = sorted(values + [new])
            extended[(n, side)] += 1
            grew = True
    if not grew:
      break
  edges = [f"{n}:{side}" for i, n in enumerate(names) if len(axes[n]) >= 2
           for side, at in (("low", axes[n][0]), ("high", axes[n][-1])) if best[i] == at]
  return Tuned(dict(zip(names, best)), scores[best], scores, axes, edges)


class _Missing(Exception):
  """A tuning record the caller has not got (an unfinished grid, read without training)."""


def tune_records(grid: Mapping[str, Sequence[float]], keys_of: Callable[[dict], list],
                 by_key: dict, run_missing: Callable | None = None, max_extend: int = 2,
                 requested: set | None = None,
                 bounds: Mapping[str, tuple[float, float]] | None = None,
                 scales: Mapping[str, Scale] | None = None) -> Tuned | None:
  """`tune` scored from run records: a point's score is the mean validation accuracy of its
  runs (a failed run scores 0), read from `by_key` or, when missing, trained by `run_missing`.

  The report (from records alone) and the grid runner (training what is missing) call this
  with the same records and so make the same choice. Only 'val_acc' is read: tuning records
  hold no test accuracy.

  Args:
    grid: axis name -> candidate values, as `tune`.
    keys_of: point -> the keys of the runs that score it (tuning draws, or their CV folds).
    by_key: run key -> record with 'status' and 'val_acc'; runs trained here are added.
    run_missing: key -> record, training a missing run; None = read records only.
    max_extend: as `tune`.
    requested: if given, collects every run key the choice read (the grid's tuning runs).
    bounds, scales: as `tune`.

  Returns:
    A `Tuned`, or None when a run is missing and `run_missing` is None (an unfinished grid).
  """
  def score(point):
    keys = keys_of(point)
    for k in keys:
      if requested is not None:
        requested.add(k)
      if k not in by_key:
        if run_missing is None:
          raise _Missing(k)
        by_key[k] = run_missing(k)
    return float(np.mean([by_key[k]["val_acc"] if by_key[k].get("status", "ok") == "ok" else 0.0
                          for k in keys]))

  try:
    return tune(grid, score, max_extend, bounds, scales)
  except _Missing:
    return None


def kfold(labels: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Stratified folds of a labelled pool: [(train_idx, val_idx)] per fold.

  Raises:
    InputError: a class has fewer images than folds.
  """
  from sklearn.model_selection import StratifiedKFold
  labels = np.asarray(labels)
  counts = np.bincount(labels)
  present = counts[counts > 0]
  if n_folds < 2:
    raise InputError(f"cross-validation needs at least 2 folds, got {n_folds}")
  if present.min() < n_folds:
    raise InputError(f"{n_folds}-fold cross-validation needs {n_folds} images of each class; "
                     f"the smallest class has {present.min()}")
  skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
  return [(np.sort(tr), np.sort(va)) for tr, va in skf.split(np.zeros(len(labels)), labels)]
