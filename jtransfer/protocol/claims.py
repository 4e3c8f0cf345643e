"""Claims: a paper's ordering of two arms, tested per draw and read as a verdict.

An experiment module declares its claims (`Claim('cwl', 'Freeze+CWL > Freeze', 'freeze_cwl',
'freeze')`) and hands `evaluate` its records; each claim is compared per cell (every value of
the cell fields, e.g. arch x target x k) and pooled over all its cells, as paired differences
over the same draws (`stats.paired`), and `section` writes the report's "Claims" section.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Callable, Iterable, Mapping, Optional, Sequence

from jtransfer.protocol import stats


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

  def applies(self, cell: Mapping) -> bool:
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
    {'claim': dataclass dict, 'cells': [{'cell': {...}, 'paired': {...}, 'verdict': str}],
     'pooled': {'paired': {...}, 'verdict': str} or None}. Draws where either arm failed are
    left out (and counted in 'missing').
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
                      verdict=stats.verdict(c, claim.margin, claim.at_least)))
    for va, vb, draw in zip(a, b, draws):
      where = dict(zip(fields, (*cell, draw)))
      slot = by_draw[tuple(where[f] for f in draw_fields)]
      slot[0].append(va)
      slot[1].append(vb)
  pooled = None
  if by_draw:
    c = stats.paired([sum(a) / len(a) for a, _ in by_draw.values()],
                     [sum(b) / len(b) for _, b in by_draw.values()])
    pooled = dict(paired=c.to_dict(), verdict=stats.verdict(c, claim.margin, claim.at_least),
                  draw_fields=draw_fields)
  return dict(claim=dataclasses.asdict(claim), cells=cells, pooled=pooled, missing=missing)


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
