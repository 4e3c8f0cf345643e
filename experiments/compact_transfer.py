"""Compact transfer by joint learning (compact-cnn-transfer): teacher vs students.

  python -m experiments.compact_transfer --arch resnet_s --out results/compact_transfer

For each target (default both embedded ones) and draw (`--shots` training images per class
from the target's train split plus a disjoint validation set of `--val-per-class` per class),
the variants of `jtransfer.methods.compact` (`--strategies`, default all):

  * teacher: the large target CNN fine-tuned from the source with `--strategy` (stage 1);
  * scratch / finetune: the compact CNN (`--student-config` widths, default half width) from
    random init / from a compact source of its own size (pretrained on the source data and
    cached, or `--student-source ckpt:DIR`), on the labels alone;
  * distill / distill_ft: the same two trained with the joint loss (1 - lambda) CE(y, p_s) +
    lambda T^2 KL(p_t^T || p_s^T) against the teacher (`jtransfer.methods.distill`, stage 2);
  * pruned / pruned_distill: the teacher channel-pruned (`--prune-keep` of each conv unit by
    |CWL sigma|, |BN scale| or filter L1 norm), fine-tuned on labels alone or with the loss.

Protocol (docs/protocol.md): converged runs (validation patience, capped at `--teacher-steps`
or `--student-steps`); the teacher's LR (and its strategy's knobs), each student's LR
(`--student-lr` from random init, `--ft-lr` from pretrained weights) and the distilled
students' T and lambda jointly are chosen on `--tune-repeats` tuning draws by mean validation
accuracy (a grid edge extends, lambda on its odds scale so it stays in (0, 1)); a student
learns from the teacher trained on its own draw at the teacher's chosen point. The claims are
paired per draw: distill > scratch, distill_ft > finetune, and distill (distill_ft) >= teacher
- `--approach-margin`. Reported: accuracy, agreement with the teacher, params, FLOPs (XLA),
latency (median of `--latency-runs` calls, median over draws), the chosen point, steps.
The paper states its method without numbers to compare against. A reduced run (the published
folders' settings):

  python -m experiments.compact_transfer --arch vgg_s --shots 20 --repeats 5 \\
      --tune-repeats 1 --teacher-lr 3e-4,1e-3 --student-lr 2e-3,6e-3 --ft-lr 3e-4,1e-3 \\
      --temperature 2,4 --lam 0.5,0.8 --teacher-steps 200 --student-steps 300 --patience 50 \\
      --batch-size 50 --test-per-class 200 --student-source-epochs 1 --latency-runs 10 \\
      --out results/compact_transfer_reduced
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import numpy as np

from experiments.compact_report import ALONE, WITH_TEACHER, make_report, plot, teacher_lrs
from jtransfer import models, sources, study
from jtransfer.data import load_spec, parse_spec
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.methods import compact, compact_runs, transfer
from jtransfer.methods.compact import KD, NEEDS_TEACHER, VARIANTS
from jtransfer.protocol import tuning
from jtransfer.study import records as rec
from jtransfer.study import runner
from jtransfer.study.config import at_least, flag, json_object, number
from jtransfer.study.tables import float_list, positive_ints

DEFAULT_MARGIN = 0.02
LR_TEXT = "learning rates must be finite numbers > 0"


def _grid(flag_name: str, ok, what: str):
  """A parser: a comma list of distinct numbers, each passing `ok`, sorted."""
  def parse(text) -> tuple[float, ...]:
    values = float_list(text, flag_name, ok, what)
    if len(set(values)) != len(values):
      raise InputError(f"{flag_name} {text!r}: values must be distinct")
    return tuple(sorted(values))
  return parse


def _teacher_lrs(text) -> str | tuple:
  return "paper" if text == "paper" else _grid("--teacher-lr", lambda v: v > 0, LR_TEXT)(text)


@dataclasses.dataclass(frozen=True)
class Knobs:
  """compact_transfer's own flags (`Config.extra`)."""
  strategy: str = flag("--strategy", "finetune", "teacher's transfer strategy")
  student_arch: Optional[str] = flag(
      "--student-arch", None, "the compact student's architecture (default --arch), e.g. "
      "mobilenet_v2 under a resnet_s teacher", choices=models.names())
  student_source: Optional[str] = flag(
      "--student-source", None, "the compact source: ckpt:PATH, or a dataset spec to pretrain "
      "it on (default: --source's data when that is a spec)")
  student_config: Optional[dict] = flag(
      "--student-config", None, 'compact widths as JSON, e.g. \'{"stage_widths": [16, 32, 64], '
      '"stem_width": 16}\' (default: half width; taken from the checkpoint with '
      "--student-source ckpt:)", parse=lambda t: json_object("--student-config")(t) if t else None)
  student_source_epochs: Optional[float] = flag(
      "--student-source-epochs", None, "pretraining epochs of the compact source (default "
      "--source-epochs)", parse=number("--student-source-epochs"))
  teacher_lr: str | tuple = flag("--teacher-lr", "paper", "teacher's Adam LR grid: 'paper' (the "
                            "strategy's grid of the CWL paper) or a comma list",
                            parse=_teacher_lrs)
  student_lr: tuple = flag(
      "--student-lr", (1e-3, 3e-3, 1e-2), "Adam LR grid of the students from random init "
      "(scratch, distill)", cli="1e-3,3e-3,1e-2", parse=_grid("--student-lr", lambda v: v > 0,
                                                              LR_TEXT))
  ft_lr: tuple = flag(
      "--ft-lr", (3e-4, 1e-3, 3e-3), "Adam LR grid of the students from pretrained weights "
      "(finetune, distill_ft, pruned, pruned_distill)", cli="3e-4,1e-3,3e-3",
      parse=_grid("--ft-lr", lambda v: v > 0, LR_TEXT))
  temperature: tuple = flag(
      "--temperature", (2.0, 4.0, 8.0), "T grid of the joint loss", cli="2,4,8",
      parse=_grid("--temperature", lambda v: v > 0,
                  "the distillation temperature must be a finite number > 0"))
  lam: tuple = flag(
      "--lam", (0.5, 0.75, 0.9), "lambda grid (weight of the teacher term); a grid's values "
      "must lie in (0, 1), a single value in [0, 1]", cli="0.5,0.75,0.9",
      parse=_grid("--lam", lambda v: 0 <= v <= 1, "distillation lambda must be in [0, 1]"))
  teacher_steps: int = flag("--teacher-steps", 500, "step cap of a teacher run",
                            check=at_least(1, "--teacher-steps"))
  student_steps: int = flag("--student-steps", 1000, "step cap of a student run",
                            check=at_least(1, "--student-steps"))
  approach_margin: float = flag(
      "--approach-margin", DEFAULT_MARGIN, "'approaches the teacher' is tested as student >= "
      "teacher - this margin (accuracy units: 0.02 = 2 points)")
  prune_keep: float = flag("--prune-keep", 0.5, "fraction of each conv unit's channels the "
                           "pruned variants keep")
  prune_residual: str = flag("--prune-residual", "group", "ResNet stage channels: pruned as "
                             "one group, or left whole", choices=("group", "keep"))
  latency_batches: tuple = flag("--latency-batches", (1, 128), "batch sizes timed",
                                cli="1,128",
                                parse=lambda t: tuple(positive_ints(t, "--latency-batches")))
  latency_runs: int = flag("--latency-runs", 20, "timed calls per model and batch size",
                           check=at_least(1, "--latency-runs"))


def variant_grid(config, variant: str) -> dict:
  """A variant's tuning grid (knob -> sorted values) from the flags."""
  k = config.extra
  if variant == "teacher":
    return {"lr": teacher_lrs(k), **transfer.get_strategy(k.strategy).knobs}
  out = {"lr": k.student_lr if variant in compact.FROM_SCRATCH else k.ft_lr}
  if variant in KD:
    out.update(T=k.temperature, lam=k.lam)
  return out


def student_source(config) -> Optional[str]:
  """--student-source, else --source when that is a dataset spec."""
  spec = config.extra.student_source
  if spec is None and not config.source.spec.startswith("ckpt:"):
    return config.source.spec
  return spec


def check(config) -> None:
  """compact_transfer's own flag rules (one InputError sentence each)."""
  k, p, arms = config.extra, config.protocol, set(config.cells.arms)
  for name, values in (("--arch", config.cells.archs), ("--shots", config.cells.shots)):
    if len(values) != 1:
      raise InputError(f"{name} takes one value in compact_transfer, got {len(values)}")
  strategy = transfer.get_strategy(k.strategy)
  if not (math.isfinite(k.approach_margin) and 0 <= k.approach_margin < 1):
    raise InputError(f"--approach-margin must be in [0, 1), got {k.approach_margin}")
  if not 0 < k.prune_keep <= 1:
    raise InputError(f"--prune-keep must be in (0, 1], got {k.prune_keep}")
  if len(k.lam) > 1 and not 0 < k.lam[0] <= k.lam[-1] < 1:
    raise InputError(f"--lam {','.join(f'{v:g}' for v in k.lam)}: a grid of distillation "
                     "lambda must lie in (0, 1) (it is tuned on the odds scale lambda / "
                     "(1 - lambda)); one value may be 0 or 1")
  if not p.tune_draws:
    multi = [f for f, g in (("--teacher-lr", teacher_lrs(k)), ("--student-lr", k.student_lr),
                            ("--ft-lr", k.ft_lr), ("--temperature", k.temperature),
                            ("--lam", k.lam)) if len(g) > 1]
    multi += [f"the {k.strategy} knob {n}" for n, g in strategy.knobs.items() if len(g) > 1]
    if multi:
      raise InputError(f"--tune-repeats 0 leaves no draws to choose {', '.join(multi)} on: "
                       "give one value each or --tune-repeats >= 1")
  spec = student_source(config)
  if compact.NEEDS_COMPACT_SOURCE & arms and spec is None:
    raise InputError("--student-source is needed (ckpt:PATH or a dataset spec) when --source "
                     "is a checkpoint and the finetune/distill_ft variants run")
  if spec and not spec.startswith("ckpt:"):
    parse_spec(spec, flag="--student-source")
  if k.student_config is not None and spec and spec.startswith("ckpt:"):
    raise InputError("--student-config conflicts with --student-source ckpt: (the "
                     "checkpoint's config is the student's)")


# ----------------------------------------------------------------------------- runs
@dataclasses.dataclass
class CellData:
  """What a cell's runs share: the trainer, the target's train pool and capped test split,
  and the teachers trained so far, (draw, point) -> (Teacher, outcome, cost key)."""
  trainer: compact_runs.CompactTrainer
  pool: Any  # an ImageSet
  test: Any
  num_classes: int
  teachers: dict = dataclasses.field(default_factory=dict)


def _trainer(config, cache: dict) -> compact_runs.CompactTrainer:
  """The invocation's trainer (sources loaded, or pretrained once and cached)."""
  if "trainer" in cache:
    return cache["trainer"]
  k, arch, quiet = config.extra, config.cells.archs[0], config.output.quiet
  source = sources.source_for(arch, config.source.spec, epochs=config.source.epochs,
                               seed=config.protocol.seed, progress=not quiet)
  s_arch, spec, student_src = k.student_arch or arch, student_source(config), None
  if compact.NEEDS_COMPACT_SOURCE & set(config.cells.arms) or (spec or "").startswith("ckpt:"):
    widths = None if spec.startswith("ckpt:") else compact.student_config(s_arch,
                                                                         k.student_config)
    student_src = compact.compact_source(
        s_arch, spec, widths, epochs=k.student_source_epochs or config.source.epochs,
        seed=config.protocol.seed, cache_root=sources.cache_root(), pretrain=sources.pretrain,
        progress=not quiet)
    if tuple(student_src.input_shape) != tuple(source.input_shape):
      raise InputError(f"the compact source takes {tuple(student_src.input_shape)} images, the "
                       f"teacher's source {tuple(source.input_shape)}")
  p = config.protocol
  settings = compact_runs.RunSettings(
      arch=arch, student_arch=s_arch, strategy=k.strategy, teacher_steps=k.teacher_steps,
      student_steps=k.student_steps, eval_every=p.eval_every, patience=p.patience,
      batch_size=p.batch_size, augment=p.augment, prune_keep=k.prune_keep,
      prune_residual=k.prune_residual, latency_batches=k.latency_batches,
      latency_runs=k.latency_runs)
  cache["trainer"] = compact_runs.CompactTrainer(settings, source, student_src, k.student_config)
  return cache["trainer"]


def prepare(plan, cell: dict, cache: dict) -> CellData:
  """`Study.prepare`: the trainer, the target (test capped per class) and a teacher cache."""
  config = plan.config
  trainer = _trainer(config, cache)
  data = load_spec(cell["target"], trainer.shape, flag="--target",
                   data_dir=config.protocol.data_dir)
  test, cap = data.test, config.protocol.test_per_class
  if cap > 0:
    test = test.take(np.sort(np.concatenate([np.flatnonzero(test.labels == c)[:cap]
                                             for c in range(test.num_classes)])))
  return CellData(trainer, data.train, test, data.train.num_classes)


def _draw(ctx) -> compact_runs.Draw:
  pool = ctx.data.pool
  return compact_runs.Draw(ctx.seed, pool.images[ctx.train_idx], pool.labels[ctx.train_idx],
                           (pool.images[ctx.val_idx], pool.labels[ctx.val_idx]),
                           ctx.data.test if ctx.draw.role == "eval" else None)


def _teacher(ctx, point: dict, measure: bool):
  """(Teacher, outcome, cost key) on ctx's draw at `point`, trained once per cell."""
  key = (ctx.draw.repeat, tuple(sorted(rec.canon_point(point).items())))
  found = ctx.data.teachers.get(key)
  if found is None:
    hp = transfer.hp_string({n: v for n, v in point.items() if n != "lr"})
    try:
      found = compact_runs.run_teacher(ctx.data.trainer, ctx.data.num_classes, _draw(ctx),
                                       point["lr"], hp, ctx.on_step, measure=measure)
    except NonFiniteError as e:
      found = e
    ctx.data.teachers[key] = found
  if isinstance(found, NonFiniteError):
    raise found
  return found


def _timed(ctx, out: dict, key) -> dict:
  """The outcome with its model's latency, timed round-robin with the draw's teacher (when
  measured) so load on a shared machine hits both alike; tuning draws are not timed."""
  if key is None:
    return out
  trainer, teacher = ctx.data.trainer, ("teacher", ctx.data.num_classes)
  keys = [key] + ([teacher] if key != teacher and trainer.measured(teacher) else [])
  trainer.retime(keys)
  return dict(out, latency_ms=trainer.latency(key),
              latency_timing=WITH_TEACHER if len(keys) > 1 else ALONE)


def run_teacher(ctx, point: dict) -> dict:
  """The teacher arm's run."""
  _, out, key = _teacher(ctx, point, measure=True)
  return _timed(ctx, dict(out), key)


def run_student(variant: str):
  """The run function of a compact variant: learns from (or prunes) the teacher trained on
  its draw at the teacher's chosen point when it needs one."""
  def run(ctx, point: dict) -> dict:
    teacher, base = None, {}
    if variant in NEEDS_TEACHER:
      # The teacher's point as its own runs got it (their keys' 6 digits, records.canon).
      tp = rec.canon_point(ctx.chosen.get("teacher") or {
          n: v[0] for n, v in variant_grid(ctx.config, "teacher").items()})
      base = dict(teacher_lr=tp["lr"],
                  teacher_hp=transfer.hp_string({n: v for n, v in tp.items() if n != "lr"}))
      # Keep only the teacher at the chosen point: the others taught nobody.
      chosen_key = tuple(sorted(tp.items()))
      for key in [key for key in ctx.data.teachers if key[1] != chosen_key]:
        del ctx.data.teachers[key]
      teacher = _teacher(ctx, tp, measure=False)[0]
    knobs = {n: v for n, v in point.items() if n != "lr"}
    out, key = compact_runs.run_variant(ctx.data.trainer, variant, ctx.data.num_classes,
                                        _draw(ctx), point["lr"], knobs, teacher, ctx.on_step)
    return _timed(ctx, dict(out, **base), key)
  return run


def _arm(v: str) -> study.Arm:
  teacher = v == "teacher"
  return study.Arm(
      v, grid=lambda config, v=v: variant_grid(config, v),
      run=run_teacher if teacher else run_student(v),
      after=("teacher",) if v in NEEDS_TEACHER and not teacher else (),
      scales={"lam": tuning.odds_scale()} if v in KD else {},
      budget=runner.own_cap((lambda c: c.extra.teacher_steps) if teacher
                            else (lambda c: c.extra.student_steps)))


STUDY = study.Study(
    module="experiments.compact_transfer", title="# Compact transfer by joint learning",
    arms=tuple(_arm(v) for v in VARIANTS), any_strategy=False, extra=Knobs, check=check,
    prepare=prepare, report=make_report, plots=plot,
    defaults={"arch": "resnet_s", "shots": "30", "strategies": ",".join(VARIANTS),
              "repeats": 5, "tune_repeats": 2, "paper_grid": False,
              "out": "results/compact_transfer"},
    # Each variant runs at its chosen point only (no paper grid); caps are the arms' own.
    # --bn: its runs pin their own BN modes (`compact_runs`), not the runner's.
    hidden=frozenset({"lrs", "steps", "cv_folds", "stored_size", "stream_threads",
                      "stream_workers", "batch_runs", "no_feature_cache", "paper_grid",
                      "bn"}),
    doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
