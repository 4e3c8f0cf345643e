"""Tables 1-3 and Fig. 3 of Sparse Deep Transfer Learning (Liu et al., AAAI 2017), embedded.

  python -m experiments.sparse_transfer --out results/sparse_transfer

runs the paper's pipeline under the protocol of docs/protocol.md on both embedded targets
with 5 evaluation seeds (`--seeds 0,1,2,3,4`), the LR grid {1e-4, 3e-4, 1e-3} and lambda grid
{0.5, 1, 2} tuned on tuning seed 100. A reduced run (one target, 2 seeds, a shorter cap, lambda
fixed at the paper's 1, so 12 tuning runs instead of 24):

  python -m experiments.sparse_transfer --target fmnist:1,5,7,8,9 --seeds 0,1 \
      --steps 300 --patience 60 --lam 1 --test-per-class 200 --source-rounds 3 \
      --source-sparsity 0.8 --target-rates 0.85,0.9,0.95 --out results/sparse_reduced

published/sparse_transfer's run.json records 8,019 s (2.2 h) on 2 cores over three
invocations, two of them timed from session notes (the runs were killed and resumed).

Pipeline on vgg_s (conv1_1..conv3_2, fc6, fc7, head); the stages are library functions:
1. Sparse-SourceNet (`jtransfer.methods.hybrid_source`): the source (`--source`, the
   Reference-SourceNet) pruned by iterative magnitude pruning of every kernel (per-layer rates
   by the Erdos-Renyi-Kernel rule by default, `--scope`) to `--source-sparsity` in
   `--source-rounds` rounds (`--source-schedule`), `--source-steps` SGD steps of retraining on
   the source data per round; source test accuracy vs sparsity (Table S).
2. Per target and seed (`jtransfer.methods.hybrid_run.Unit`; `--train-per-class` images per
   class, the paper is not few-shot, plus `--val-per-class` validation images) the four nets
   of Table 1 (`jtransfer.methods.hybrid`): Standard-TransferNet (S-K-), Hybrid(S+K-),
   Hybrid(S-K+), Hybrid(S+K+). The main branch re-initialises its top N_m = 2 layers; the
   extra branch is a copy of the reference's top N_e = 2 layers (fc7 and the source head) on
   the main fc6; knowledge loss lam * CE(softmax(a_extra/tau), softmax(a_R/tau)). Each net
   trains (Adam) until its validation accuracy has not improved for `--patience` steps (at most
   `--steps`), keeping its best validation state. Its LR (`--lrs`) and, for the K+ nets, lambda
   (`--lam`, paper 1) and tau (`--tau`, paper 4, fixed by default) are chosen per target by
   mean validation accuracy over `--tune-seeds` (never evaluation seeds, never tested), a grid
   extended at an edge (`--tune-extend`).
3. Sparse-TargetNet (Fig. 3): the trained Hybrid's main-branch kernels pruned to each rate of
   `--target-rates` in turn, retrained at each (validation patience, at most `--target-steps`)
   with the total loss (K+) or CE alone (K-), at the Hybrid's chosen point.
4. Neuron pruning (Table 2): from the K+ net at `--neuron-from` (default: the sparsest one
   whose validation accuracy reaches the Standard-TransferNet's), the `--neuron-layers` lose
   `--neuron-frac` of their neurons per iteration (lowest mean activation over
   `--neuron-images-per-class` images per class), `--neuron-steps` steps of retraining, until
   validation accuracy falls below the Standard-TransferNet's (that iteration undone).
5. Table 3: accuracy and main-branch connection pruning rate (`hybrid_measure.main_rate`).
6. Claims, paired by evaluation seed: Hybrid vs Standard and each ablation (Table 1), the
   Sparse-TargetNet vs the dense Hybrid and vs its K- twin (Fig. 3), the neuron-pruned net vs
   Standard and the share of fc neurons it removed (Tables 2-3).

Writes results.jsonl (one record per finished piece), results.json, report.md
(`experiments.sparse_tables`), summary.json, source_sparsity.png and fig3_pruning.png.
`--resume` skips finished tuning runs and (target, seed) units; the Sparse-SourceNet is saved
under models/ and reloaded. Accuracies are test accuracies of the main branch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

from experiments import sparse_tables
from jtransfer import study
from jtransfer.errors import InputError
from jtransfer.methods import hybrid, sparsity
from jtransfer.study import Arm, flag, sparse_pipeline
from jtransfer.study.config import at_least, comma_list

VARIANTS = sparse_pipeline.VARIANTS


def _ints(flag_name: str):
  """A parser of a non-empty comma list of integers >= 0."""
  def parse(text):
    try:
      values = tuple(int(s) for s in str(text).split(",") if s.strip())
    except ValueError:
      values = ()
    if not values or any(v < 0 for v in values):
      raise InputError(f"{flag_name} {text!r}: expected a non-empty comma list of integers >= 0")
    return values
  return parse


def _floats(flag_name: str, lo: float, hi: float, open_lo: bool = False):
  """A parser of a comma list of floats in [lo, hi] (or (lo, hi]): sorted, distinct."""
  return lambda text: tuple(sparse_pipeline.floats_in(text, flag_name, lo, hi, open_lo))


def _check(name: str, ok, what: str):
  def check(v):
    if not ok(v):
      raise InputError(f"{name} must be {what}, got {v}")
  return check


def _variants(text) -> tuple[str, ...]:
  names = comma_list("--variants")(text)
  if not names or any(v not in VARIANTS for v in names):
    raise InputError(f"--variants {text!r}: expected some of {', '.join(VARIANTS)}")
  return names


def _layers(text) -> tuple[str, ...]:
  names = comma_list("--neuron-layers")(text)
  if not names or any(n not in ("fc6", "fc7") for n in names):
    raise InputError(f"--neuron-layers {text!r}: expected fc6 and/or fc7")
  return names


@dataclasses.dataclass(frozen=True)
class Knobs:
  """The sparse-transfer study's own flags (`Config.extra`)."""
  source_data: Optional[str] = flag(
      "--source-data", None, "source dataset for pruning (default: the source's own spec)")
  source_sparsity: float = flag("--source-sparsity", 0.85, "final sparsity of the source",
                                check=lambda v: sparsity.check_fraction(v, "--source-sparsity"))
  source_rounds: int = flag("--source-rounds", 4, "prune-retrain rounds of the source",
                            check=at_least(1, "--source-rounds"))
  source_schedule: str = flag("--source-schedule", "polynomial", "round targets",
                              choices=("polynomial", "linear", "geometric"))
  source_steps: int = flag("--source-steps", 100, "retrain steps per round",
                           check=at_least(1, "--source-steps"))
  source_lr: float = flag("--source-lr", 0.01, "SGD, momentum 0.9",
                          check=_check("--source-lr", lambda v: v > 0, "> 0"))
  source_batch_size: int = flag("--source-batch-size", 128, "source retraining batch size",
                                check=at_least(1, "--source-batch-size"))
  source_max_train: int = flag("--source-max-train", 6000, "cap on source images used for "
                               "retraining (0 = all)", check=at_least(0, "--source-max-train"))
  source_test_per_class: int = flag("--source-test-per-class", 500, "0 = all",
                                    check=at_least(0, "--source-test-per-class"))
  scope: str = flag("--scope", "erk", "how a sparsity target is shared among layers (source and "
                    "target pruning); 'global' can empty fc6, whose weights are smallest",
                    choices=sparsity.SCOPES)
  train_per_class: int = flag("--train-per-class", 100, "training images per class",
                              check=at_least(1, "--train-per-class"))
  seeds: tuple[int, ...] = flag(
      "--seeds", (0, 1, 2, 3, 4), "evaluation seeds, comma list; one data draw and init per "
      "seed (the claims pair the nets by seed and need >= 2 seeds for an interval)",
      cli="0,1,2,3,4", parse=_ints("--seeds"))
  tune_seeds: tuple[int, ...] = flag(
      "--tune-seeds", (100,), "seeds of the tuning draws (comma list, disjoint from --seeds): "
      "their validation accuracy chooses LR, lambda and tau; they are never tested", cli="100",
      parse=_ints("--tune-seeds"))
  variants: tuple[str, ...] = flag("--variants", VARIANTS, "Table 1 nets, comma list",
                                   cli=",".join(VARIANTS), parse=_variants)
  lrs: tuple[float, ...] = flag(
      "--lrs", (1e-4, 3e-4, 1e-3), "Adam learning rates (transfer), comma list; chosen per "
      "(target, net) on the tuning seeds' validation sets", cli="1e-4,3e-4,1e-3",
      parse=_floats("--lrs", 0.0, 10.0, open_lo=True))
  lams: tuple[float, ...] = flag(
      "--lam", (0.5, 1.0, 2.0), "knowledge-term weight(s) of the K+ nets, comma list (tuned "
      "with the LR)", dest="lam", cli="0.5,1,2", parse=_floats("--lam", 0.0, 1e3))
  taus: tuple[float, ...] = flag(
      "--tau", (4.0,), "softmax temperature(s) of the knowledge term, comma list (tuned with "
      "the LR; default fixed at the paper's 4)", dest="tau", cli="4",
      parse=_floats("--tau", 0.0, 1e3, open_lo=True))
  n_m: int = flag("--n-m", 2, "top main layers re-initialised dense")
  n_e: int = flag("--n-e", 2, "top reference layers in the extra branch")
  target_rates: tuple[float, ...] = flag(
      "--target-rates", (0.8, 0.9, 0.95, 0.975), "connection pruning rates of the "
      "Sparse-TargetNet", cli="0.8,0.9,0.95,0.975",
      parse=_floats("--target-rates", 0.0, 0.999))
  target_steps: int = flag("--target-steps", 300, "most retrain steps per rate (under "
                           "--patience on validation; exactly this many with --patience 0)",
                           check=at_least(1, "--target-steps"))
  neuron_from: Optional[float] = flag(
      "--neuron-from", None, "connection rate whose K+ net is neuron-pruned (default: the "
      "highest rate whose validation accuracy reaches the Standard-TransferNet's, else the "
      "lowest)", parse=float)
  neuron_frac: float = flag("--neuron-frac", 0.125, "fraction of a layer's neurons removed per "
                            "iteration (paper 512/4096)",
                            check=_check("--neuron-frac", lambda v: 0 < v < 1, "in (0, 1)"))
  neuron_steps: int = flag("--neuron-steps", 50, "retrain steps per neuron-pruning iteration",
                           check=at_least(1, "--neuron-steps"))
  neuron_images_per_class: int = flag(
      "--neuron-images-per-class", 50, "training images per class ranking the neurons",
      check=at_least(1, "--neuron-images-per-class"))
  neuron_layers: tuple[str, ...] = flag("--neuron-layers", ("fc6", "fc7"), "FC layers pruned, "
                                        "in order", cli="fc6,fc7", parse=_layers)


# The Table 1 nets are tuned arms (their run function trains one net); the pruning stages
# are arms that follow the net they prune. Their records come from `hybrid_run.Unit.run`.
ARMS = (Arm("sparse_source", "Sparse-SourceNet", run=None, tuned=False),
        *(Arm(v, hybrid.VARIANT_NAMES[v], run=functools.partial(sparse_pipeline.run_transfer, v),
              after=("sparse_source",) if hybrid.VARIANTS[v][0] else ()) for v in VARIANTS),
        Arm("sparse_target", "Sparse-TargetNet", after=("hybrid",), tuned=False),
        Arm("neuron", "Sparse-TargetNet_N", after=("sparse_target", "standard"), tuned=False))

# Shared flags the study does not offer; --lrs is its own (a comma list only). Its pipeline
# runs its own grid (sparse_pipeline.run), which tunes on --tune-seeds and implements none of
# the grid runner's --tuning nested, --disjoint-tuning and --cap-share: offered, they parsed
# and were silently ignored; likewise --bn (its fine-tuning keeps its published mode).
HIDDEN = frozenset({"arch", "shots", "strategies", "lrs", "repeats", "tune_repeats", "cv_folds",
                    "augment", "stored_size", "stream_threads", "stream_workers", "paper_grid",
                    "seed", "batch_runs", "no_feature_cache", "shard", "num_processes",
                    "process_id", "coordinator", "tuning", "disjoint_tuning", "cap_share",
                    "bn"})

STUDY = study.Study(
    module="experiments.sparse_transfer",
    title="# Sparse deep transfer (Liu et al. 2017): Tables 1-3, Fig. 3",
    arms=ARMS, any_strategy=False, cell_fields=("target",), extra=Knobs,
    claims=sparse_tables.TABLE1_CLAIMS + sparse_tables.FIG3_CLAIMS + sparse_tables.NEURON_CLAIMS,
    defaults={"out": "results/sparse_transfer", "steps": 1000,
              "tune_extend": 1, "arch": "vgg_s", "strategies": ",".join(VARIANTS),
              "tune_repeats": 0},
    hidden=HIDDEN, check=sparse_pipeline.plan_of, plan=sparse_pipeline.plan_of,
    run=sparse_pipeline.run, record_key=sparse_pipeline.record_key,
    # --seeds may grow on --resume: a unit per seed, tuned on --tune-seeds alone
    grows=frozenset({"seeds"}), report=sparse_tables.report, plots=sparse_tables.plots, doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (exit 0; 2 after a bad-input sentence; 130 after Ctrl-C)."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  import sys

  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
