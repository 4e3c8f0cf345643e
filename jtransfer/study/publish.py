"""Published results: the command beside every results folder, reports regenerated from
results.json, a check of each folder against its grid, shards merged.

A module that publishes declares a `PUBLISHER` (how to parse its flags, build its plan, write its
report from records, and list the runs its grid holds); a study's is `study_publisher(STUDY)`.
Its main() ends with `save`, which writes results.json, report.md (the command line under the
title), summary.json and run.json (module, argv, the command, wall time of each invocation).
`check` says everything wrong with a published folder; `snapshot` publishes a stopped grid as
it stands; `merge` joins --shard folders (`python -m experiments.publish` is the command line).
A folder of `published/` is a copy of a module's `--out` directory (results.jsonl included), so
copying it back and passing `--resume` continues the grid where it stopped.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import shlex
import sys
import time
from typing import Any, Callable, Sequence

from jtransfer.errors import InputError
from jtransfer.study.results import ResultsDir

RUN_FILE = "run.json"
PUBLISHED = "published"
RESULTS_PAGE = "RESULTS.md"
# Flags that change how a grid is run, not what it computes: left out of the shown command.
NOT_RESULT_FLAGS = ("--resume", "--overwrite", "--quiet")


def read_run(path: str) -> dict | None:
  """A folder's run.json, or None when it has none."""
  f = os.path.join(path, RUN_FILE)
  if not os.path.exists(f):
    return None
  with open(f) as fh:
    return json.load(fh)


def folders(root: str) -> list[str]:
  """Every published results folder under root (those holding a run.json), sorted."""
  return sorted(d for d, _, files in os.walk(root) if RUN_FILE in files)


@dataclasses.dataclass(frozen=True)
class Publisher:
  """How `save`, `regenerate` and `check` read one experiment module.

  Attributes:
    module: the module's import name ('experiments.cwl_tables').
    parse_args: argv -> flags.
    validate: flags -> plan (checks only; loads no data).
    report: (records, plan, args, folder) -> (report text, summary dict); `folder` is the
      results directory, for modules whose report also reads a side file (DELTA's curves).
    grid_keys: (records, plan, args) -> the keys of every run the grid holds given these
      records (tuning choices decide which runs follow), or None when not enumerable.
    key: record -> its key (the run it records), or None when records have no key: the
      duplicate and grid checks are then skipped.
    collect: results directory -> the records results.json holds (`snapshot` only; default:
      results.jsonl without timings, sorted by `key`).
  """
  module: str
  parse_args: Callable[[Sequence[str]], Any]
  validate: Callable[[Any], dict]
  report: Callable[[list, dict, Any, str], tuple[str, dict]]
  grid_keys: Callable[[list, dict, Any], set] | None = None
  key: Callable[[dict], tuple] | None = None
  collect: Callable[[str], list] | None = None


def command_line(module: str, argv: Sequence[str]) -> str:
  """The shell command that makes a folder (flags that only steer resumption left out)."""
  kept = [a for a in argv if a not in NOT_RESULT_FLAGS]
  return " ".join(["python", "-m", module] + [shlex.quote(a) for a in kept])


def with_command(text: str, command: str) -> str:
  """The report with the command that made it under its first (title) line."""
  title, _, rest = text.partition("\n")
  return f"{title}\n\nCommand: `{command}`\n{rest}"


def save(results, publisher: Publisher, argv: Sequence[str] | None, records: list[dict],
         plan: dict, args: Any, t0: float,
         wall_s: float | None = None, wall_source: str = "") -> tuple[str, dict]:
  """Writes results.json, run.json, report.md and summary.json of a finished invocation.

  Args:
    results: the `ResultsDir`.
    publisher: the module's `PUBLISHER`.
    argv: the invocation's flags (None = sys.argv[1:]).
    records: what results.json holds (timings left out: they are not determined by the seed).
    plan, args: the invocation's plan and flags.
    t0: when the invocation started (time.time()), for its wall time in run.json.
    wall_s: the invocation's wall time when not `now - t0` (a snapshot of a stopped run:
      0 = not timed). A snapshot taken again of the same stopped run (same flags, same
      records) replaces its invocation rather than adding its time twice.
    wall_source: where `wall_s` comes from (kept beside it when given).

  Returns:
    (report text, summary).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  results.write_json("results.json", records)
  text, summary = publisher.report(records, plan, args, results.path)
  run = read_run(results.path) or {}
  invocations = run.get("invocations", [])
  latest = dict(argv=argv, wall_s=round(time.time() - t0 if wall_s is None else wall_s, 1),
                finished=datetime.datetime.now(datetime.timezone.utc).strftime(
                    "%Y-%m-%d %H:%M UTC"))
  if wall_source:
    latest["wall_source"] = wall_source
  if wall_s is not None:
    latest["snapshot_records"] = len(records)
    last = invocations[-1] if invocations else {}
    if last.get("snapshot_records") == len(records) and last.get("argv") == argv:
      invocations = invocations[:-1]  # the same stopped run snapshotted again
  invocations = invocations + [latest]
  command = command_line(publisher.module, argv)
  missing, grid = None, run.get("grid")
  if publisher.grid_keys is not None and publisher.key is not None:
    missing = len(publisher.grid_keys(records, plan, args) - {publisher.key(r) for r in records})
  elif grid is not None and not (wall_s is None and grid.get("from") == COUNTED_AT_END):
    # a hand-written count of the evaluation grid (see `check`)
    n = evaluation_runs(records, plan)
    if wall_s is None and n > grid["eval_runs"]:
      # the main finished a grid grown past the count (more --seeds): say so, not "incomplete"
      grid = {"eval_runs": n, "from": f"{COUNTED_AT_END}, a grown grid (the hand-written "
                                      f"count was {grid['eval_runs']}: {grid['from']})"}
    missing = grid["eval_runs"] - n
  elif wall_s is None:
    # A module without grid keys saves from its main only once its whole grid has run (a
    # stopped grid is published by `snapshot`, which passes wall_s): the count it reached is
    # the grid's (recounted when a resume adds runs, e.g. model_selection --scratch), and a
    # later snapshot is checked against it.
    grid = {"eval_runs": evaluation_runs(records, plan), "from": COUNTED_AT_END}
    missing = 0
  extra = {"grid": grid} if grid is not None else {}
  if isinstance(summary, dict) and summary.get("tune_overlap"):  # --disjoint-tuning runs
    extra["tune_overlap"] = summary["tune_overlap"]
  results.write_json(RUN_FILE, dict(
      module=publisher.module, argv=argv, command=command, invocations=invocations,
      wall_s=round(sum(i["wall_s"] for i in invocations), 1),
      # None: neither grid keys nor a grid count; `check` then asks for one
      complete=None if missing is None else missing == 0, records=len(records), **extra))
  text = with_command(text, command)
  results.write_text("report.md", text)
  results.write_json("summary.json", summary)
  return text, summary


def jsonl_records(path: str, key: Callable[[dict], tuple] | None = None) -> list[dict]:
  """The records of `path`/results.jsonl without timings (sorted by `key` when given)."""
  records = [{k: v for k, v in r.items() if k != "seconds"}
             for r in ResultsDir(path, resume=True).records]
  return sorted(records, key=lambda r: tuple(map(str, key(r)))) if key else records


def snapshot(path: str, module: str, argv: Sequence[str], wall_s: float = 0.0,
             wall_source: str = "") -> tuple[str, dict]:
  """Publishes a results directory as it stands (e.g. a grid stopped before its end).

  `wall_s`: how long the stopped invocation ran (its log or the clock say; a killed run
  cannot record it), kept in run.json's invocations with `wall_source` (how it was
  measured); 0 = not timed, shown as such.
  """
  publisher = getattr(importlib.import_module(module), "PUBLISHER", None)
  if publisher is None:
    raise InputError(f"{module} declares no PUBLISHER")
  argv = folder_bn(argv, [path])
  args = publisher.parse_args(list(argv))
  plan = publisher.validate(args)
  records = (publisher.collect or (lambda p: jsonl_records(p, publisher.key)))(path)
  if not records:
    raise InputError(f"{path} holds no recorded runs")
  if not wall_s >= 0:
    raise InputError(f"--wall-s must be >= 0 seconds, got {wall_s}")
  return save(ResultsDir(path, resume=True), publisher, argv, records, plan, args, time.time(),
              wall_s=wall_s, wall_source=wall_source)


SIDE_FILES = ("curves.json", "zoo.json", "source.json")


def merge(out: str, shards: Sequence[str], module: str, argv: Sequence[str]) -> tuple[str, dict]:
  """Joins the folders of a grid run in shards (`--shard I/N`) into one folder `out` and
  publishes it as the grid `argv` (the flags without --shard).

  Every results.jsonl (the top one and, e.g., a budget study's x<factor>/ ones) is the union of
  the shards' at the same relative path; the side files the report reads (DELTA's curves, the
  zoo table) come from the first shard holding them. A run recorded by two shards must agree.

  Raises:
    InputError: `out` already holds results, a shard is missing, argv still has --shard, or
      two shards disagree about a run.
  """
  if "--shard" in argv:
    raise InputError("merge: pass the grid's flags without --shard")
  if not shards:
    raise InputError("merge: name at least one shard folder")
  for s in shards:
    if not os.path.isdir(s):
      raise InputError(f"merge: shard folder {s} does not exist")
  ResultsDir(out)  # refuses an `out` that already holds results
  rels = sorted({os.path.relpath(d, s) for s in shards for d, _, f in os.walk(s)
                 if "results.jsonl" in f})
  for rel in rels:
    merged: dict[str, dict] = {}
    for s in shards:
      path = os.path.join(s, rel)
      if not os.path.exists(os.path.join(path, "results.jsonl")):
        continue
      for r in ResultsDir(path, resume=True).records:
        k = json.dumps({a: b for a, b in r.items() if a != "seconds"}, sort_keys=True)
        ident = json.dumps(_identity(r), sort_keys=True)
        if ident in merged and json.dumps({a: b for a, b in merged[ident].items()
                                           if a != "seconds"}, sort_keys=True) != k:
          raise InputError(f"merge: shards disagree about run {ident}")
        merged.setdefault(ident, r)
    target = ResultsDir(os.path.join(out, rel), resume=True)
    for r in merged.values():
      target.add(r)
  for name in SIDE_FILES:
    for s in shards:
      if os.path.exists(os.path.join(s, name)):
        with open(os.path.join(s, name)) as f, open(os.path.join(out, name), "w") as g:
          g.write(f.read())
        break
  return snapshot(out, module, folder_bn(argv, shards))


def folder_bn(argv: Sequence[str], folders: Sequence[str]) -> list[str]:
  """`argv` with the --bn the first of `folders` recording one in settings.json holds, when
  argv lacks it: a grid started since --bn existed records its mode there (the command line's
  default included), so its snapshot or merge publishes that mode; a folder without one
  predates the flag, and an absent --bn then means what it ran (`Study.bn_before`)."""
  argv = list(argv)
  if any(a == "--bn" or a.startswith("--bn=") for a in argv):
    return argv
  for folder in folders:
    try:
      with open(os.path.join(folder, "settings.json")) as f:
        stored = json.load(f)["flags"]
    except (OSError, ValueError, KeyError, TypeError):
      continue
    if "--bn" in stored:
      return argv + ["--bn", str(stored["--bn"])]
  return argv


def _identity(record: dict) -> dict:
  """What names a run across shards: everything but its outcome and timing."""
  outcome = {"seconds", "outcome", "test_acc", "val_acc", "steps", "best_step", "stopped", "status",
             "error", "filter_distance"}
  return {k: v for k, v in record.items() if k not in outcome}


def load(path: str) -> tuple[Publisher, dict, Any, dict, list[dict]]:
  """(publisher, run.json, flags, plan, records) of a published folder.

  Raises:
    InputError: the folder, its run.json or results.json is missing or unreadable, or its
      module publishes nothing.
  """
  run = read_run(path)
  if run is None:
    raise InputError(f"{path} has no {RUN_FILE}: not a published results folder")
  try:
    module = importlib.import_module(run["module"])
  except (KeyError, ImportError) as e:
    raise InputError(f"{path}/{RUN_FILE}: module {run.get('module')!r} does not import "
                     f"({e})") from None
  publisher = getattr(module, "PUBLISHER", None)
  if publisher is None:
    raise InputError(f"{run['module']} declares no PUBLISHER: its results cannot be checked")
  try:
    with open(os.path.join(path, "results.json")) as f:
      records = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"{path}/results.json is missing or corrupt: {e}") from None
  if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
    raise InputError(f"{path}/results.json: expected a list of run records")
  args = publisher.parse_args(run["argv"])
  return publisher, run, args, publisher.validate(args), records


def regenerate(path: str) -> tuple[str, dict]:
  """report.md text and summary of a published folder, from its results.json alone."""
  publisher, run, args, plan, records = load(path)
  text, summary = publisher.report(records, plan, args, path)
  return with_command(text, run["command"]), summary


# run.json's grid count of a module without grid keys, when its main counted it at the end.
COUNTED_AT_END = "counted when the grid finished"


def evaluation_runs(records: list[dict], plan: dict) -> int:
  """The records that are evaluation runs: not tuning runs (role 'tune', or a seed among the
  plan's tuning seeds)."""
  tune_seeds = set(plan.get("tune_seeds", ()) if isinstance(plan, dict) else ())
  role = lambda r: r["draw"]["role"] if "draw" in r else r.get("role")  # version 2 or 1
  return sum(1 for r in records
             if role(r) != "tune" and not (tune_seeds and r.get("seed") in tune_seeds))


def _count_problems(run: dict, records: list[dict], plan: dict) -> list[str]:
  """A folder whose module lists no grid keys is counted against run.json's 'grid':
  {'eval_runs': N, 'from': how N follows from the command}: its evaluation runs must number
  N when marked complete and fewer when marked incomplete."""
  grid = run.get("grid")
  if run.get("complete") is None or grid is None:
    return ["completeness not recorded: its module lists no grid keys, so run.json needs "
            "'complete' and a 'grid' count of its evaluation runs"]
  n = evaluation_runs(records, plan)
  if run["complete"] and n != grid["eval_runs"]:
    return [f"marked complete with {n} evaluation run(s), its grid holds {grid['eval_runs']}"]
  if not run["complete"] and n >= grid["eval_runs"]:
    return ["marked incomplete but every evaluation run of the grid is present"]
  return []


def check(path: str) -> list[str]:
  """Everything wrong with a published folder (empty = sound).

  Checks: results.json parses into run records, one per key; the keys are exactly the runs
  its grid holds (tuning runs included, as the recorded tuning choices decide them; a folder
  marked incomplete may lack runs but holds none outside the grid; run.json must say which);
  a module without grid keys is counted against run.json's hand-written 'grid'
  (`_count_problems`); run.json's count and completeness agree; report.md and summary.json
  regenerate from results.json byte for byte.
  """
  try:
    publisher, run, args, plan, records = load(path)
  except InputError as e:
    return [str(e)]
  problems = []
  keys = [publisher.key(r) for r in records] if publisher.key is not None else []
  if len(set(keys)) != len(keys):
    problems.append(f"{len(keys) - len(set(keys))} duplicate run record(s)")
  if run.get("records") != len(records):
    problems.append(f"run.json counts {run.get('records')} records, results.json holds "
                    f"{len(records)}")
  if publisher.grid_keys is not None and publisher.key is not None:
    if not isinstance(run.get("complete"), bool):  # (else a missing run would pass unseen)
      problems.append("run.json does not say whether the grid is complete ('complete': "
                      "true or false)")
    expected = publisher.grid_keys(records, plan, args)
    stray, missing = set(keys) - expected, expected - set(keys)
    if stray:
      problems.append(f"{len(stray)} record(s) outside the grid, e.g. {sorted(stray)[0]}")
    if missing and run.get("complete", True):
      problems.append(f"marked complete but {len(missing)} run(s) of the grid are missing, "
                      f"e.g. {sorted(missing, key=str)[0]}")
    if not missing and not run.get("complete", True):
      problems.append("marked incomplete but every run of the grid is present")
  else:
    problems += _count_problems(run, records, plan)
  try:
    text, summary = regenerate(path)
  except ValueError as e:  # e.g. a duplicated evaluation run the claims cannot pair
    return problems + [f"report.md does not regenerate from results.json: {e}"]
  with open(os.path.join(path, "report.md")) as f:
    if f.read() != text:
      problems.append("report.md differs from the report regenerated from results.json")
  with open(os.path.join(path, "summary.json")) as f:
    if json.load(f) != json.loads(json.dumps(summary)):
      problems.append("summary.json differs from the summary regenerated from results.json")
  return problems
