"""Published results: the command beside every results folder, reports regenerated from
results.json, a check of each folder against its grid, and the RESULTS.md summary page.

An experiment module that publishes declares a `PUBLISHER` (how to parse its flags, build its
plan, write its report from records, and list the runs its grid holds). Its main() ends with
`jtransfer.study.publish.save`, which writes results.json, report.md (the command line under the title), summary.json
and run.json (module, argv, the command, wall time of each invocation). Then

  python -m experiments.publish check published        # every folder parses, matches its grid
                                                       # and regenerates its report byte for byte
  python -m experiments.publish regenerate published/X # rewrite report.md from results.json
  python -m experiments.publish results                # RESULTS.md from every published folder
  python -m experiments.publish snapshot OUT [--wall-s S] -- FLAGS
                                                       # publish a stopped grid as it stands
  python -m experiments.publish merge OUT SHARD... --module M -- FLAGS
                                                       # join --shard I/N folders into one grid
  python -m experiments.publish compare A B --out FILE.md
                                                       # two protocols' folders side by side
  python -m experiments.publish draws [--root R] [--out docs/reruns.md]
                                                       # primary cells short of 10 draws, and
                                                       # the reruns that fill them

`snapshot` writes what `save` would from the runs recorded so far (results.jsonl), marked
incomplete when the grid lacks runs, so a grid stopped for lack of time is published from its
partial results and resumed later with `--resume`.

A folder of `published/` is a copy of a module's `--out` directory (results.jsonl included), so
copying it back and passing `--resume` continues the grid where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from jtransfer.errors import InputError
from jtransfer.study import compare, draw_audit
# The command line of the library's publishing (`jtransfer.study.publish`, `.results_page`).
from jtransfer.study.publish import (PUBLISHED, RESULTS_PAGE, RUN_FILE, check, folders, merge,
                                     read_run, regenerate, snapshot)
from jtransfer.study.results_page import results_page as page_of


def results_page(current: str, root: str) -> str:
  """RESULTS.md rebuilt from the published folders under `root` for the repository's claims
  (`experiments.claims_registry.ALL`); the written text outside the markers is kept."""
  from experiments.claims_registry import ALL  # the registry reads every module's claims
  return page_of(current, root, ALL)


def _write(path: str, text: str) -> None:
  """Writes a generated page whole (built before the file is opened, so a failure leaves the
  old one)."""
  try:
    with open(path, "w") as f:
      f.write(text)
  except OSError as e:
    raise InputError(f"cannot write {path}: {e.strerror}") from None


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("check", help="check every published folder under a root")
  c.add_argument("root", nargs="?", default=PUBLISHED)
  g = sub.add_parser("regenerate", help="rewrite a folder's report.md and summary.json")
  g.add_argument("folder")
  s = sub.add_parser("snapshot", help="publish a results directory's runs so far")
  s.add_argument("folder")
  s.add_argument("--module", required=True, help="e.g. experiments.cwl_tables")
  s.add_argument("--wall-s", type=float, default=0.0,
                 help="seconds the stopped invocation ran (from its log); 0 = not timed")
  s.add_argument("--wall-source", default="", help="how --wall-s was measured (kept with it)")
  s.epilog = "after the options: -- and the module's flags, as the grid was run"
  m = sub.add_parser("merge", help="join --shard folders into the grid's folder")
  m.add_argument("folder", help="the merged folder (must not hold results)")
  m.add_argument("shards", nargs="+")
  m.add_argument("--module", required=True)
  m.epilog = "after the options: -- and the grid's flags, without --shard"
  x = sub.add_parser("compare", help="two folders of the same cells under two tuning "
                     "protocols, claim by claim, side by side")
  x.add_argument("a", help="folder A (e.g. published/bn_mode, nested tuning)")
  x.add_argument("b", help="folder B (e.g. published/bn_mode_shared, one tuning draw)")
  x.add_argument("--out", required=True, help="the markdown file to write")
  d = sub.add_parser("draws", help="each registered claim's primary cells and draws, the "
                     "short ones flagged, and the reruns that bring them to 10 draws")
  d.add_argument("--root", default=PUBLISHED)
  d.add_argument("--out", default=os.path.join("docs", "reruns.md"))
  r = sub.add_parser("results", help="rebuild RESULTS.md's generated table")
  r.add_argument("--root", default=PUBLISHED)
  r.add_argument("--page", default=RESULTS_PAGE)
  argv = list(sys.argv[1:] if argv is None else argv)
  flags = argv[argv.index("--") + 1:] if "--" in argv else []
  args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
  try:
    if args.cmd == "check":
      found = folders(args.root)
      if not found:
        raise InputError(f"no published folder (with {RUN_FILE}) under {args.root}")
      bad = 0
      for path in found:
        problems = check(path)
        bad += bool(problems)
        print(f"{path}: " + ("ok" if not problems else "; ".join(problems)))
      return 1 if bad else 0
    if args.cmd == "snapshot":
      snapshot(args.folder, args.module, flags, args.wall_s, args.wall_source)
      run = read_run(args.folder)
      print(f"wrote {args.folder}: {run['records']} runs, "
            f"{'complete' if run['complete'] else 'incomplete'}")
      return 0
    if args.cmd == "merge":
      merge(args.folder, args.shards, args.module, flags)
      run = read_run(args.folder)
      print(f"wrote {args.folder}: {run['records']} runs from {len(args.shards)} shard(s), "
            f"{'complete' if run['complete'] else 'incomplete'}")
      return 0
    if args.cmd == "compare":
      from experiments.claims_registry import ALL
      text = compare.render(compare.compare(args.a, args.b, ALL), args.a, args.b)
      _write(args.out, text)
      print(f"wrote {args.out}")
      return 0
    if args.cmd == "draws":
      from experiments.claims_registry import ALL
      audits = draw_audit.audit(ALL, args.root)
      found, notes = draw_audit.reruns(audits, args.root)
      _write(args.out, draw_audit.render(audits, found, notes, args.root))
      short = sum(c.short for a in audits for c in a.cells)
      print(f"wrote {args.out}: {short} short (claim, primary cell) pair(s), {len(found)} "
            "rerun(s)")
      return 0
    if args.cmd == "regenerate":
      text, summary = regenerate(args.folder)
      for name, body in (("report.md", text), ("summary.json",
                                                json.dumps(summary, indent=1, sort_keys=True))):
        with open(os.path.join(args.folder, name), "w") as f:
          f.write(body)
      print(f"wrote {args.folder}/report.md and summary.json")
      return 0
    current = open(args.page).read() if os.path.exists(args.page) else ""
    text = results_page(current, args.root)  # built before the page is opened for writing
    with open(args.page, "w") as f:
      f.write(text)
    print(f"wrote {args.page}")
    return 0
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
