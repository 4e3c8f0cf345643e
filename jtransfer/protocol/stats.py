"""Paired statistics over k-shot draws: method minus baseline, per draw.

Every comparison a paper claims is reported as the per-draw difference of two arms trained on
the same k-shot draw (same images, same validation set, same test set), so the draw's own
difficulty cancels. The interval is Student's t on the differences (the paired t-test's
interval); `claims.decide` reads it as a claim's verdict (the rule is written there once).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as sps

from jtransfer.errors import InputError

REPRODUCED, REFUTED, INCONCLUSIVE = "reproduced", "refuted", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Paired:
  """A paired comparison of two arms over n draws.

  Attributes:
    n: number of draws with both arms finished.
    mean: mean of a - b.
    lo, hi: the two-sided confidence interval of the mean difference (nan when n < 2).
    wins, ties, losses: draws where a > b, a == b, a < b.
    p: two-sided paired t-test p-value (nan when n < 2 or all differences are equal).
    level: the interval's confidence level.
  """
  n: int
  mean: float
  lo: float
  hi: float
  wins: int
  ties: int
  losses: int
  p: float
  level: float = 0.95

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Paired:
  """Mean, t confidence interval and wins of `a - b` over paired draws.

  Args:
    a, b: one value per draw, same order (draw i of `a` is paired with draw i of `b`).
    level: confidence level of the interval.

  Raises:
    InputError: the arms have different lengths, no draws, or non-finite values.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise InputError(f"paired comparison needs two equal-length 1-D lists, got shapes "
                     f"{a.shape} and {b.shape}")
  if a.size == 0:
    raise InputError("paired comparison needs at least one draw")
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise InputError("paired comparison got a non-finite value (a failed run?)")
  d = a - b
  n, mean = d.size, float(d.mean())
  wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
  if n < 2:
    return Paired(n, mean, math.nan, math.nan, wins, n - wins - losses, losses, math.nan, level)
  se = float(d.std(ddof=1)) / math.sqrt(n)
  if se == 0.0:  # every draw gives the same difference: the interval is that point
    return Paired(n, mean, mean, mean, wins, n - wins - losses, losses,
                  1.0 if mean == 0 else 0.0, level)
  t = float(sps.t.ppf(0.5 + level / 2, n - 1))
  p = float(2 * sps.t.sf(abs(mean) / se, n - 1))
  return Paired(n, mean, mean - t * se, mean + t * se, wins, n - wins - losses, losses, p, level)


def format_paired(c: Paired, scale: float = 100.0, digits: int = 1) -> str:
  """'+1.2 [-0.3, +2.7] 7/10' (mean, CI, wins/n), in points when scale=100."""
  f = lambda v: "nan" if math.isnan(v) else f"{scale * v:+.{digits}f}"
  return f"{f(c.mean)} [{f(c.lo)}, {f(c.hi)}] {c.wins}/{c.n}"
