"""Where `make demo`'s time goes: `experiments.fewshot` run once with its phases timed.

  python -m bench.demo_time [FEWSHOT FLAGS ...] --out /tmp/demo_time --overwrite

runs `experiments.fewshot.main` on the given flags (its embedded default when none) and prints,
from the same process: the wall time; jax's own tracing, lowering and backend-compile seconds
(`jax.monitoring` duration events; a persistent-cache hit is counted in the backend compile,
as its read); the seconds spent loading or pretraining sources, computing frozen features,
evaluating on test, and writing the report and plots; then, from the folder's results.jsonl,
the runs' seconds and steps by (arch, arm, role, k). The phases overlap (a compile happens
inside a run), so they do not add up to the wall time.

A profiling tool, not a part of the library: it times by wrapping the functions named in
`PHASES` for the one process it runs in.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import Sequence

# (module, attribute path, phase name): wrapped for the duration of `main`.
PHASES = (
    ("jtransfer.sources", "study_source", "sources (load or pretrain)"),
    ("jtransfer.study.target", "TargetRuns.features", "frozen features"),
    ("jtransfer.study.target", "TargetRuns._feature_notes", "dead-feature check"),
    ("jtransfer.study.target", "TargetRuns._evaluate", "final val + test evaluation"),
    ("jtransfer.study.publish", "save", "results.json + report"),
    ("jtransfer.study.fewshot", "plot_accuracy", "plots"),
)
JAX_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "jax trace",
              "/jax/core/compile/jaxpr_to_mlir_module_duration": "jax lower",
              "/jax/core/compile/backend_compile_duration": "jax backend compile"}


def _wrap(totals: dict, module: str, path: str, name: str):
  """Replaces `module.path` by a copy adding its seconds to `totals[name]`; returns the
  function that puts the original back."""
  import importlib
  obj = importlib.import_module(module)
  *owners, attr = path.split(".")
  for o in owners:
    obj = getattr(obj, o)
  inner = getattr(obj, attr)

  def timed(*a, **k):
    t0 = time.perf_counter()
    try:
      return inner(*a, **k)
    finally:
      totals[name] += time.perf_counter() - t0
  setattr(obj, attr, timed)
  return lambda: setattr(obj, attr, inner)


def runs_table(path: str) -> list[str]:
  """Lines: runs, mean/total seconds and mean steps by (arch, arm, role, k) of results.jsonl."""
  groups: dict = collections.defaultdict(list)
  with open(path) as f:
    for line in f:
      r = json.loads(line)
      role = r["draw"]["role"]
      groups[(r["cell"]["arch"], r["arm"], role, r["cell"]["shots"])].append(
          (r.get("seconds", 0.0), r["outcome"].get("steps") or 0))
  out = ["| arch | arm | role | k | runs | mean s | total s | mean steps |",
         "|---|---|---|---|---|---|---|---|"]
  for key in sorted(groups, key=str):
    v = groups[key]
    s = sum(x for x, _ in v)
    out.append(f"| {' | '.join(map(str, key))} | {len(v)} | {s / len(v):.2f} | {s:.1f} | "
               f"{sum(n for _, n in v) / len(v):.0f} |")
  return out


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the few-shot study on `argv` with its phases timed; prints the breakdown."""
  argv = list(sys.argv[1:] if argv is None else argv)
  t_start = time.perf_counter()
  from jtransfer import compile_cache
  compile_cache.enable_compilation_cache()
  import jax
  totals: dict = collections.defaultdict(float)
  jax.monitoring.register_event_duration_secs_listener(
      lambda event, secs, **_: totals.__setitem__(JAX_EVENTS[event],
                                                  totals[JAX_EVENTS[event]] + secs)
      if event in JAX_EVENTS else None)
  restore = [_wrap(totals, module, path, name) for module, path, name in PHASES]
  from experiments import fewshot
  t_main = time.perf_counter()
  try:
    code = fewshot.main(argv)
  finally:
    for undo in restore:
      undo()
  wall = time.perf_counter() - t_start
  print(f"\nexit {code}; wall {wall:.1f} s (imports before main {t_main - t_start:.1f} s)")
  for name, secs in sorted(totals.items(), key=lambda kv: -kv[1]):
    print(f"  {name}: {secs:.1f} s")
  out = argv[argv.index("--out") + 1] if "--out" in argv else "results/fewshot"
  jsonl = os.path.join(out, "results.jsonl")
  if os.path.exists(jsonl):
    print("\n".join(runs_table(jsonl)))
  return code


if __name__ == "__main__":
  from jtransfer import cpu_allocator
  cpu_allocator.configure()  # restarts the command with tcmalloc first, where it applies
  sys.exit(main())
