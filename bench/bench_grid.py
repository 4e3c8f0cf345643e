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
    as a user runs it (the study runner, `jtransfer.study.main`): Freeze trains its head on backbone features computed once per image,
    Freeze+CWL runs through the full model, one jitted step per shape, runs one at a time (the
    grid runner trains runs one at a time under early stopping: batched runs need fixed-length
    runs);
  * PyTorch loop: what a researcher writes around bench/torch_ref.py's nets (NCHW, CWL as an
    explicit scale layer): per run a copy of the pretrained net, Adam on the head (+ scales), the
    full forward every step (no cached features, no batching of runs), a validation forward every
    `--eval-every` steps with the same stopping rule, the best state restored, then the test
    forward. Same source weights and new-head init (copied from jtransfer), same k-shot draws and
    validation sets (`jtransfer.study.draws`), same batch at every step (`Batches.at`), same
    tuning runs and evaluation points (`jtransfer.study.grid` on the same typed `Config`); its LR
    is chosen on its own validation accuracies (the same selection rule).
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

import dataclasses
import os
import sys
import tempfile
from typing import Optional, Sequence

from bench.common import emit
from bench.grid_jax import GridConfig, jax_grid, process_grid
from bench.grid_report import report
from bench.grid_torch import torch_grid, torch_threads
from jtransfer import sources
from jtransfer.errors import InputError
from jtransfer.study import flags


def parse(argv: Optional[Sequence[str]]) -> GridConfig:
  """The typed configuration of the command line (the CLI edge: `jtransfer.study.flags`).

  Raises:
    InputError: one sentence naming a bad flag.
  """
  return flags.command_config(GridConfig, argv, __doc__)


def _merge(a: dict | None, b: dict) -> dict:
  """Two partial results of one arm (seconds added, records joined)."""
  if a is None:
    return b
  return {k: a[k] + b[k] for k in a}


def main(argv=None) -> int:
  """Caches the sources, times the arms alternating by arch, writes the report."""
  try:
    config = parse(argv)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  paths = config.paths
  for arch in config.archs:  # sources are cached before timing
    sources.source_for(arch, config.source, epochs=config.source_epochs,
                        seed=config.protocol.seed,
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
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  raise SystemExit(main())
