"""LEGACY: the few-shot grid before the study runner, kept only for the modules not yet declared
on `jtransfer.study` (delta_table, bench_grid), which import these names through
`experiments.fewshot`; delete it with them. The few-shot study is `experiments.fewshot`.

Few-shot transfer of a pretrained source to a k-shot target: strategies side by side.

  python -m experiments.fewshot --arch vgg_s,resnet_s --source fmnist:0,2,3,4,6 \
      --target 'fmnist:1,5,7,8,9' --target digits --shots 1,3,5,10 --repeats 10 \
      --strategies freeze,finetune --lrs paper --out results/fewshot

writes results.jsonl (one record per finished run), results.json, report.md and
accuracy_vs_shots.png. With no flags it runs the embedded default: both small archs, both
embedded targets, freeze and finetune, shots 1,5,10, 2 evaluation draws and 1 tuning draw,
2 LRs per strategy (extended at an edge), runs capped at 500 steps, 300 test images per class.

Protocol (docs/protocol.md, `jtransfer.protocol`): for each (arch, target, k) and draw one
stratified k-shot set plus a disjoint validation set (`--val-per-class`) from the target's train
split, shared by every strategy and LR (paired comparison). Every run trains full batches of the
k-shot set (at most `--batch-size`) until its validation accuracy has not improved for
`--patience` steps (at most `--steps`) and keeps its best validation state. Each strategy's LR
(and its own knobs, e.g. DELTA's alpha) is chosen on `--tune-repeats` tuning draws that are
never evaluation draws and never see the test split (by k-fold CV where the paper does); the
evaluation draws run at that choice and, under `--paper-grid`, over the whole LR grid too. The
report gives the tuned figure with its claims (per-draw differences, 95% CI, verdict), then the
paper's test-selected best over LR, labelled, and the LR chosen per draw on validation.
Frozen-backbone strategies with BN in eval mode train their head on backbone features computed
once per (arch, target).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Sequence

import jax
import numpy as np

from experiments import cli, grid_progress, knobs, pretrain, publish
from experiments.report import (ResultsDir, best_over_lr, lr_grid_text, pct, positive_ints,
                                split_text)
from jtransfer import checks, models, surgery
from jtransfer.data import Batches, ImageSet, augment, load_spec, parse_spec, sample_kshot
from jtransfer.data.stream import StreamOptions, is_lazy
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.methods import delta, transfer
from jtransfer.protocol import Budget, claims, progress, tuning
from jtransfer.protocol.run import train_run
from jtransfer.train import (accuracy, batched, init_state, make_optimizer,
                             make_train_step, parallel, predict_logits)
from jtransfer.train.loop import nonfinite_error

KEY = ("strategy", "arch", "target", "shots", "repeat", "lr", "hp", "fold")
# Fields older records lack: the knob values ('' = none) and the cross-validation fold (-1).
KEY_DEFAULTS = {"hp": "", "fold": -1}
DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")
FEATURE_BATCH = 256
REDUCED_LRS = {"freeze": (1e-2, 5e-2), "finetune": (1e-4, 1e-3)}


# Runs of a frozen-backbone strategy trained together per vmapped step (jtransfer.train.batched).
# Measured on the 2-core CPU: 0.75-0.89x the speed of one run at a time (the runs are already
# compute-bound there; docs/decisions.md), so 'auto' batches only on accelerators, where a k-shot
# batch of 5-64 images leaves the device idle.
BATCH_RUNS_ACCELERATOR = 64


def add_batch_runs_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--batch-runs", default="auto",
                 help="train up to this many runs of a frozen-backbone strategy (freeze, "
                      "freeze_cwl) together as one vmapped step; 1 = one at a time; 'auto' = "
                      f"1 on CPU, {BATCH_RUNS_ACCELERATOR} on GPU/TPU")


def resolve_batch_runs(value) -> int:
  """--batch-runs as an int ('auto' by backend)."""
  if value == "auto":
    import jax
    return 1 if jax.default_backend() == "cpu" else BATCH_RUNS_ACCELERATOR
  try:
    n = int(value)
  except (TypeError, ValueError):
    n = 0
  if n < 1:
    raise InputError(f"--batch-runs must be 'auto' or an int >= 1, got {value!r}")
  return n


def add_protocol_flags(p: argparse.ArgumentParser, steps: int = 500, patience: int = 100,
                       tune_repeats: int = 2, val_per_class: int = 20) -> None:
  """The protocol's flags (docs/protocol.md): run budget, validation, tuning draws."""
  cli.add_stopping_flags(p, patience, "a run", steps=steps)
  p.add_argument("--val-per-class", type=int, default=val_per_class,
                 help="validation images per class, disjoint from the k-shot set and from test")
  p.add_argument("--tune-repeats", type=int, default=tune_repeats,
                 help="tuning draws per (arch, target, k), not among the evaluation draws, on "
                      "which each strategy's LR is chosen by mean validation accuracy; 0 = no "
                      "tuning draws (the LR grid runs on every draw and is chosen per draw on "
                      "validation)")
  cli.add_tune_extend_flag(p)
  p.add_argument("--cv-folds", default="auto",
                 help="choose a strategy's knobs (and LR) by this many-fold cross-validation on "
                      "each tuning draw's labelled pool (k-shot + validation images); 'auto' = "
                      "as its paper (DELTA, L2-SP: 5; others: the validation set); 0 = never")
  p.add_argument("--augment", default="none",
                 help="training augmentation, on device, per example, from each step's rng "
                      "(jtransfer.data.augment): none, flip, crop (shorter side to 32/28 of "
                      "the input, random crop), rrc (random-resized crop), pad[N] (zero-pad N "
                      "px, default 4, random crop back), each optionally +flip; "
                      "frozen-feature caching is off when augmenting")
  p.add_argument("--stored-size", type=int, default=0,
                 help="store the target's images as squares of this side (cover, centre "
                      "crop; e.g. 256 for 224 px inputs) so --augment crops real pixels; the "
                      "network sees Resize(32/28 x input) + CenterCrop(input) views of them "
                      "for validation, test and unaugmented training; 0 = the input size")
  p.add_argument("--stream-threads", type=int, default=0,
                 help="decode an image-folder target on demand with this many threads through "
                      "grain (folders larger than memory; jtransfer.data.stream) instead of "
                      "loading it; 0 = load into memory")
  p.add_argument("--stream-workers", type=int, default=0,
                 help="with --stream-threads: grain worker processes decoding (0: threads only)")
  p.add_argument("--shard", default=None, metavar="I/N",
                 help="run only the grid's cells (arch, target, k) whose index modulo N is I "
                      "(0 <= I < N), e.g. one scheduler job per shard; `python -m "
                      "experiments.publish merge` joins the shards' folders into the grid's")
  p.add_argument("--paper-grid", action=argparse.BooleanOptionalAction, default=True,
                 help="also run the whole LR grid on the evaluation draws, for the papers' "
                      "test-selected 'best over LR' figure (reported apart, labelled)")


def budget_of(args: argparse.Namespace) -> Budget | None:
  """The run budget from the flags: None = fixed --steps, keep the last state."""
  return Budget.from_flags(args.steps, args.eval_every, args.patience)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default=",".join(models.SMALL_ARCHS),
                 help="comma list of architectures")
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE,
                 help="dataset spec to pretrain on (cached), or ckpt:PATH")
  p.add_argument("--target", action="append", default=None,
                 help="target dataset spec; repeat the flag (or separate with ';') for several")
  p.add_argument("--shots", default="1,5,10", help="comma list of k (images per class)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--strategies", default="freeze,finetune")
  p.add_argument("--lrs", default="reduced",
                 help="'paper' (the CWL paper's grid per strategy), 'reduced' (2 per strategy) "
                      "or a comma list")
  add_protocol_flags(p, tune_repeats=1)  # one tuning draw keeps the embedded demo short
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--test-per-class", type=int, default=300,
                 help="cap on test images per class (0 = all)")
  p.add_argument("--data-dir", default=None,
                 help="TFDS data_dir (default $TFDS_DATA_DIR) or the Fashion-MNIST IDX directory")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  add_batch_runs_flag(p)
  p.add_argument("--no-feature-cache", action="store_true",
                 help="train head-only strategies through the full forward (slow path)")
  cli.add_results_flags(p, "results/fewshot", resume_help="continue a grid, skipping finished runs")
  return p.parse_args(argv)


def validate(args: argparse.Namespace) -> dict:
  """Checks every flag before any data is loaded or anything compiled."""
  archs = [a.strip() for a in args.arch.split(",") if a.strip()]
  for a in archs:
    if a not in models.names():
      raise InputError(f"--arch {a!r} is unknown; expected one of {', '.join(models.names())}")
  strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
  for s in strategies:
    transfer.get_strategy(s)
  targets = cli.target_list(args.target, DEFAULT_TARGETS)
  for t in targets:
    parse_spec(t, flag="--target")
  if not args.source.startswith("ckpt:"):
    parse_spec(args.source, flag="--source")
  if args.repeats < 1:
    raise InputError(f"--repeats must be >= 1, got {args.repeats}")
  if args.steps < 1:
    raise InputError(f"--steps must be >= 1, got {args.steps}")
  for flag, v in (("--patience", args.patience), ("--tune-repeats", args.tune_repeats),
                  ("--tune-extend", args.tune_extend), ("--val-per-class", args.val_per_class),
                  ("--test-per-class", args.test_per_class)):
    if v < 0:
      raise InputError(f"{flag} must be >= 0, got {v}")
  if args.cv_folds != "auto" and not (str(args.cv_folds).isdigit() and
                                      int(args.cv_folds) != 1):
    raise InputError(f"--cv-folds must be 'auto', 0 or an integer >= 2, got {args.cv_folds!r}")
  if args.eval_every < 1:
    raise InputError(f"--eval-every must be >= 1, got {args.eval_every}")
  cli.check_validation_needs(args)
  if args.batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
  resolve_batch_runs(args.batch_runs)
  lrs = {}
  for s in strategies:
    strategy = transfer.get_strategy(s)
    if args.lrs == "reduced":
      lrs[s] = REDUCED_LRS.get(s, strategy.paper_lrs[1::2] or strategy.paper_lrs)
    else:
      lrs[s] = transfer.lr_grid(strategy, args.lrs)
  if augment_recipe(args).kind == "pad" and getattr(args, "stored_size", 0):  # also parses
    raise InputError(f"--augment {args.augment} crops back to the stored size, so it cannot "
                     "be combined with --stored-size: use crop or rrc")
  options, knob_grids = knobs.plan_knobs(strategies)
  return dict(archs=archs, strategies=strategies, targets=targets,
              shots=positive_ints(args.shots, "--shots"), lrs=lrs,
              shard=parse_shard(getattr(args, "shard", None)), options=options,
              knobs=knob_grids)


def augment_recipe(args) -> augment.Recipe:
  """The --augment recipe of `args` (none for modules without the flag)."""
  return augment.parse(getattr(args, "augment", "none"))


def stream_options(args):
  """The --stream-threads/--stream-workers options, or None to load targets into memory."""
  threads = int(getattr(args, "stream_threads", 0) or 0)
  if not threads:
    if getattr(args, "stream_workers", 0):
      raise InputError("--stream-workers needs --stream-threads")
    return None
  return StreamOptions(threads=threads, workers=int(getattr(args, "stream_workers", 0) or 0))


def stored_shape(args, input_shape: Sequence[int]) -> tuple[int, int, int]:
  """The (H, W, C) the target images are stored at: --stored-size squares, else the input's.

  Raises:
    InputError: a stored size below the input size, or with a non-square input.
  """
  h, w, c = (int(v) for v in input_shape)
  size = int(getattr(args, "stored_size", 0) or 0)
  if size == 0 or (size, size) == (h, w):
    return (h, w, c)
  if h != w:
    raise InputError(f"--stored-size needs a square input; the source's is {h}x{w}")
  if size < h:
    raise InputError(f"--stored-size {size} is smaller than the {h} px input: crops would "
                     "come from upsampled pixels")
  return (size, size, c)


def parse_shard(text: str | None) -> tuple[int, int] | None:
  """'I/N' -> (I, N), or None for the whole grid."""
  if text is None:
    return None
  try:
    i, n = (int(v) for v in text.split("/"))
  except ValueError:
    raise InputError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
  if not (n >= 1 and 0 <= i < n):
    raise InputError(f"--shard {text!r}: needs N >= 1 and 0 <= I < N")
  return i, n


def cells(plan: dict) -> list[tuple[str, str, int]]:
  """The (arch, target, k) cells this invocation runs: all of them, or its --shard's share.

  Cells are the grid's unit of work: a cell's tuning and evaluation runs, and its k-shot
  draws, depend on nothing outside it, so shards run independently and merge exactly."""
  every = [(a, t, k) for a in plan["archs"] for t in plan["targets"] for k in plan["shots"]]
  if not plan.get("shard"):
    return every
  i, n = plan["shard"]
  return [c for j, c in enumerate(every) if j % n == i]


def cap_per_class(s: ImageSet, n: int) -> ImageSet:
  """The first `n` images of each class (deterministic), or all when n == 0."""
  if n <= 0:
    return s
  keep = np.concatenate([np.flatnonzero(s.labels == c)[:n] for c in range(s.num_classes)])
  return s.take(np.sort(keep))


class TargetRuns:
  """Everything shared by the runs of one (arch, target): data, cached features, compiled fns."""

  def __init__(self, source: transfer.Source, spec: str, args, data_cache: dict,
               setup_cache: dict, options: dict | None = None):
    shape = stored_shape(args, source.input_shape)
    key = (spec, shape)
    if key not in data_cache:
      data_cache[key] = load_spec(spec, shape, flag="--target", data_dir=args.data_dir,
                                  stream=stream_options(args))
    data = data_cache[key]
    self.source, self.spec, self.args = source, spec, args
    # strategy -> extra `build` keyword arguments (`knobs.plan_knobs`: DELTA's config)
    self.options = options or {}
    self.pool = data.train
    self.test = cap_per_class(data.test, args.test_per_class)
    # Stored larger than the input: the network sees test-time views (Resize + CenterCrop);
    # `stored` keeps the pixels the augmentation crops from.
    self.stored, self.out_hw = None, tuple(source.input_shape[:2])
    if shape[:2] != self.out_hw:
      self.stored = self.pool
      # (a streamed folder stays lazy: each decoded batch is viewed as it is read)
      view = lambda s: ImageSet(s.images.centre_view(self.out_hw) if is_lazy(s.images)
                                else augment.center_view(s.images, self.out_hw), s.labels,
                                s.class_names)
      self.pool, self.test = view(self.pool), view(self.test)
    self.num_classes = data.train.num_classes
    # Setups (and so compiled steps) are shared by every target with the same class count.
    self._setups = setup_cache.setdefault((id(source), self.num_classes), {})
    self._features = None
    # What loading did to the data (logged by the loader), then a check of the features: the
    # report repeats these sentences (records carry them).
    self.notes = tuple(data.notes) + self._feature_notes()

  def _feature_notes(self) -> tuple[str, ...]:
    """A dead-features warning (`checks.dead_features_note`), logged, or nothing."""
    n = min(FEATURE_BATCH, len(self.pool))  # one batch: the feature cache's compiled shape
    rows = np.sort(np.random.default_rng(0).choice(len(self.pool), n, replace=False))
    feats = transfer.extract_features(self.source, self.num_classes, self.pool.images[rows],
                                      batch_size=FEATURE_BATCH)
    note = checks.dead_features_note(feats, f"--source {self.args.source} on --target "
                                            f"{self.spec} ({self.source.arch})")
    if note is None:
      return ()
    logging.getLogger(__name__).warning("%s", note)
    return (note,)

  def features(self, idx: np.ndarray):
    """Head inputs for pool rows `idx` and for the test set, computed once per image.

    Only the rows runs ask for are computed (k-shot and validation draws, not the whole pool),
    in fixed-size batches so one compiled forward serves every call.
    """
    if self._features is None:
      extract = lambda im: transfer.extract_features(self.source, self.num_classes, im,
                                                     batch_size=FEATURE_BATCH)
      test = extract(self.test.images)
      self._features = (np.zeros((len(self.pool), test.shape[1]), test.dtype),
                        np.zeros(len(self.pool), bool), test)
    pool, have, test = self._features
    todo = np.unique(idx[~have[idx]])
    if todo.size:
      padded = np.resize(todo, -(-todo.size // FEATURE_BATCH) * FEATURE_BATCH)
      pool[padded] = transfer.extract_features(self.source, self.num_classes,
                                               self.pool.images[padded],
                                               batch_size=FEATURE_BATCH)
      have[todo] = True
    return pool[idx], test

  def setup(self, name: str, hp: str = ""):
    """(Setup, compiled step, head-only optimizer or None) per (strategy, knob values), built
    once."""
    if (name, hp) not in self._setups:
      strategy = transfer.get_strategy(name)
      setup = strategy.build(self.source, self.num_classes, self.args.steps,
                             **self.options.get(name, {}), **transfer.parse_hp(hp))
      recipe = augment_recipe(self.args)
      head_only = strategy.head_only and not self.args.no_feature_cache and not recipe.active
      if strategy.head_only and recipe.active and not self.args.quiet:
        print(f"[fewshot] {name}: frozen features not cached (--augment {recipe}): every step "
              "runs the full forward", file=sys.stderr)
      if head_only:
        label = setup.optimizer.labels["head"]["kernel"]
        params, _ = setup.init(0, self.pool.images[:1], self.pool.labels[:1])
        opt = make_optimizer({"head": params["head"]}, [(".*", label)],
                             {label: setup.optimizer.groups[label]}, injected_lr=True)
        step = make_train_step(transfer.head_loss_fn(), opt)
      else:
        opt = setup.optimizer
        crops_stored = self.stored is not None and recipe.active
        step = make_train_step(augment.wrap_loss(setup.loss_fn, recipe,
                                                 self.out_hw if crops_stored else None), opt)
      self._setups[(name, hp)] = (setup, step, opt, head_only)
    return self._setups[(name, hp)]

  def _prepare(self, name: str, train_idx, val_idx, lr: float, seed: int, hp: str = ""):
    """(initial state, batches, x_val, x_test, forward) of one run."""
    setup, _, opt, head_only = self.setup(name, hp)
    params, stats = setup.init(seed, self.pool.images[train_idx], self.pool.labels[train_idx])
    if head_only:
      rows, test_f = self.features(np.concatenate([train_idx, val_idx]))
      params, stats = {"head": params["head"]}, {}
      x_train, x_val, x_test = rows[:len(train_idx)], rows[len(train_idx):], test_f
      forward = transfer.head_forward
    else:
      # Augmented runs crop the stored pixels (their step brings them to the input size).
      train_from = (self.stored if self.stored is not None and augment_recipe(self.args).active
                    else self.pool)
      x_train, x_val, x_test = (train_from.images[train_idx], self.pool.images[val_idx],
                                self.test.images)
      forward = setup.forward
    batches = Batches(x_train, self.pool.labels[train_idx], self.args.batch_size, seed)
    return init_state(params, stats, opt, seed, lr), batches, x_val, x_test, forward

  def _evaluate(self, state, forward, x_val, val_idx, x_test, test: bool = True) -> dict:
    val_acc = (accuracy(predict_logits(forward, state.params, state.batch_stats, x_val),
                        self.pool.labels[val_idx]) if len(val_idx) else float("nan"))
    # Tuning runs never see the test split (test=False): they only choose hyper-parameters.
    test_acc = (accuracy(predict_logits(forward, state.params, state.batch_stats, x_test),
                         self.test.labels) if test else None)
    return dict(test_acc=test_acc, val_acc=val_acc)

  def run(self, name: str, train_idx, val_idx, lr: float, seed: int,
          budget: Budget | None = None, test: bool = True, hp: str = "",
          on_step=None) -> dict:
    """One run, alone (the plain path).

    Args:
      name, train_idx, val_idx, lr, seed: the strategy, the k-shot and validation rows of the
        pool, the learning rate and the run's seed.
      budget: stop by validation patience (`jtransfer.protocol.budget`) and keep the best
        validation state; None trains `--steps` steps and keeps the last state.
      test: evaluate on the test split (False for tuning runs).
      hp: the strategy's knob values (`transfer.hp_string`), '' for its defaults.
      on_step: (step, cap, val acc) after each step: a long run's progress line.

    Returns:
      {'test_acc', 'val_acc', 'steps' (trained), 'best_step' (kept), 'stopped'}.

    Raises:
      NonFiniteError: a step was not finite.
    """
    setup, step, _, head_only = self.setup(name, hp)
    state, batches, x_val, x_test, forward = self._prepare(name, train_idx, val_idx, lr, seed,
                                                           hp)
    val = None
    if budget is not None and len(val_idx):
      labels = self.pool.labels[val_idx]
      val = lambda st: accuracy(predict_logits(forward, st.params, st.batch_stats, x_val),
                                labels)
    out = train_run(state, step, batches.at, steps=self.args.steps, budget=budget, val_acc=val,
                    finalize=setup.finalize, keep_initial=not head_only,
                    on_step=on_step)
    state, info, initial = out.state, out.info, out.initial
    info.pop("curve")
    if not head_only:  # how far training moved the conv filters (DELTA's Fig. 3 measure)
      # Per-run constants (DELTA's frozen source copy and attention) are not trained filters.
      start = {k: v for k, v in initial.items() if k != delta.FROZEN_KEY}
      info["filter_distance"] = surgery.mean_filter_distance(state.params, start)
    return dict(self._evaluate(state, forward, x_val, val_idx, x_test, test), **info)

  def batchable(self, name: str) -> bool:
    """Whether runs of `name` can train together (`jtransfer.train.batched`)."""
    key = ("batchable", name)
    if key not in self._setups:  # asked once per (target, k) group: initialise params once
      setup, _, opt, head_only = self.setup(name)
      if head_only:
        self._setups[key] = True
      elif setup.finalize is not None:  # the batched path has no finalize step
        self._setups[key] = False
      elif augment_recipe(self.args).active:  # nor augmentation
        self._setups[key] = False
      else:
        params, _ = setup.init(0, self.pool.images[:1], self.pool.labels[:1])
        self._setups[key] = batched.batchable(opt, params)
    return self._setups[key]

  def run_many(self, name: str, jobs: Sequence[tuple]) -> list:
    """Runs sharing their frozen params, trained as one batched step; same results as `run`.

    Args:
      name: a strategy for which `batchable(name)`.
      jobs: (train_idx, val_idx, lr, seed) per run; every train set of the same size.

    Returns:
      Per job, the dict `run` returns, or the NonFiniteError `run` would have raised.
    """
    setup, _, opt, head_only = self.setup(name)
    key = ("batched", name)
    if key not in self._setups:
      loss = transfer.head_loss_fn() if head_only else setup.loss_fn
      self._setups[key] = batched.make_batched_train_step(loss, opt)
    bstep = self._setups[key]
    prepared = [self._prepare(name, *job) for job in jobs]
    bstate, frozen = batched.stack_states([p[0] for p in prepared], opt)
    errors: list = [None] * len(jobs)
    for step in range(self.args.steps):
      bstate, m = bstep(bstate, frozen, batched.stack_batches([p[1].at(step) for p in prepared]))
      finite = np.asarray(m["finite"])
      for r in np.flatnonzero(~finite):
        if errors[r] is None:  # the plain path stops at its first non-finite step
          errors[r] = nonfinite_error(step, {k: np.asarray(v)[r] for k, v in m.items()})
    out = []
    for r, (_, _, x_val, x_test, forward) in enumerate(prepared):
      if errors[r] is not None:
        out.append(errors[r])
        continue
      state = batched.unstack_state(bstate, frozen, r)
      out.append(dict(self._evaluate(state, forward, x_val, jobs[r][1], x_test),
                      steps=self.args.steps, best_step=self.args.steps, stopped="fixed"))
    return out


def source_input_shape(source_spec: str) -> tuple[int, ...]:
  """The input shape a source takes, read without loading or training it."""
  if not source_spec.startswith("ckpt:"):
    return tuple(pretrain.DEFAULT_SHAPE)
  import json
  path = os.path.join(source_spec[len("ckpt:"):], "meta.json")
  try:
    with open(path) as f:
      return tuple(int(v) for v in json.load(f)["input_shape"])
  except (OSError, ValueError, KeyError, TypeError):
    raise InputError(f"--source {source_spec}: {path} is missing or has no input_shape; "
                     "expected a model saved by experiments.pretrain or convert_weights") from None


def check_targets(args: argparse.Namespace, plan: dict, data_cache: dict) -> None:
  """Loads every target and checks the largest k against each class, before any training."""
  shape = stored_shape(args, source_input_shape(args.source))
  for spec in plan["targets"]:
    key = (spec, shape)
    if key not in data_cache:
      data_cache[key] = load_spec(spec, shape, flag="--target", data_dir=args.data_dir,
                                  stream=stream_options(args))
    train = data_cache[key].train
    sample_kshot(train.labels, max(plan["shots"]), 0, num_classes=train.num_classes)


def _record(key, train_idx, val_idx, runs: "TargetRuns", args) -> dict:
  out = dict(zip(KEY, key), status="ok", n_train=int(len(train_idx)), n_val=int(len(val_idx)),
             n_test=len(runs.test), cap=args.steps, role="tune" if key[4] < 0 else "eval")
  recipe = str(augment_recipe(args))
  if recipe != "none":  # unaugmented records keep their old form
    out["augment"] = recipe
  if runs.stored is not None:
    out["stored_size"] = int(runs.stored.images.shape[1])
  if runs.notes:  # conversions and warnings, repeated in the report
    out["notes"] = list(runs.notes)
  return out


def record_key(r: dict) -> tuple:
  """A record's KEY tuple (older records get KEY_DEFAULTS)."""
  return tuple(r.get(k, KEY_DEFAULTS.get(k)) for k in KEY)


def _outcome(result) -> dict:
  """Record fields from a run's result dict or its NonFiniteError."""
  if isinstance(result, NonFiniteError):
    return dict(status="failed", error=str(result), test_acc=None, val_acc=None)
  return result


def draw_seed(args, shots: int, repeat: int) -> int:
  """The seed of a k-shot draw. Evaluation draws have repeat >= 0, tuning draws repeat < 0,
  so the two never share a draw."""
  return (args.seed * 1_000_003 + shots * 1009 + repeat) % (2 ** 31)


def cv_folds(args, name: str) -> int:
  """Cross-validation folds for a strategy's tuning: --cv-folds, or with 'auto' the folds its
  paper uses for its knobs (DELTA, L2-SP: 5) and 0 (the tuning draw's validation set) else."""
  if args.cv_folds == "auto":
    return transfer.get_strategy(name).cv_folds
  return int(args.cv_folds)


def fold_split(pool_labels: np.ndarray, train_idx, val_idx, n_folds: int, fold: int, seed: int,
               shots: int):
  """(train, validation) rows of fold `fold` of a draw's labelled pool (k-shot + validation).

  Stratified k-fold over the pool; each fold's training part is cut to `shots` images per class
  (seeded), so a knob is chosen at the shot count it is evaluated at, not at the 4/5 of
  k + validation images a plain fold would train on. The fold's held-out part validates.
  """
  pool = np.concatenate([train_idx, val_idx])
  tr, va = tuning.kfold(pool_labels[pool], n_folds, seed)[fold]
  rng = np.random.default_rng([seed, fold])
  labels = pool_labels[pool[tr]]
  keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:shots]
                         for c in np.unique(labels)])
  return np.sort(pool[tr][keep]), pool[va]


def tuning_keys(args, cell: tuple, lr: float, hp: str) -> list[tuple]:
  """The runs that score one point: each tuning draw, on each fold when cross-validating."""
  arch, spec, shots, name = cell
  folds = cv_folds(args, name)
  return [(name, arch, spec, shots, -1 - t, lr, hp, f) for t in range(args.tune_repeats)
          for f in (range(folds) if folds else (-1,))]


def choose(records: list[dict], plan: dict, args, run_missing=None,
           requested: set | None = None) -> dict:
  """The LR and knob values each (arch, target, shots, strategy) uses on its evaluation draws.

  Tuning (`--tune-repeats` > 0) scores each point of the strategy's grid (its LRs x its knobs'
  grids) by mean validation accuracy over the tuning draws (and their cross-validation folds,
  `--cv-folds`), extending an axis at an edge (`jtransfer.protocol.tuning`). A failed
  (non-finite) run scores 0. Only 'val_acc' is read: tuning records hold no test accuracy.
  From records alone (the report) or, with `run_missing(key) -> record`, training what is
  missing (the grid runner); both give the same choice for the same records.

  Returns:
    (arch, target, shots, strategy) -> Tuned.to_dict() plus 'hp', or {} without tuning draws.
  """
  if not args.tune_repeats:
    return {}
  by_key = {record_key(r): r for r in records}
  out = {}
  for arch in plan["archs"]:
    for spec in plan["targets"]:
      for shots in plan["shots"]:
        for name in plan["strategies"]:
          cell = (arch, spec, shots, name)
          strategy = knobs.strategy_of(plan, name)

          def keys_of(point, cell=cell):
            hp = transfer.hp_string({k: v for k, v in point.items() if k != "lr"})
            return tuning_keys(args, cell, point["lr"], hp)

          grid = {"lr": plan["lrs"][name], **strategy.knobs}
          found = tuning.tune_records(grid, keys_of, by_key, run_missing, args.tune_extend,
                                      requested, strategy.knob_bounds)
          if found is None:  # the report of an unfinished grid: that cell is not tuned yet
            continue
          t = found.to_dict()
          t["hp"] = transfer.hp_string({k: v for k, v in t["choice"].items() if k != "lr"})
          out[cell] = t
  return out


def eval_points(plan: dict, args, tuned: dict, cell: tuple) -> list[tuple[float, str]]:
  """(lr, hp) run on a cell's evaluation draws: the tuned point, plus under --paper-grid every
  LR of the grid at the paper's knob values."""
  name = cell[3]
  hp0 = transfer.hp_string(knobs.strategy_of(plan, name).knob_defaults)
  points = ([(lr, hp0) for lr in plan["lrs"][name]]
            if (args.paper_grid or not args.tune_repeats) else [])
  if cell in tuned and (tuned[cell]["choice"]["lr"], tuned[cell]["hp"]) not in points:
    points.append((tuned[cell]["choice"]["lr"], tuned[cell]["hp"]))
  return points


def grid_keys(records: list[dict], plan: dict, args) -> set[tuple]:
  """The keys of every run the grid holds, given its records: the tuning runs the choices read
  (edge extensions included) and each cell's evaluation runs at its chosen point. A cell whose
  tuning is unfinished counts the tuning run it lacks and no evaluation runs beyond the paper
  grid's."""
  requested: set = set()
  keys = set()
  for arch, spec, shots in cells(plan):
    tuned = choose(records, dict(plan, archs=[arch], targets=[spec], shots=[shots]), args,
                   requested=requested)
    for name in plan["strategies"]:
      for lr, hp in eval_points(plan, args, tuned, (arch, spec, shots, name)):
        keys |= {(name, arch, spec, shots, repeat, lr, hp, -1)
                 for repeat in range(args.repeats)}
  return keys | requested


def results_records(records: list[dict]) -> list[dict]:
  """What results.json holds: the records sorted by key, without timings (they are not
  determined by the seed; results.jsonl keeps them), so two runs of one config are equal."""
  return [{k: v for k, v in r.items() if k != "seconds"}
          for r in sorted(records, key=lambda r: tuple(map(str, record_key(r))))]


def run_grid(args: argparse.Namespace, plan: dict, results: ResultsDir) -> None:
  done = {record_key(r) for r in results.records}
  recipe = str(augment_recipe(args))
  other = {r.get("augment", "none") for r in results.records} - {recipe}
  if other:
    raise InputError(f"--out {results.path} holds runs made with --augment "
                     f"{', '.join(sorted(other))}, not {recipe}: use the same --augment or "
                     "another --out")
  stored = int(getattr(args, "stored_size", 0) or 0)
  sizes = {r["stored_size"] for r in results.records if "stored_size" in r}
  if sizes - {stored} or (sizes and any("stored_size" not in r for r in results.records)):
    raise InputError(f"--out {results.path} holds runs with target images stored at "
                     f"{sorted(sizes)} px, not --stored-size {stored or 'input size'}: use the "
                     "same --stored-size or another --out")
  data_cache: dict = {}
  check_targets(args, plan, data_cache)
  budget = budget_of(args)
  mine = cells(plan)
  emit = grid_progress.stderr_or_quiet(args)
  grid = progress.GridProgress(
      grid_progress.planned_runs(plan, args, mine, lambda name: cv_folds(args, name)),
      saved=sum(1 for k in done if k[1:4] in set(mine)), emit=emit)
  grid.announce()

  def add(key, train_idx, val_idx, runs, result, seconds):
    record = _record(key, train_idx, val_idx, runs, args)
    record.update(_outcome(result))
    record["seconds"] = round(seconds, 3)
    results.add(record)
    grid.finished(grid_progress.run_line(key, args, cv_folds(args, key[0]), record))
    return record

  # Without early stopping, runs of a frozen-backbone strategy may train together (one batched
  # step per group of up to --batch-runs runs); the rest, and every run under --devices > 1,
  # one at a time.
  batch_runs = resolve_batch_runs(args.batch_runs) if parallel.default_mesh() is None else 1
  if budget is not None:
    batch_runs = 1
  for arch in plan["archs"]:
    if not any(c[0] == arch for c in mine):
      continue
    source = pretrain.source_for(arch, args.source, epochs=args.source_epochs, seed=args.seed,
                                 progress=not args.quiet)
    setup_cache: dict = {}
    for spec in plan["targets"]:
      if not any(c[:2] == (arch, spec) for c in mine):
        continue
      runs = TargetRuns(source, spec, args, data_cache, setup_cache, plan.get("options"))
      for shots in plan["shots"]:
        if (arch, spec, shots) not in mine:
          continue
        # One draw per (shots, repeat), shared by all strategies and LRs: paired comparison.
        draws = {}
        for repeat in range(-args.tune_repeats, args.repeats):
          seed = draw_seed(args, shots, repeat)
          draws[repeat] = (seed, *sample_kshot(runs.pool.labels, shots, seed,
                                               val_per_class=args.val_per_class,
                                               num_classes=runs.num_classes))

        def run_one(key):
          name, _, _, _, repeat, lr, hp, fold = key
          seed, train_idx, val_idx = draws[repeat]
          if fold >= 0:
            train_idx, val_idx = fold_split(runs.pool.labels, train_idx, val_idx,
                                            cv_folds(args, name), fold, seed, shots)
          t0 = time.time()
          draw = progress.draw_label(repeat, args.tune_repeats, args.repeats)
          label = f"{arch} k={shots} {draw} {name} lr={lr:g}"
          try:
            out = runs.run(name, train_idx, val_idx, lr, seed, budget, test=repeat >= 0, hp=hp,
                           on_step=progress.ticker(label, emit))
          except NonFiniteError as e:
            out = e
          return add(key, train_idx, val_idx, runs, out, time.time() - t0)

        one_cell = dict(plan, archs=[arch], targets=[spec], shots=[shots])
        tuned = choose(results.records, one_cell, args, run_missing=run_one)
        for name in plan["strategies"]:
          todo = [((name, arch, spec, shots, repeat, lr, hp, -1), *draws[repeat][1:], lr,
                   draws[repeat][0])
                  for repeat in range(args.repeats)
                  for lr, hp in eval_points(plan, args, tuned, (arch, spec, shots, name))
                  if (name, arch, spec, shots, repeat, lr, hp, -1) not in done]
          if batch_runs > 1 and len(todo) > 1 and runs.batchable(name) and \
              not knobs.strategy_of(plan, name).knobs:
            for i in range(0, len(todo), batch_runs):
              group = todo[i:i + batch_runs]
              t0 = time.time()
              outs = runs.run_many(name, [job[1:] for job in group])
              seconds = (time.time() - t0) / len(group)
              for (key, train_idx, val_idx, _, _), out in zip(group, outs):
                add(key, train_idx, val_idx, runs, out, seconds)
            continue
          for job in todo:
            run_one(job[0])


def paper_grid_records(records: list[dict], plan: dict) -> list[dict]:
  """Evaluation records on the LR grid at the paper's knob values (for 'best over LR')."""
  hp0 = {s: transfer.hp_string(knobs.strategy_of(plan, s).knob_defaults)
         for s in plan["strategies"]}
  return [r for r in records if r["strategy"] in hp0 and r.get("hp", "") == hp0[r["strategy"]]
          and r.get("role", "eval") == "eval" and r["lr"] in plan["lrs"][r["strategy"]]]


def tuned_records(records: list[dict], tuned: dict) -> list[dict]:
  """Evaluation records at each cell's tuned point (the protocol's figure)."""
  out = []
  for r in records:
    t = tuned.get((r["arch"], r["target"], r["shots"], r["strategy"]))
    if t and r.get("role", "eval") == "eval" and r["lr"] == t["choice"]["lr"] and \
        r.get("hp", "") == t["hp"]:
      out.append(r)
  return out


def tuned_summary(records: list[dict], tuned: dict) -> dict:
  """(arch, target, strategy, shots) -> {'mean', 'std', 'n', 'failed', 'lr', 'hp', 'edges',
  'steps'} at the tuned point, over evaluation draws (failed runs left out and counted)."""
  out: dict = {}
  for r in tuned_records(records, tuned):
    out.setdefault((r["arch"], r["target"], r["strategy"], r["shots"]), []).append(r)
  summary = {}
  for cell, rs in out.items():
    ok = [r for r in rs if r["status"] == "ok"]
    t = tuned[(cell[0], cell[1], cell[3], cell[2])]
    acc = np.array([r["test_acc"] for r in ok]) if ok else np.array([np.nan])
    summary[cell] = dict(mean=float(acc.mean()), std=float(acc.std()), n=len(ok),
                         failed=len(rs) - len(ok), lr=t["choice"]["lr"], hp=t["hp"],
                         edges=t["edges"],
                         steps=float(np.mean([r["steps"] for r in ok])) if ok else None)
  return summary


# The CWL paper's reading of its Table II (section 4): fine-tuning pays on a domain far from
# the source (digits from clothes), not on a near one (other clothes).
# The near domain: the embedded Fashion-MNIST targets (the other half of the source's classes,
# in either direction of the split); digits is the far one.
NEAR_TARGETS = ("fmnist:1,5,7,8,9", "fmnist:0,2,3,4,6")
CLAIMS = (
    claims.Claim("CWL", "fine-tuning beats freezing on a far domain", "finetune", "freeze",
                 where={"target": ("digits",)}, source="Table II, section 4"),
    claims.Claim("CWL", "fine-tuning does not beat freezing on a near domain", "freeze",
                 "finetune", at_least=True, margin=0.01,
                 where={"target": NEAR_TARGETS}, source="Table II, section 4"),
)


def protocol_text(args, records: Sequence[dict] = ()) -> str:
  """One paragraph saying how runs were budgeted and tuned, and the split `records` used."""
  if args.patience:
    run = (f"each run trains until its validation accuracy has not improved for "
           f"{args.patience} steps (checked every {args.eval_every}), at most {args.steps} "
           "steps, and keeps its best validation state")
  else:
    run = f"each run trains {args.steps} steps and keeps its last state"
  tune = (f"each strategy's LR is chosen per (arch, target, k) by mean validation accuracy over "
          f"{args.tune_repeats} tuning draws that are not evaluation draws (grid extended up to "
          f"{args.tune_extend} values at an edge)" if args.tune_repeats else
          "the LR is chosen per draw on that draw's validation set")
  recipe = str(augment_recipe(args))
  aug = f" Training images augmented on device: {recipe}." if recipe != "none" else ""
  if getattr(args, "stored_size", 0):
    aug += (f" Target images stored at {args.stored_size} px; the network sees "
            "Resize + CenterCrop views of them" + (" and crops of the stored pixels in "
                                                   "training." if recipe != "none" else "."))
  return (f"Protocol: {run}; {tune}.{aug} "
          f"{split_text(args.val_per_class, args.test_per_class, records)}; the test split "
          "reaches no selection.")


def tuned_table(summary: dict, plan: dict, rows: Sequence[str], labels: dict | None = None
                ) -> list[str]:
  """The protocol's table: mean (std) test accuracy at the tuned LR, chosen LR, mean steps."""
  shots, labels = plan["shots"], labels or {}
  out = ["| arch | target | strategy | " + " | ".join(f"k={k}" for k in shots) + " |",
         "|---|---|---|" + "---|" * len(shots)]
  edges = []
  for arch in plan["archs"]:
    for target in plan["targets"]:
      for strat in rows:
        cells = []
        for k in shots:
          v = summary.get((arch, target, strat, k))
          if not v:
            cells.append("-")
            continue
          hp = f" {v['hp']}" if v["hp"] else ""
          cells.append(f"{pct(v['mean'], v['std'])} lr {v['lr']:g}{hp}, "
                       f"{v['steps']:.0f} st" if v["n"] else "failed")
          if v["edges"]:
            edges.append(f"{arch}/{target}/{strat}/k={k}: {', '.join(v['edges'])}")
        out.append(f"| {arch} | {target} | {labels.get(strat, strat)} | " + " | ".join(cells)
                   + " |")
  out.append("")
  if edges:
    out += ["Chosen LR still on a grid edge after extension (the optimum may lie beyond): "
            + "; ".join(edges) + ".", ""]
  return out


def make_report(records: list[dict], plan: dict, args, title: str = "# Few-shot transfer",
                claim_list: Sequence = CLAIMS, tables=None, labels: dict | None = None,
                extra_claims=None, paper_tables=None) -> tuple[str, dict]:
  """report.md text and summary.json content, from the records alone.

  Args:
    records: every run's record (tuning and evaluation draws).
    plan, args: the grid and flags that made them.
    title: the report's first line.
    claim_list: claims tested on the tuned evaluation runs.
    tables: [(heading, strategies)] of the tuned table; default one table of every strategy.
    labels: display names of strategies.
    extra_claims: tuned evaluation records -> more claim results (`claims.evaluate` dicts),
      for claims that are not one strategy against another within a cell.
    paper_tables: (paper-grid records, best_over_lr summary) -> report lines replacing the
      default 'best over LR' and per-draw validation-selected tables.
  """
  tuned = choose(records, plan, args)
  summary = best_over_lr(paper_grid_records(records, plan), ("arch", "target", "strategy",
                                                             "shots"))
  shots = plan["shots"]
  lines = [title, "", f"Source `{args.source}`; {args.repeats} evaluation draws per cell.",
           "", protocol_text(args, records), ""]
  out_summary: dict = {"best_over_lr": {"|".join(map(str, k)): v for k, v in summary.items()}}
  if tuned:
    ts = tuned_summary(records, tuned)
    out_summary["tuned"] = {"|".join(map(str, k)): v for k, v in ts.items()}
    out_summary["tuning"] = {"|".join(map(str, k)): v for k, v in tuned.items()}
    lines += ["## Tuned on validation (the protocol's figure)", "",
              "Cells: mean (std) test accuracy in % over evaluation draws at the LR chosen on "
              "the tuning draws; the chosen LR; mean steps trained.", ""]
    shown: set = set()
    for heading, rows in (tables or [("", plan["strategies"])]):
      rows = [r for r in rows if r in plan["strategies"]]
      if not set(rows) - shown:  # only reference rows an earlier table already has
        continue
      shown |= set(rows)
      if heading:
        lines += [f"### {heading}", ""]
      lines += tuned_table(ts, plan, rows, labels)
    # Archs share their k-shot draws (the seed depends on k and the repeat): pooled per draw.
    results = [claims.evaluate(c, tuned_records(records, tuned), ("arch", "target", "shots"),
                               draw_fields=("target", "shots", "repeat"))
               for c in claim_list if {c.a, c.b} <= set(plan["strategies"])]
    if extra_claims is not None:
      results += extra_claims(tuned_records(records, tuned))
    results = [r for r in results if r["cells"]]
    if results:
      lines += claims.section(results, labels or {})
    out_summary["claims"] = results
  grid_runs = args.paper_grid or not args.tune_repeats
  if grid_runs and paper_tables is not None:
    lines += paper_tables(paper_grid_records(records, plan), summary)
  elif grid_runs:
    for title2, m, sd in (("Best over LR (test-selected, as the paper; optimistic)", "test_mean",
                           "test_std"),
                          ("Validation-selected LR per draw", "val_sel_mean", "val_sel_std")):
      lines += [f"## {title2}", "", "| arch | target | strategy | " +
                " | ".join(f"k={k}" for k in shots) + " |",
                "|---|---|---|" + "---|" * len(shots)]
      for arch in plan["archs"]:
        for target in plan["targets"]:
          for strat in plan["strategies"]:
            cells = []
            for k in shots:
              v = summary.get((arch, target, strat, k))
              cells.append(pct(v[m], v[sd]) if v else "-")
            lines.append(f"| {arch} | {target} | {(labels or {}).get(strat, strat)} | "
                         + " | ".join(cells) + " |")
      lines.append("")
  lines += [lr_grid_text(plan["strategies"], plan["lrs"], tuned), ""]
  lines += notes_section(records)
  failed = [r for r in records if r.get("status") != "ok"]
  if failed:
    lines += [f"{len(failed)} run(s) failed (non-finite loss); see results.json.", ""]
  return "\n".join(lines), out_summary


def notes_section(records: list[dict]) -> list[str]:
  """'## Data notes and warnings': each distinct sentence the records carry (conversions,
  automatic splits, skipped files, dead features), in first-seen order; [] when none."""
  seen = list(dict.fromkeys(n for r in records for n in r.get("notes", ())))
  return ["## Data notes and warnings", ""] + [f"- {n}" for n in seen] + [""] if seen else []


def plot(summary: dict, plan: dict, path: str) -> None:
  """Accuracy vs k per (arch, target): the tuned figure when there is one, else best over LR."""
  summary = summary.get("tuned") or summary.get("best_over_lr") or summary
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  archs, targets = plan["archs"], plan["targets"]
  fig, axes = plt.subplots(len(archs), len(targets), figsize=(4.5 * len(targets),
                                                            3.5 * len(archs)), squeeze=False)
  for i, arch in enumerate(archs):
    for j, target in enumerate(targets):
      ax = axes[i][j]
      for strat in plan["strategies"]:
        pts = [(k, summary.get(f"{arch}|{target}|{strat}|{k}")) for k in plan["shots"]]
        pts = [(k, v) for k, v in pts if v]
        if pts:
          m, sd = ("mean", "std") if "mean" in pts[0][1] else ("test_mean", "test_std")
          ax.errorbar([k for k, _ in pts], [100 * v[m] for _, v in pts],
                      yerr=[100 * v[sd] for _, v in pts], marker="o", capsize=3,
                      label=strat)
      ax.set_title(f"{arch} -> {target}", fontsize=9)
      ax.set_xlabel("images per class (k)")
      ax.set_ylabel("test accuracy (%)")
      ax.set_xscale("log")
      ax.set_xticks(plan["shots"], [str(k) for k in plan["shots"]])
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  return cli.main(argv, PUBLISHER, run_grid, lambda results, _: results_records(results.records),
                  lambda summary, plan, args, results, _: plot(
                      summary, plan, os.path.join(results.path, "accuracy_vs_shots.png")))


PUBLISHER = publish.Publisher(
    "experiments.fewshot", parse_args, validate,
    lambda records, plan, args, _: make_report(records, plan, args), grid_keys, record_key)


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
