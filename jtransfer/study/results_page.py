"""RESULTS.md's generated part: one row per registered claim, then the per-folder evidence.

The leading table decides each registered claim (`jtransfer.protocol.registry.Registered`; the
repository's are `experiments.claims_registry.ALL`, handed in by the publish command) once, from its primary
evidence (`jtransfer.protocol.registry.decide_family`: verdict, effect, interval, wins/N, the
one-sided p-value, the Holm-adjusted verdict over the page's family, and why a claim is "not
tested"; "not tested yet" when its primary evidence has no published folder). The second table
shows every folder's evidence for each claim, decided by the same rule and margin, primary and
secondary alike, and says when a row's runs are the same records another folder holds (a grid
that reran nothing new). `python -m experiments.publish results`
writes both from the published folders' results.json and summary.json.
"""
from __future__ import annotations

import json
import math
import os
from typing import Mapping, Sequence

from jtransfer.protocol import claims, registry, stats
from jtransfer.study.publish import folders, read_run

NOT_YET = "not tested yet"  # a registered claim whose primary evidence is not published yet
TABLE_BEGIN, TABLE_END = "<!-- claims table: begin (generated) -->", \
    "<!-- claims table: end -->"


def wall_text(run: dict) -> str:
  """run.json's wall time in minutes, '+' when an invocation was not timed (wall_s 0: a
  snapshot of a killed run published without --wall-s)."""
  untimed = any(i.get("wall_s", 0) == 0 for i in run.get("invocations", []))
  return f"{run['wall_s'] / 60:.0f}{'+' if untimed else ''} min"


def load(root: str) -> tuple[dict, dict]:
  """({folder name: summary dict}, {folder name: records}) of every folder under root."""
  summaries, records = {}, {}
  for path in folders(root):
    name = os.path.relpath(path, root)
    with open(os.path.join(path, "summary.json")) as f:
      summaries[name] = json.load(f)
    with open(os.path.join(path, "results.json")) as f:
      records[name] = json.load(f)
  return summaries, records


def _effect(p: stats.Paired | None) -> str:
  return "no draws" if p is None else stats.format_paired(p)


def _margin(e: registry.Registered) -> str:
  return f"{100 * e.margin:.3g} pt" if e.margin else "0"


def _note(e: registry.Registered, r: Mapping) -> str:
  parts = []
  d = r["decision"]
  if d.verdict == claims.NOT_TESTED:
    parts.append(f"not tested: {d.reason}")
  elif r["untested"][0] and e.untested:
    parts.append(f"{r['untested'][0]} of {r['untested'][1]} (cell, draw) pairs left out: "
                 f"{e.untested.reason}")
  if d.verdict != claims.NOT_TESTED and d.reason:
    parts.append(d.reason)
  if e.kind == registry.DOSE:
    per = ", ".join(f"{dose:g}: {v}" for dose, _, v in r["doses"])
    largest = "none" if r["largest_dose"] is None else f"{r['largest_dose']:g}"
    parts.append(f"read at {e.dose} = {e.dose_at:g}; per {e.dose}: {per}; largest {e.dose} "
                 f"within the margin: {largest}")
  if d.below_zero and e.rule == claims.NONINFERIORITY:
    parts.append("interval wholly below 0: never reproduced")
  return "; ".join(parts)


def _p(v: float) -> str:
  return "" if math.isnan(v) else f"{v:.2g}"


def _pair(d: claims.Decision) -> str:
  """The p of the test whose rejection reproduces the claim, and of the one that refutes it."""
  return f"{_p(d.p_reproduce)} / {_p(d.p_refute)}"


def registered_table(rows: Sequence[Mapping], root: str) -> list[str]:
  """One row per registered claim: its primary verdict, raw and Holm-adjusted."""
  out = ["| id | paper (where) | claim | kind, margin | verdict | effect: mean [95% CI] wins/N, "
         "points | p (one-sided): reproduce / refute | Holm-adjusted | note | primary evidence |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    e = r["entry"]
    links = ", ".join(_link(root, f) for f in e.primary.folders)
    where = "".join(f" ({k} = {', '.join(map(str, v))})" for k, v in e.primary.where.items())
    if r.get("pending"):  # registered before its evidence: no verdict, outside Holm's family
      missing = ", ".join(f for f in e.primary.folders if f in r["pending"])
      plain = ", ".join(os.path.relpath(os.path.join(root, f)) for f in e.primary.folders)
      part = sorted(r["pending"] & r.get("partial", set()))
      why = (f"{', '.join(part)} is a partial grid: the verdict waits for the whole grid"
             if part else f"no published folder {missing} yet")
      out.append(f"| {e.id} | {e.paper} ({e.stated}) | {e.statement} | {e.kind}, "
                 f"{_margin(e)} | **{NOT_YET}** | no draws | | | {why} | {plain}{where} |")
      continue
    p = r.get("p_adjusted")
    out.append(f"| {e.id} | {e.paper} ({e.stated}) | {e.statement} | {e.kind}, {_margin(e)} | "
               f"**{r['decision'].verdict}** | {_effect(r['paired'])} | "
               f"{_pair(r['decision']) if p else ''} | {r['adjusted']} | "
               f"{_note(e, r)} | {links}{where} |")
  return out


def margins_list(entries: Sequence[registry.Registered]) -> list[str]:
  """Each claim's margin and its reason (and a dose claim's reading point)."""
  out = []
  for e in entries:
    dose = f" Read at {e.dose} = {e.dose_at:g}: {e.dose_reason}." if e.kind == registry.DOSE \
        else ""
    out.append(f"- {e.id}: {e.kind}, margin {_margin(e)}: {e.margin_reason}.{dose}")
  return out


def _record_keys(records: list) -> set:
  return {json.dumps(r, sort_keys=True) for r in records}


def reused_from(entry: registry.Registered, folder: str, records: Mapping[str, list],
                keys: Mapping[str, set]) -> str:
  """The first other folder holding every record of `entry.runs` that `folder` holds ('' =
  none): the row is then those runs again, not new evidence."""
  if not entry.runs:
    return ""
  # (a version-2 record names its strategy 'arm', jtransfer.study.records)
  mine = _record_keys([r for r in records[folder]
                       if r.get("strategy", r.get("arm")) in entry.runs])
  if not mine:
    return ""
  for other in sorted(keys):
    if other != folder and mine <= keys[other]:
      return other
  return ""


def _entry_for(res: dict, folder: str, by_text: Mapping) -> tuple:
  """(registered entry, evidence, role) of a folder's claim result; a claim no entry names
  is decided by the module's own kind and margin."""
  e = by_text.get(res["claim"]["text"])
  if e is not None:
    for role, ev in [("primary", e.primary)] + [("secondary", s) for s in e.secondary]:
      if folder in ev.folders:
        return e, registry.Evidence((folder,), ev.where, ev.note), role
    return e, registry.Evidence((folder,)), "not registered as evidence"
  cl = res["claim"]
  kind = claims.NONINFERIORITY if cl["at_least"] else claims.SUPERIORITY
  e = registry.Registered("(unregistered)", cl["paper"], cl["source"], cl["text"], kind,
                          cl["margin"], "the module's own margin", cl["text"],
                          registry.Evidence((folder,)), runs=(cl["a"], cl["b"]))
  return e, e.primary, "unregistered"


def evidence_table(entries: Sequence[registry.Registered], summaries: Mapping[str, dict],
                   records: Mapping[str, list], root: str) -> list[str]:
  """Per folder and claim: the registered rule and margin on that folder's cells alone."""
  keys = {f: _record_keys(r) for f, r in records.items()}
  by_text = {e.text: e for e in entries}
  rows = []
  for folder in sorted(summaries):
    s = summaries[folder]
    run = read_run(os.path.join(root, folder)) or {}
    partial = (f"a partial grid ({run.get('records')} runs so far): a reading that may change"
               if run.get("complete") is False else "")
    for res in s.get("claims", []) if isinstance(s, dict) else []:
      if not res.get("pooled"):
        continue
      e, ev, role = _entry_for(res, folder, by_text)
      r = registry.decide_entry(e, ev, summaries, records)
      same = reused_from(e, folder, records, keys)
      cl = res["claim"]
      note = "; ".join(x for x in (
          partial, ev.note if not same else "",
          f"the same runs as {same}: not new evidence" if same else "", _note(e, r)) if x)
      rel = ">=" if cl["at_least"] else ">"
      text = cl["text"].replace("|", "\\|")
      rows.append((e.id, folder, f"| {e.id} | {cl['paper']}: {text} | "
                   f"{cl['a']} {rel} {cl['b']} | {_link(root, folder)} | {role} | "
                   f"{r['decision'].verdict} | {_effect(r['paired'])} | {note} |"))
  return ["| id | claim (module's text) | tested as | folder | role | verdict | effect: mean "
          "[95% CI] wins/N, points | note |", "|---|---|---|---|---|---|---|---|"] + \
      [row for _, _, row in sorted(rows, key=lambda t: (t[0] == "(unregistered)", t[0], t[1]))]


def _link(root: str, folder: str) -> str:
  rel = os.path.relpath(os.path.join(root, folder))
  return f"[{rel}]({rel}/report.md)"


def commands_list(root: str) -> list[str]:
  """One line per folder: its command, wall time and run count."""
  out = []
  for path in folders(root):
    run = read_run(path)
    rel = os.path.relpath(path)
    out += [f"- [{rel}]({rel}/report.md): `{run['command']}` ({wall_text(run)}, "
            f"{run['records']} runs{', partial grid' if run.get('complete') is False else ''})"]
  return out


def generated(root: str, entries: Sequence[registry.Registered]) -> list[str]:
  """The lines between RESULTS.md's markers, for the registered claims `entries`."""
  summaries, records = load(root)
  # a partial grid (a run stopped for time, run.json complete: false) is shown as evidence but
  # decides no registered claim: its verdict waits for the cells it lacks
  partial = {f for f in summaries if read_run(os.path.join(root, f)).get("complete") is False}
  present = [e for e in entries if set(e.primary.folders) <= set(summaries) - partial]
  rows = registry.decide_family(present, summaries, records)
  rows += [dict(entry=e, pending=set(e.primary.folders) - (set(summaries) - partial),
                partial=partial) for e in entries if e not in present]
  return ([TABLE_BEGIN, "", "### One row per registered claim", ""] +
          registered_table(rows, root) +
          ["", "### Margins and their reasons (fixed before the verdicts were computed)", ""] +
          margins_list(entries) +
          ["", "### Every folder's evidence, by the same rule and margin", ""] +
          evidence_table(entries, summaries, records, root) +
          ["", "Commands (each folder's report.md starts with its own):", ""] +
          commands_list(root) + ["", TABLE_END])


def results_page(current: str, root: str, entries: Sequence[registry.Registered]) -> str:
  """RESULTS.md with its generated part (between the markers) rebuilt from `root` for the
  registered claims `entries`; the text outside the markers (the verdict paragraphs) is kept as
  written."""
  lines = generated(root, entries)
  if TABLE_BEGIN in current and TABLE_END in current:
    head, rest = current.split(TABLE_BEGIN, 1)
    tail = rest.split(TABLE_END, 1)[1]
  else:
    head, tail = current + ("\n" if current and not current.endswith("\n") else ""), "\n"
  return head + "\n".join(lines) + tail
