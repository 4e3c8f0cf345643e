"""Two published folders of the same cells under two protocols, claim by claim, side by side.

Issue 29 asks how much wider the intervals get when each evaluation draw is tuned on its own
labelled pool (`--tuning nested`) than when one shared tuning draw fixes the choice for every
draw of a cell, and which verdicts move. `compare` reads two folders (A and B; e.g. A nested,
B shared) and, for every claim both summaries hold, decides each cell and the claim's pooled
row under each folder by the registered rule and margin (`registry.decide_entry`, so a
registered claim's untested draws are left out exactly as in RESULTS.md; a claim no entry
names is read by its module's own kind and margin). A row gives, under A and under B, the
effect, its 95% interval, the interval's width and wins/N, the verdict, and the width ratio
A / B; a verdict that differs says why, read from B to A (`why_moved`). `render` writes the
markdown; `python -m experiments.publish compare A B --out FILE.md` is the command.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Mapping, Optional, Sequence

from jtransfer.errors import InputError
from jtransfer.protocol import claims, registry, stats
from jtransfer.study.publish import read_run

SCALE = 100.0  # accuracy (and mAP, rho) as points, as RESULTS.md shows them


@dataclasses.dataclass(frozen=True)
class Side:
  """One row under one folder: the paired comparison (None: no draws) and its decision."""
  paired: Optional[stats.Paired]
  decision: claims.Decision

  @property
  def width(self) -> float:
    """hi - lo, in the effect's units (nan without an interval)."""
    p = self.paired
    return math.nan if p is None or math.isnan(p.lo) else p.hi - p.lo


@dataclasses.dataclass(frozen=True)
class Row:
  """A cell (or the claim's pooled row, cell None) under A and under B (None: absent there)."""
  cell: Optional[dict]
  a: Optional[Side]
  b: Optional[Side]
  moved: str  # '' when the verdicts agree (or a side is absent), else the reason

  @property
  def ratio(self) -> float:
    """Width under A over width under B (nan when either has no interval or B's is 0)."""
    if self.a is None or self.b is None or not self.b.width > 0:
      return math.nan
    return self.a.width / self.b.width


@dataclasses.dataclass(frozen=True)
class ClaimComparison:
  """One claim's rows: its entry (registered, or the module's own), pooled row, then cells."""
  entry: registry.Registered
  where: Mapping
  pooled: Row
  cells: tuple


def load_folder(path: str) -> tuple[dict, list]:
  """(summary.json, results.json) of a published folder.

  Raises:
    InputError: either file is missing or unreadable.
  """
  out = []
  for name in ("summary.json", "results.json"):
    try:
      with open(os.path.join(path, name)) as f:
        out.append(json.load(f))
    except (OSError, json.JSONDecodeError) as e:
      raise InputError(f"{path}/{name} is missing or unreadable: {e}") from None
  return out[0], out[1]


def entry_for(res: Mapping, folder_names: Sequence[str],
              entries: Sequence[registry.Registered]) -> tuple[registry.Registered, dict]:
  """(entry, cells that count) for a folder's claim result: the registered entry with the same
  text and the `where` of the evidence naming one of `folder_names` (else its primary's), or
  an entry with the module's own kind and margin when no entry names the claim."""
  for e in entries:
    if e.text == res["claim"]["text"]:
      for ev in (e.primary,) + tuple(e.secondary):
        if set(ev.folders) & set(folder_names):
          return e, dict(ev.where)
      return e, dict(e.primary.where)
  cl = res["claim"]
  kind = claims.NONINFERIORITY if cl["at_least"] else claims.SUPERIORITY
  return registry.Registered(
      "(unregistered)", cl["paper"], cl["source"], cl["text"], kind, cl["margin"],
      "the module's own margin", cl["text"], registry.Evidence(("",))), {}


def _bounds(rule: str, margin: float) -> list[tuple[str, float]]:
  """The (interval end, boundary) pairs a verdict of `rule` is read from."""
  if rule == claims.SUPERIORITY:
    return [("lower", margin), ("upper", 0.0)]
  if rule == claims.EQUIVALENCE:
    return [("lower", -margin), ("upper", margin), ("upper", -margin), ("lower", margin)]
  if rule == claims.NONINFERIORITY:  # (an interval wholly below 0 never reproduces)
    return [("lower", -margin), ("upper", -margin), ("upper", 0.0)]
  return [("lower", -margin), ("upper", -margin)]  # threshold, regret


def _shifted(p: stats.Paired, mean: float, half: float) -> stats.Paired:
  return dataclasses.replace(p, mean=mean, lo=mean - half, hi=mean + half)


def why_moved(rule: str, margin: float, a: Side, b: Side) -> str:
  """Why the verdict under A differs from the one under B ('' when it does not).

  A verdict without a test (not tested, fewer than 2 draws) is named with its reason. Else the
  change is split into its two causes by reading two counterfactual intervals with `decide`:
  B's mean with A's half-width (does the width alone move it?) and A's mean with B's
  half-width (does the mean alone?). The reason names the cause and the boundary an interval
  end crossed, e.g. 'interval widened past 0 (lower end +0.40 -> -0.30 points)'.
  """
  va, vb = a.decision.verdict, b.decision.verdict
  if va == vb:
    return ""
  for name, side in (("A", a), ("B", b)):
    if side.decision.reason:
      return f"under {name}: {side.decision.verdict} ({side.decision.reason})"
  pa, pb = a.paired, b.paired
  ha, hb = (pa.hi - pa.lo) / 2, (pb.hi - pb.lo) / 2
  by_width = claims.decide(rule, _shifted(pa, pb.mean, ha), margin).verdict != vb
  by_mean = claims.decide(rule, _shifted(pa, pa.mean, hb), margin).verdict != vb
  width = "interval widened" if ha > hb else "interval narrowed"
  mean = "effect rose" if pa.mean > pb.mean else "effect fell"
  cause = width if by_width and not by_mean else mean if by_mean and not by_width else \
      f"{width} and {mean}"
  ends = {"lower": (pb.lo, pa.lo), "upper": (pb.hi, pa.hi)}
  for end, bound in _bounds(rule, margin):
    old, new = ends[end]
    if (old > bound) != (new > bound):
      past = "0" if bound == 0 else f"{SCALE * bound:+.3g}"
      return (f"{cause} past {past} ({end} end {SCALE * old:+.2f} -> "
              f"{SCALE * new:+.2f} points)")
  return cause  # (every end on the same side of every boundary: the p-value moved alone)


def _side(entry: registry.Registered, name: str, where: Mapping, summaries: Mapping,
          records: Mapping, cell: Optional[Mapping]) -> Optional[Side]:
  """The decision of `entry` on folder `name`'s cells in `where` (one cell when given)."""
  if cell is not None:  # one cell of a dose claim is read by its rule, at its own dose
    entry = dataclasses.replace(entry, kind=entry.rule)
    where = {**where, **{k: (v,) for k, v in cell.items()}}
  try:
    r = registry.decide_entry(entry, registry.Evidence((name,), where), summaries, records)
  except InputError:  # the folder lacks the claim, or (dose claims) its registered dose
    return None
  if r["paired"] is None and not r["untested"][1]:
    return None
  return Side(r["paired"], r["decision"])


def _row(entry, where, summaries, records, cell, names) -> Row:
  a, b = (_side(entry, n, where, summaries, records, cell) for n in names)
  moved = why_moved(entry.rule, entry.margin, a, b) if a is not None and b is not None else ""
  return Row(None if cell is None else dict(cell), a, b, moved)


def compare(a_path: str, b_path: str,
            entries: Sequence[registry.Registered]) -> list[ClaimComparison]:
  """Every claim of folder A's summary that folder B's also holds, compared (see the module
  docstring). A's claims come in its summary's order; cells are the union of both folders',
  in A's order then B's own.

  Raises:
    InputError: a folder is missing its files, or the two hold no claim in common.
  """
  names = (os.path.normpath(a_path), os.path.normpath(b_path))
  if names[0] == names[1]:
    raise InputError(f"compare needs two different folders, got {a_path} twice")
  loaded = [load_folder(p) for p in names]
  summaries = {n: s for n, (s, _) in zip(names, loaded)}
  records = {n: r for n, (_, r) in zip(names, loaded)}
  results = [{res["claim"]["text"]: res for res in (s.get("claims") or [])}
             for s in summaries.values()]
  common = [t for t in results[0] if t in results[1]]
  if not common:
    raise InputError(f"{a_path} and {b_path} hold no claim in common: compare folders of the "
                     "same study")
  bases = [os.path.basename(n) for n in names]
  out = []
  for text in common:
    entry, where = entry_for(results[0][text], bases, entries)
    cells = []
    for res in (results[0][text], results[1][text]):
      for c in res["cells"]:
        if c["cell"] not in cells:
          cells.append(c["cell"])
    out.append(ClaimComparison(
        entry, where, _row(entry, where, summaries, records, None, names),
        tuple(_row(entry, {}, summaries, records, c, names) for c in cells)))
  return out


def _pts(v: float) -> str:
  return "" if math.isnan(v) else f"{SCALE * v:.2f}"


def _cells(side: Optional[Side]) -> list[str]:
  """[effect [CI] wins/N, width, verdict] of one side (dashes when absent)."""
  if side is None:
    return ["-", "-", "-"]
  effect = "no draws" if side.paired is None else stats.format_paired(side.paired, SCALE)
  return [effect, _pts(side.width), side.decision.verdict]


def _name(cell: Optional[Mapping], where: Mapping) -> str:
  if cell is None:
    only = "".join(f" ({k} = {', '.join(map(str, v))})" for k, v in where.items())
    return f"**all cells**{only}"
  return ", ".join(f"{k}={v}" for k, v in cell.items())


def _command(path: str) -> str:
  run = read_run(path)
  return f"`{run['command']}`" if run and "command" in run else "(no run.json)"


def render(comparisons: Sequence[ClaimComparison], a_path: str, b_path: str) -> str:
  """The markdown of `compare`'s result: a summary of widths, the verdicts that moved, then
  one table per claim (pooled row first)."""
  rows = [(c, r) for c in comparisons for r in (c.pooled,) + tuple(c.cells)]
  ratios = sorted(r.ratio for _, r in rows if r.cell is not None and not math.isnan(r.ratio))
  pooled = [c.pooled.ratio for c in comparisons if not math.isnan(c.pooled.ratio)]
  out = [f"# {a_path} (A) vs {b_path} (B): intervals and verdicts side by side", "",
         f"- A: {a_path}, {_command(a_path)}", f"- B: {b_path}, {_command(b_path)}", "",
         "Per claim and per cell, under each folder: the paired difference in points (mean "
         "[95% t-interval] wins/N), the interval's width (hi - lo, points) and the verdict by "
         "the claim's registered rule and margin (docs/protocol_verdicts.md); 'A/B' is A's "
         "width over B's. A moved verdict's reason reads from B to A: which end of the "
         "interval crossed which boundary, and whether the width alone, the mean alone, or "
         "both moved it.", ""]
  if ratios:
    out.append(f"Width A/B over {len(ratios)} cell(s): median {statistics.median(ratios):.2f}, range "
               f"{ratios[0]:.2f} to {ratios[-1]:.2f}" +
               (f"; pooled rows: {', '.join(f'{v:.2f}' for v in pooled)}." if pooled else "."))
    out.append("")
  moved = [(c, r) for c, r in rows if r.moved]
  out += ["## Verdicts that moved", ""]
  if moved:
    out += ["| claim | cell | B | A | reason |", "|---|---|---|---|---|"]
    out += [f"| {c.entry.id}: {c.entry.text} | {_name(r.cell, c.where)} | "
            f"{r.b.decision.verdict} | {r.a.decision.verdict} | {r.moved} |" for c, r in moved]
  else:
    out.append("None: every row reads the same verdict under A and B.")
  for c in comparisons:
    e = c.entry
    margin = f"{SCALE * e.margin:.3g} pt" if e.margin else "0"
    out += ["", f"## {e.id}: {e.text}", "", f"{e.kind}, margin {margin}.", "",
            "| cell | A: effect [95% CI] wins/N | A width | A verdict | B: effect [95% CI] "
            "wins/N | B width | B verdict | A/B | moved |", "|---|---|---|---|---|---|---|---|---|"]
    for r in (c.pooled,) + tuple(c.cells):
      ratio = "" if math.isnan(r.ratio) else f"{r.ratio:.2f}"
      out.append("| " + " | ".join([_name(r.cell, c.where)] + _cells(r.a) + _cells(r.b) +
                                   [ratio, r.moved]) + " |")
  return "\n".join(out) + "\n"
