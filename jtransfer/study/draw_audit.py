"""The draw audit: does every registered claim's primary evidence have enough draws?

Issue 29 (item 9) asks for 10 evaluation draws in every primary cell, and for correlation
claims (truncation, model selection: one draw is a target or a group of the zoo) at least 5,
or a test valid at the N they have. `audit` lists, per registered claim, its primary folders'
cells and how many paired draws each holds (from summary.json: the draws where both arms
finished, the N its interval rests on) and flags the cells below the bar. `reruns` builds, from
a flagged folder's run.json, the command that brings it to 10 draws, with a cost estimated from
the folder's own wall time per recorded run. `render` writes docs/reruns.md (`python -m
experiments.publish draws`).

Where the folder's module lets a resume grow its draws (`Study.grows`: the runner's --repeats,
sparse_transfer's --seeds; not under --disjoint-tuning, whose tuning draws change with the
count: `jtransfer.study.edge.growth_check`), the command grows the published folder in place
(`grow`): the same flags with the larger count and `--resume` on the folder itself, so every
finished run is kept and only the new draws run (about half the runs of a fresh grid at 5 ->
10). Otherwise, and as the alternative beside an in-place growth, `rerun` gives a fresh folder
under the protocol the issue asks for (nested tuning, `--cap-share 0.1`, DELTA's
`--l2fe-lrs 0.01,0.1 --l2fe-steps 1000 --steps 500`; each only where the module takes the
flag): those flags are settings of the resume
fingerprint (jtransfer.protocol.outdir), so they cannot be added to a folder, and under nested
tuning no shared-tuned run could be reused anyway. Both commands state the BatchNorm mode the
folder ran (`--bn frozen` for a folder made before --bn; DELTA's table `--bn train`), since a
command line without --bn now runs train mode.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import shlex
from collections import Counter
from typing import Optional, Sequence

from jtransfer.errors import InputError
from jtransfer.protocol import outdir, registry
from jtransfer.study import edge, flags
from jtransfer.study.publish import NOT_RESULT_FLAGS, read_run
from jtransfer.study.results_page import load

DRAWS, UNITS = 10, 5  # evaluation draws per primary cell; targets / groups of a correlation
CORRELATION_FIELDS = ("target", "group")  # draw fields whose draws are targets or groups
# (flag, value, modules): the protocol the issue asks a rerun to use; None = every module
# that takes the flag.
PROTOCOL = (("--tuning", "nested", None), ("--cap-share", "0.1", None),
            ("--l2fe-lrs", "0.01,0.1", ("experiments.delta_table",)),
            ("--l2fe-steps", "1000", ("experiments.delta_table",)),
            ("--steps", "500", ("experiments.delta_table",)))  # (its other arms converge)


@dataclasses.dataclass(frozen=True)
class Cell:
  """One primary cell: its folder, its cell fields, and its paired draws."""
  folder: str
  cell: dict
  draws: int
  unit: str  # 'draws' (evaluation draws) or the correlation unit ('targets', 'groups')

  @property
  def needed(self) -> int:
    """The bar for this cell: 10 evaluation draws, or 5 targets or groups."""
    return DRAWS if self.unit == "draws" else UNITS

  @property
  def short(self) -> bool:
    """Whether the cell has fewer draws than its bar."""
    return self.draws < self.needed


@dataclasses.dataclass(frozen=True)
class ClaimAudit:
  """A registered claim's primary cells (none while its folders are not published)."""
  entry: registry.Registered
  cells: tuple
  pending: tuple  # primary folders not published yet


def audit(entries: Sequence[registry.Registered], root: str) -> list[ClaimAudit]:
  """Every entry's primary cells under `root` and their paired-draw counts (see the module
  docstring); an entry whose primary folders are not all published lists them as pending."""
  summaries, _ = load(root)
  if not summaries:
    raise InputError(f"no published folder (with run.json) under {root}")
  out = []
  for e in entries:
    pending = tuple(f for f in e.primary.folders if f not in summaries)
    cells = []
    for folder in () if pending else e.primary.folders:
      res = next((r for r in summaries[folder].get("claims", [])
                  if r["claim"]["text"] == e.text), None)
      if res is None:
        raise InputError(f"{folder}/summary.json has no claim {e.text!r}")
      field = res.get("draw_field", "repeat")
      unit = field + "s" if field in CORRELATION_FIELDS else "draws"
      for c in res["cells"]:
        if all(c["cell"].get(k) in v for k, v in e.primary.where.items()):
          cells.append(Cell(folder, dict(c["cell"]), len(c["draws"]), unit))
    out.append(ClaimAudit(e, tuple(cells), pending))
  return out


@dataclasses.dataclass(frozen=True)
class Rerun:
  """The command that brings a folder to 10 draws, and what it costs.

  Attributes:
    folder: the published folder's name.
    command: the shell command.
    added: the protocol flags added (those the module takes).
    runs_now, runs: the folder's recorded runs, and the rerun's estimated runs.
    seconds: the estimate (None when the folder's wall time was not recorded).
    how: how the runs were estimated.
    in_place: the command grows the folder itself (`grow`); else it writes a fresh one.
    fresh: beside an in-place growth, the fresh-folder rerun under the issue's protocol.
  """
  folder: str
  command: str
  added: tuple
  runs_now: int
  runs: int
  seconds: Optional[float]
  how: str
  in_place: bool = False
  fresh: Optional["Rerun"] = None


def _set(argv: list, flag: str, value: str) -> list:
  """argv with `flag`'s value replaced (or the flag appended)."""
  if flag in argv:
    i = argv.index(flag)
    return argv[:i + 1] + [value] + argv[i + 2:]
  return argv + [flag, value]


def _parses(publisher, argv: Sequence[str]) -> bool:
  """Whether the module takes these flags (its parser and plan check, no data loaded)."""
  try:
    with contextlib.redirect_stderr(io.StringIO()):
      publisher.validate(publisher.parse_args(list(argv)))
  except (SystemExit, InputError):
    return False
  return True


def _estimate(records: Sequence[dict], draws_now: int, nested: bool) -> tuple[int, str]:
  """(runs, how) of the rerun at 10 draws from the folder's records: evaluation runs (and
  records of no tuning role, e.g. a pipeline's pruning rounds: counted as if per draw, which
  overcounts a per-target source) scale with the draws; shared tuning runs stay; nested
  tuning runs one tuning draw's grid per evaluation draw."""
  scale = DRAWS / draws_now
  role = lambda r: r.get("role", (r.get("draw") or {}).get("role"))
  tune = [r for r in records if role(r) == "tune"]
  rest = len(records) - len(tune)
  if not tune:
    return round(len(records) * scale), f"every recorded run x {scale:g}"
  tune_draws = len({r.get("repeat") for r in tune}) or 1
  if nested:  # each evaluation draw tunes on its own pool: one draw's tuning runs each
    return (round(rest * scale + DRAWS * len(tune) / tune_draws),
            f"{rest} evaluation (and other) runs x {scale:g}, plus {DRAWS} draws x the "
            f"{len(tune) // tune_draws} tuning runs of one tuning draw (nested)")
  return (round(len(tune) + rest * scale),
          f"{len(tune)} tuning runs, plus {rest} evaluation (and other) runs x {scale:g}")


def _grown_runs(records: Sequence[dict], draws_now: int) -> tuple[int, str]:
  """(runs, how) of growing the folder in place to 10 draws: its shared tuning runs are kept
  and every other run (evaluation runs, nested tuning runs, a pipeline's per-draw records)
  scales with the draws added; records made once per folder (a pipeline's source rounds) are
  counted as if per draw, an overcount."""
  role = lambda r: r.get("role", (r.get("draw") or {}).get("role"))
  rest = sum(1 for r in records if role(r) != "tune")
  scale = (DRAWS - draws_now) / draws_now
  return (round(rest * scale),
          f"the {len(records) - rest} tuning runs kept, {rest} evaluation (and other) runs "
          f"x {scale:g} for the {DRAWS - draws_now} new draws")


def _timed(run: dict, runs: int) -> Optional[float]:
  """The folder's wall time per recorded run times `runs` (None: a folder not timed)."""
  wall = run.get("wall_s", 0)
  untimed = any(i.get("wall_s", 0) == 0 for i in run.get("invocations", [])) or not wall
  return None if untimed else wall / max(run["records"], 1) * runs


def _draw_flag(draw_field: str) -> tuple[str, str]:
  """The flag and value that make 10 draws: --seeds 0..9 for seed draws, else --repeats 10."""
  return (("--seeds", ",".join(map(str, range(DRAWS)))) if draw_field == "seed"
          else ("--repeats", str(DRAWS)))


def grow(path: str, draw_field: str, draws_now: int) -> Optional[Rerun]:
  """The command growing the published folder `path` to 10 draws in place, or None where its
  module's resume may not grow them (see the module docstring): `--resume` on `path` with
  run.json's flags and the larger count, checked by the rule a resume applies
  (`jtransfer.protocol.outdir.growth`, `edge.growth_check`)."""
  run = read_run(path)
  if run is None:
    return None
  study = getattr(importlib.import_module(run["module"]), "STUDY", None)
  if study is None:
    return None
  flag, value = _draw_flag(draw_field)
  argv = _set([a for a in run["argv"] if a not in NOT_RESULT_FLAGS], flag, value)
  argv = _set(_bn_stated(study, argv), "--out", path) + ["--resume"]
  try:
    with contextlib.redirect_stderr(io.StringIO()):
      raw = flags.raw_flags(study, argv)
      config = flags.config_of(study, raw)
    grown = outdir.growth(edge.legacy_settings(study)(run), edge.settings(study, raw),
                          edge.growable(study))
    if not grown:
      return None
    edge.growth_check(config)(grown)
    edge.bn_check(study, config, path)
  except (SystemExit, InputError):
    return None
  with open(os.path.join(path, "results.json")) as f:
    runs, how = _grown_runs(json.load(f), draws_now)
  command = " ".join(["python", "-m", run["module"]] + [shlex.quote(a) for a in argv])
  return Rerun(os.path.basename(os.path.normpath(path)), command, (), run["records"], runs,
               _timed(run, runs), how, in_place=True)


def _bn_stated(study, argv: list) -> list:
  """A published folder's argv with the BatchNorm mode it ran stated: a folder made before
  --bn lacks it, and a command line without it now runs --bn train (`flags.stated_argv`), so
  its rerun states its old mode (`Study.bn_before`: frozen, DELTA's table train)."""
  if study is None or not flags.offers_bn(study) or "--bn" in argv:
    return list(argv)
  return list(argv) + ["--bn", study.bn_before]


def rerun(path: str, draw_field: str, draws_now: int) -> Rerun:
  """The command bringing the published folder `path` to 10 draws in a fresh folder under the
  issue's protocol (see the module docstring).

  Args:
    path: the folder (its run.json names the module and argv).
    draw_field: its claims' draw field ('repeat': --repeats; 'seed': --seeds 0..9).
    draws_now: the fewest paired draws of its primary cells (for the cost's scale).

  Raises:
    InputError: the folder has no run.json, or its module takes no draw-count flag.
  """
  run = read_run(path)
  if run is None:
    raise InputError(f"{path} has no run.json: not a published results folder")
  module = run["module"]
  publisher = importlib.import_module(module).PUBLISHER
  argv = _bn_stated(getattr(importlib.import_module(module), "STUDY", None),
                    [a for a in run["argv"] if a not in NOT_RESULT_FLAGS])
  flag, value = _draw_flag(draw_field)
  argv = _set(argv, flag, value)
  if not _parses(publisher, argv):
    raise InputError(f"{module} takes no {flag}: {path} cannot be brought to {DRAWS} draws "
                     "by a flag")
  added = []
  for f, v, modules in PROTOCOL:
    if (modules is None or module in modules) and f not in argv and _parses(
        publisher, argv + [f, v]):
      argv += [f, v]
      added.append(f"{f} {v}")
  old_out = argv[argv.index("--out") + 1] if "--out" in argv else "results/" + \
      os.path.basename(path)
  argv = _set(argv, "--out", f"{old_out.rstrip('/')}_{DRAWS}draws") + ["--resume"]
  with open(os.path.join(path, "results.json")) as f:
    records = json.load(f)
  runs, how = _estimate(records, draws_now, "--tuning nested" in added)
  seconds = _timed(run, runs)
  command = " ".join(["python", "-m", module] + [shlex.quote(a) for a in argv])
  return Rerun(os.path.basename(os.path.normpath(path)), command, tuple(added),
               run["records"], runs, seconds, how)


def reruns(audits: Sequence[ClaimAudit], root: str) -> tuple[list[Rerun], list[str]]:
  """One `Rerun` per folder holding a short evaluation-draw cell (growing it in place where
  its module allows, the fresh rerun beside; else the fresh rerun), and one line per folder
  whose short cells are correlation units (no flag adds targets or groups)."""
  short: dict = {}
  units: dict = {}
  for a in audits:
    for c in a.cells:
      if c.short and c.unit == "draws":
        short[c.folder] = min(short.get(c.folder, DRAWS), c.draws)
      elif c.short:
        units.setdefault(c.folder, (c.unit, c.draws))
  summaries, _ = load(root)
  out = []
  for folder, n in sorted(short.items()):
    field = next(r["draw_field"] for r in summaries[folder]["claims"])
    path = os.path.join(root, folder)
    fresh = rerun(path, field, n)
    grown = grow(path, field, n)
    out.append(dataclasses.replace(grown, fresh=fresh) if grown else fresh)
  notes = [_unit_note(root, folder, unit, n) for folder, (unit, n) in sorted(units.items())]
  return out, notes


def _unit_note(root: str, folder: str, unit: str, n: int) -> str:
  """The line for a folder short of targets or groups: how its module adds them, if it can."""
  run = read_run(os.path.join(root, folder))
  study = getattr(importlib.import_module(run["module"]), "STUDY", None) if run else None
  flag = "--" + unit.rstrip("s")
  if study is not None and flag in edge.growable(study):
    return (f"{folder}: {n} {unit}, fewer than {UNITS}; `--resume` on it with its flags and "
            f"more `{flag}` flags adds {unit} in place (which ones is the rerun's stated "
            "choice)")
  return (f"{folder}: {n} {unit}, fewer than {UNITS}; no flag adds {unit}: the claims need "
          f"{UNITS} or more {unit}, or a test valid at N = {n} (e.g. a permutation test over "
          "the rank pairs)")


def _cells_text(cells: Sequence[Cell]) -> str:
  """'16 cells x 10 draws' when uniform, else the counts, the short cells named."""
  counts = Counter(c.draws for c in cells)
  unit = cells[0].unit
  if len(counts) == 1:
    n = next(iter(counts))
    return f"{len(cells)} cell{'s' if len(cells) > 1 else ''} x {n} {unit}"
  return ", ".join(f"{k} cell{'s' if k > 1 else ''} x {n} {unit}"
                   for n, k in sorted(counts.items()))


def _minutes(s: Optional[float]) -> str:
  return "not timed" if s is None else f"{s / 60:.0f} min"


def render(audits: Sequence[ClaimAudit], found: Sequence[Rerun], notes: Sequence[str],
           root: str) -> str:
  """docs/reruns.md: the per-claim table, then each folder's rerun command and its cost."""
  out = ["# Reruns to 10 draws (issue 29, item 9)", "",
         f"Generated by `python -m experiments.publish draws --root {root} --out "
         "docs/reruns.md` (`jtransfer/study/draw_audit.py`) from the published folders; "
         "regenerate it after publishing.", "",
         f"Every registered claim's primary cells and their paired draws (both arms finished: "
         f"the N the interval rests on). A cell is short with fewer than {DRAWS} evaluation "
         f"draws, or, where a draw is a target or a group (correlation claims), fewer than "
         f"{UNITS}.", "",
         "| claim | kind | primary folder | cells x draws | short |", "|---|---|---|---|---|"]
  for a in audits:
    if a.pending:
      out.append(f"| {a.entry.id} | {a.entry.kind} | {', '.join(a.pending)} | not published "
                 "yet | |")
      continue
    for folder in a.entry.primary.folders:
      cells = [c for c in a.cells if c.folder == folder]
      bad = [c for c in cells if c.short]
      flag = f"**{len(bad)} of {len(cells)} short**" if bad else ""
      out.append(f"| {a.entry.id} | {a.entry.kind} | {folder} | "
                 f"{_cells_text(cells) if cells else 'no cell'} | {flag} |")
  total = sum(r.seconds for r in found if r.seconds is not None)
  out += ["", "## Commands", "",
          "Where the folder's module lets a resume grow its draws (the study runner's "
          "`--repeats`, sparse_transfer's `--seeds`; not under `--disjoint-tuning`, whose "
          "tuning draws change with the count), the command grows the published folder in "
          "place: run.json's flags with the draw count set to 10 and `--resume` on the folder, "
          "which keeps every finished run (the first draws of a bigger grid are the draws of "
          "the smaller one) and runs only the new draws. It keeps the folder's protocol: "
          "`--tuning nested` (each evaluation draw tuned on its own labelled pool), "
          "`--cap-share 0.1` (an arm at its step cap in over 10% of its runs reads not "
          "converged) and delta_table's `--l2fe-lrs 0.01,0.1 --l2fe-steps 1000` (L2-FE tuned, "
          "with its own cap) are settings, "
          "which a resume cannot change, so the issue's protocol is the fresh-folder rerun "
          "given beside it (a nested rerun reuses no shared-tuned run). Cost: the folder's "
          "wall time per recorded run (run.json) times the estimated runs, on the machine "
          "that made the folder; a rough guide (a folder's wall time includes its setup).", ""]
  for r in found:
    out += [f"### {r.folder}", ""]
    if r.in_place:
      f = r.fresh
      out += ["Grow in place:", "", f"```\n{r.command}\n```", "",
              f"Runs: {r.runs_now} now, about {r.runs} more ({r.how}); about "
              f"{_minutes(r.seconds)}.", ""]
      if f is not None:
        flags = ", ".join(f.added) if f.added else "none the module takes"
        out += ["Or, under the issue's protocol, a fresh folder:", "",
                f"```\n{f.command}\n```", "",
                f"Protocol flags added: {flags}. Runs: about {f.runs} ({f.how}); about "
                f"{_minutes(f.seconds)}.", ""]
      continue
    flags = ", ".join(r.added) if r.added else "none the module takes"
    out += ["A fresh folder (its module cannot grow this folder's draws in place):", "",
            f"```\n{r.command}\n```", "",
            f"Protocol flags added: {flags}. Runs: {r.runs_now} now, about {r.runs} in the "
            f"rerun ({r.how}); about {_minutes(r.seconds)}.", ""]
  fresh = [r.fresh or r for r in found]
  total_fresh = sum(r.seconds for r in fresh if r.seconds is not None)
  untimed = sum(r.seconds is None for r in found)
  out.append(f"Total: about {total / 3600:.1f} h of runs for the commands above (in place "
             f"where allowed), against {total_fresh / 3600:.1f} h for fresh folders under "
             "the issue's protocol" +
             (f" (not counting {untimed} untimed folder(s))" if untimed else "") + ".")
  if notes:
    out += ["", "## Correlation claims short of targets or groups", ""]
    out += [f"- {n}." for n in notes]
  return "\n".join(out) + "\n"
