"""Compact transfer by joint learning (compact-cnn-transfer): teacher vs students.

  python -m experiments.compact_transfer --arch resnet_s --out results/compact_transfer

For each target (default both embedded ones, fmnist:1,5,7,8,9 and digits) and draw (a fresh
stratified draw of `--shots` training images per class from the target's train split, plus a
disjoint validation set of `--val-per-class` images per class):

  * teacher: the large target CNN fine-tuned from the source (`--strategy`, default finetune,
    any strategy of experiments.fewshot), stage 1 of the paper;
  * scratch: the compact CNN (`--student-config` widths, default half width:
    `distill.COMPACT_CONFIGS`) trained from random init on the labels;
  * finetune: the compact CNN fine-tuned from a source of its own size (the compact arch
    pretrained on the source data, cached under .cache/sources, or `--student-source ckpt:DIR`);
  * distill / distill_ft: the compact CNN from random init / from its compact source, trained
    with the joint loss (1 - lambda) CE(y, p_s) + lambda T^2 KL(p_t^T || p_s^T) against the
    teacher (`jtransfer.methods.distill`), stage 2 of the paper;
  * pruned / pruned_distill: the teacher itself made compact by channel pruning
    (`jtransfer.methods.prune`: `--prune-keep` of each conv unit's channels by |CWL sigma| when
    the strategy has scales, else |BN scale| or filter L1 norm), fine-tuned on the labels alone
    or with the teacher's soft targets: pruning and distillation combined.

Protocol (docs/protocol.md, `jtransfer.protocol`):
  * Converged runs: every teacher and student run evaluates its validation accuracy every
    `--eval-every` steps, stops once it has not improved for `--patience` steps or at its cap
    (`--teacher-steps`, `--student-steps`) and keeps its best validation state; each record
    holds `steps`, `best_step` and `stopped`. `--patience 0` trains exactly the cap.
  * Tuning never on test: per target, on `--tune-repeats` tuning draws (repeat < 0, never
    evaluation draws, never evaluated on test), by mean validation accuracy: the teacher's LR
    (`--teacher-lr`, and its strategy's knobs), each student's LR (`--student-lr` from random
    init, `--ft-lr` from pretrained weights) and, for the distilled students, T
    (`--temperature`) and lambda (`--lam`) jointly with their LR. Every such flag takes a comma
    list (a grid) or one value (fixed); a choice on a grid edge extends the grid
    (`--tune-extend`, geometric; lambda on its odds scale lambda / (1 - lambda), so it stays in
    (0, 1)) or is flagged in the report. A student on a draw learns from the teacher trained on
    that same draw at the teacher's chosen point. `--tune-repeats 0` needs one value per flag.
  * Paired claims: evaluation draws run each variant at its chosen point; every variant sees
    the same draw, validation and test images (paired comparison). The report's "Claims"
    section tests the paper's claims as per-draw differences (mean, 95% t-interval, wins,
    verdict): distill > scratch, distill_ft > finetune, and "approaches the teacher" as
    distill >= teacher - `--approach-margin` (non-inferiority), the same for distill_ft.

Students use Adam and BN with batch statistics. Reported: test accuracy mean (std) over
evaluation draws, agreement with the teacher's test predictions, params, FLOPs per image (XLA's
cost analysis of the jitted eval forward at batch 1), latency (median of `--latency-runs` timed
calls after warm-up, at batch 1 and 128, each evaluation draw's models timed together; the
report gives the median over draws), the chosen hyper-parameters, steps trained, and the
claims. Writes results.jsonl (one record per finished run, tuning runs included; `--resume`
continues), results.json, report.md (regenerated from results.json alone by `make_report`),
summary.json and accuracy_vs_flops.png.

The paper (VGG/ImageNet teachers, CIFAR-10 and MIT Indoor) only states its method in the text we
have: no numbers to compare against. The defaults (5 evaluation and 2 tuning draws per target;
the teacher's 5 paper LRs, 3 LRs per student, 3 T x 3 lambda for each distilled student: about
190 tuning and 35 evaluation runs per target, more where a grid extends) are a long run on a
CPU. A reduced one, grids cut to two points and one tuning draw (32 tuning and 21 evaluation
runs per target; not timed here):

  python -m experiments.compact_transfer --arch vgg_s --shots 20 --repeats 3 \\
      --tune-repeats 1 --teacher-lr 3e-4,1e-3 --student-lr 2e-3,6e-3 --ft-lr 3e-4,1e-3 \\
      --temperature 2,4 --lam 0.5,0.8 --teacher-steps 200 --student-steps 300 --patience 50 \\
      --batch-size 50 --test-per-class 200 --student-source-epochs 1 --latency-runs 10 \\
      --out results/compact_transfer_reduced
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np

from experiments import cli, grid_progress, pretrain, publish
from experiments.report import (TIMED_AFTER_RESUME, TIMED_TOGETHER, ResultsDir, float_list,
                                mean_std, positive_ints, timing_text)
from jtransfer import models
from jtransfer.data import augment, load_spec, parse_spec, sample_kshot
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.methods import compact, distill, transfer
from jtransfer.methods.compact import (DESCRIPTIONS, FROM_SCRATCH, KD, NEEDS_COMPACT_SOURCE,
                                       NEEDS_TEACHER, PRUNED, VARIANTS)
from jtransfer.methods.compact_runs import CompactTrainer, Draw, RunSettings, run_teacher, \
    run_variant
from jtransfer.protocol import claims, progress, tuning

# One record per run: a variant at one hyper-parameter point ('lr', and 'hp' = its other knobs:
# T and lambda for the distilled students, the teacher strategy's knobs) on one draw.
KEY = ("target", "shots", "variant", "repeat", "lr", "hp")
DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")
CELL_FIELDS = ("arch", "target", "shots")
DEFAULT_MARGIN = 0.02


def paper_claims(margin: float = DEFAULT_MARGIN) -> tuple[claims.Claim, ...]:
  """The compact-transfer paper's claims (abstract and introduction; its results are not in the
  text we have) as paired comparisons over draws."""
  src = "abstract, introduction"
  return (
      claims.Claim("Compact", "the jointly learned compact net beats the same net trained on "
                   "labels alone", "distill", "scratch", source=src),
      claims.Claim("Compact", "joint learning beats labels alone for the compact net "
                   "fine-tuned from a compact source", "distill_ft", "finetune",
                   source=src + "; the pretrained compact net is this repo's variant"),
      claims.Claim("Compact", "the jointly learned compact net approaches the large target "
                   "net (efficiency without reducing performance)", "distill", "teacher",
                   at_least=True, margin=margin, source=src),
      claims.Claim("Compact", "the jointly learned compact net from a compact source approaches "
                   "the large target net", "distill_ft", "teacher", at_least=True,
                   margin=margin, source=src + "; this repo's variant"),
  )


# ----------------------------------------------------------------------------- flags
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="resnet_s", choices=models.names())
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE,
                 help="dataset spec to pretrain the teacher's source on (cached), or ckpt:PATH")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--student-arch", default=None, choices=models.names(),
                 help="the compact student's architecture (default --arch), e.g. mobilenet_v2 "
                      "under a resnet_s teacher")
  p.add_argument("--student-source", default=None,
                 help="the compact source: ckpt:PATH, or a dataset spec to pretrain it on "
                      "(default: --source's data when that is a spec)")
  p.add_argument("--student-config", default=None,
                 help='compact widths as JSON, e.g. \'{"stage_widths": [16, 32, 64], '
                      '"stem_width": 16}\' (default: half width; taken from the checkpoint '
                      'with --student-source ckpt:)')
  p.add_argument("--student-source-epochs", type=float, default=None,
                 help="pretraining epochs of the compact source (default --source-epochs)")
  p.add_argument("--target", action="append", default=None,
                 help="target dataset spec; repeat the flag (or separate with ';') for several")
  p.add_argument("--shots", type=int, default=30, help="training images per class")
  p.add_argument("--repeats", type=int, default=5, help="evaluation draws per target")
  p.add_argument("--test-per-class", type=int, default=300, help="0 = all")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--strategy", default="finetune", help="teacher's transfer strategy")
  # Hyper-parameters: a comma list is a grid chosen on the tuning draws, one value is fixed.
  p.add_argument("--teacher-lr", default="paper",
                 help="teacher's Adam LR grid: 'paper' (the strategy's grid of the CWL paper) or "
                      "a comma list")
  p.add_argument("--student-lr", default="1e-3,3e-3,1e-2",
                 help="Adam LR grid of the students from random init (scratch, distill)")
  p.add_argument("--ft-lr", default="3e-4,1e-3,3e-3",
                 help="Adam LR grid of the students from pretrained weights (finetune, "
                      "distill_ft, pruned, pruned_distill)")
  p.add_argument("--temperature", default="2,4,8", help="T grid of the joint loss")
  p.add_argument("--lam", default="0.5,0.75,0.9",
                 help="lambda grid (weight of the teacher term); a grid's values must lie in "
                      "(0, 1), a single value in [0, 1]")
  # The protocol (docs/protocol.md).
  p.add_argument("--teacher-steps", type=int, default=500, help="step cap of a teacher run")
  p.add_argument("--student-steps", type=int, default=1000, help="step cap of a student run")
  cli.add_stopping_flags(p, 100, "a run")
  p.add_argument("--val-per-class", type=int, default=20,
                 help="validation images per class, disjoint from the k-shot set and from test")
  p.add_argument("--tune-repeats", type=int, default=2,
                 help="tuning draws per target (not evaluation draws, never tested) on which "
                      "every grid is chosen by mean validation accuracy; 0 = no tuning (every "
                      "hyper-parameter flag must then hold one value)")
  cli.add_tune_extend_flag(p)
  p.add_argument("--approach-margin", type=float, default=DEFAULT_MARGIN,
                 help="'approaches the teacher' is tested as student >= teacher - this margin "
                      "(accuracy units: 0.02 = 2 points)")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--augment", default="none",
                 help="training augmentation of the students (jtransfer.data.augment: none, "
                      "flip, crop, rrc, pad[N], each optionally +flip; e.g. pad2+flip: zero-pad "
                      "2 px, random crop, flip), inside the loss, so the teacher sees the "
                      "student's very batch; 'none' caches the teacher's logits once")
  p.add_argument("--prune-keep", type=float, default=0.5,
                 help="fraction of each conv unit's channels the pruned variants keep")
  p.add_argument("--prune-residual", default="group", choices=("group", "keep"),
                 help="ResNet stage channels: pruned as one group, or left whole")
  p.add_argument("--latency-batches", default="1,128")
  p.add_argument("--latency-runs", type=int, default=20)
  p.add_argument("--data-dir", default=None,
                 help="TFDS data_dir or the Fashion-MNIST IDX directory")
  p.add_argument("--seed", type=int, default=0)
  cli.add_results_flags(p, "results/compact_transfer")
  return p.parse_args(argv)


def _grid(text: str, flag: str, ok: Callable[[float], bool], what: str) -> tuple[float, ...]:
  """A comma list of distinct numbers from `flag`, each passing `ok`, sorted."""
  values = float_list(text, flag, ok, what)
  if len(set(values)) != len(values):
    raise InputError(f"{flag} {text!r}: values must be distinct")
  return tuple(sorted(values))


def validate(args: argparse.Namespace) -> dict:
  """Checks every flag before loading anything; returns the plan."""
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    raise InputError(f"--variants {args.variants!r}: expected some of {', '.join(VARIANTS)}")
  notes: list = []
  targets = cli.target_list(args.target, DEFAULT_TARGETS)
  for t in targets:
    parse_spec(t, flag="--target")
  if not args.source.startswith("ckpt:"):
    parse_spec(args.source, flag="--source")
  strategy = transfer.get_strategy(args.strategy)
  for flag, v in (("--shots", args.shots), ("--repeats", args.repeats),
                  ("--teacher-steps", args.teacher_steps), ("--batch-size", args.batch_size),
                  ("--student-steps", args.student_steps), ("--eval-every", args.eval_every),
                  ("--latency-runs", args.latency_runs)):
    if v < 1:
      raise InputError(f"{flag} must be >= 1, got {v}")
  for flag, v in (("--patience", args.patience), ("--tune-repeats", args.tune_repeats),
                  ("--tune-extend", args.tune_extend), ("--val-per-class", args.val_per_class),
                  ("--test-per-class", args.test_per_class)):
    if v < 0:
      raise InputError(f"{flag} must be >= 0, got {v}")
  if not (math.isfinite(args.approach_margin) and 0 <= args.approach_margin < 1):
    raise InputError(f"--approach-margin must be in [0, 1), got {args.approach_margin}")
  positive = lambda v: v > 0
  teacher_lrs = (transfer.lr_grid(strategy, "paper") if args.teacher_lr == "paper" else
                 _grid(args.teacher_lr, "--teacher-lr", positive,
                       "learning rates must be finite numbers > 0"))
  grids = dict(
      teacher={"lr": tuple(sorted(teacher_lrs)), **strategy.knobs},
      student_lr=_grid(args.student_lr, "--student-lr", positive,
                       "learning rates must be finite numbers > 0"),
      ft_lr=_grid(args.ft_lr, "--ft-lr", positive, "learning rates must be finite numbers > 0"),
      T=_grid(args.temperature, "--temperature", positive,
              "the distillation temperature must be a finite number > 0"),
      lam=_grid(args.lam, "--lam", lambda v: 0 <= v <= 1, "distillation lambda must be in "
                "[0, 1]"))
  if len(grids["lam"]) > 1 and not 0 < grids["lam"][0] <= grids["lam"][-1] < 1:
    raise InputError(f"--lam {args.lam!r}: a grid of distillation lambda must lie in (0, 1) "
                     "(it is tuned on the odds scale lambda / (1 - lambda)); one value may be "
                     "0 or 1")
  cli.check_validation_needs(args)
  if not args.tune_repeats:
    multi = [f for f, g in (("--teacher-lr", grids["teacher"]["lr"]),
                            ("--student-lr", grids["student_lr"]), ("--ft-lr", grids["ft_lr"]),
                            ("--temperature", grids["T"]), ("--lam", grids["lam"])) if len(g) > 1]
    multi += [f"the {args.strategy} knob {k}" for k, g in strategy.knobs.items() if len(g) > 1
              and NEEDS_TEACHER & set(variants)]
    if multi:
      raise InputError(f"--tune-repeats 0 leaves no draws to choose {', '.join(multi)} on: "
                       "give one value each or --tune-repeats >= 1")
  if not 0 < args.prune_keep <= 1:
    raise InputError(f"--prune-keep must be in (0, 1], got {args.prune_keep}")
  augment.parse(args.augment)  # refuses an unknown recipe
  student_source = args.student_source
  if student_source is None:
    student_source = args.source if not args.source.startswith("ckpt:") else None
  if NEEDS_COMPACT_SOURCE & set(variants) and student_source is None:
    raise InputError("--student-source is needed (ckpt:PATH or a dataset spec) when --source "
                     "is a checkpoint and the finetune/distill_ft variants run")
  if student_source and not student_source.startswith("ckpt:"):
    parse_spec(student_source, flag="--student-source")
  if args.student_config and student_source and student_source.startswith("ckpt:"):
    raise InputError("--student-config conflicts with --student-source ckpt: (the "
                     "checkpoint's config is the student's)")
  config = compact.parse_student_config(args.student_config)
  return dict(variants=variants, targets=targets, student_source=student_source,
              student_config=config, grids=grids,
              batches=positive_ints(args.latency_batches, "--latency-batches"),
              notes=notes)


def variant_grid(plan: dict, variant: str) -> dict:
  """The tuning grid of a variant (axis -> sorted values). The distilled students' lambda is
  tuned on its odds scale ('lam_odds' = lambda / (1 - lambda)) when it has several values, so
  the geometric edge extension stays inside (0, 1)."""
  g = plan["grids"]
  if variant == "teacher":
    return dict(g["teacher"])
  out = {"lr": g["student_lr"] if variant in FROM_SCRATCH else g["ft_lr"]}
  if variant in KD:
    out["T"] = g["T"]
    out["lam_odds" if len(g["lam"]) > 1 else "lam"] = (
        tuple(_odds(v) for v in g["lam"]) if len(g["lam"]) > 1 else g["lam"])
  return out


def _odds(lam: float) -> float:
  return float(f"{lam / (1 - lam):.12g}")


def point_knobs(point: dict) -> dict:
  """A tuning point's knobs besides the LR, as the run takes them (lam_odds -> lam)."""
  out = {k: v for k, v in point.items() if k not in ("lr", "lam_odds")}
  if "lam_odds" in point:
    out["lam"] = float(f"{point['lam_odds'] / (1 + point['lam_odds']):.12g}")
  return out


# ----------------------------------------------------------------------------- sources
def student_arch(args) -> str:
  """The student's architecture: --student-arch, else the teacher's --arch."""
  return args.student_arch or args.arch


# ----------------------------------------------------------------------------- runs
def record_key(r: dict) -> tuple:
  return tuple(r.get(k) for k in KEY)


def draw_seed(args, repeat: int) -> int:
  """The seed of a draw: evaluation draws have repeat >= 0, tuning draws repeat < 0, so the two
  never share a draw."""
  return (args.seed * 1_000_003 + repeat) % (2 ** 31)


def trainer_for(args, plan, source, student_src) -> CompactTrainer:
  """The runs' shared trainer (`jtransfer.methods.compact_runs`), configured from the flags."""
  return CompactTrainer(RunSettings(
      arch=args.arch, student_arch=student_arch(args), strategy=args.strategy,
      teacher_steps=args.teacher_steps, student_steps=args.student_steps,
      eval_every=args.eval_every, patience=args.patience, batch_size=args.batch_size,
      augment=args.augment, prune_keep=args.prune_keep, prune_residual=args.prune_residual,
      latency_batches=tuple(plan["batches"]), latency_runs=args.latency_runs),
      source, student_src, plan["student_config"])


class TargetRuns:
  """The runs of one target: its draws, the teachers trained on them, one record per run.

  Tuning draws (repeat < 0) never see the test split: their runs are scored on the draw's
  validation images only, and their records hold test_acc None. `grid` (a
  `jtransfer.protocol.progress.GridProgress` spanning every target) counts each finished run
  and prints its line; long runs tick through `grid.emit`.
  """

  def __init__(self, runner: CompactTrainer, args, plan, spec: str, pool, test,
               results: ResultsDir, log, grid: Optional[progress.GridProgress] = None):
    self.runner, self.args, self.plan = runner, args, plan
    self.spec, self.pool, self.test, self.results, self.log = spec, pool, test, results, log
    self.grid = grid or progress.GridProgress({})
    self.k = pool.num_classes
    self._draws: dict = {}
    self._teachers: dict = {}
    self.done = {record_key(r) for r in results.records}
    # An evaluation draw's (record, cost key)s, written once its models are timed together.
    self._deferred: Optional[list] = None

  def draw(self, repeat: int):
    """(seed, train rows, validation rows) of a draw; the same for every variant."""
    if repeat not in self._draws:
      seed = draw_seed(self.args, repeat)
      train_idx, val_idx = sample_kshot(self.pool.labels, self.args.shots, seed,
                                        val_per_class=self.args.val_per_class,
                                        num_classes=self.k)
      self._draws[repeat] = (seed, train_idx, val_idx)
    return self._draws[repeat]

  def _draw(self, repeat: int) -> tuple[Draw, np.ndarray, np.ndarray]:
    """(the `Draw` of `repeat`, its train rows, its validation rows); tuning draws (repeat < 0)
    carry no test split."""
    seed, train_idx, val_idx = self.draw(repeat)
    draw = Draw(seed, self.pool.images[train_idx], self.pool.labels[train_idx],
                (self.pool.images[val_idx], self.pool.labels[val_idx]),
                self.test if repeat >= 0 else None)
    return draw, train_idx, val_idx

  def _base(self, variant, repeat, lr, hp, train_idx, val_idx, cap) -> dict:
    a = self.args
    out = dict(arch=a.arch, target=self.spec, shots=a.shots, variant=variant, repeat=repeat,
               lr=lr, hp=hp, role="tune" if repeat < 0 else "eval", status="ok",
               n_train=int(len(train_idx)), n_val=int(len(val_idx)), n_test=len(self.test),
               cap=cap)
    if variant in KD:
      knobs = transfer.parse_hp(hp)
      out.update(temperature=knobs["T"], lam=knobs["lam"])
    return out

  def _ticker(self, variant: str, repeat: int, lr: float):
    """The long-run progress hook of one run (None when silent)."""
    return progress.ticker(f"{self.spec} r={repeat} {variant} lr={lr:g}", self.grid.emit)

  def _add(self, record: dict, t0: float, cost_key=None) -> dict:
    record["seconds"] = round(time.time() - t0, 2)
    self.done.add(record_key(record))
    self.grid.finished(self._line(record))
    if self._deferred is not None:
      self._deferred.append((record, cost_key))
    else:
      self._write(record)
    return record

  def _write(self, record: dict) -> None:
    self.results.add(record)

  def _line(self, r: dict) -> str:
    """What a finished run was and scored (its progress line)."""
    what = "val" if r["repeat"] < 0 else "test"
    acc = r["val_acc" if r["repeat"] < 0 else "test_acc"]
    return (f"{self.spec} r={r['repeat']} {r['variant']} lr={r['lr']:g} {r['hp']}: {what} "
            + ("failed" if acc is None else f"{acc:.4f}") + f" steps={r.get('steps', '-')}"
            + (f" (teacher agreement {r['agreement']:.3f})" if "agreement" in r else ""))

  def _record(self, key: tuple) -> dict:
    """The record of run `key`, written or waiting in this draw's deferred list."""
    pending = [r for r, _ in self._deferred or []]
    return next(r for r in reversed(list(self.results.records) + pending)
                if record_key(r) == key)

  # -- teacher
  def teacher(self, repeat: int, lr: float, hp: str) -> dict:
    """The teacher trained on a draw at (lr, hp), once; recorded when its run is not yet (on
    evaluation draws only if 'teacher' is a variant)."""
    key = (repeat, lr, hp)
    if key in self._teachers:
      if isinstance(self._teachers[key], NonFiniteError):
        raise self._teachers[key]
      return self._teachers[key]
    a = self.args
    draw, train_idx, val_idx = self._draw(repeat)
    rkey = (self.spec, a.shots, "teacher", repeat, lr, hp)
    record_it = rkey not in self.done and (repeat < 0 or "teacher" in self.plan["variants"])
    base = self._base("teacher", repeat, lr, hp, train_idx, val_idx, a.teacher_steps)
    t0 = time.time()
    try:
      t, res, cost_key = run_teacher(self.runner, self.k, draw, lr, hp,
                                     self._ticker("teacher", repeat, lr), measure=record_it)
    except NonFiniteError as e:
      self._teachers[key] = e
      if record_it:
        self._add(dict(base, status="failed", error=str(e), val_acc=None, test_acc=None), t0)
      raise
    self._teachers[key] = t
    if record_it:
      self._add(dict(base, **res), t0, cost_key)
    return t

  def drop_teachers(self, repeat: Optional[int] = None) -> None:
    """Frees the teachers of one draw (or of every draw)."""
    for key in [k for k in self._teachers if repeat is None or k[0] == repeat]:
      del self._teachers[key]

  # -- one run
  def run(self, key: tuple, teacher_point: Optional[tuple]) -> dict:
    """Trains and records the run `key` (a KEY tuple of this target); returns its record.

    Args:
      key: (target, shots, variant, repeat, lr, hp).
      teacher_point: (lr, hp) of the teacher the run learns from, or pruning starts from.
    """
    _, _, variant, repeat, lr, hp = key
    if variant == "teacher":
      try:
        self.teacher(repeat, lr, hp)
      except NonFiniteError:
        pass
      return self._record(key)
    a = self.args
    draw, train_idx, val_idx = self._draw(repeat)
    base = self._base(variant, repeat, lr, hp, train_idx, val_idx, a.student_steps)
    t0 = time.time()
    teacher = None
    try:
      if variant in NEEDS_TEACHER:
        base.update(teacher_lr=teacher_point[0], teacher_hp=teacher_point[1])
        teacher = self.teacher(repeat, *teacher_point)
      out, cost_key = run_variant(self.runner, variant, self.k, draw, lr, transfer.parse_hp(hp),
                                  teacher, self._ticker(variant, repeat, lr))
    except NonFiniteError as e:
      return self._add(dict(base, status="failed", error=str(e), val_acc=None, test_acc=None),
                       t0)
    return self._add(dict(base, **out), t0, cost_key)

  def run_tuning(self, key: tuple, tuned: dict) -> dict:
    """`choose`'s run_missing: a tuning run, learning from the teacher at its chosen point."""
    t = tuned.get((self.spec, "teacher"))
    return self.run(key, (t["lr"], t["hp"]) if t else None)

  def run_eval(self, repeat: int, tuned: dict) -> None:
    """Every variant on evaluation draw `repeat`, each at its chosen point; the draw's
    records are written together, after its models are timed round-robin (a kill loses at
    most this draw, which a resume reruns)."""
    t = tuned.get((self.spec, "teacher"))
    teacher_point = (t["lr"], t["hp"]) if t else None
    keys = [(self.spec, self.args.shots, variant, repeat, tuned[(self.spec, variant)]["lr"],
             tuned[(self.spec, variant)]["hp"]) for variant in self.plan["variants"]]
    # part of the draw was timed and recorded before a kill (failed runs carry no latency)
    resumed = any(key in self.done and "latency_ms" in self._record(key) for key in keys)
    self._deferred = []
    for key in keys:
      if key not in self.done:
        self.run(key, teacher_point)
    deferred, self._deferred = self._deferred, None
    timed = [key for _, key in deferred if key is not None]
    if timed:
      self.runner.retime(timed)
    for record, key in deferred:
      if key is not None:
        record.update(latency_ms=self.runner.latency(key),
                      latency_timing=TIMED_AFTER_RESUME if resumed else TIMED_TOGETHER)
    self.results.add_many([record for record, _ in deferred])
    self.drop_teachers(repeat)


def tuning_keys(args, spec: str, variant: str, lr: float, hp: str) -> list[tuple]:
  """The runs that score one point: the variant at (lr, hp) on each tuning draw."""
  return [(spec, args.shots, variant, -1 - t, lr, hp) for t in range(args.tune_repeats)]


def choose(records: list[dict], plan: dict, args, run_missing=None,
           targets: Optional[Sequence[str]] = None) -> dict:
  """The point (LR and knobs) each (target, variant) runs at on its evaluation draws.

  Each variant's grid (`variant_grid`) is scored by mean validation accuracy over the tuning
  draws (a failed run scores 0) and extended at an edge (`jtransfer.protocol.tuning.tune`);
  the teacher is chosen first, and the students' tuning runs learn from (or prune) the teacher
  at its chosen point on the same tuning draw. A grid of one point is that point, untrained.
  Only 'val_acc' is read: tuning records hold no test accuracy. From records alone (the
  report) or, with `run_missing(key, chosen so far) -> record`, training what is missing;
  both give the same choice for the same records.

  Returns:
    (target, variant) -> Tuned.to_dict() plus 'lr', 'knobs' (T, lam, ...) and 'hp' (the
    record field); cells whose tuning runs are missing (an unfinished grid) are left out.
  """
  by_key = {record_key(r): r for r in records}
  out: dict = {}
  variants = list(plan["variants"])
  order = (["teacher"] if NEEDS_TEACHER & set(variants) else []) + \
      [v for v in variants if v != "teacher"]
  for spec in (targets or plan["targets"]):
    for variant in order:
      if variant in NEEDS_TEACHER and variant != "teacher" and (spec, "teacher") not in out:
        continue  # the teacher is not chosen yet (unfinished grid): nor are its students
      grid = variant_grid(plan, variant)

      def keys_of(point, spec=spec, variant=variant):
        return tuning_keys(args, spec, variant, point["lr"],
                           transfer.hp_string(point_knobs(point)))

      found = tuning.tune_records(
          grid, keys_of, by_key, None if run_missing is None else lambda k: run_missing(k, out),
          args.tune_extend)
      if found is None:  # the report of an unfinished grid: that cell is not tuned yet
        continue
      t = found.to_dict()
      t["lr"] = t["choice"]["lr"]
      t["knobs"] = point_knobs(t["choice"])
      t["hp"] = transfer.hp_string(t["knobs"])
      out[(spec, variant)] = t
  return out


def planned_runs(plan: dict, args) -> dict[str, int]:
  """Runs the grid plans, by kind, before tuning has chosen anything (`choose`): each point of
  a variant's grid on each tuning draw when the grid has several points; the teacher also on
  each tuning draw at its one point when a student learning from it is tuned; every variant
  once per evaluation draw. Extensions at a grid's edge add runs later."""
  size = lambda v: math.prod(len(values) for values in variant_grid(plan, v).values())
  students = [v for v in plan["variants"] if v != "teacher"]
  tuned_students = [v for v in students if size(v) > 1]
  teacher_points = 0
  if NEEDS_TEACHER & set(plan["variants"]):
    teacher_points = size("teacher") if size("teacher") > 1 else int(
        any(v in NEEDS_TEACHER for v in tuned_students))
  n = len(plan["targets"])
  return progress.plan_counts({
      "teacher tuning runs": n * teacher_points * args.tune_repeats,
      "student tuning runs": n * sum(map(size, tuned_students)) * args.tune_repeats,
      "teacher eval runs": n * args.repeats * ("teacher" in plan["variants"]),
      "student eval runs": n * args.repeats * len(students)})


def run(args, plan, results: ResultsDir) -> None:
  log = (lambda *m: None) if args.quiet else (
      lambda *m: print("[compact_transfer]", *m, file=sys.stderr))
  if any("role" not in r for r in results.records):
    raise InputError(f"{results.path} holds results of an older compact_transfer (fixed steps, "
                     "no tuning draws); they cannot be resumed: pass --overwrite or another --out")
  variants = plan["variants"]
  source = pretrain.source_for(args.arch, args.source, epochs=args.source_epochs, seed=args.seed,
                               progress=not args.quiet)
  student_src = None
  if (NEEDS_COMPACT_SOURCE & set(variants)) or (plan["student_source"] or "").startswith("ckpt:"):
    config = (None if plan["student_source"].startswith("ckpt:")
              else distill.compact_config(student_arch(args), plan["student_config"]))
    student_src = compact.compact_source(
        student_arch(args), plan["student_source"], config,
        epochs=args.student_source_epochs or args.source_epochs, seed=args.seed,
        cache_root=pretrain.CACHE_ROOT, pretrain=pretrain.pretrain, progress=not args.quiet)
    if tuple(student_src.input_shape) != tuple(source.input_shape):
      raise InputError(f"the compact source takes {tuple(student_src.input_shape)} images, the "
                       f"teacher's source {tuple(source.input_shape)}")
  runner = trainer_for(args, plan, source, student_src)
  grid = progress.GridProgress(
      planned_runs(plan, args),
      saved=sum(1 for r in results.records if r["target"] in plan["targets"]
                and r["shots"] == args.shots),
      emit=grid_progress.stderr_or_quiet(args))
  grid.announce("compact_transfer")
  for spec in plan["targets"]:
    data = load_spec(spec, source.input_shape, flag="--target", data_dir=args.data_dir)
    test = data.test
    if args.test_per_class > 0:
      keep = np.concatenate([np.flatnonzero(test.labels == c)[:args.test_per_class]
                             for c in range(test.num_classes)])
      test = test.take(np.sort(keep))
    cell = TargetRuns(runner, args, plan, spec, data.train, test, results, log, grid)
    tuned = choose(results.records, plan, args, run_missing=cell.run_tuning, targets=[spec])
    cell.drop_teachers()
    for repeat in range(args.repeats):
      cell.run_eval(repeat, tuned)


# ----------------------------------------------------------------------------- report
def eval_records(records: list[dict], tuned: dict) -> list[dict]:
  """Evaluation records at each (target, variant)'s chosen point: the protocol's figures."""
  out = []
  for r in records:
    t = tuned.get((r["target"], r["variant"]))
    if t and r.get("role") == "eval" and r["lr"] == t["lr"] and r["hp"] == t["hp"]:
      out.append(r)
  return out


def _groups(records: list[dict]) -> dict:
  """(target, variant) -> its records in draw order."""
  groups: dict = {}
  for r in sorted(records, key=lambda r: r["repeat"]):
    groups.setdefault((r["target"], r["variant"]), []).append(r)
  return groups


def median_latency(records: list[dict]) -> Optional[dict]:
  """{batch: median over the records' latencies (ms)}: each evaluation draw's models are timed
  together, so one draw that a burst of load hit does not set the figure."""
  timed = [r["latency_ms"] for r in records if r.get("latency_ms")]
  if not timed:
    return None
  return {b: float(np.median([t[b] for t in timed if b in t])) for b in timed[0]}


def summarize(records: list[dict]) -> dict:
  """(target, variant) -> accuracy mean/std over evaluation draws (failed runs counted apart),
  agreement, steps, params and FLOPs of the first finished draw, and the median latency over
  the finished draws."""
  out: dict = {}
  for key, rs in _groups(records).items():
    ok = [r for r in rs if r["status"] == "ok"]
    if not ok:
      out[key] = dict(n=0, failed=len(rs))
      continue
    m, s = mean_std(r["test_acc"] for r in ok)
    agree = [r["agreement"] for r in ok if "agreement" in r]
    out[key] = dict(acc_mean=m, acc_std=s, n=len(ok), failed=len(rs) - len(ok),
                    params=ok[0]["params"], flops=ok[0]["flops"],
                    latency_ms=median_latency(ok),
                    agreement=float(np.mean(agree)) if agree else None,
                    steps=float(np.mean([r["steps"] for r in ok])),
                    capped=sum(r["stopped"] == "cap" for r in ok))
  return out


def _grid_text(values) -> str:
  return ", ".join(f"{v:g}" for v in values)


def protocol_text(args, plan) -> str:
  """How runs were budgeted and how their hyper-parameters were chosen."""
  if args.patience:
    runs = (f"every run (teacher and students) trains until its validation accuracy has not "
            f"improved for {args.patience} steps (checked every {args.eval_every}), at most "
            f"{args.teacher_steps} steps (teacher) or {args.student_steps} (students), and keeps "
            "its best validation state")
  else:
    runs = (f"every run trains exactly {args.teacher_steps} steps (teacher) or "
            f"{args.student_steps} (students) and keeps its last state")
  g = plan["grids"]
  teacher_knobs = "".join(f", {k} {{{_grid_text(v)}}}" for k, v in g["teacher"].items()
                          if k != "lr")
  grids = (f"teacher LR {{{_grid_text(g['teacher']['lr'])}}}{teacher_knobs}; students' LR "
           f"{{{_grid_text(g['student_lr'])}}} from random init, "
           f"{{{_grid_text(g['ft_lr'])}}} from pretrained weights; T {{{_grid_text(g['T'])}}}, "
           f"λ {{{_grid_text(g['lam'])}}} jointly with the LR for the distilled students")
  if args.tune_repeats:
    tune = (f"hyper-parameters are chosen per target by mean validation accuracy over "
            f"{args.tune_repeats} tuning draw(s) that are not evaluation draws and are never "
            f"evaluated on test ({grids}; a choice on a grid edge extends that axis by up to "
            f"{args.tune_extend} values, λ on its odds scale λ/(1-λ)); the students on a "
            "tuning draw learn from the teacher trained on it at the teacher's chosen point")
  else:
    tune = f"hyper-parameters are fixed, not tuned ({grids})"
  return (f"Protocol: {runs}; {tune}. Validation: {args.val_per_class}/class, disjoint from "
          "the k-shot set and from test; test: "
          f"{'all' if not args.test_per_class else f'<= {args.test_per_class}/class'} of the "
          "target's test split, which reaches no selection.")


def _chosen(t: Optional[dict]) -> str:
  if not t:
    return "-"
  knobs = "".join(f", {'λ' if k == 'lam' else k} {v:g}" for k, v in sorted(t["knobs"].items()))
  return f"lr {t['lr']:g}{knobs}"


def make_report(records: list[dict], args, plan) -> tuple[str, dict]:
  """report.md text and summary.json content, from the records (results.json) alone."""
  tuned = choose(records, plan, args)
  ev = eval_records(records, tuned)
  summary = summarize(ev)
  shown = [r for r in ev if r["status"] == "ok"]  # whose latencies the table's medians take
  batches = [str(b) for b in plan["batches"]]
  widths = next((_widths(r["config"]) for r in ev
                 if r["variant"] not in PRUNED | {"teacher"} and "config" in r), "-")
  teacher_widths = next((_widths(r["config"]) for r in ev
                         if r["variant"] == "teacher" and "config" in r), "-")
  lines = ["# Compact transfer by joint learning", "",
           f"{args.arch}: teacher = source `{args.source}` fine-tuned with `{args.strategy}` "
           f"({teacher_widths}); compact student {_student_arch_text(args)}{widths}. Adam, batch {args.batch_size}, "
           "students' BN (if any) in train mode. Joint loss (1 - λ) CE(y, p_s) + "
           f"λ T² KL(p_t^T ‖ p_s^T), augmentation `{args.augment}`. {args.shots} training "
           f"images per class, {args.repeats} evaluation draws per target (a fresh draw each, "
           "the same for every variant).", "",
           protocol_text(args, plan), "",
           "Accuracy: mean (std) over evaluation draws, %, at the variant's chosen "
           "hyper-parameters. Agreement: fraction of test images on which the model predicts "
           "the teacher's class. FLOPs: XLA cost analysis of the jitted eval forward, per "
           f"image. Latency: median of {args.latency_runs} calls of the jitted forward after "
           "warm-up" + timing_text(shown, ", the draw's models timed together round-robin") +
           ", median over the evaluation draws (pruned widths keep "
           f"{args.prune_keep:g} of each unit's channels, residual={args.prune_residual}). "
           "Steps: mean steps trained, and how many runs stopped at the cap rather than by "
           "patience.", ""]
  lines += [f"- {v}: {DESCRIPTIONS[v]}" for v in plan["variants"]] + [""]
  for note in plan.get("notes", []):
    lines += [f"Note: {note}", ""]
  edges = []
  for target in plan["targets"]:
    teacher = summary.get((target, "teacher"))
    head = ["variant", "accuracy", "Δ teacher", "agreement", "params", "MFLOPs"] + \
        [f"ms b={b}" for b in batches] + ["chosen on validation", "val (tuning)", "steps"]
    lines += [f"## {target}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in plan["variants"]:
      r, t = summary.get((target, v)), tuned.get((target, v))
      if t and t["edges"]:
        edges.append(f"{target}/{v}: " + ", ".join(e.replace("lam_odds", "λ")
                                                  for e in t["edges"]))
      if r is None:
        continue
      val = f"{100 * t['score']:.1f}" if t and t["score"] is not None else "-"
      if not r["n"]:
        lines.append(f"| {v} | failed ({r['failed']}) | | | | | " + " | " * len(batches)
                     + f"{_chosen(t)} | {val} | |")
        continue
      ok_teacher = teacher and teacher.get("n")
      gap = (f"{100 * (r['acc_mean'] - teacher['acc_mean']):+.1f}" if ok_teacher and
             v != "teacher" else "-")
      agree = f"{r['agreement']:.3f}" if r["agreement"] is not None else "-"
      failed = f" ({r['failed']} failed)" if r["failed"] else ""
      lines.append(f"| {v} | {100 * r['acc_mean']:.1f} ({100 * r['acc_std']:.1f}){failed} | "
                   f"{gap} | {agree} | {r['params']:,} | {r['flops'] / 1e6:.2f} | " +
                   " | ".join(f"{(r['latency_ms'] or {}).get(b, float('nan')):.2f}"
                              for b in batches)
                   + f" | {_chosen(t)} | {val} | {r['steps']:.0f} ({r['capped']}/{r['n']} "
                   "capped) |")
    lines += [""] + _comparison(summary, target) + [""]
  if edges:
    lines += ["Chosen value still on a grid edge after extension (the optimum may lie beyond): "
              + "; ".join(edges) + ".", ""]
  results = [claims.evaluate(c, ev, CELL_FIELDS, arm_field="variant",
                             draw_fields=("target", "shots", "repeat"))
             for c in paper_claims(args.approach_margin)
             if {c.a, c.b} <= set(plan["variants"])]
  results = [r for r in results if r["cells"]]
  if results:
    lines += claims.section(results, {})
  failed = [r for r in records if r.get("status") != "ok"]
  if failed:
    lines += [f"{len(failed)} run(s) failed (non-finite loss); see results.json.", ""]
  text = "\n".join(lines)
  out = dict(variants={"|".join(k): v for k, v in summary.items()},
             tuning={"|".join(k): v for k, v in tuned.items()}, claims=results)
  return text, out


def _student_arch_text(args) -> str:
  return f"{args.student_arch} " if args.student_arch else ""


def _widths(config: dict) -> str:
  keys = ("conv_widths", "stage_widths", "stem_width", "inner_widths", "dense_widths", "blocks",
          "top_width")
  return ", ".join(f"{k} {json.dumps(config[k])}" for k in keys if config.get(k) is not None)


def _comparison(summary: dict, target: str) -> list[str]:
  """Sentences: distilled vs the same student without the teacher, and vs the teacher."""
  out = []
  ok = lambda v: (summary.get((target, v)) or {}).get("n")
  t = summary.get((target, "teacher")) if ok("teacher") else None
  for with_t, without in (("distill", "scratch"), ("distill_ft", "finetune"),
                          ("pruned_distill", "pruned")):
    if not (ok(with_t) and ok(without)):
      continue
    a, b = summary[(target, with_t)], summary[(target, without)]
    line = (f"- {with_t} vs {without}: {100 * (a['acc_mean'] - b['acc_mean']):+.1f} points")
    if t:
      gap = t["acc_mean"] - b["acc_mean"]
      line += (f"; {with_t} is {100 * (a['acc_mean'] - t['acc_mean']):+.1f} points from the "
               f"teacher at {a['flops'] / t['flops']:.2f}x its FLOPs")
      if gap > 1e-9:  # a share of the gap means something only when there is one
        line += (f" and closes {100 * (a['acc_mean'] - b['acc_mean']) / gap:.0f}% of the "
                 f"{without}-teacher gap")
      else:
        line += f"; {without} already matches the teacher"
    out.append(line)
  return out


def plot(summary: dict, plan: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  summary = summary.get("variants", summary)
  targets = plan["targets"]
  fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.8), squeeze=False)
  for ax, target in zip(axes[0], targets):
    rows = [(v, summary.get(f"{target}|{v}")) for v in plan["variants"]]
    rows = [(v, r) for v, r in rows if r is not None and r.get("n")]
    top = max((r["flops"] for _, r in rows), default=1.0) / 1e6
    same = [[w for w, q in rows if q["flops"] == r["flops"]] for _, r in rows]
    for (v, r), group in zip(rows, same):
      # Students share one width config, hence one FLOP count: spread those a little.
      x = r["flops"] / 1e6 + 0.012 * top * (group.index(v) - (len(group) - 1) / 2)
      ax.errorbar([x], [100 * r["acc_mean"]], yerr=[100 * r["acc_std"]],
                  marker="o", capsize=3, label=v, linestyle="none")
    ax.set_xlim(left=0)
    ax.set_xlabel("MFLOPs per image (XLA; points spread sideways for legibility)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(target, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------- main
def sort_records(records: list[dict]) -> list[dict]:
  order = {v: i for i, v in enumerate(VARIANTS)}
  return sorted(records, key=lambda r: (r["target"], order[r["variant"]], r["repeat"], r["lr"],
                                        r["hp"]))


def main(argv: Sequence[str] | None = None) -> int:
  # results.json holds no timings (those stay in results.jsonl); the report reads it alone.
  return cli.main(
      argv, PUBLISHER, run,
      lambda results, _: [{k: v for k, v in r.items() if k != "seconds"}
                          for r in sort_records(results.records)],
      lambda summary, plan, args, results, _: plot(
          summary, plan, os.path.join(results.path, "accuracy_vs_flops.png")))


PUBLISHER = publish.Publisher(
    "experiments.compact_transfer", parse_args, validate,
    lambda records, plan, args, _: make_report(records, args, plan), key=record_key)


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
