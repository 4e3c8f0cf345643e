"""Flags every experiment module shares."""
from __future__ import annotations

import argparse
import contextlib
import functools
import io
import os
import shlex
import sys
import time
from typing import Callable, Sequence

from jtransfer.errors import InputError
from jtransfer.protocol import outdir
from jtransfer.train import parallel

# Exit code of a command stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED = 130


def add_devices_flag(p: argparse.ArgumentParser) -> None:
  """--devices N: data-parallel train steps over N devices (default 1); the multi-host flags."""
  p.add_argument("--devices", type=int, default=1,
                 help="data-parallel training over this many devices (jax.sharding mesh, "
                      "batch split, params replicated); with --num-processes > 1 the mesh "
                      "spans every process's devices")
  p.add_argument("--num-processes", type=int, default=1,
                 help="multi-host: the number of processes (jax.distributed); each runs the "
                      "same command with its own --process-id")
  p.add_argument("--process-id", type=int, default=0, help="multi-host: this process's index")
  p.add_argument("--coordinator", default=None,
                 help="multi-host: host:port of process 0's coordinator (jax.distributed); "
                      "on TPU / SLURM clusters leave it unset to auto-detect")


def add_results_flags(p: argparse.ArgumentParser, out: str,
                      resume_help: str = "continue, skipping the runs already recorded") -> None:
  """--out, --resume, --overwrite, --quiet and --devices: the flags of every module writing a
  results directory (experiments.report.ResultsDir)."""
  p.add_argument("--out", default=out, help="results directory")
  p.add_argument("--resume", action="store_true", help=resume_help)
  p.add_argument("--overwrite", action="store_true", help="replace existing results")
  p.add_argument("--quiet", action="store_true", help="no progress output")
  add_devices_flag(p)


def add_stopping_flags(p: argparse.ArgumentParser, patience: int = 100, what: str = "a run",
                       steps: int | None = None) -> None:
  """--patience and --eval-every (and --steps when given a default): the stopping rule of
  `jtransfer.protocol.budget` (docs/protocol.md, rule 1), for modules whose runs stop early.

  Args:
    p: the parser.
    patience: default of --patience.
    what: the runs the flags govern, for the help text ("a run", "the transfer", ...).
    steps: default of --steps; None = the module declares its own cap flags.
  """
  if steps is not None:
    p.add_argument("--steps", type=int, default=steps,
                   help=f"step cap of {what} (with --patience 0: the exact number of steps)")
  p.add_argument("--patience", type=int, default=patience,
                 help=f"stop {what} once its validation accuracy has not improved for this "
                      "many steps and keep its best validation state; 0 = train to the cap and "
                      "keep the last state")
  p.add_argument("--eval-every", type=int, default=10,
                 help=f"steps between validation evaluations of {what}")


def add_tune_extend_flag(p: argparse.ArgumentParser, default: int = 2) -> None:
  """--tune-extend: how far `jtransfer.protocol.tuning.tune` may extend a grid at an edge."""
  p.add_argument("--tune-extend", type=int, default=default,
                 help="when a chosen value is the first or last of its grid, extend that grid "
                      "by up to this many values on that side")


def target_list(values, default) -> list[str]:
  """The --target specs: each repeated flag split at ';', `default` when the flag is absent.

  Raises:
    InputError: the flag was given but names no dataset (`--target ""`), which would otherwise
      run an empty grid and fail after writing its report.
  """
  targets = [t for flag in (values or default) for t in flag.split(";") if t.strip()]
  if not targets:
    raise InputError(f"--target {';'.join(values)!r} names no dataset; expected e.g. "
                     "--target digits or --target folder:/path (omit --target for the default)")
  return targets


def check_validation_needs(args: argparse.Namespace) -> None:
  """Early stopping (--patience) and tuning draws (--tune-repeats) read validation images:
  refuse either without them, naming the flag to change."""
  for flag, value in (("--patience", args.patience), ("--tune-repeats", args.tune_repeats)):
    if value and not args.val_per_class:
      raise InputError(f"{flag} needs validation images: set --val-per-class >= 1 or "
                       f"{flag} 0")


def apply_devices(args: argparse.Namespace) -> None:
  """Starts jax.distributed (--num-processes > 1) and sets the default training mesh from
  args.devices; exits 2 with a message if impossible.

  Multi-host, the mesh spans every process's devices (--devices must be 1, meaning all, or
  their total) and every process holds whole global batches (`parallel.set_default_mesh`).
  """
  try:
    if args.devices < 1:
      raise InputError(f"--devices must be >= 1 (the number of devices to train on), got "
                       f"{args.devices}")
    processes = args.num_processes  # (add_devices_flag gives every caller the flag)
    if processes > 1:
      if not 0 <= args.process_id < processes:
        raise InputError(f"--process-id {args.process_id} is not in [0, {processes})")
      kwargs = dict(num_processes=processes, process_id=args.process_id)
      if args.coordinator:
        kwargs["coordinator_address"] = args.coordinator
      parallel.initialize_distributed(**kwargs)
      total = len(__import__("jax").devices())
      if args.devices not in (1, total):
        raise InputError(f"--devices {args.devices}: with {processes} processes the mesh spans "
                         f"all {total} devices; pass 1 or {total}")
      parallel.set_default_mesh(parallel.make_mesh(total), global_batches=True)
      return
    parallel.set_default_mesh(parallel.make_mesh(args.devices) if args.devices != 1 else None)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e


def settings(module: str, args: argparse.Namespace,
             additive: Sequence[str] = ()) -> outdir.Settings:
  """The result-changing flags of `args` as parsed (call before anything rewrites them, e.g.
  --tiny), for `open_results`.

  `additive`: flag dests a resume may change because they only add runs beside the finished
  ones (model_selection's --scratch adds a reference model); left out of the settings."""
  return outdir.settings_of(module, {k: v for k, v in vars(args).items() if k not in additive})


def legacy_settings(parse: Callable[[Sequence[str]], argparse.Namespace],
                    additive: Sequence[str] = ()) -> Callable[[dict], outdir.Settings]:
  """run.json -> the settings of a folder published before settings.json existed: its module
  and its argv parsed again by `parse` (today's defaults fill flags added since).

  Raises (from the returned function):
    InputError: the argv no longer parses.
  """
  def read(run: dict) -> outdir.Settings:
    module, argv = str(run["module"]), [str(a) for a in run["argv"]]
    try:
      with contextlib.redirect_stderr(io.StringIO()):
        ns = parse(argv)
    except SystemExit:
      raise InputError(f"run.json's flags ({' '.join(argv)}) no longer parse, so its settings "
                       "cannot be checked for --resume: pass --overwrite or another "
                       "--out") from None
    return outdir.settings_of(module, {k: v for k, v in vars(ns).items() if k not in additive})
  return read


def open_results(args: argparse.Namespace, made_by: outdir.Settings,
                 parse: Callable[[Sequence[str]], argparse.Namespace], cls=None,
                 writer: bool = True, additive: Sequence[str] = (), **kwargs):
  """Opens --out as a `ResultsDir` (or subclass `cls`) under the output-folder rule
  (`jtransfer.protocol.outdir`): refused when it holds anything unless --resume with the same
  module and settings `made_by`, or --overwrite (old contents moved aside). Says on stderr
  where --overwrite moved them and how many runs a resume keeps (unless --quiet).
  `additive`: as `settings` (the same tuple made `made_by`)."""
  from experiments.report import ResultsDir
  quiet = args.quiet  # (add_results_flags gives every caller the flag)
  log = None if quiet else (lambda line: print(line, file=sys.stderr))
  results = (cls or ResultsDir)(args.out, resume=args.resume, overwrite=args.overwrite,
                                writer=writer, settings=made_by,
                                legacy=legacy_settings(parse, additive),
                                log=log, **kwargs)
  if results.opened.resumed and log is not None and writer:
    log(f"--resume: {saved_runs(results.path)} runs already saved in {results.path} are "
        "skipped")
  return results


def open_model_dir(path: str, overwrite: bool, quiet: bool, check_only: bool = False) -> None:
  """Applies the output-folder rule to a model folder (experiments.pretrain,
  experiments.convert_weights): refused when it holds anything unless `overwrite`, which
  moves it aside; nothing is created (the saver writes the folder whole).
  `check_only`: refuse now, move nothing (call again right before saving, so a failed or
  interrupted run leaves the old folder in place). Multi-host, only the writer moves."""
  log = None if quiet else (lambda line: print(line, file=sys.stderr))
  outdir.open_outdir(path, None, overwrite=overwrite,
                     writer=parallel.is_writer() and not check_only, log=log, create=False)


def saved_runs(path: str) -> int:
  """How many run records the results.jsonl files under `path` hold."""
  n = 0
  for folder, _, files in os.walk(path):
    if "results.jsonl" in files:
      with open(os.path.join(folder, "results.jsonl"), "rb") as f:
        n += sum(1 for line in f if line.strip())
  return n


def interrupted_line(module: str, argv: Sequence[str],
                     parse: Callable[[Sequence[str]], argparse.Namespace]) -> str:
  """The one line a Ctrl-C ends with: how many runs --out keeps and the command that resumes."""
  try:
    with contextlib.redirect_stderr(io.StringIO()):
      ns = parse(list(argv))
    out = os.path.abspath(ns.out)
  except (SystemExit, AttributeError):
    return "interrupted before --out was opened; nothing saved"
  if not hasattr(ns, "resume"):  # a model folder (experiments.pretrain): saved only at the end
    ckpt = getattr(ns, "ckpt_dir", None)
    return (f"interrupted: no model saved in {out}" + (
        f"; the same command continues from the checkpoints in {ckpt}" if ckpt else ""))
  kept = [a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"]
  command = " ".join(["python", "-m", module] + [shlex.quote(a) for a in kept])
  return (f"interrupted: {saved_runs(out)} runs saved in {out}; continue with: {command}")


def interruptible(module: str, parse: Callable[[Sequence[str]], argparse.Namespace]):
  """Decorates a module's main(argv): Ctrl-C ends it with `interrupted_line` on stderr and
  exit code 130 instead of a traceback (finished runs are already on disk)."""
  def wrap(main: Callable[[Sequence[str] | None], int]):
    @functools.wraps(main)
    def guarded(argv: Sequence[str] | None = None) -> int:
      try:
        return main(argv)
      except KeyboardInterrupt:
        line = interrupted_line(module, list(sys.argv[1:] if argv is None else argv), parse)
        print(line, file=sys.stderr, flush=True)
        return INTERRUPTED
    return guarded
  return wrap


def start(args: argparse.Namespace, validate: Callable, run: Callable,
          made_by: outdir.Settings | None = None, parse: Callable | None = None):
  """The front half of an experiment's main(): check every flag, then open and fill --out.

  Calls `validate(args) -> plan`, only then opens the results directory (so a bad flag never
  touches existing results; `open_results` with `made_by` and `parse`), then
  `run(args, plan, results)`.

  Returns:
    (plan, results, run's return value), or None after printing an InputError (exit code 2).
  """
  try:
    made_by = made_by or settings("experiments", args)
    plan = validate(args)
    # Multi-host: every process runs the grid (its runs are collective), one writes it.
    results = open_results(args, made_by, parse or (lambda argv: args),
                           writer=parallel.is_writer())
    parallel.barrier("results directory opened")
    if not results.writer:
      results.reload()  # after the writer's --overwrite
    return plan, results, run(args, plan, results)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return None


def main(argv, publisher, run: Callable, records_of: Callable,
         plot: Callable | None = None) -> int:
  """The main() of an experiment module that publishes its results.

  Parses and checks the flags (`publisher.parse_args`, `publisher.validate`), sets the device
  mesh, opens --out (`start`), runs the grid, then writes results.json, report.md, summary.json
  and run.json (`experiments.publish.save`) and the plots.

  Args:
    argv: the flags (None = sys.argv[1:]).
    publisher: the module's `experiments.publish.Publisher`.
    run: (args, plan, results) -> what the grid returns.
    records_of: (results, what run returned) -> the records results.json holds.
    plot: optional (summary, plan, args, results, what run returned) -> None.

  Returns:
    The exit code: 0, 2 after printing a bad-input sentence, or 130 after Ctrl-C
    (`interruptible`).
  """
  return interruptible(publisher.module, publisher.parse_args)(
      functools.partial(_main, publisher=publisher, run=run, records_of=records_of,
                        plot=plot))(argv)


def _main(argv, publisher, run: Callable, records_of: Callable,
          plot: Callable | None = None) -> int:
  """`main` without the Ctrl-C guard."""
  from experiments import publish
  args = publisher.parse_args(argv)
  made_by = settings(publisher.module, args)
  apply_devices(args)
  t0 = time.time()
  started = start(args, publisher.validate, run, made_by, publisher.parse_args)
  if started is None:
    return 2
  plan, results, ran = started
  text, summary = publish.save(results, publisher, argv, records_of(results, ran), plan, args,
                               t0)
  if plot is not None and results.writer:
    plot(summary, plan, args, results, ran)
  return finish(results, text, t0)


def finish(results, text: str, t0: float) -> int:
  """The back half: prints the report and where it went; returns exit code 0."""
  if not results.writer:
    return 0
  print(text)
  print(f"wrote {results.path}/report.md in {time.time() - t0:.0f} s", file=sys.stderr)
  return 0
