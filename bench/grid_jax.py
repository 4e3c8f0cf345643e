"""bench/bench_grid.py's jtransfer arm: `experiments.cwl_tables` run as a user runs it, in this
process (with the seconds in evaluation forwards, Freeze's features and compilation) or split
by target over pinned single-threaded processes."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import subprocess
import sys
import time
from collections import defaultdict

from experiments import cwl_tables
from jtransfer import study
from jtransfer.errors import InputError
from jtransfer.study import Protocol, flag
from jtransfer.study import records as rec
from jtransfer.study.config import at_least, comma_list, offered
from jtransfer.study.tables import positive_ints

TARGETS = ("fmnist:1,5,7,8,9", "digits")
STRATEGIES = ("freeze", "freeze_cwl")
# The declaration whose grid both arms run.
STUDY = cwl_tables.STUDY
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


PATHS = ("jtransfer", "torch", "plain", "processes")


def _paths(text: str) -> tuple[str, ...]:
  """--paths: a comma list of PATHS."""
  names = comma_list("--paths")(text)
  bad = [n for n in names if n not in PATHS]
  if bad:
    raise InputError(f"--paths: unknown path {bad[0]!r}; expected a comma list of "
                     f"{', '.join(PATHS)}")
  return names


def _threads(text: str) -> str:
  """--torch-threads: 'auto' or an integer >= 1."""
  if text != "auto" and not (str(text).isdigit() and int(text) >= 1):
    raise InputError(f"--torch-threads {text!r}: expected 'auto' or an integer >= 1")
  return str(text)


@dataclasses.dataclass(frozen=True)
class GridConfig:
  """What one invocation of bench/bench_grid.py times: its flags, typed (`jtransfer.study.flag`
  fields, parsed by `bench_grid.parse`). The grid fields are `experiments.cwl_tables`' flags of
  the same names; `protocol` holds the library's `Protocol` fields the bench offers, under its
  own defaults (`lrs` fixed to the paper's grid)."""
  archs: tuple[str, ...] = flag("--archs", ("vgg_s", "resnet_s"), "comma list of archs",
                                cli="vgg_s,resnet_s", parse=comma_list("--archs"))
  targets: tuple[str, ...] = flag("--targets", TARGETS, "';'-separated target specs",
                                  cli=";".join(TARGETS),
                                  parse=lambda t: tuple(s for s in t.split(";") if s.strip()))
  shots: tuple[int, ...] = flag("--shots", (1, 3, 5, 10), "comma list of k", cli="1,3,5,10",
                                parse=lambda t: tuple(positive_ints(t, "--shots")))
  protocol: Protocol = offered(Protocol, {
      "repeats": dict(default=1), "tune_draws": dict(default=2), "tune_extend": {},
      # cwl_tables' step cap and patience
      "steps": dict(default=1000), "patience": dict(default=200), "eval_every": {},
      # validation chooses the LR: at least one image per class
      "val_per_class": dict(check=at_least(1, "--val-per-class")),
      "paper_grid": dict(default=False, help="also run every grid LR on the evaluation "
                         "draws, in both arms (cwl_tables' 'best over LR' tables); off: "
                         "evaluation draws run only at the chosen LR"),
      "test_per_class": {}, "batch_size": {}, "seed": {}},
      # BN on running statistics, as the PyTorch arm's eval() (its strategies keep them anyway)
      fixed={"lrs": "paper", "bn": "frozen"})
  source: str = flag("--source", "fmnist:0,2,3,4,6", "dataset spec (pretrained, cached) or "
                     "ckpt:PATH")
  source_epochs: float = flag("--source-epochs", 2.0, "pretraining epochs of the source")
  torch_threads: str = flag("--torch-threads", "auto", "PyTorch intra-op threads; 'auto' = "
                            "whichever of 1 and torch's default runs a probe step faster now "
                            "(on a loaded machine torch's OpenMP threads can run 10x slower "
                            "than one thread)", parse=_threads)
  paths: tuple[str, ...] = flag("--paths", ("jtransfer", "torch"), "comma list of "
                                + ", ".join(PATHS), cli="jtransfer,torch", parse=_paths)
  out: str = flag("--out", "bench/GRID.md", "the report")

  def text(self, name: str) -> str:
    """A top-level field's value as the command line writes it ('vgg_s,resnet_s',
    '1,3,5,10')."""
    value = getattr(self, name)
    if isinstance(value, (tuple, list)):
      return (";" if name == "targets" else ",").join(map(str, value))
    return str(value)


def grid_argv(config: GridConfig, targets, out: str, feature_cache: bool = True) -> list[str]:
  """`experiments.cwl_tables` flags of the timed grid over `targets`, writing to `out`: the
  command a user types (`study_config` is the same configuration, typed)."""
  c, p = config, config.protocol
  argv = ["--arch", c.text("archs"), "--shots", c.text("shots"), "--repeats", str(p.repeats),
          "--tune-repeats", str(p.tune_draws), "--tune-extend", str(p.tune_extend),
          "--steps", str(p.steps), "--patience", str(p.patience),
          "--eval-every", str(p.eval_every), "--val-per-class", str(p.val_per_class),
          "--strategies", ",".join(STRATEGIES), "--lrs", p.lrs,
          "--test-per-class", str(p.test_per_class), "--batch-size", str(p.batch_size),
          "--source", c.source, "--source-epochs", str(c.source_epochs),
          "--seed", str(p.seed), "--paper-grid" if p.paper_grid else "--no-paper-grid",
          "--bn", p.bn, "--out", out, "--overwrite", "--quiet"]
  for t in targets:
    argv += ["--target", t]
  return argv + ([] if feature_cache else ["--no-feature-cache"])


def study_config(config: GridConfig, targets, out: str, feature_cache: bool = True
                 ) -> study.Config:
  """The study runner's `Config` of the timed grid over `targets` (what `grid_argv` parses to;
  tests/test_bench.py checks)."""
  c = config
  return study.Config(
      cells=study.Cells(archs=c.archs, targets=tuple(targets), shots=c.shots, arms=STRATEGIES),
      protocol=dataclasses.replace(c.protocol, no_feature_cache=not feature_cache),
      output=study.Output(out=out, overwrite=True, quiet=True),
      source=study.Source(spec=c.source, epochs=c.source_epochs))


def read_records(path: str) -> list[dict]:
  """A results.jsonl's run records, as version 2 (`jtransfer.study.records.read`)."""
  with open(path) as f:
    return rec.read([json.loads(line) for line in f if line.strip()])


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


def jax_grid(config: GridConfig, out: str, feature_cache: bool = True) -> dict:
  """The jtransfer arm in this process: wall seconds, records (with per-run seconds) and the
  seconds in eval forwards, feature extraction and compilation."""
  import jax.monitoring
  from jtransfer.methods import transfer
  from jtransfer.study import target
  compile_s = defaultdict(float)

  def on_event(event, duration, **_):
    if event in COMPILE_EVENTS:
      compile_s[event] += duration

  jax.monitoring.register_event_duration_secs_listener(on_event)
  evals = _Timer(target, "predict_logits")  # validation and test forwards of every run
  feats = _Timer(transfer, "extract_features")  # Freeze's cached backbone features
  try:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its report; the records are read below
      rc = cwl_tables.main(grid_argv(config, config.targets, out, feature_cache))
    seconds = time.perf_counter() - t0
    if rc != 0:
      raise RuntimeError("experiments.cwl_tables failed")
  finally:
    evals.restore()
    feats.restore()
    jax.monitoring.unregister_event_duration_listener(on_event)
  return dict(wall=seconds, records=read_records(os.path.join(out, "results.jsonl")),
              eval_s=evals.seconds, features_s=feats.seconds,
              compile_s=sum(compile_s.values()))


def process_grid(config: GridConfig, out: str, workers: int) -> dict:
  """The jtransfer arm split by target over `workers` single-threaded processes, each pinned
  to its own core, run at the same time."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false",
                               "intra_op_parallelism_threads=1"]).strip()
  targets = config.targets
  procs = []
  t0 = time.perf_counter()
  for w in range(workers):
    # The child pins itself (no preexec_fn: forking this multithreaded process is unsafe).
    pin = f"import os, runpy, sys; os.sched_setaffinity(0, {{{w}}}) if hasattr(os, " \
          "'sched_setaffinity') else None; sys.argv[0] = 'cwl_tables'; " \
          "runpy.run_module('experiments.cwl_tables', run_name='__main__')"
    argv = [sys.executable, "-c", pin, *grid_argv(config, targets[w::workers],
                                                  os.path.join(out, str(w)))]
    procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))
  if any(p.wait() != 0 for p in procs):
    raise RuntimeError("a bench_grid worker process failed")
  seconds = time.perf_counter() - t0
  records = []
  for w in range(workers):
    records += read_records(os.path.join(out, str(w), "results.jsonl"))
  return dict(wall=seconds, records=records)


