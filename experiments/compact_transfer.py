"""Compact transfer by joint learning (compact-cnn-transfer; DESIGN.md 4.4): teacher vs students.

  python -m experiments.compact_transfer --arch resnet_s --out results/compact_transfer

For each target (default both embedded ones, fmnist:1,5,7,8,9 and digits) and repeat (a fresh
stratified draw of `--shots` training images per class from the target's train split):

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

Every student run sees the same batches in the same order (paired comparison), uses Adam
(`--student-lr` from random init, `--ft-lr` from pretrained weights) and BN with batch
statistics. Reported: test accuracy mean (std) over repeats, agreement with the teacher's test
predictions, params, FLOPs per image (XLA's cost analysis of the jitted eval forward at batch 1)
and latency (median of `--latency-runs` timed calls after warm-up, at batch 1 and 128). Writes
results.jsonl (one record per finished run; `--resume` continues), results.json, report.md and
accuracy_vs_flops.png.

The paper (VGG/ImageNet teachers, CIFAR-10 and MIT Indoor) only states its method in the text we
have: no numbers to compare against. A reduced run,

  python -m experiments.compact_transfer --arch vgg_s --shots 20 --repeats 2 \
      --teacher-steps 50 --student-steps 80 --batch-size 50 --test-per-class 200 \
      --student-source-epochs 1 --latency-runs 10 --out results/compact_transfer_reduced

took 13 min (4.8 CPU-min) on a shared 2-core machine with the vgg_s source cached, the compact
source pretrained on the way; the defaults are about four times that work.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from experiments import cli, pretrain
from experiments.report import ResultsDir, mean_std, positive_ints
from jtransfer import models, surgery
from jtransfer.data import Batches, load_spec, parse_spec, sample_kshot
from jtransfer.errors import InputError
from jtransfer.methods import distill, transfer
from jtransfer.train import (accuracy, adam, fit, init_state, make_optimizer, make_train_step,
                             predict_logits)
from jtransfer.train.evaluate import median_latency_ms

try:  # CWL channel pruning (another method module); the pruned variants need it.
  from jtransfer.methods import prune as prune_lib
except ImportError:  # pragma: no cover - depends on the checkout
  prune_lib = None

KEY = ("target", "variant", "repeat")
DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")
VARIANTS = ("teacher", "scratch", "finetune", "distill", "distill_ft", "pruned",
            "pruned_distill")
DESCRIPTIONS = {
    "teacher": "large CNN fine-tuned from the source (stage 1)",
    "scratch": "compact CNN, random init, labels only",
    "finetune": "compact CNN fine-tuned from a compact source, labels only",
    "distill": "compact CNN, random init, joint loss with the teacher (stage 2)",
    "distill_ft": "compact CNN from the compact source, joint loss with the teacher",
    "pruned": "teacher channel-pruned, fine-tuned on labels only",
    "pruned_distill": "teacher channel-pruned, fine-tuned with the joint loss",
}
NEEDS_TEACHER = {"teacher", "distill", "distill_ft", "pruned", "pruned_distill"}
NEEDS_COMPACT_SOURCE = {"finetune", "distill_ft"}
PRUNED = {"pruned", "pruned_distill"}


# ----------------------------------------------------------------------------- flags
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="resnet_s", choices=models.names())
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE,
                 help="dataset spec to pretrain the teacher's source on (cached), or ckpt:PATH")
  p.add_argument("--source-epochs", type=float, default=2.0)
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
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--test-per-class", type=int, default=300, help="0 = all")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--strategy", default="finetune", help="teacher's transfer strategy")
  p.add_argument("--teacher-lr", type=float, default=1e-3)
  p.add_argument("--teacher-steps", type=int, default=100)
  p.add_argument("--student-steps", type=int, default=200)
  p.add_argument("--student-lr", type=float, default=2e-3, help="Adam lr from random init")
  p.add_argument("--ft-lr", type=float, default=1e-3, help="Adam lr from pretrained weights")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--temperature", type=float, default=4.0, help="T of the joint loss")
  p.add_argument("--lam", type=float, default=0.7, help="lambda: weight of the teacher term")
  p.add_argument("--augment", default="none", choices=distill.AUGMENTS,
                 help="random crop (and flip) inside the loss, the same for teacher and "
                      "student; 'none' caches the teacher's logits once")
  p.add_argument("--pad", type=int, default=2, help="crop padding in pixels")
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


def validate(args: argparse.Namespace) -> dict:
  """Checks every flag before loading anything; returns the plan."""
  variants = [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in VARIANTS]
  if unknown or not variants:
    raise InputError(f"--variants {args.variants!r}: expected some of {', '.join(VARIANTS)}")
  notes = []
  if prune_lib is None and PRUNED & set(variants):
    notes.append("jtransfer.methods.prune is missing: pruned variants skipped")
    variants = [v for v in variants if v not in PRUNED]
  targets = [t for flag in (args.target or DEFAULT_TARGETS) for t in flag.split(";") if t]
  for t in targets:
    parse_spec(t, flag="--target")
  if not args.source.startswith("ckpt:"):
    parse_spec(args.source, flag="--source")
  transfer.get_strategy(args.strategy)
  for flag, v in (("--shots", args.shots), ("--repeats", args.repeats),
                  ("--teacher-steps", args.teacher_steps), ("--batch-size", args.batch_size),
                  ("--student-steps", args.student_steps),
                  ("--latency-runs", args.latency_runs)):
    if v < 1:
      raise InputError(f"{flag} must be >= 1, got {v}")
  for flag, v in (("--teacher-lr", args.teacher_lr), ("--student-lr", args.student_lr),
                  ("--ft-lr", args.ft_lr)):
    if not (np.isfinite(v) and v > 0):
      raise InputError(f"{flag} must be a finite number > 0, got {v}")
  distill.check_hparams(args.temperature, args.lam)
  if not 0 < args.prune_keep <= 1:
    raise InputError(f"--prune-keep must be in (0, 1], got {args.prune_keep}")
  if args.pad < 0:
    raise InputError(f"--pad must be >= 0, got {args.pad}")
  student_source = args.student_source
  if student_source is None:
    student_source = args.source if not args.source.startswith("ckpt:") else None
  if NEEDS_COMPACT_SOURCE & set(variants) and student_source is None:
    raise InputError("--student-source is needed (ckpt:PATH or a dataset spec) when --source "
                     "is a checkpoint and the finetune/distill_ft variants run")
  if student_source and not student_source.startswith("ckpt:"):
    parse_spec(student_source, flag="--student-source")
  config = None
  if args.student_config:
    if student_source and student_source.startswith("ckpt:"):
      raise InputError("--student-config conflicts with --student-source ckpt: (the "
                       "checkpoint's config is the student's)")
    try:
      config = json.loads(args.student_config)
    except ValueError as e:
      raise InputError(f"--student-config is not valid JSON: {e}") from None
    if not isinstance(config, dict):
      raise InputError("--student-config must be a JSON object of model config fields")
  return dict(variants=variants, targets=targets, student_source=student_source,
              student_config=config,
              batches=positive_ints(args.latency_batches, "--latency-batches"),
              notes=notes)


# ----------------------------------------------------------------------------- sources
def compact_cache_dir(arch: str, spec: str, config: dict, epochs: float, seed: int) -> str:
  blob = json.dumps(dict(arch=arch, spec=spec, config=config, epochs=epochs, seed=seed),
                    sort_keys=True)
  key = hashlib.sha1(blob.encode()).hexdigest()[:10]
  return os.path.join(pretrain.CACHE_ROOT, "sources", f"{arch}-compact-{key}")


def compact_source(arch: str, spec: str, config: dict, *, epochs: float, seed: int,
                   progress: bool) -> transfer.Source:
  """The compact arch pretrained on `spec` (cached), or loaded from `ckpt:PATH`."""
  if spec.startswith("ckpt:"):
    source = transfer.load_source(spec[len("ckpt:"):])
    if source.arch != arch:
      raise InputError(f"--student-source {spec} holds a {source.arch} model, not --arch {arch}")
    return source
  path = compact_cache_dir(arch, spec, config, epochs, seed)
  if os.path.isdir(path):
    return transfer.load_source(path)
  print(f"[compact_transfer] no cached compact {arch} source {config}: training it once "
        f"({epochs} epochs), cache {path}", file=sys.stderr)
  source = pretrain.pretrain(arch, spec, epochs=epochs, seed=seed, progress=progress,
                             model_config=config)
  transfer.save_source(path, source)
  return source


def _student_config(source: Optional[transfer.Source], arch: str, config) -> dict:
  if source is not None:
    return {k: v for k, v in source.config.items() if k != "num_classes"}
  return distill.compact_config(arch, config)


# ----------------------------------------------------------------------------- measurement
def cost(forward: Callable, params, stats, shape, batches: Sequence[int], runs: int) -> dict:
  """FLOPs per image (XLA cost analysis) and median latency (ms) per batch size.

  Each batch size is compiled once with `lower(...).compile()`; that compiled call is both
  analysed and timed (two warm-up calls, then `runs` timed ones).
  """
  params, stats = jax.device_put(params), jax.device_put(stats)
  out: dict[str, Any] = {"latency_ms": {}}
  for b in batches:
    x = np.zeros((b, *shape), np.uint8)
    compiled = jax.jit(forward).lower(params, stats, x).compile()
    if "flops" not in out:
      analysis = compiled.cost_analysis()
      analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
      out["flops"] = float(analysis["flops"]) / b
    out["latency_ms"][str(b)] = median_latency_ms(compiled, params, stats, x, runs=runs)
  return out


# ----------------------------------------------------------------------------- pruning
def channel_scores(params) -> dict[str, np.ndarray]:
  """Per conv unit: |BN scale| (BN nets: the channel's gain) or the filter's L1 norm."""
  flat = surgery.flatten(params)
  scores = {}
  for unit in surgery.conv_units(params):
    if f"{unit}/bn/scale" in flat:
      scores[unit] = np.abs(np.asarray(flat[f"{unit}/bn/scale"], np.float64))
    else:
      scores[unit] = np.abs(np.asarray(flat[f"{unit}/conv/kernel"], np.float64)).sum((0, 1, 2))
  return scores


def prune_teacher(params, stats, config: dict, keep_frac: float, residual: str):
  """Keeps the top `keep_frac` channels of each conv unit (|CWL sigma| when the params hold
  scales, else `channel_scores`) and removes the rest with `prune.prune_channels`.

  Returns:
    (params, batch_stats, config) of the pruned model.
  """
  from jtransfer.methods import cwl
  params = jax.tree.map(np.asarray, params)
  if cwl.CWL_KEY in params:
    scales, rest = cwl.split_cwl(params)
    params = jax.tree.map(np.asarray, cwl.apply_cwl(rest, scales))
    scores = {u: np.abs(np.asarray(s, np.float64)) for u, s in scales.items()}
  else:
    scores = channel_scores(params)
  keep = {}
  for unit, s in scores.items():
    n = max(1, int(np.ceil(keep_frac * s.size)))
    mask = np.zeros(s.size, bool)
    mask[np.argsort(-s, kind="stable")[:n]] = True
    keep[unit] = mask
  return prune_lib.prune_channels(params, jax.tree.map(np.asarray, stats or {}), config, keep,
                                  residual=residual)


# ----------------------------------------------------------------------------- runs
class Runner:
  """Compiled steps, forwards and costs shared by the runs of one experiment."""

  def __init__(self, args, plan, source, student_src):
    self.args, self.plan, self.source, self.student_src = args, plan, source, student_src
    self.config = _student_config(student_src, args.arch, plan["student_config"])
    stats_from = student_src or source
    self.s_mean, self.s_std = stats_from.mean, stats_from.std
    self.shape = tuple(source.input_shape)
    self._setups: dict = {}
    self._steps: dict = {}
    self._forwards: dict = {}
    self._costs: dict = {}

  # -- teacher
  def teacher_setup(self, k: int):
    if k not in self._setups:
      setup = transfer.get_strategy(self.args.strategy).build(self.source, k,
                                                              self.args.teacher_steps)
      self._setups[k] = (setup, make_train_step(setup.loss_fn, setup.optimizer))
    return self._setups[k]

  def train_teacher(self, k, images, labels, seed):
    setup, step = self.teacher_setup(k)
    params, stats = setup.init(seed, images, labels)
    state = init_state(params, stats, setup.optimizer, seed, self.args.teacher_lr)
    state = fit(state, step, Batches(images, labels, self.args.batch_size, seed).at,
                self.args.teacher_steps)
    return (jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.batch_stats),
            setup)

  # -- students
  def student(self, k: int):
    return distill.student_model(self.args.arch, k, self.config)

  def student_init(self, k: int, seed: int, pretrained: bool):
    model = self.student(k)
    if pretrained:
      if models.model_config(transfer.target_model(self.student_src, k)) != \
          models.model_config(model):
        raise InputError("the compact source does not match the student config")
      return transfer.init_target(self.student_src, model, seed)
    v = models.init_model(model, jax.random.PRNGKey(seed), self.shape)
    return v["params"], v.get("batch_stats", {})

  def _optimizer(self, params):
    return make_optimizer(params, [(".*", "all")], {"all": adam(1.0)}, injected_lr=True)

  def step_for(self, model, mean, std, kd: bool, teacher, key) -> tuple[Callable, Any]:
    """(compiled step, optimizer) for a student, cached under `key` (None: not cached)."""
    if key is not None and key in self._steps:
      return self._steps[key]
    a = self.args
    # With augmentation the teacher is closed over (so it sees the augmented batch), which
    # makes the step specific to that teacher: not cached.
    closed = teacher if (kd and a.augment != "none") else None
    loss_fn = distill.distill_loss_fn(model, mean, std, closed, temperature=a.temperature,
                                      lam=a.lam if kd else 0.0, augment_mode=a.augment,
                                      pad=a.pad, bn_train=True)
    params = models.abstract_variables(model, self.shape)["params"]
    opt = self._optimizer(params)
    out = (make_train_step(loss_fn, opt), opt)
    if key is not None:
      self._steps[key] = out
    return out

  def forward(self, model, mean, std, key):
    if key is None:
      return transfer.eval_forward(model, mean, std)
    if key not in self._forwards:
      self._forwards[key] = transfer.eval_forward(model, mean, std)
    return self._forwards[key]

  def measure(self, forward, params, stats, key) -> dict:
    if key is None or key not in self._costs:
      c = cost(forward, params, stats, self.shape, self.plan["batches"], self.args.latency_runs)
      if key is None:
        return c
      self._costs[key] = c
    return self._costs[key]

  def train_student(self, model, params, stats, lr, mean, std, kd, teacher, data, seed,
                    step_key):
    images, labels, logits = data
    step, opt = self.step_for(model, mean, std, kd, teacher, step_key)
    a = self.args
    if kd and a.augment == "none":
      batch_at = distill.cached_batches(images, labels, logits, a.batch_size, seed)
    else:
      batch_at = Batches(images, labels, a.batch_size, seed).at
    state = init_state(params, stats, opt, seed, lr)
    state = fit(state, step, batch_at, a.student_steps)
    return state.params, state.batch_stats


def _eval(forward, params, stats, test, teacher_pred):
  logits = predict_logits(forward, params, stats, test.images)
  out = dict(test_acc=accuracy(logits, test.labels))
  if teacher_pred is not None:
    out["agreement"] = float(np.mean(np.argmax(logits, -1) == teacher_pred))
  return out, logits


def run_repeat(runner: Runner, spec: str, k: int, pool, test, repeat: int, todo: list[str],
               results: ResultsDir, log) -> None:
  """All variants in `todo` for one (target, repeat); the teacher is trained when needed."""
  a = runner.args
  seed = (a.seed * 1_000_003 + repeat) % (2 ** 31)
  train_idx, _ = sample_kshot(pool.labels, a.shots, seed, num_classes=k)
  images, labels = pool.images[train_idx], pool.labels[train_idx]
  base = dict(target=spec, repeat=repeat, n_train=int(len(train_idx)), n_test=len(test),
              arch=a.arch)
  teacher = teacher_pred = logits = None
  t_params = t_stats = t_config = None
  if NEEDS_TEACHER & set(todo):
    t0 = time.time()
    t_params, t_stats, setup = runner.train_teacher(k, images, labels, seed)
    teacher = distill.teacher_fn(setup.forward, t_params, t_stats)
    res, t_logits = _eval(setup.forward, t_params, t_stats, test, None)
    teacher_pred = np.argmax(t_logits, -1)
    if a.augment == "none":
      logits = distill.cached_teacher_logits(teacher, images)
    t_config = models.model_config(setup.model)
    if "teacher" in todo:
      c = runner.measure(setup.forward, t_params, t_stats, ("teacher", k))
      results.add(dict(base, variant="teacher", **res, params=surgery.count(t_params),
                       flops=c["flops"], latency_ms=c["latency_ms"], config=t_config,
                       seconds=round(time.time() - t0, 2)))
      log(f"{spec} r={repeat} teacher: test {res['test_acc']:.4f}")
  data = (images, labels, logits)
  for variant in todo:
    if variant == "teacher":
      continue
    t0 = time.time()
    kd = variant in ("distill", "distill_ft", "pruned_distill")
    extra = {}
    if variant in PRUNED:
      p, s, cfg = prune_teacher(t_params, t_stats, t_config, a.prune_keep, a.prune_residual)
      model = models.from_config(a.arch, cfg)
      mean, std = runner.source.mean, runner.source.std
      fwd = runner.forward(model, mean, std, None)
      extra["acc_before_ft"] = _eval(fwd, p, s, test, None)[0]["test_acc"]
      step_key, cost_key, lr = None, None, a.ft_lr
    else:
      model = runner.student(k)
      cfg = models.model_config(model)
      mean, std = runner.s_mean, runner.s_std
      pretrained = variant in NEEDS_COMPACT_SOURCE
      p, s = runner.student_init(k, seed, pretrained)
      fwd = runner.forward(model, mean, std, ("student", k))
      step_key, cost_key = ("student", k, kd), ("student", k)
      lr = a.ft_lr if pretrained else a.student_lr
    p, s = runner.train_student(model, p, s, lr, mean, std, kd, teacher, data, seed, step_key)
    p, s = jax.tree.map(np.asarray, p), jax.tree.map(np.asarray, s)
    res, _ = _eval(fwd, p, s, test, teacher_pred)
    c = runner.measure(fwd, p, s, cost_key)
    results.add(dict(base, variant=variant, **res, **extra, params=surgery.count(p),
                     flops=c["flops"], latency_ms=c["latency_ms"], config=cfg, lr=lr,
                     seconds=round(time.time() - t0, 2)))
    log(f"{spec} r={repeat} {variant}: test {res['test_acc']:.4f}"
        + (f" (teacher agreement {res['agreement']:.3f})" if "agreement" in res else ""))


def run(args, plan, results: ResultsDir) -> None:
  log = (lambda *m: None) if args.quiet else (
      lambda *m: print("[compact_transfer]", *m, file=sys.stderr))
  done = results.done(KEY)
  variants = plan["variants"]
  source = pretrain.source_for(args.arch, args.source, epochs=args.source_epochs, seed=args.seed,
                               progress=not args.quiet)
  student_src = None
  if (NEEDS_COMPACT_SOURCE & set(variants)) or (plan["student_source"] or "").startswith("ckpt:"):
    config = (None if plan["student_source"].startswith("ckpt:")
              else distill.compact_config(args.arch, plan["student_config"]))
    student_src = compact_source(
        args.arch, plan["student_source"], config,
        epochs=args.student_source_epochs or args.source_epochs, seed=args.seed,
        progress=not args.quiet)
    if tuple(student_src.input_shape) != tuple(source.input_shape):
      raise InputError(f"the compact source takes {tuple(student_src.input_shape)} images, the "
                       f"teacher's source {tuple(source.input_shape)}")
  runner = Runner(args, plan, source, student_src)
  for spec in plan["targets"]:
    data = load_spec(spec, source.input_shape, flag="--target", data_dir=args.data_dir)
    test = data.test
    if args.test_per_class > 0:
      keep = np.concatenate([np.flatnonzero(test.labels == c)[:args.test_per_class]
                             for c in range(test.num_classes)])
      test = test.take(np.sort(keep))
    for repeat in range(args.repeats):
      todo = [v for v in variants if (spec, v, repeat) not in done]
      if todo:
        run_repeat(runner, spec, data.train.num_classes, data.train, test, repeat, todo,
                   results, log)


# ----------------------------------------------------------------------------- report
def summarize(records: list[dict]) -> dict:
  """(target, variant) -> mean/std of accuracy (and agreement) over repeats, costs of repeat 0."""
  out: dict = {}
  groups: dict = {}
  for r in records:
    groups.setdefault((r["target"], r["variant"]), []).append(r)
  for key, rs in groups.items():
    rs = sorted(rs, key=lambda r: r["repeat"])
    m, s = mean_std(r["test_acc"] for r in rs)
    agree = [r["agreement"] for r in rs if "agreement" in r]
    out[key] = dict(acc_mean=m, acc_std=s, n=len(rs), params=rs[0]["params"],
                    flops=rs[0]["flops"], latency_ms=rs[0]["latency_ms"],
                    agreement=float(np.mean(agree)) if agree else None)
  return out


def make_report(records: list[dict], args, plan) -> tuple[str, dict]:
  summary = summarize(records)
  batches = [str(b) for b in plan["batches"]]
  widths = next((_widths(r["config"]) for r in records
                 if r["variant"] not in PRUNED | {"teacher"}), "-")
  teacher_widths = next((_widths(r["config"]) for r in records if r["variant"] == "teacher"),
                        "-")
  lines = ["# Compact transfer by joint learning", "",
           f"{args.arch}: teacher = source `{args.source}` fine-tuned with `{args.strategy}` "
           f"(Adam {args.teacher_lr:g}, {args.teacher_steps} steps; {teacher_widths}); compact "
           f"student {widths}; students: {args.student_steps} Adam steps "
           f"(lr {args.student_lr:g} from random init, {args.ft_lr:g} from pretrained), "
           f"batch {args.batch_size}, BN (if any) in train mode. Joint loss (1 - λ) CE(y, p_s) + "
           f"λ T² KL(p_t^T ‖ p_s^T) with T = {args.temperature:g}, λ = {args.lam:g}, "
           f"augmentation `{args.augment}`. {args.shots} training images per class, "
           f"{args.repeats} repeats (a fresh draw each); test "
           f"{'all' if not args.test_per_class else f'<= {args.test_per_class}/class'} of the "
           "target's test split.", "",
           "Accuracy: mean (std) over repeats, %. Agreement: fraction of test images on which the "
           "model predicts the teacher's class. FLOPs: XLA cost analysis of the jitted eval "
           "forward, per image. Latency: median of "
           f"{args.latency_runs} calls of the jitted forward after warm-up (repeat 0's model; "
           f"pruned widths keep {args.prune_keep:g} of each unit's channels, "
           f"residual={args.prune_residual}).", ""]
  lines += [f"- {v}: {DESCRIPTIONS[v]}" for v in plan["variants"]] + [""]
  for note in plan.get("notes", []):
    lines += [f"Note: {note}", ""]
  for target in plan["targets"]:
    teacher = summary.get((target, "teacher"))
    head = ["variant", "accuracy", "Δ teacher", "agreement", "params", "MFLOPs"] + \
        [f"ms b={b}" for b in batches]
    lines += [f"## {target}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in plan["variants"]:
      r = summary.get((target, v))
      if r is None:
        continue
      gap = (f"{100 * (r['acc_mean'] - teacher['acc_mean']):+.1f}" if teacher and v != "teacher"
             else "-")
      agree = f"{r['agreement']:.3f}" if r["agreement"] is not None else "-"
      lines.append(f"| {v} | {100 * r['acc_mean']:.1f} ({100 * r['acc_std']:.1f}) | {gap} | "
                   f"{agree} | {r['params']:,} | {r['flops'] / 1e6:.2f} | " +
                   " | ".join(f"{r['latency_ms'].get(b, float('nan')):.2f}" for b in batches)
                   + " |")
    lines += [""] + _comparison(summary, target) + [""]
  text = "\n".join(lines)
  return text, {"|".join(k): v for k, v in summary.items()}


def _widths(config: dict) -> str:
  keys = ("conv_widths", "stage_widths", "stem_width", "inner_widths", "dense_widths")
  return ", ".join(f"{k} {json.dumps(config[k])}" for k in keys if config.get(k) is not None)


def _comparison(summary: dict, target: str) -> list[str]:
  """Sentences: distilled vs the same student without the teacher, and vs the teacher."""
  out = []
  t = summary.get((target, "teacher"))
  for with_t, without in (("distill", "scratch"), ("distill_ft", "finetune"),
                          ("pruned_distill", "pruned")):
    a, b = summary.get((target, with_t)), summary.get((target, without))
    if not (a and b):
      continue
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
  targets = plan["targets"]
  fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.8), squeeze=False)
  for ax, target in zip(axes[0], targets):
    rows = [(v, summary.get(f"{target}|{v}")) for v in plan["variants"]]
    rows = [(v, r) for v, r in rows if r is not None]
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
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  cli.apply_devices(args)
  t0 = time.time()
  started = cli.start(args, validate, run)
  if started is None:
    return 2
  plan, results, _ = started
  order = {v: i for i, v in enumerate(VARIANTS)}
  records = sorted(results.records, key=lambda r: (r["target"], order[r["variant"]],
                                                   r["repeat"]))
  results.write_json("results.json", records)
  text, summary = make_report(records, args, plan)
  results.write_text("report.md", text)
  results.write_json("summary.json", summary)
  plot(summary, plan, os.path.join(results.path, "accuracy_vs_flops.png"))
  return cli.finish(results, text, t0)


if __name__ == "__main__":
  sys.exit(main())
