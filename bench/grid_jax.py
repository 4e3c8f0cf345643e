"""bench/bench_grid.py's jtransfer arm: `experiments.cwl_tables` run as a user runs it, in this
process (with the seconds in evaluation forwards, Freeze's features and compilation) or split
by target over pinned single-threaded processes."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

from experiments import cwl_tables, fewshot

TARGETS = ("fmnist:1,5,7,8,9", "digits")
STRATEGIES = ("freeze", "freeze_cwl")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")



def grid_argv(args, targets, out: str) -> list[str]:
  """`experiments.cwl_tables` flags of the timed grid over `targets`, writing to `out`."""
  argv = ["--arch", args.archs, "--shots", args.shots, "--repeats", str(args.repeats),
          "--tune-repeats", str(args.tune_repeats), "--tune-extend", str(args.tune_extend),
          "--steps", str(args.steps), "--patience", str(args.patience),
          "--eval-every", str(args.eval_every), "--val-per-class", str(args.val_per_class),
          "--strategies", ",".join(STRATEGIES), "--lrs", "paper",
          "--test-per-class", str(args.test_per_class), "--batch-size", str(args.batch_size),
          "--source", args.source, "--source-epochs", str(args.source_epochs),
          "--seed", str(args.seed), "--paper-grid" if args.paper_grid else "--no-paper-grid",
          "--out", out, "--overwrite", "--quiet"]
  for t in targets:
    argv += ["--target", t]
  return argv


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- jtransfer arm
class _Timer:
  """Wraps `module.name` (a function) to sum the seconds spent in it; `restore()` undoes it."""

  def __init__(self, module, name: str):
    self.module, self.name, self.fn, self.seconds = module, name, getattr(module, name), 0.0

    def timed(*a, **kw):
      t0 = time.perf_counter()
      try:
        return self.fn(*a, **kw)  # both wrapped functions return host arrays (synchronised)
      finally:
        self.seconds += time.perf_counter() - t0

    setattr(module, name, timed)

  def restore(self):
    setattr(self.module, self.name, self.fn)


def jax_grid(args, extra: list[str], out: str) -> dict:
  """The jtransfer arm in this process: wall seconds, records (with per-run seconds) and the
  seconds in eval forwards, feature extraction and compilation."""
  import jax.monitoring
  from jtransfer.methods import transfer
  compile_s = defaultdict(float)

  def on_event(event, duration, **_):
    if event in COMPILE_EVENTS:
      compile_s[event] += duration

  jax.monitoring.register_event_duration_secs_listener(on_event)
  evals = _Timer(fewshot, "predict_logits")  # validation and test forwards of every run
  feats = _Timer(transfer, "extract_features")  # Freeze's cached backbone features
  try:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its report; the records are read below
      rc = cwl_tables.main(grid_argv(args, args.targets.split(";"), out) + extra)
    seconds = time.perf_counter() - t0
    if rc != 0:
      raise RuntimeError("experiments.cwl_tables failed")
  finally:
    evals.restore()
    feats.restore()
    jax.monitoring.unregister_event_duration_listener(on_event)
  return dict(wall=seconds, records=_read_jsonl(os.path.join(out, "results.jsonl")),
              eval_s=evals.seconds, features_s=feats.seconds,
              compile_s=sum(compile_s.values()))


def process_grid(args, out: str, workers: int) -> dict:
  """The jtransfer arm split by target over `workers` single-threaded processes, each pinned
  to its own core, run at the same time."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false",
                               "intra_op_parallelism_threads=1"]).strip()
  targets = args.targets.split(";")
  procs = []
  t0 = time.perf_counter()
  for w in range(workers):
    # The child pins itself (no preexec_fn: forking this multithreaded process is unsafe).
    pin = f"import os, runpy, sys; os.sched_setaffinity(0, {{{w}}}) if hasattr(os, " \
          "'sched_setaffinity') else None; sys.argv[0] = 'cwl_tables'; " \
          "runpy.run_module('experiments.cwl_tables', run_name='__main__')"
    argv = [sys.executable, "-c", pin, *grid_argv(args, targets[w::workers],
                                                  os.path.join(out, str(w)))]
    procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))
  if any(p.wait() != 0 for p in procs):
    raise RuntimeError("a bench_grid worker process failed")
  seconds = time.perf_counter() - t0
  records = []
  for w in range(workers):
    records += _read_jsonl(os.path.join(out, str(w), "results.jsonl"))
  return dict(wall=seconds, records=records)


