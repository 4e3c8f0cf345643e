"""Every study module's `main`: flags -> Config -> results folder -> runner -> published report.

  def main(argv=None): return jtransfer.study.main(STUDY, argv)

`main` states --bn in argv when absent (`flags.stated_argv`: the folder records its BatchNorm
mode; a stored argv without it means a folder made before the flag), parses the flags
(`flags`; a malformed flag exits 2 through argparse, a bad value prints its one `error: ...`
sentence and returns 2 before anything is opened), sets the device mesh,
opens --out under the output-folder rule with the settings fingerprint (refused unless empty,
--resume with the same module and settings, or --overwrite, which moves the old folder aside),
runs the grid (`runner.run`), then writes results.json, report.md, summary.json and run.json
(`publish.save`) and the study's plots. Ctrl-C ends it with one line (how many runs are saved
and the command that resumes) and exit code 130.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shlex
import sys
import time
from typing import Optional, Sequence

from jtransfer.errors import InputError
from jtransfer.protocol import outdir
from jtransfer.study import flags, grid, publish
from jtransfer.study import records as rec
from jtransfer.study import report as report_lib
from jtransfer.study import runner
from jtransfer.study.declare import Study
from jtransfer.study.results import ResultsDir
from jtransfer.train import parallel

# Exit code of a command stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED = 130


def plan_of(study: Study, config):
  """The invocation's plan: the study's own (`Study.plan`) or its grid (`grid.plan`)."""
  return study.plan(config) if study.plan is not None else grid.plan(study, config)


def publisher(study: Study) -> publish.Publisher:
  """The study's `Publisher`: what `publish check/regenerate/snapshot/merge` read."""
  def report(records, plan, config, folder):
    if study.report is not None:
      return study.report(plan, records, folder)
    return report_lib.make_report(plan, records)

  parse = lambda argv: flags.parse(study, argv)
  record_key = study.record_key or (lambda r: rec.key(rec.read([r], study.cell_fields)[0]))
  # A study with its own `run` lists its grid's keys itself (`Study.keys`), or none: its
  # folder is then counted when it finishes (`publish.save`).
  own = study.run is not None or study.plan is not None
  keys = study.keys if own else grid.grid_keys

  def grid_keys(records, plan, _):
    return keys(rec.read(records, study.cell_fields), plan)

  return publish.Publisher(
      study.module, parse, lambda c: plan_of(study, c),
      report, None if keys is None else grid_keys, record_key)


def settings(study: Study, raw: dict) -> outdir.Settings:
  """The settings fingerprint of parsed flags (`raw`, by destination): the study's additive
  flags left out, and flags added after publishing while at their default
  (`flags.settings_flags`)."""
  return outdir.settings_of(study.module, {k: v for k, v in flags.settings_flags(study, raw).items()
                                           if k not in study.additive})


def legacy_settings(study: Study):
  """run.json -> the settings of a folder published before settings.json existed (its argv
  parsed again; today's defaults fill flags added since)."""
  def read(run: dict) -> outdir.Settings:
    module, argv = str(run["module"]), [str(a) for a in run["argv"]]
    try:
      with contextlib.redirect_stderr(io.StringIO()):
        raw = flags.raw_flags(study, argv)
    except SystemExit:
      raise InputError(f"run.json's flags ({' '.join(argv)}) no longer parse, so its settings "
                       "cannot be checked for --resume: pass --overwrite or another "
                       "--out") from None
    return dataclasses.replace(settings(study, raw), module=module)
  return read


def growable(study: Study) -> dict:
  """The settings flags ('--repeats') a --resume may grow in this study (`Study.grows`; by
  default --repeats where the study offers the runner's protocol flags), each mapped to the
  value it has when left off the command line (a folder made with the default --target list
  stores None and grows to a superset of that list), None where it has none."""
  dests = study.grows
  if dests is None:
    dests = {"repeats"} if "protocol" in study.groups and "repeats" not in study.hidden \
        else set()
  return {"--" + d.replace("_", "-"): flags.default_of(study, d) for d in sorted(dests)}


def growth_check(config):
  """The check of a resume that grows the draws (`outdir.open_outdir`'s `check_growth`).

  Refuses --disjoint-tuning with shared tuning draws: their images are drawn from the pool
  rows no evaluation draw uses (`draws.cell_draws`), so more evaluation draws change the
  tuning draws, and with them every tuned choice the finished runs were made at.
  """
  p = config.protocol

  def check(grown: list[str]) -> None:
    if p.disjoint_tuning and p.tune_draws and p.tuning == "shared":
      raise InputError(f"--resume cannot grow {', '.join(grown)} under --disjoint-tuning, "
                       "whose tuning draws avoid every evaluation draw's images and so change "
                       "with the count: rerun with the new count in another --out")
  return check


def absent_flags(study: Study) -> dict:
  """What a flag a stored folder predates means there ('--bn' -> `Study.bn_before`)."""
  return {"--bn": study.bn_before} if flags.offers_bn(study) else {}


def predates_bn(path: str) -> bool:
  """Whether results folder `path` was made before --bn: its settings.json, else its
  run.json's argv, holds no --bn (False when it holds neither file)."""
  for name, read in (("settings.json", lambda d: "--bn" in d["flags"]),
                     ("run.json", lambda d: any(a == "--bn" or str(a).startswith("--bn=")
                                                for a in d["argv"]))):
    f = os.path.join(path, name)
    if os.path.isfile(f):
      try:
        with open(f) as fh:
          return not read(json.load(fh))
      except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable: `outdir.stored_settings` refuses it with its own sentence
  return False


def bn_check(study: Study, config, path: str, plan=None) -> None:
  """Refuses to resume a folder made before --bn whose arms ran BatchNorm modes that the
  --bn it resumes with does not reproduce: then every strategy ran its own recipe
  (`Strategy.recipe_bn`: the DELTA family train, the rest frozen), so e.g. a folder of
  finetune and l2sp has no --bn under which both keep their mode. Other folders, and studies
  that plan their own runs (`Study.plan`), pass. `plan`: the grid's plan when the caller
  has made it already (else made here).

  Raises:
    InputError: one sentence naming the arms and their modes then and now.
  """
  p = config.protocol
  if not (study.plan is None and flags.offers_bn(study) and os.path.isdir(path)
          and predates_bn(path)):
    return
  plan = plan or grid.plan(study, config)
  moved = [(a.name, a.strategy.recipe_bn, a.strategy.bn_mode(p.bn)) for a in plan.arms
           if a.strategy is not None and a.strategy.bn_mode(p.bn) != a.strategy.recipe_bn]
  if moved and p.bn == study.bn_before:  # else the settings check names --bn itself
    what = ", ".join(f"{n} ({then}, now {now})" for n, then, now in moved)
    raise InputError(f"--resume refused: --out {path} was made before --bn, when each arm ran "
                     f"its own BatchNorm mode, and --bn {p.bn} changes {what}: rerun in "
                     "another --out")


def saved_runs(path: str) -> int:
  """How many run records the results.jsonl files under `path` hold."""
  n = 0
  for folder, _, files in os.walk(path):
    if "results.jsonl" in files:
      with open(os.path.join(folder, "results.jsonl"), "rb") as f:
        n += sum(1 for line in f if line.strip())
  return n


def open_results(study: Study, config, made_by: outdir.Settings) -> ResultsDir:
  """Opens --out as a `ResultsDir` under the output-folder rule; says on stderr where
  --overwrite moved the old folder and how many runs a resume keeps (unless --quiet)."""
  o = config.output
  log = None if o.quiet else (lambda line: print(line, file=sys.stderr))
  writer = parallel.is_writer()
  results = ResultsDir(o.out, resume=o.resume, overwrite=o.overwrite, writer=writer,
                       settings=made_by, legacy=legacy_settings(study), log=log,
                       growable=growable(study), check_growth=growth_check(config),
                       absent=absent_flags(study))
  if results.opened.resumed and log is not None and writer:
    log(f"--resume: {saved_runs(results.path)} runs already saved in {results.path} are "
        "skipped")
  return results


def apply_devices(o) -> None:
  """Starts jax.distributed (--num-processes > 1) and sets the default training mesh.

  Raises:
    InputError: a device count that cannot be met.
  """
  if o.devices < 1:
    raise InputError(f"--devices must be >= 1 (the number of devices to train on), got "
                     f"{o.devices}")
  if o.num_processes > 1:
    if not 0 <= o.process_id < o.num_processes:
      raise InputError(f"--process-id {o.process_id} is not in [0, {o.num_processes})")
    kwargs = dict(num_processes=o.num_processes, process_id=o.process_id)
    if o.coordinator:
      kwargs["coordinator_address"] = o.coordinator
    parallel.initialize_distributed(**kwargs)
    import jax
    total = len(jax.devices())
    if o.devices not in (1, total):
      raise InputError(f"--devices {o.devices}: with {o.num_processes} processes the mesh "
                       f"spans all {total} devices; pass 1 or {total}")
    parallel.set_default_mesh(parallel.make_mesh(total), global_batches=True)
    return
  parallel.set_default_mesh(parallel.make_mesh(o.devices) if o.devices != 1 else None)


def interrupted_line(study: Study, argv: Sequence[str]) -> str:
  """The one line a Ctrl-C ends with: how many runs --out keeps and the command that resumes."""
  try:
    with contextlib.redirect_stderr(io.StringIO()):
      out = os.path.abspath(flags.raw_flags(study, list(argv))["out"])
  except (SystemExit, KeyError):
    return "interrupted before --out was opened; nothing saved"
  kept = [a for a in argv if a not in ("--resume", "--overwrite")] + ["--resume"]
  command = " ".join(["python", "-m", study.module] + [shlex.quote(a) for a in kept])
  return f"interrupted: {saved_runs(out)} runs saved in {out}; continue with: {command}"


def open_model_dir(path: str, overwrite: bool, quiet: bool, check_only: bool = False) -> None:
  """The output-folder rule for a model folder (experiments.pretrain, convert_weights):
  refused when it holds anything unless `overwrite`, which moves it aside; nothing is created
  (the saver writes the folder whole). `check_only`: refuse now, move nothing (call again right
  before saving, so a failed or interrupted run leaves the old folder in place). Multi-host,
  only the writer moves."""
  log = None if quiet else (lambda line: print(line, file=sys.stderr))
  outdir.open_outdir(path, None, overwrite=overwrite,
                     writer=parallel.is_writer() and not check_only, log=log, create=False)


def model_interrupted_line(parse, argv: Sequence[str]) -> str:
  """The one line a Ctrl-C of a model-folder command ends with (its model is saved only at the
  end; `parse`: argv -> its config, with `out` and optionally `ckpt_dir`)."""
  try:
    with contextlib.redirect_stderr(io.StringIO()):
      config = parse(list(argv))
  except (SystemExit, InputError):
    return "interrupted before --out was opened; nothing saved"
  ckpt = getattr(config, "ckpt_dir", None)
  return (f"interrupted: no model saved in {os.path.abspath(config.out)}" + (
      f"; the same command continues from the checkpoints in {ckpt}" if ckpt else ""))


def model_command(parse, body, argv: Optional[Sequence[str]] = None) -> int:
  """A model-folder command's main (`experiments.pretrain`, `convert_weights`): `body(config)`
  on the flags `parse` reads from argv; the exit code: body's, 2 after a bad-input sentence,
  130 after Ctrl-C with the `model_interrupted_line`."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    try:
      return body(parse(argv))
    except InputError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  except KeyboardInterrupt:
    print(model_interrupted_line(parse, argv), file=sys.stderr, flush=True)
    return INTERRUPTED


def result_records(records: Sequence[dict], cell_fields: Sequence[str],
                   key=None) -> list[dict]:
  """What results.json holds: the records sorted by key (`key`, default the version-2
  record's), without timings (they are not determined by the seed; results.jsonl keeps
  them), so two runs of one config are equal."""
  key = key or (lambda r: rec.key(rec.read([r], cell_fields)[0]))
  return [{k: v for k, v in r.items() if k != "seconds"}
          for r in sorted(records, key=lambda r: tuple(map(str, key(r))))]


def main(study: Study, argv: Optional[Sequence[str]] = None) -> int:
  """A study module's main: exit code 0, 2 after a bad-input sentence, 130 after Ctrl-C."""
  args = flags.stated_argv(study, sys.argv[1:] if argv is None else argv)
  try:
    return _main(study, args)
  except KeyboardInterrupt:
    print(interrupted_line(study, args), file=sys.stderr, flush=True)
    return INTERRUPTED

def script(study: Study) -> None:
  """`python -m experiments.X`: the process prepared before the first compilation
  (`jtransfer.cli_process`: compilation cache, CPU allocator), then `main` on the command
  line, exiting with its code. The one `if __name__ == "__main__"` body of every declared
  study."""
  from jtransfer.cli_process import prepare
  prepare()
  sys.exit(main(study))



def _main(study: Study, argv: list) -> int:
  raw = flags.raw_flags(study, argv)
  made_by = settings(study, raw)
  t0 = time.time()
  try:
    config = flags.config_of(study, raw)
    apply_devices(config.output)
    plan = plan_of(study, config)
    if study.plan is None:
      runner.arm_order(plan)  # an arm missing what it runs after: refused before --out opens
      if config.output.resume:
        bn_check(study, config, config.output.out, plan)
    # Multi-host: every process runs the grid (its runs are collective), one writes it.
    results = open_results(study, config, made_by)
    parallel.barrier("results directory opened")
    if not results.writer:
      results.reload()  # after the writer's --overwrite
    records = (study.run or runner.run)(study, config, results)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  pub = publisher(study)
  records = result_records(records, study.cell_fields, study.record_key)
  text, summary = publish.save(results, pub, argv, records, plan, config, t0)
  if study.plots is not None and results.writer:
    study.plots(summary, plan, results.path)
  if not results.writer:
    return 0
  print(text)
  print(f"wrote {results.path}/report.md in {time.time() - t0:.0f} s", file=sys.stderr)
  return 0
