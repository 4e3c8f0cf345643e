"""The claims registry: one entry per distinct claim, decided once from its primary evidence.

A module's `claims.Claim` says how one results folder tests an ordering; the same claim is
tested by several folders (the main and the swapped split, two archs, runs reused by a later
grid). A `Registered` claim names it once: where the paper states it, its kind and margin with
the margin's reason (fixed before any verdict was read), its primary evidence (the folders and
cells whose per-draw differences decide it) and its secondary evidence (reported, not
deciding). `decide_entry` re-pools the primary cells' per-draw differences (each summary's
`cells[i].diffs`, written by `claims.evaluate`) per independent draw and reads the verdict
through `claims.decide`; `decide_family` adds Holm's adjustment over every registered claim.

Not tested: a draw whose treatment arm did nothing (the records say alpha = 1, nothing
pruned) tests nothing; an entry's `untested` detector names those (cell, draw) slots from the
records, they are left out, and a claim left with fewer than two tested draws reads
"not tested" (as one whose paired differences are all exactly 0).
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Callable, Mapping, Optional, Sequence

from jtransfer.errors import InputError
from jtransfer.protocol import claims, stats

DOSE = "dose"  # non-inferiority read per dose of a grid (pruning threshold, sparsity)
KINDS = claims.KINDS + (DOSE,)
# (frozenset of cell items that must match, draw value): one draw of one cell
Slot = tuple


@dataclasses.dataclass(frozen=True)
class Evidence:
  """Folders (names under published/) and the cells of their claim result that count.

  Attributes:
    folders: one or more folders; their cells are pooled per draw key, and cells of two
      folders with the same draw key (two archs on the same k-shot draw) are averaged into
      one draw, as `claims.evaluate` does within a folder.
    where: cell field -> allowed values (e.g. {'epochs': (30,)}); empty = every cell.
    note: what this evidence is (shown beside secondary evidence).
  """
  folders: tuple
  where: Mapping = dataclasses.field(default_factory=dict)
  note: str = ""


@dataclasses.dataclass(frozen=True)
class Untested:
  """Detects, from a folder's records, the (cell, draw) slots where the claim's treatment did
  nothing: `slots(records)` -> {(frozenset of (field, value) the cell must have, draw)}."""
  reason: str
  slots: Callable[[list], set]


@dataclasses.dataclass(frozen=True)
class Registered:
  """One distinct claim.

  Attributes:
    id: short stable id ('cwl.freeze_cwl_gt_freeze').
    paper: 'CWL', 'DELTA', 'Selection', 'Sparse', 'Compact', or a later baseline's name.
    stated: where the paper states it (table / section).
    statement: what it says, paraphrased.
    kind: one of KINDS.
    margin: in the effect's units (accuracy: 0.01 = one point).
    margin_reason: why this margin (test-set resolution, the paper's own numbers, or a stated
      practical threshold).
    text: the module claim's text in the folders' summary.json (how evidence is found).
    primary: the evidence that decides.
    secondary: evidence reported beside it.
    dose: for DOSE claims, the cell field holding the dose.
    dose_at: for DOSE claims, the dose the verdict is read at, and why (dose_reason).
    untested: a detector of draws whose treatment did nothing, or None.
    runs: the strategies whose records make the claim's rows (to detect reused runs);
      empty = not strategy records.
  """
  id: str
  paper: str
  stated: str
  statement: str
  kind: str
  margin: float
  margin_reason: str
  text: str
  primary: Evidence
  secondary: tuple = ()
  dose: str = ""
  dose_at: Optional[float] = None
  dose_reason: str = ""
  untested: Optional[Untested] = None
  runs: tuple = ()

  def __post_init__(self):
    if self.kind not in KINDS:
      raise InputError(f"claim {self.id}: unknown kind {self.kind!r}")
    if not self.margin >= 0 or not self.margin_reason:
      raise InputError(f"claim {self.id}: a margin >= 0 with its reason is required")
    if self.kind == DOSE and (not self.dose or self.dose_at is None or not self.dose_reason):
      raise InputError(f"claim {self.id}: a dose claim names its dose field and dose_at")

  @property
  def rule(self) -> str:
    """The `claims.decide` kind its verdicts are read with (dose: non-inferiority)."""
    return claims.NONINFERIORITY if self.kind == DOSE else self.kind


def _result(summary: dict, text: str, folder: str) -> dict:
  for res in summary.get("claims", []) if isinstance(summary, dict) else []:
    if res["claim"]["text"] == text:
      return res
  raise InputError(f"{folder}/summary.json has no claim {text!r}")


def cell_draws(entry: Registered, ev: Evidence, summaries: Mapping[str, dict],
               records: Mapping[str, list]) -> list:
  """[(cell dict, draw key, diff, untested, why untested)] of `ev`'s cells.

  The draw key is the result's pooled draw fields' values (a cell of one folder and a cell of
  another with the same key are the same draw); `untested` marks the slots the entry's
  detector names from the folder's records, and every slot of a folder whose report marks the
  claim's arm not converged (`--cap-share`: the result's 'not_converged'), so the registry
  reads the claim as that folder's report does."""
  out = []
  for folder in ev.folders:
    res = _result(summaries[folder], entry.text, folder)
    fields = list(res["pooled"]["draw_fields"]) if res.get("pooled") else []
    bad = entry.untested.slots(records[folder]) if entry.untested else set()
    capped = res.get("not_converged") or []
    for c in res["cells"]:
      if any(c["cell"].get(k) not in v for k, v in ev.where.items()):
        continue
      for draw, d in zip(c["draws"], c["diffs"]):
        why = (f"{', '.join(capped)} not converged ({folder}'s report: at the step cap in "
               "more than the --cap-share of evaluation runs)") if capped else \
            entry.untested.reason if any(draw == sd and cell <= set(c["cell"].items())
                                         for cell, sd in bad) else ""
        where = dict(c["cell"], **{res["draw_field"]: draw})
        out.append((c["cell"], tuple(where[f] for f in fields), d, bool(why), why))
  return out


def pool(items: Sequence) -> stats.Paired:
  """The paired comparison of (cell, draw key, diff, ...) items, averaged within a draw key."""
  by: dict = defaultdict(list)
  for it in items:
    by[it[1]].append(it[2])
  means = [sum(v) / len(v) for _, v in sorted(by.items(), key=lambda kv: tuple(map(str, kv[0])))]
  return stats.paired(means, [0.0] * len(means))


def _decide(entry: Registered, items: Sequence) -> tuple:
  """(Paired or None, Decision, (untested draws, draws)) of items, untested ones left out."""
  tested = [it for it in items if not it[3]]
  untested = (len(items) - len(tested), len(items))
  if len({it[1] for it in tested}) < 2:
    reasons = "; ".join(sorted({it[4] for it in items if it[3]}))
    why = (f"{untested[0]} of {untested[1]} (cell, draw) pairs: {reasons}" if untested[0]
           else "fewer than 2 draws")
    return (pool(tested) if tested else None,
            claims.Decision(claims.NOT_TESTED if untested[0] else claims.INCONCLUSIVE, 1.0, 1.0,
                            reason=why), untested)
  p = pool(tested)
  return p, claims.decide(entry.rule, p, entry.margin), untested


def decide_entry(entry: Registered, ev: Evidence, summaries: Mapping[str, dict],
                 records: Mapping[str, list]) -> dict:
  """The verdict of `entry` on evidence `ev`.

  A (cell, draw) pair the detector names is left out; a draw whose every cell is left out
  drops out of the pooled comparison, one with cells left stands on those. DOSE claims
  are decided per dose; their decision is the one at `dose_at`, and 'largest_dose' is the
  largest dose at which, and at every tested smaller one, the claim reads reproduced.

  Returns:
    {'paired': Paired or None, 'decision': claims.Decision, 'untested': ((cell, draw) pairs
     left out, pairs), 'doses': [(dose, Paired or None, verdict)], 'largest_dose': dose or
     None}.
  """
  items = cell_draws(entry, ev, summaries, records)
  doses, largest = [], None
  if entry.kind != DOSE:
    paired, decision, untested = _decide(entry, items)
  else:
    found = None
    for dose in sorted({it[0][entry.dose] for it in items}):
      p, d, u = _decide(entry, [it for it in items if it[0][entry.dose] == dose])
      doses.append((dose, p, d.verdict))
      if dose == entry.dose_at:
        found = (p, d, u)
    for dose, p, v in doses:
      if v == claims.NOT_TESTED:
        continue
      if v != claims.REPRODUCED:
        break
      largest = dose
    if found is None:
      raise InputError(f"claim {entry.id}: no cell at dose {entry.dose_at}")
    paired, decision, untested = found
  return dict(paired=paired, decision=decision, untested=untested, doses=doses,
              largest_dose=largest)


def decide_family(entries: Sequence[Registered], summaries: Mapping[str, dict],
                  records: Mapping[str, list]) -> list[dict]:
  """Every entry's primary verdict plus its Holm-adjusted one over the whole family.

  The family is every registered claim with a test (not 'not tested', two or more draws);
  'reproduce' and 'refute' p-values are adjusted as two families (each claim contributes one
  of each), so a verdict survives adjustment when its own p-value does."""
  rows = [dict(entry=e, **decide_entry(e, e.primary, summaries, records)) for e in entries]
  tested = [r for r in rows if not r["decision"].reason]
  rep = claims.holm([r["decision"].p_reproduce for r in tested]) if tested else []
  ref = claims.holm([r["decision"].p_refute for r in tested]) if tested else []
  for r, a, b in zip(tested, rep, ref):
    r["p_adjusted"] = (a, b)
  for r in rows:
    pa = r.get("p_adjusted", (math.nan, math.nan))
    r["adjusted"] = (r["decision"].verdict if "p_adjusted" not in r else
                     claims.adjusted(r["entry"].rule, r["decision"], *pa))
  return rows
