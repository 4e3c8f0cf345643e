"""Whole-table wall time: the CWL Table I grid under the protocol, jtransfer against a PyTorch loop.

  python -m bench.bench_grid [--repeats 1] [--out bench/GRID.md]

The grid is `experiments.cwl_tables`' Table I (Freeze, Freeze+CWL; both small archs; both
embedded targets; k in {1,3,5,10}; the paper's freeze LR grid) under the protocol of
docs/protocol.md, the same in both arms:
  * every run evaluates its validation accuracy every `--eval-every` steps, stops once it has
    not improved for `--patience` steps (at most `--steps`) and keeps its best validation state;
  * per (arch, target, k, strategy), the LR is chosen by mean validation accuracy over
    `--tune-repeats` tuning draws (not evaluation draws), the grid extended at an edge
    (`--tune-extend`); the `--repeats` evaluation draws then run at the chosen LR (with
    `--paper-grid`, at every grid LR too) and are tested.

Arms (sources cached before timing; everything else, data loading and compilation included, is
inside the timed region):
  * jtransfer: `python -m experiments.cwl_tables --strategies freeze,freeze_cwl` with these flags,
    as a user runs it: Freeze trains its head on backbone features computed once per image,
    Freeze+CWL runs through the full model, one jitted step per shape, runs one at a time (the
    grid runner trains runs one at a time under early stopping: batched runs need fixed-length
    runs);
  * PyTorch loop: what a researcher writes around bench/torch_ref.py's nets (NCHW, CWL as an
    explicit scale layer): per run a copy of the pretrained net, Adam on the head (+ scales), the
    full forward every step (no cached features, no batching of runs), a validation forward every
    `--eval-every` steps with the same stopping rule, the best state restored, then the test
    forward. Same source weights and new-head init (copied from jtransfer), same k-shot draws and
    validation sets (experiments.fewshot's seeds), same batch at every step (`Batches.at`), same
    tuning runs; its LR is chosen on its own validation accuracies (the same selection rule).
The two arms alternate by arch (jtransfer's arch, PyTorch's same arch, the next arch ...), so a
change in a shared machine's load falls on both; jtransfer compiles per arch either way (its setups
are shared across targets with the same class count, not across archs).
Optional paths (`--paths`): `plain` (jtransfer with `--no-feature-cache`: Freeze through the full
model, the cached-features lever removed) and `processes` (the jtransfer arm split by target over
one single-threaded process per core, each pinned to its core).

The report (bench/GRID.md): wall time per arm and the ratio, the time split (Freeze vs
Freeze+CWL runs, tuning vs evaluation runs, validation/test forwards, compilation, feature
extraction), steps trained against the cap (what early stopping saves), and accuracy parity:
jtransfer minus PyTorch test accuracy per evaluation run at each arm's chosen LR (mean, 95% CI,
`jtransfer.protocol.stats.paired`), plus the same-LR tuning runs' validation accuracies.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile

from bench.common import emit
from bench.grid_jax import GridConfig, jax_grid, process_grid
from bench.grid_report import report
from bench.grid_torch import torch_grid, torch_threads
from experiments import pretrain


def parse_args(argv):
  """The bench's flags (defaults: `GridConfig`'s)."""
  d = GridConfig()
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default=d.text("archs"))
  p.add_argument("--targets", default=d.text("targets"), help="';'-separated target specs")
  p.add_argument("--shots", default=d.text("shots"))
  p.add_argument("--repeats", type=int, default=d.repeats, help="evaluation draws per cell")
  p.add_argument("--tune-repeats", type=int, default=d.tune_repeats,
                 help="tuning draws per cell")
  p.add_argument("--tune-extend", type=int, default=d.tune_extend)
  p.add_argument("--steps", type=int, default=d.steps,
                 help="step cap per run (cwl_tables' default)")
  p.add_argument("--patience", type=int, default=d.patience, help="(cwl_tables' default)")
  p.add_argument("--eval-every", type=int, default=d.eval_every)
  p.add_argument("--val-per-class", type=int, default=d.val_per_class)
  p.add_argument("--paper-grid", action=argparse.BooleanOptionalAction, default=d.paper_grid,
                 help="also run every grid LR on the evaluation draws, in both arms "
                      "(cwl_tables' 'best over LR' tables); off: evaluation draws run only at "
                      "the chosen LR")
  p.add_argument("--test-per-class", type=int, default=d.test_per_class)
  p.add_argument("--batch-size", type=int, default=d.batch_size)
  p.add_argument("--source", default=d.source, help="dataset spec (pretrained, cached) or "
                 "ckpt:PATH")
  p.add_argument("--source-epochs", type=float, default=d.source_epochs)
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--torch-threads", default=d.torch_threads,
                 help="PyTorch intra-op threads; 'auto' = whichever of 1 and torch's default "
                      "runs a probe step faster now (on a loaded machine torch's OpenMP threads "
                      "can run 10x slower than one thread)")
  p.add_argument("--paths", default=d.text("paths"),
                 help="comma list of jtransfer, torch, plain, processes")
  p.add_argument("--out", default=d.out)
  return p.parse_args(argv)


PATHS = ("jtransfer", "torch", "plain", "processes")


def config_of(args: argparse.Namespace) -> GridConfig:
  """The typed configuration of the parsed flags (the CLI edge: nothing below sees argparse).

  Raises:
    SystemExit: an unknown --paths entry or a --shots entry that is not an integer.
  """
  fields = {f.name for f in dataclasses.fields(GridConfig)}
  values = {k: v for k, v in vars(args).items() if k in fields}
  paths = tuple(p for p in args.paths.split(",") if p)
  for p in paths:
    if p not in PATHS:
      raise SystemExit(f"--paths: unknown path {p!r}")
  try:
    shots = tuple(int(k) for k in args.shots.split(",") if k.strip())
  except ValueError:
    raise SystemExit(f"--shots {args.shots!r}: expected a comma list of integers") from None
  values.update(archs=tuple(a for a in args.archs.split(",") if a),
                targets=tuple(t for t in args.targets.split(";") if t), shots=shots,
                paths=paths)
  return GridConfig(**values)


def _merge(a: dict | None, b: dict) -> dict:
  """Two partial results of one arm (seconds added, records joined)."""
  if a is None:
    return b
  return {k: a[k] + b[k] for k in a}


def main(argv=None) -> int:
  """Caches the sources, times the arms alternating by arch, writes the report."""
  config = config_of(parse_args(argv))
  paths = config.paths
  for arch in config.archs:  # sources are cached before timing
    pretrain.source_for(arch, config.source, epochs=config.source_epochs, seed=config.seed,
                        progress=False)
  load0 = " / ".join(f"{v:.2f}" for v in os.getloadavg())
  arms: dict = {}
  if "torch" in paths:
    import torch
    threads, probe = torch_threads(config.torch_threads)
    torch.set_num_threads(threads)
  with tempfile.TemporaryDirectory() as tmp:
    # The two main arms alternate by arch (jtransfer compiles per arch either way), so a change
    # in the shared machine's load falls on both rather than on one.
    for arch in config.archs:
      one = dataclasses.replace(config, archs=(arch,))
      for arm in ("jtransfer", "torch"):
        if arm in paths:
          res = (jax_grid(one, os.path.join(tmp, f"jtransfer-{arch}")) if arm == "jtransfer"
                 else torch_grid(one))
          arms[arm] = _merge(arms.get(arm), res)
    if "torch" in arms:
      arms["torch"].update(threads=threads, probe=probe)
    if "plain" in paths:
      arms["plain"] = jax_grid(config, os.path.join(tmp, "plain"), feature_cache=False)
    if "processes" in paths:  # one worker per core, at most one per target
      workers = min(os.cpu_count() or 1, len(config.targets))
      arms["processes"] = process_grid(config, os.path.join(tmp, "processes"), workers)
  load1 = " / ".join(f"{v:.2f}" for v in os.getloadavg())
  emit(report(config, argv, arms, (load0, load1)) + "\n", config.out)
  return 0


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  raise SystemExit(main())
