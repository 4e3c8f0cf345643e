"""ONE record schema for every study's runs (version 2), and a reader of published version-1
records, so reports regenerate from old folders.

A version-2 record, one per finished run (results.jsonl, then results.json):

  {"version": 2, "arm": "freeze_cwl",
   "cell": {"arch": "vgg_s", "target": "digits", "shots": 5},
   "draw": {"role": "tune" | "eval", "index": 0, "fold": -1},
   "knobs": {"lr": 0.01, "alpha": 0.1},            # floats, never text
   "outcome": {"status": "ok", "test_acc": .., "val_acc": .., "steps": .., ...},
   "extra": {"n_train": .., "n_val": .., "n_test": .., "cap": .., "notes": [...]},
   "seconds": 1.25}

`key(record)` names the run: (arm, cell items, role, index, fold, knob items). Version-1
records (the modules' flat records before the runner: arm = strategy / variant / model, draw =
repeat (negative: tuning draw) or seed, knobs = lr plus the 'hp' text 'alpha=0.01,...') are
converted by `read`. Reports read `flat` rows: one dict with the arm, the cell's fields, the
draw ('role', 'repeat', 'fold'), 'lr', the other knobs, 'hp' (their canonical text, a label
only) and the outcome.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional, Sequence

from jtransfer.study.draws import Draw

VERSION = 2
# Outcome fields of a version-1 record (what a run scored); the rest is identity or extra.
OUTCOME = ("status", "error", "test_acc", "val_acc", "steps", "best_step", "stopped",
           "filter_distance", "acc", "map", "lr_val", "edges")
ARM_FIELDS = ("strategy", "variant", "model")
CELL_FIELDS = ("arch", "target", "shots")


def hp_text(knobs: Mapping[str, float]) -> str:
  """Canonical text of knob values other than the LR ('alpha=0.01,beta=0.01'; '' for none), a
  label of reports and progress lines; records keep the floats."""
  return ",".join(f"{k}={float(v):.6g}" for k, v in sorted(knobs.items()) if k != "lr")


def parse_hp(text: str) -> dict[str, float]:
  """Inverse of `hp_text` (version-1 records' 'hp' field)."""
  return {k: float(v) for k, v in (kv.split("=") for kv in str(text).split(",") if kv)}


def make(arm: str, cell: Mapping[str, Any], draw: Draw, knobs: Mapping[str, float],
         outcome: Mapping[str, Any], seconds: Optional[float] = None,
         extra: Optional[Mapping[str, Any]] = None) -> dict:
  """A version-2 record."""
  r = {"version": VERSION, "arm": arm, "cell": dict(cell), "draw": draw.to_dict(),
       "knobs": {k: float(v) for k, v in knobs.items()}, "outcome": dict(outcome),
       "extra": dict(extra or {})}
  if seconds is not None:
    r["seconds"] = round(float(seconds), 3)
  return r


def canon(v: float) -> float:
  """A knob value as keys compare it: 6 significant digits. Tuning extends a grid to values
  like 10.8695652174 (`jtransfer.protocol.tuning`); version-1 records kept them as 6-digit
  text, so a key that compared every digit would not find them."""
  return float(f"{float(v):.6g}")


def canon_point(knobs: Mapping[str, float]) -> dict:
  """{knob: canon(value)}."""
  return {k: canon(v) for k, v in knobs.items()}


def run_key(arm: str, cell: Mapping[str, Any], draw: Draw, knobs: Mapping[str, float]) -> tuple:
  """The key of the run (arm, cell, draw, knobs), as `key` gives it for its record."""
  return (arm, tuple(sorted(cell.items())), draw.role, draw.index, draw.fold,
          tuple(sorted(canon_point(knobs).items())))


def key(record: Mapping) -> tuple:
  """A version-2 record's key (`run_key`)."""
  d = record["draw"]
  return run_key(record["arm"], record["cell"], Draw(d["role"], d["index"], d["fold"]),
                 record["knobs"])


def from_v1(r: Mapping, cell_fields: Sequence[str] = CELL_FIELDS,
            knob_fields: Sequence[str] = ()) -> dict:
  """A version-1 record as version 2.

  Args:
    r: the flat record.
    cell_fields: its fields that name the cell (a budget study adds 'factor').
    knob_fields: its fields that are knobs besides 'lr' and the 'hp' text.
  """
  arm = next((r[f] for f in ARM_FIELDS if f in r), "")
  if "repeat" in r:
    draw = Draw.of_repeat(int(r["repeat"]), int(r.get("fold", -1)))
    if r.get("role") == "tune" and draw.role != "tune":
      draw = Draw("tune", draw.index, draw.fold)
  else:
    draw = Draw(r.get("role", "eval"), int(r.get("seed", 0)), int(r.get("fold", -1)))
  knobs = {"lr": float(r["lr"])} if "lr" in r else {}
  knobs.update(parse_hp(r.get("hp", "")))
  knobs.update({f: float(r[f]) for f in knob_fields if f in r})
  cell = {f: r[f] for f in cell_fields if f in r}
  used = set(ARM_FIELDS) | {"repeat", "fold", "role", "seed", "lr", "hp", "seconds",
                            *knob_fields, *cell_fields}
  outcome = {f: r[f] for f in OUTCOME if f in r}
  extra = {f: v for f, v in r.items() if f not in used and f not in outcome}
  return make(arm, cell, draw, knobs, outcome, r.get("seconds"), extra)


def read(records: Iterable[Mapping], cell_fields: Sequence[str] = CELL_FIELDS,
         knob_fields: Sequence[str] = ()) -> list[dict]:
  """Every record as version 2 (version-1 records converted by `from_v1`)."""
  return [dict(r) if r.get("version") == VERSION else from_v1(r, cell_fields, knob_fields)
          for r in records]


def flat(r: Mapping) -> dict:
  """The report's row of a version-2 record (see the module docstring)."""
  d = Draw(r["draw"]["role"], r["draw"]["index"], r["draw"]["fold"])
  out = dict(r.get("extra", {}))
  out.update(r["cell"])
  out.update({k: v for k, v in r["knobs"].items()})
  out.update(arm=r["arm"], role=d.role, repeat=d.repeat, fold=d.fold,
             knobs={k: v for k, v in r["knobs"].items() if k != "lr"},
             hp=hp_text(r["knobs"]))
  out.update({"status": "ok"})
  out.update(r["outcome"])
  return out


def rows(records: Iterable[Mapping], cell_fields: Sequence[str] = CELL_FIELDS) -> list[dict]:
  """The report rows (`flat`) of records of either version (e.g. a results.json)."""
  return [flat(r) for r in read(records, cell_fields)]
