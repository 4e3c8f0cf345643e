"""Did an arm converge? The share of its evaluation runs that stopped at their step cap.

A run under a patience budget stops either because its validation accuracy stopped improving
('patience') or because it reached the step cap ('cap'; `jtransfer.protocol.budget`). An arm
whose evaluation runs reach the cap in more than `CAP_SHARE` of runs was still learning when
the budget ended, so a comparison with it measures the budget, not the method (issue 29: L2-FE
at the 200-step cap in 25 of 40 runs of delta_table_k10). Its report rows are flagged "not
converged" and a registered claim with it on either side reads "not tested" (`not_converged`,
a registry `Untested`).
Runs trained a fixed number of steps ('fixed') have no cap to hit and never count.

Records may be version 1 (flat: 'strategy', 'role', 'repeat', 'stopped') or version 2
('arm', 'cell', 'draw', 'outcome'; `jtransfer.study.records`).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional

from jtransfer.protocol.registry import Untested

CAP_SHARE = 0.1  # more than this share of evaluation runs at the cap: not converged


def eval_stop(r: Mapping) -> Optional[tuple]:
  """(arm, cell items, draw, stopped) of an evaluation record that says how it stopped, else
  None (tuning runs, records without a 'stopped' field)."""
  if "outcome" in r:  # version 2
    if r["draw"]["role"] != "eval" or "stopped" not in r["outcome"]:
      return None
    return r["arm"], frozenset(r["cell"].items()), r["draw"]["index"], r["outcome"]["stopped"]
  if r.get("role", "eval") != "eval" or "stopped" not in r:
    return None
  cell = {k: r[k] for k in ("arch", "target", "shots") if k in r}
  return (r.get("strategy", r.get("arm")), frozenset(cell.items()), r.get("repeat", 0),
          r["stopped"])


def capped(records: Iterable[Mapping]) -> dict[str, tuple[int, int]]:
  """arm -> (evaluation runs stopped at the cap, evaluation runs that say how they stopped)."""
  out: dict = {}
  for r in records:
    s = eval_stop(r)
    if s is not None:
      c, n = out.get(s[0], (0, 0))
      out[s[0]] = (c + (s[3] == "cap"), n + 1)
  return out


def flagged(records: Iterable[Mapping], share: float = CAP_SHARE) -> dict[str, tuple[int, int]]:
  """The arms whose evaluation runs stop at the cap in more than `share` of runs:
  arm -> (at the cap, runs)."""
  return {a: (c, n) for a, (c, n) in capped(records).items() if n and c > share * n}


def flag_text(c: int, n: int) -> str:
  """The tables' mark of an arm that did not converge."""
  return f"not converged: {c}/{n} runs at the step cap"


def not_converged(*arms: str, share: float = CAP_SHARE) -> Untested:
  """A registry detector: every (cell, draw) of a folder where one of `arms` is flagged (so a
  claim comparing them reads "not tested" there: a comparison with an arm still learning at
  its cap measures the budget, whichever side of the claim it is on)."""
  if not arms:
    raise ValueError("not_converged needs at least one arm")

  def slots(records: list) -> set:
    bad = set(arms) & set(flagged(records, share))
    return {(s[1], s[2]) for s in map(eval_stop, records) if s is not None and s[0] in bad}
  who = arms[0] if len(arms) == 1 else f"{', '.join(arms[:-1])} or {arms[-1]}"
  return Untested(f"{who}'s evaluation runs stop at their step cap in more than "
                  f"{share:.0%} of runs (not converged)", slots)
