"""Claims: a paper's ordering of two arms, tested per draw and read as a verdict.

An experiment module declares its claims (`Claim('cwl', 'Freeze+CWL > Freeze', 'freeze_cwl',
'freeze')`) and hands `evaluate` its records; each claim is compared per cell (every value of
the cell fields, e.g. arch x target x k) and pooled over all its cells, as paired differences
over the same draws (`stats.paired`), and `section` writes the report's "Claims" section.

The verdict rule is written here once (`decide`), for every kind of claim, and the claims
registry (`jtransfer.protocol.registry`) and every report read verdicts through it. With d the
per-draw difference a - b, its mean m, standard error s and n - 1 degrees of freedom, a
boundary c is tested one-sided with Student's t: p(d > c) = P(T > (m - c) / s), and a 95%
interval lies above c exactly when that p is below 0.025. Kinds (margin M >= 0):

- superiority ('a beats b'): reproduced when the interval lies above M (0 when the claim
  names no margin), refuted when it lies below 0.
- non-inferiority ('a at least matches b'): reproduced when the interval's lower end is above
  -M, refuted when its upper end is below -M; an interval wholly below 0 never reads
  reproduced (it is then inconclusive), whatever the margin.
- equivalence ('a equals b'): reproduced when the interval lies inside (-M, +M), refuted when
  it lies wholly outside (above +M or below -M).
- threshold (a statistic against a stated value, the arms' difference being statistic minus
  threshold): reproduced when the lower end is above -M (M = the claim's stated tolerance,
  0 for a strict '>'), refuted when the upper end is below -M.
- regret (a selection rule's pick is as good as the best of its set; the difference is pick
  minus best, <= 0 by construction): reproduced when the interval's lower end is above -M,
  refuted when its upper end is below -M. An interval below 0 is the construction, not a
  loss, and every difference 0 means the rule picked the best every time: reproduced (for
  M > 0), never "not tested".
- "not tested": every paired difference is exactly 0 (the two arms are the same model), so
  the data say nothing about the claim. The registry also reads "not tested" from records
  (alpha = 1, nothing pruned).

Fewer than two draws give no interval: inconclusive. `holm` adjusts a family's one-sided
p-values (Holm 1979); `adjusted` reads a decision again at the adjusted p-values.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats as sps

from jtransfer.errors import InputError
from jtransfer.protocol import stats

REPRODUCED, REFUTED, INCONCLUSIVE, NOT_TESTED = (stats.REPRODUCED, stats.REFUTED,
                                                 stats.INCONCLUSIVE, "not tested")
SUPERIORITY, NONINFERIORITY, EQUIVALENCE, THRESHOLD, REGRET = (
    "superiority", "non-inferiority", "equivalence", "threshold", "regret")
KINDS = (SUPERIORITY, NONINFERIORITY, EQUIVALENCE, THRESHOLD, REGRET)


@dataclasses.dataclass(frozen=True)
class Decision:
  """A claim's verdict and the one-sided p-values it was read from.

  Attributes:
    verdict: REPRODUCED, REFUTED, INCONCLUSIVE or NOT_TESTED.
    p_reproduce: p-value of the test whose rejection reproduces the claim (1 when untestable).
    p_refute: p-value of the test whose rejection refutes it (1 when untestable).
    below_zero: the interval lies wholly below 0 (a non-inferiority claim then cannot read
      reproduced, also after adjustment).
    reason: why NOT_TESTED or INCONCLUSIVE without a test ('' otherwise).
  """
  verdict: str
  p_reproduce: float
  p_refute: float
  below_zero: bool = False
  reason: str = ""


def p_above(c: stats.Paired, bound: float) -> float:
  """One-sided p of 'the mean difference is above `bound`': P(T_{n-1} > (m - bound) / se).

  The standard error is recovered from the two-sided interval (se = (hi - lo) / 2t), so the
  p-value is exactly the one that interval implies. A zero-width interval (every draw the same
  difference) gives 0 when the mean is above the bound, else 1.
  """
  if c.n < 2 or math.isnan(c.lo):
    return 1.0
  t = float(sps.t.ppf(0.5 + c.level / 2, c.n - 1))
  se = (c.hi - c.lo) / (2 * t)
  if se <= 0:
    return 0.0 if c.mean > bound else 1.0
  return float(sps.t.sf((c.mean - bound) / se, c.n - 1))


def p_below(c: stats.Paired, bound: float) -> float:
  """One-sided p of 'the mean difference is below `bound`' (the mirror of `p_above`)."""
  if c.n < 2 or math.isnan(c.lo):
    return 1.0
  t = float(sps.t.ppf(0.5 + c.level / 2, c.n - 1))
  se = (c.hi - c.lo) / (2 * t)
  if se <= 0:
    return 0.0 if c.mean < bound else 1.0
  return float(sps.t.cdf((c.mean - bound) / se, c.n - 1))


def _read(kind: str, p_rep: float, p_ref: float, below_zero: bool, alpha: float) -> str:
  if p_rep < alpha and not (kind == NONINFERIORITY and below_zero):
    return REPRODUCED
  return REFUTED if p_ref < alpha else INCONCLUSIVE


def decide(kind: str, c: stats.Paired, margin: float = 0.0) -> Decision:
  """The verdict of a claim of `kind` on the paired comparison `c` (a - b), margin >= 0.

  See the module docstring for the rule of each kind. The one-sided level is half of
  `1 - c.level`, so 'reproduced' means the two-sided interval clears the boundary.

  Raises:
    InputError: an unknown kind or a negative margin.
  """
  if kind not in KINDS:
    raise InputError(f"unknown claim kind {kind!r}: expected one of {', '.join(KINDS)}")
  if not margin >= 0:
    raise InputError(f"a claim's margin must be >= 0, got {margin}")
  if c.n >= 1 and c.ties == c.n and kind != REGRET:
    return Decision(NOT_TESTED, 1.0, 1.0, reason="every paired difference is exactly 0")
  if c.n < 2 or math.isnan(c.lo):
    return Decision(INCONCLUSIVE, 1.0, 1.0, reason="fewer than 2 draws")
  if kind == SUPERIORITY:
    p_rep, p_ref = p_above(c, margin), p_below(c, 0.0)
  elif kind in (NONINFERIORITY, THRESHOLD, REGRET):
    p_rep, p_ref = p_above(c, -margin), p_below(c, -margin)
  else:  # equivalence: two one-sided tests inside, either side outside
    p_rep = max(p_above(c, -margin), p_below(c, margin))
    p_ref = min(p_below(c, -margin), p_above(c, margin))
  below = c.hi < 0
  alpha = (1 - c.level) / 2
  return Decision(_read(kind, p_rep, p_ref, below, alpha), p_rep, p_ref, below)


def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values, in the input's order.

  Sorted ascending, the i-th smallest (0-based) becomes max over j <= i of (m - j) p_(j),
  capped at 1: rejecting where the adjusted p is below alpha controls the family-wise error
  rate at alpha (Holm 1979, "A simple sequentially rejective multiple test procedure").
  """
  p = np.asarray(pvalues, np.float64)
  m = p.size
  order = np.argsort(p, kind="stable")
  scaled = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
  out = np.empty(m)
  out[order] = scaled
  return [float(v) for v in out]


def adjusted(kind: str, d: Decision, p_reproduce: float, p_refute: float,
             level: float = 0.95) -> str:
  """The verdict of `d` read again at family-adjusted p-values (NOT_TESTED stays)."""
  if d.verdict == NOT_TESTED or d.reason:
    return d.verdict
  return _read(kind, p_reproduce, p_refute, d.below_zero, (1 - level) / 2)


@dataclasses.dataclass(frozen=True)
class Claim:
  """`a > b` (or `a >= b` within `margin` when `at_least`) over paired draws.

  Attributes:
    paper: short paper name ('CWL', 'DELTA', ...).
    text: the claim as the paper states it.
    a, b: the arms (strategy names) compared as a - b.
    at_least: a non-inferiority claim (a >= b - margin) instead of a > b + margin.
    margin: in accuracy units (0.01 = one point).
    where: cell field -> allowed values; cells outside are not part of the claim.
    source: where in the paper (table / figure).
  """
  paper: str
  text: str
  a: str
  b: str
  at_least: bool = False
  margin: float = 0.0
  where: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
  source: str = ""

  @property
  def kind(self) -> str:
    """The verdict rule's kind (`NONINFERIORITY` for '>=', else superiority)."""
    return NONINFERIORITY if self.at_least else SUPERIORITY

  def applies(self, cell: Mapping) -> bool:
    """Whether a cell (field -> value) is part of the claim."""
    return all(cell.get(k) in v for k, v in self.where.items())


def evaluate(claim: Claim, records: Iterable[dict], cell_fields: Sequence[str],
             arm_field: str = "strategy", draw_field: str = "repeat", value: str = "test_acc",
             keep: Optional[Callable[[dict], bool]] = None,
             draw_fields: Optional[Sequence[str]] = None) -> dict:
  """Paired comparison of a claim's arms per cell and pooled.

  Args:
    claim: the claim.
    records: one record per run, with the cell fields, the arm, the draw and the value.
    cell_fields: fields that name a cell (e.g. ('arch', 'target', 'shots')).
    arm_field, draw_field, value: record fields of the arm, the draw and the compared value.
    keep: which records count (e.g. the tuned hyper-parameters on evaluation draws); at most
      one record per (cell, arm, draw) may pass it.
    draw_fields: the fields that identify an independent draw, for the pooled row (default:
      the cell fields and the draw field, i.e. every cell has its own draws). Cells that share
      a draw (two archs trained on the same k-shot images, several pruning rates of one run)
      are averaged within the draw before pooling, so the pooled interval counts each draw
      once instead of treating correlated cells as independent.

  Returns:
    {'claim': dataclass dict, 'cells': [{'cell': {...}, 'paired': {...}, 'verdict': str,
     'draws': [draw value, ...], 'diffs': [a - b per draw, same order]}], 'pooled': {'paired':
     {...}, 'verdict': str, 'draw_fields': [...]} or None, 'missing': int, 'draw_field': str}.
    The per-draw differences let the claims registry re-pool and re-decide a claim from the
    summary alone. Draws where either arm failed are left out (and counted in 'missing').
    Verdicts follow `decide`.
  """
  vals: dict = defaultdict(dict)
  for r in records:
    if r.get(arm_field) not in (claim.a, claim.b) or (keep is not None and not keep(r)):
      continue
    cell = tuple(r[f] for f in cell_fields)
    if not claim.applies(dict(zip(cell_fields, cell))):
      continue
    slot = (cell, r[draw_field])
    if r[arm_field] in vals[slot]:
      raise ValueError(f"two records for {claim.a if r[arm_field] == claim.a else claim.b} at "
                       f"{dict(zip(cell_fields, cell))} draw {r[draw_field]}")
    vals[slot][r[arm_field]] = r.get(value) if r.get("status", "ok") == "ok" else None
  per_cell: dict = defaultdict(lambda: ([], [], []))
  missing = 0
  for (cell, draw), arms in sorted(vals.items(), key=lambda kv: tuple(map(str, kv[0]))):
    va, vb = arms.get(claim.a), arms.get(claim.b)
    if va is None or vb is None:
      missing += 1
      continue
    per_cell[cell][0].append(va)
    per_cell[cell][1].append(vb)
    per_cell[cell][2].append(draw)
  fields = list(cell_fields) + [draw_field]
  draw_fields = fields if draw_fields is None else list(draw_fields)
  if not set(draw_fields) <= set(fields):
    raise ValueError(f"draw_fields {draw_fields} must be among {fields}")
  cells = []
  by_draw: dict = defaultdict(lambda: ([], []))
  for cell, (a, b, draws) in per_cell.items():
    c = stats.paired(a, b)
    cells.append(dict(cell=dict(zip(cell_fields, cell)), paired=c.to_dict(),
                      verdict=decide(claim.kind, c, claim.margin).verdict,
                      draws=list(draws), diffs=[va - vb for va, vb in zip(a, b)]))
    for va, vb, draw in zip(a, b, draws):
      where = dict(zip(fields, (*cell, draw)))
      slot = by_draw[tuple(where[f] for f in draw_fields)]
      slot[0].append(va)
      slot[1].append(vb)
  pooled = None
  if by_draw:
    c = stats.paired([sum(a) / len(a) for a, _ in by_draw.values()],
                     [sum(b) / len(b) for _, b in by_draw.values()])
    pooled = dict(paired=c.to_dict(), verdict=decide(claim.kind, c, claim.margin).verdict,
                  draw_fields=draw_fields)
  return dict(claim=dataclasses.asdict(claim), cells=cells, pooled=pooled, missing=missing,
              draw_field=draw_field)


def _fmt(p: dict) -> str:
  return stats.format_paired(stats.Paired(**p))


def section(results: Sequence[dict], labels: Mapping[str, str] = {}) -> list[str]:
  """The report's 'Claims' section: one block per claim, one row per cell plus 'all cells'."""
  out = ["## Claims", "",
         "Per draw, method minus baseline in accuracy points: mean [95% t-interval] wins/N "
         "(same k-shot draws for both arms). Verdict: reproduced when the interval lies above "
         "the margin (for '>=' claims: above minus the margin), refuted when it lies below 0 "
         "(below minus the margin), inconclusive otherwise.", ""]
  for res in results:
    cl = res["claim"]
    rel = ">=" if cl["at_least"] else ">"
    name = lambda s: labels.get(s, s)
    margin = f", margin {100 * cl['margin']:g} pt" if cl["margin"] else ""
    out += [f"### {cl['paper']}: {cl['text']}" + (f" ({cl['source']})" if cl["source"] else ""),
            "", f"Tested as {name(cl['a'])} {rel} {name(cl['b'])}{margin}.", "",
            "| cell | difference [95% CI] wins/N | p | verdict |", "|---|---|---|---|"]
    for c in res["cells"]:
      cell = ", ".join(f"{v}" for v in c["cell"].values())
      out.append(f"| {cell} | {_fmt(c['paired'])} | {c['paired']['p']:.3g} | {c['verdict']} |")
    if res["pooled"]:
      p = res["pooled"]
      out.append(f"| **all cells** (per {', '.join(p['draw_fields'])}) | {_fmt(p['paired'])} | "
                 f"{p['paired']['p']:.3g} | **{p['verdict']}** |")
    if res["missing"]:
      out.append(f"| ({res['missing']} draw(s) left out: a run failed or is missing) | | | |")
    out.append("")
  return out
