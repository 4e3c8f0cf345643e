"""One target's runs of registered strategies: its data, cached frozen features, compiled steps.

`TargetRuns(source, spec, protocol, data_cache, setup_cache)` loads (or reuses) a target, caps
its test split, keeps Resize + CenterCrop views when images are stored larger than the input
(`--stored-size`), and trains one run of a strategy on a draw (`run`), or several frozen-backbone
runs together as one vmapped step (`run_many`, `jtransfer.train.batched`). Frozen-backbone
strategies with BN in eval mode train their head on backbone features computed once per image.
Runs train through `jtransfer.protocol.run.train_run`, as `jtransfer.api.fit` does.
"""
from __future__ import annotations

import logging
import sys
from typing import Mapping, Optional, Sequence

import numpy as np

from jtransfer import checks, surgery
from jtransfer.data import Batches, ImageSet, augment, load_spec
from jtransfer.data.stream import StreamOptions, is_lazy
from jtransfer.errors import InputError
from jtransfer.methods import cotuning, delta, peft_cost, transfer
from jtransfer.protocol import Budget
from jtransfer.protocol.run import train_run
from jtransfer.study import records as rec
from jtransfer.study.config import Protocol
from jtransfer.train import (accuracy, batched, init_state, make_optimizer, make_train_step,
                             predict_logits)
from jtransfer.train.loop import nonfinite_error

FEATURE_BATCH = 256
EVAL_BATCH = 500  # `predict_logits`' default: the largest batch of an evaluation forward
# Top-level params keys used in training only (`TargetRuns.cost` leaves them out of inference).
TRAINING_ONLY = (delta.FROZEN_KEY, cotuning.FROZEN_KEY, cotuning.COTUNING_KEY)


def stream_options(p: Protocol) -> Optional[StreamOptions]:
  """The --stream-threads/--stream-workers options, or None to load targets into memory."""
  if not p.stream_threads:
    return None
  return StreamOptions(threads=p.stream_threads, workers=p.stream_workers)


def stored_shape(p: Protocol, input_shape: Sequence[int]) -> tuple[int, int, int]:
  """The (H, W, C) the target images are stored at: --stored-size squares, else the input's.

  Raises:
    InputError: a stored size below the input size, or with a non-square input.
  """
  h, w, c = (int(v) for v in input_shape)
  size = int(p.stored_size or 0)
  if size == 0 or (size, size) == (h, w):
    return (h, w, c)
  if h != w:
    raise InputError(f"--stored-size needs a square input; the source's is {h}x{w}")
  if size < h:
    raise InputError(f"--stored-size {size} is smaller than the {h} px input: crops would "
                     "come from upsampled pixels")
  return (size, size, c)


def load_target(spec: str, shape, p: Protocol, data_cache: dict):
  """The target `spec` stored at `shape`, loaded once per invocation (`data_cache`)."""
  key = (spec, tuple(shape))
  if key not in data_cache:
    data_cache[key] = load_spec(spec, tuple(shape), flag="--target", data_dir=p.data_dir,
                                stream=stream_options(p))
  return data_cache[key]


def cap_per_class(s: ImageSet, n: int) -> ImageSet:
  """The first `n` images of each class (deterministic), or all when n == 0."""
  if n <= 0:
    return s
  keep = np.concatenate([np.flatnonzero(s.labels == c)[:n] for c in range(s.num_classes)])
  return s.take(np.sort(keep))


class TargetRuns:
  """Everything shared by the runs of one (arch, target): data, cached features, compiled fns."""

  def __init__(self, source: transfer.Source, spec: str, protocol: Protocol, data_cache: dict,
               setup_cache: dict, options: Optional[Mapping[str, dict]] = None,
               source_label: str = "", quiet: bool = False):
    """Loads (or reuses) the target.

    Args:
      source: the pretrained source; spec: the target's dataset spec.
      protocol: the run settings (batch size, augmentation, stored size, test cap, ...).
      data_cache, setup_cache: dicts shared by the invocation (loaded targets; setups and
        compiled steps, shared by every target with the same class count).
      options: arm -> extra `Strategy.build` keyword arguments (DELTA's `config`).
      source_label: names the source in the dead-features warning.
    """
    self.p, self.quiet = protocol, quiet
    shape = stored_shape(protocol, source.input_shape)
    data = load_target(spec, shape, protocol, data_cache)
    self.source, self.spec = source, spec
    self.options = dict(options or {})
    self.recipe = augment.parse(protocol.augment)
    self.pool = data.train
    self.test = cap_per_class(data.test, protocol.test_per_class)
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
    self._setups = setup_cache.setdefault((id(source), self.num_classes), {})
    self._features = None
    # What loading did to the data, then a check of the features: reports repeat these.
    self.notes = tuple(data.notes) + self._feature_notes(source_label)

  def _feature_notes(self, source_label: str) -> tuple[str, ...]:
    """A dead-features warning (`checks.dead_features_note`), logged, or nothing."""
    n = min(FEATURE_BATCH, len(self.pool))  # one batch: the feature cache's compiled shape
    rows = np.sort(np.random.default_rng(0).choice(len(self.pool), n, replace=False))
    feats = transfer.extract_features(self.source, self.num_classes, self.pool.images[rows],
                                      batch_size=FEATURE_BATCH)
    note = checks.dead_features_note(feats, f"--source {source_label} on --target "
                                            f"{self.spec} ({self.source.arch})")
    if note is None:
      return ()
    logging.getLogger(__name__).warning("%s", note)
    return (note,)

  def features(self, idx: np.ndarray):
    """Head inputs for pool rows `idx` and for the test set, computed once per image (only
    the rows runs ask for, in fixed-size batches so one compiled forward serves every call)."""
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

  def setup(self, name: str, knobs: Mapping[str, float], steps: int,
            strategy: Optional[str] = None):
    """(Setup, compiled step, optimizer, head_only) per (arm, knob values, step cap), built
    once. `strategy`: the registered strategy (default `name`); BatchNorm in the mode
    --bn asks for where the strategy follows it (`jtransfer.methods.bn_rule`)."""
    key = (name, rec.hp_text(knobs), steps, self.p.bn)
    if key not in self._setups:
      s = transfer.get_strategy(strategy or name)
      setup = s.build(self.source, self.num_classes, steps, bn=self.p.bn,
                      **self.options.get(name, {}),
                      **{k: v for k, v in knobs.items() if k != "lr"})
      recipe = self.recipe
      head_only = s.head_only and not self.p.no_feature_cache and not recipe.active
      if s.head_only and recipe.active and not self.quiet:
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
      self._setups[key] = (setup, step, opt, head_only)
    return self._setups[key]

  def cost(self, name: str, knobs: Mapping[str, float], steps: int, train_idx,
           strategy: Optional[str] = None, variables: Optional[tuple] = None) -> dict:
    """{'trained_params', 'extra_flops'} of the arm at these knobs (`peft_cost`: entries the
    optimiser updates, head included; inference FLOPs per image beyond the target model after
    merging), computed once per (arm, knobs) from the full model's params, whatever path
    (cached features, batched) its runs take.

    Args:
      train_idx: a run's k-shot rows (LP-FT's and Co-Tuning's init read every class); the
        counts do not depend on which.
      variables: (params, batch_stats) of a run's full model at its start, when the run has
        them (saves an init: DELTA's computes its attention); None = `Setup.init`.
    """
    key = ("cost", name, rec.hp_text(knobs), steps)
    if key not in self._setups:
      setup = self.setup(name, knobs, steps, strategy)[0]
      params, stats = variables or setup.init(0, self.pool.images[train_idx],
                                              self.pool.labels[train_idx])
      # Training-time constants and heads (DELTA's frozen source copy, Co-Tuning's source
      # head) are not deployed: the inference cost is the rest's.
      deployed = {k: v for k, v in params.items() if k not in TRAINING_ONLY}
      self._setups[key] = dict(
          trained_params=peft_cost.trained_params(setup, params),
          extra_flops=peft_cost.peft_cost(setup, deployed, stats,
                                          self.source.input_shape).extra_flops)
    return self._setups[key]

  def _prepare(self, built, train_idx, val_idx, lr: float, seed: int):
    """(initial state, batches, x_val, x_test, forward) of one run."""
    setup, _, opt, head_only = built
    params, stats = setup.init(seed, self.pool.images[train_idx], self.pool.labels[train_idx])
    if head_only:
      rows, test_f = self.features(np.concatenate([train_idx, val_idx]))
      params, stats = {"head": params["head"]}, {}
      x_train, x_val, x_test = rows[:len(train_idx)], rows[len(train_idx):], test_f
      forward = transfer.head_forward
    else:
      # Augmented runs crop the stored pixels (their step brings them to the input size).
      train_from = self.stored if self.stored is not None and self.recipe.active else self.pool
      x_train, x_val, x_test = (train_from.images[train_idx], self.pool.images[val_idx],
                                self.test.images)
      forward = setup.forward
    batches = Batches(x_train, self.pool.labels[train_idx], self.p.batch_size, seed)
    return init_state(params, stats, opt, seed, lr), batches, x_val, x_test, forward

  def _evaluate(self, state, forward, x_val, val_idx, x_test, test: bool = True) -> dict:
    val_acc = (accuracy(predict_logits(forward, state.params, state.batch_stats, x_val),
                        self.pool.labels[val_idx]) if len(val_idx) else float("nan"))
    # Tuning runs never see the test split (test=False): they only choose hyper-parameters.
    # The test split goes through in batches of the validation set's size, so the forward the
    # run compiled for its validation checks serves the test split too (one compile fewer per
    # strategy and target: a cold `make demo` compiles each forward once).
    bs = min(len(val_idx), EVAL_BATCH) if len(val_idx) else EVAL_BATCH
    test_acc = (accuracy(predict_logits(forward, state.params, state.batch_stats, x_test, bs),
                         self.test.labels) if test else None)
    return dict(test_acc=test_acc, val_acc=val_acc)

  def run(self, name: str, train_idx, val_idx, point: Mapping[str, float], seed: int,
          steps: int, budget: Optional[Budget] = None, test: bool = True, on_step=None,
          strategy: Optional[str] = None) -> dict:
    """One run, alone (the plain path).

    Args:
      name, train_idx, val_idx, seed: the arm, the k-shot and validation rows of the pool,
        the run's seed.
      point: {'lr', knob: value, ...}.
      steps: the step cap; budget: stop by validation patience and keep the best validation
        state (None: `steps` steps, the last state).
      test: evaluate on the test split (False for tuning runs).
      on_step: (step, cap, val acc) after each step: a long run's progress line.

    Returns:
      {'test_acc', 'val_acc', 'steps' (trained), 'best_step' (kept), 'stopped',
      'trained_params', 'extra_flops' (`cost`), 'bn' (the BatchNorm mode it trained in,
      `bn_mode`)[, 'filter_distance']}.

    Raises:
      NonFiniteError: a step was not finite.
    """
    built = self.setup(name, point, steps, strategy)
    setup, step, _, head_only = built
    state, batches, x_val, x_test, forward = self._prepare(built, train_idx, val_idx,
                                                           point["lr"], seed)
    val = None
    if budget is not None and len(val_idx):
      labels = self.pool.labels[val_idx]
      val = lambda st: accuracy(predict_logits(forward, st.params, st.batch_stats, x_val),
                                labels)
    out = train_run(state, step, batches.at, steps=steps, budget=budget, val_acc=val,
                    finalize=setup.finalize, keep_initial=not head_only, on_step=on_step)
    state, info, initial = out.state, out.info, out.initial
    info.pop("curve")
    if not head_only:  # how far training moved the conv filters (DELTA's Fig. 3 measure)
      # Per-run constants (DELTA's frozen source copy and attention) are not trained filters.
      start = {k: v for k, v in initial.items() if k != delta.FROZEN_KEY}
      info["filter_distance"] = surgery.mean_filter_distance(state.params, start)
    return dict(self._evaluate(state, forward, x_val, val_idx, x_test, test), **info,
                **self.cost(name, point, steps, train_idx, strategy,
                            None if head_only else (initial, state.batch_stats)),
                bn=self.bn_mode(name, strategy))

  def bn_mode(self, name: str, strategy: Optional[str] = None) -> str:
    """The BatchNorm mode runs of arm `name` train in under this protocol's --bn."""
    return transfer.get_strategy(strategy or name).bn_mode(self.p.bn)

  def batchable(self, name: str, steps: int, strategy: Optional[str] = None) -> bool:
    """Whether runs of `name` (at its default knobs) can train together."""
    key = ("batchable", name, steps)
    if key not in self._setups:  # asked once per (target, k) group: initialise params once
      setup, _, opt, head_only = self.setup(name, {}, steps, strategy)
      if head_only:
        self._setups[key] = True
      elif setup.finalize is not None or self.recipe.active:  # no finalize, no augmentation
        self._setups[key] = False
      else:
        params, _ = setup.init(0, self.pool.images[:1], self.pool.labels[:1])
        self._setups[key] = batched.batchable(opt, params)
    return self._setups[key]

  def run_many(self, name: str, jobs: Sequence[tuple], steps: int,
               strategy: Optional[str] = None) -> list:
    """Runs sharing their frozen params, trained as one batched step; same results as `run`.

    Args:
      name: an arm for which `batchable(name, steps)`.
      jobs: (train_idx, val_idx, lr, seed) per run; every train set of the same size.
      steps: the fixed number of steps.

    Returns:
      Per job, the dict `run` returns, or the NonFiniteError `run` would have raised.
    """
    built = self.setup(name, {}, steps, strategy)
    setup, _, opt, head_only = built
    key = ("batched", name, steps)
    if key not in self._setups:
      loss = transfer.head_loss_fn() if head_only else setup.loss_fn
      self._setups[key] = batched.make_batched_train_step(loss, opt)
    bstep = self._setups[key]
    prepared = [self._prepare(built, *job) for job in jobs]
    bstate, frozen = batched.stack_states([p[0] for p in prepared], opt)
    errors: list = [None] * len(jobs)
    for step in range(steps):
      bstate, m = bstep(bstate, frozen, batched.stack_batches([p[1].at(step) for p in prepared]))
      finite = np.asarray(m["finite"])
      for r in np.flatnonzero(~finite):
        if errors[r] is None:  # the plain path stops at its first non-finite step
          errors[r] = nonfinite_error(step, {k: np.asarray(v)[r] for k, v in m.items()})
    out, cost = [], self.cost(name, {}, steps, jobs[0][0], strategy)
    for r, (_, _, x_val, x_test, forward) in enumerate(prepared):
      if errors[r] is not None:
        out.append(errors[r])
        continue
      state = batched.unstack_state(bstate, frozen, r)
      out.append(dict(self._evaluate(state, forward, x_val, jobs[r][1], x_test),
                      steps=steps, best_step=steps, stopped="fixed", **cost,
                      bn=self.bn_mode(name, strategy)))
    return out
