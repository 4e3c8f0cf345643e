"""A zoo of base models for base-model selection (sec. 4.1 of base-model-selection-metrics).

  python -m experiments.model_zoo --out results/model_zoo

trains (once; cached under .cache/zoo/<name>) the small architectures on class-wise subsets of
the source classes and on "horizontal" splits (the same classes, fewer images per class), and
writes report.md / results.json listing each model's source test accuracy and size.

Default zoo (15 models): 3 families x 5 sources.
  * families: `vgg_s`, `resnet_s`, and `resnet_s_narrow` (resnet_s with config
    stage_widths (16, 32, 64), stem_width 16: a zoo variant by config, not a new arch);
  * class-wise: Fashion-MNIST {0,2,3,4,6} (the embedded source), {0,2,4} and {3,4,6};
  * horizontal: {0,2,3,4,6} with 100%, 30% and 10% of its images per class (nested subsets).
The two 3-class subsets have the same class count on purpose: models of one family and one
class count share a compiled train step, which on 2 CPU cores costs more than the training.

Schedule. The paper trains 30 epochs with SGD, lr 0.01, x0.1 every 7 epochs. Here: SGD
(momentum 0.9, weight decay 5e-4, neither stated in the paper), lr x0.1 at 7/30, 14/30, 21/30
and 28/30 of the run (the paper's shape, compressed), for `--epochs` (default 3) epochs over at
most `--per-class` (default 1000) images per class: a CPU-sized shortening, so horizontal splits
also get proportionally fewer steps, as in the paper. BN in train mode. The initial lr is 0.05
(`--zoo-lr`; paper 0.01): with ~100x fewer steps than the paper, 0.01 leaves the models weak
(measured, 3 epochs of 300 images/class of {0,2,3,4,6}: source test accuracy resnet_s 0.62 /
vgg_s 0.41 at lr 0.01 against 0.69 / 0.60 at 0.05).
Cost: on the shared 2-core machine it was written on (load ~10), the 15 models at 3 epochs of
<= 300 images/class trained in 4.5 minutes in all; the default (<= 1000/class) is ~3x that.

The training helpers here (`train_classifier`, `fit_step_decay`, `evaluate`) are shared with
experiments.model_selection and experiments.truncation. They normalise images once in numpy and
cache compiled steps per model config, so every zoo member (or fine-tune) with the same config
reuses one compilation; experiments.pretrain.pretrain compiles afresh per call and has a cosine
schedule only, which is why it is not used here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments.fewshot import cap_per_class
from experiments.report import ResultsDir
from experiments import cli
from jtransfer import models, surgery
from jtransfer.data import Batches, ImageSet, channel_stats, load_spec, parse_spec
from jtransfer.data.fewshot import subset_classes
from jtransfer.errors import InputError
from jtransfer.methods import selection, transfer
from jtransfer.protocol import fit_converged, progress
from jtransfer.train import (cross_entropy, fit, init_state, make_optimizer, make_train_step,
                             predict_logits, sgd)

CACHE_ROOT = os.environ.get("JTRANSFER_CACHE", ".cache")
# family -> (registered arch, config overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "vgg_s": ("vgg_s", {}),
    "resnet_s": ("resnet_s", {}),
    "resnet_s_narrow": ("resnet_s", {"stage_widths": (16, 32, 64), "stem_width": 16}),
}
DEFAULT_CLASS_SETS = "0,2,3,4,6;0,2,4;3,4,6"
DEFAULT_FRACTIONS = "1,0.3,0.1"
# The paper's step decay (x0.1 every 7 of 30 epochs) as fractions of a run of any length.
PAPER_DECAY_AT = (7 / 30, 14 / 30, 21 / 30, 28 / 30)
TINY = dict(families="resnet_s_narrow", class_sets="0,2,3;4,6,8", fractions="1,0.5",
            epochs=0.5, per_class=20, test_per_class=10, batch_size=16)


# ----------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """How a classifier is trained: SGD with the paper's step decay compressed to the run.

  Attributes:
    lr: initial learning rate (paper: 0.01).
    momentum, weight_decay: SGD momentum and coupled L2 decay (not stated in the paper).
    batch_size: images per step.
    bn_train: BN uses batch statistics and updates its running averages.
    decay_at: fractions of the run where the lr is multiplied by `decay_factor`.
    decay_factor: paper: 0.1.
  """
  lr: float = 0.01
  momentum: float = 0.9
  weight_decay: float = 5e-4
  batch_size: int = 64
  bn_train: bool = True
  decay_at: tuple[float, ...] = PAPER_DECAY_AT
  decay_factor: float = 0.1


class Compiled:
  """Compiled train steps and eval forwards, one per (model, train config), reused by runs.

  The inputs are float32 images already normalised with the source's statistics (see
  `prenormalize`), so nothing run-specific is baked into a compilation.
  """

  def __init__(self):
    self._steps: dict = {}
    self._forwards: dict = {}

  def step(self, model, params, config: TrainConfig):
    """(Optimizer, jitted step) for `model` (all params trained, lr injected at init)."""
    key = (model, config.momentum, config.weight_decay, config.bn_train)
    if key not in self._steps:
      opt = make_optimizer(params, [(".*", "all")],
                           {"all": sgd(1.0, config.momentum, config.weight_decay)},
                           injected_lr=True)
      self._steps[key] = (opt, make_train_step(_ce_loss(model, config.bn_train), opt))
    return self._steps[key]

  def forward(self, model, taps: tuple[str, ...] = ()) -> Callable:
    """Jitted eval forward: (params, stats, x) -> logits, or (logits, {tap: array}) with taps
    (any model tap, or `selection.LAST_CONV_OUTPUT`)."""
    key = (model, taps)
    if key not in self._forwards:
      if taps:
        fn = lambda p, s, x: _logits_taps(model, p, s, x, taps)
      else:
        fn = lambda p, s, x: models.apply_model(model, p, s, x)[0]
      self._forwards[key] = jax.jit(fn)
    return self._forwards[key]


def _logits_taps(model, params, stats, x, taps):
  # selection.apply_with_taps: models.apply_model's taps plus the last conv unit's output.
  return selection.apply_with_taps(model, params, stats, x, taps)


def _ce_loss(model, bn_train: bool) -> Callable:
  """CE loss_fn on pre-normalised float images."""

  def loss_fn(params, batch_stats, batch, rng):
    logits, new_stats, _ = models.apply_model(model, params, batch_stats, batch["image"],
                                              train=bn_train, rng=rng)
    ce = cross_entropy(logits, batch["label"])
    return ce, ({"ce": ce}, new_stats if bn_train else batch_stats)

  return loss_fn


def prenormalize(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """uint8 images to float32 (x / 255 - mean) / std, once, outside every jitted function."""
  x = images.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _set_lr(state, lr: float):
  # The optimizer's injected scale lives in its state: changing it between steps changes the
  # lr without recompiling (see jtransfer.train.optim.make_optimizer(injected_lr=True)).
  state.opt_state[1].hyperparams["step_size"] = jnp.asarray(lr, jnp.float32)
  return state


def decay_steps(config: TrainConfig, length: int) -> list[int]:
  """The steps in (0, length) at which `config`'s lr decays (its fractions of the run)."""
  return [b for b in sorted({int(round(f * length)) for f in config.decay_at} - {0})
          if b < length]


def fit_step_decay(state, step: Callable, batch_at: Callable, num_steps: int,
                   config: TrainConfig):
  """Runs `step` to `num_steps` with lr = config.lr x factor^(decays passed).

  Args:
    state: a TrainState whose optimizer was built with `injected_lr=True`.
    step: the compiled step.
    batch_at: step -> batch.
    num_steps: length of the run.
    config: lr and its decay points (fractions of `num_steps`).

  Returns:
    The trained state.
  """
  bounds = decay_steps(config, num_steps) + [num_steps]
  lr = config.lr
  for end in bounds:
    state = fit(_set_lr(state, lr), step, batch_at, end)
    lr *= config.decay_factor
  return state


def train_classifier(model, variables: dict, x: np.ndarray, y: np.ndarray, num_steps: int,
                     config: TrainConfig, compiled: Compiled, seed: int = 0):
  """Trains every param of `model` from `variables` on pre-normalised images.

  Args:
    model: a Flax model from jtransfer.models.
    variables: {'params', maybe 'batch_stats'} to start from.
    x: (N, H, W, C) float32 pre-normalised images (see `prenormalize`).
    y: (N,) int labels.
    num_steps: optimiser steps.
    config: the schedule.
    compiled: where compiled steps are shared.
    seed: batch order and step rng.

  Returns:
    (params, batch_stats) after training.
  """
  params, stats = variables["params"], variables.get("batch_stats", {})
  opt, step = compiled.step(model, params, config)
  batches = Batches(x, np.asarray(y, np.int32), config.batch_size, seed)
  state = init_state(params, stats, opt, seed, config.lr)
  state = fit_step_decay(state, step, batches.at, num_steps, config)
  return state.params, state.batch_stats


def train_classifier_converged(model, variables: dict, x: np.ndarray, y: np.ndarray,
                               val: tuple[np.ndarray, np.ndarray], budget, config: TrainConfig,
                               compiled: Compiled, seed: int = 0, on_step=None):
  """`train_classifier` under the protocol's stopping rule: validation accuracy every
  `budget.eval_every` steps, stop after `budget.patience` steps without improvement (at most
  `budget.cap`), keep the best validation state. The step decay is placed at fractions of the
  cap, so a run that stops early ends inside its schedule (as the protocol's runs do).

  Args:
    val: (pre-normalised images, labels) of the validation set.
    budget: a `jtransfer.protocol.Budget`.
    on_step: (step, cap, val acc) after each step: a long run's progress hook
      (`jtransfer.protocol.progress.ticker`), or None.
    (the rest as `train_classifier`)

  Returns:
    (params, batch_stats, info) with info from `protocol.fit_converged` (steps, best_step,
    stopped; the curve dropped).
  """
  params, stats = variables["params"], variables.get("batch_stats", {})
  opt, step = compiled.step(model, params, config)
  batches = Batches(x, np.asarray(y, np.int32), config.batch_size, seed)
  bounds = decay_steps(config, budget.cap)

  def decayed_step(state, batch):
    passed = sum(int(state.step) >= b for b in bounds)
    return step(_set_lr(state, config.lr * config.decay_factor ** passed), batch)

  val_acc = lambda state: evaluate(model, state.params, state.batch_stats, val[0], val[1],
                                   compiled)
  state, info = fit_converged(init_state(params, stats, opt, seed, config.lr), decayed_step,
                              batches.at, val_acc, budget, on_step=on_step)
  info.pop("curve", None)
  return state.params, state.batch_stats, info


def steps_per_epoch(n: int, batch_size: int) -> int:
  """Steps of one pass over `n` images, as `Batches` counts them (a partial batch is dropped)."""
  return max(1, n // max(1, min(batch_size, n)))


def evaluate(model, params, stats, x: np.ndarray, y: np.ndarray, compiled: Compiled) -> float:
  """Top-1 accuracy of `model` on pre-normalised images."""
  logits = predict_logits(compiled.forward(model), params, stats, x)
  return float(np.mean(np.argmax(logits, axis=-1) == y))


# ----------------------------------------------------------------------------- the zoo
@dataclasses.dataclass(frozen=True)
class ZooSpec:
  """One base model of the zoo.

  Attributes:
    family: a key of FAMILIES (arch + config).
    classes: source class indices of the dataset.
    fraction: share of each class's images used (horizontal split), in (0, 1]; 0 marks
      the untrained reference of `scratch_member`.
  """
  family: str
  classes: tuple[int, ...]
  fraction: float = 1.0

  @property
  def name(self) -> str:
    if self.fraction == 0:
      return f"{self.family}-scratch"
    return f"{self.family}-c{'_'.join(map(str, self.classes))}-f{round(100 * self.fraction)}"

  @property
  def arch(self) -> str:
    return FAMILIES[self.family][0]

  @property
  def config(self) -> dict:
    return dict(FAMILIES[self.family][1])


@dataclasses.dataclass(frozen=True)
class ZooSettings:
  """How every zoo member is trained (stored with it; a cached model with other settings is
  retrained).

  Attributes:
    dataset: source dataset spec without a class list ('fmnist', 'tfds:NAME', ...).
    epochs: passes over each member's training images.
    per_class: cap on a class's images before the horizontal fraction is applied.
    test_per_class: cap on source test images per class for the source accuracy.
    image_shape: (H, W, C).
    seed: subsets, init and batch order.
    lr, batch_size: see TrainConfig (momentum 0.9, weight decay 5e-4, paper decay points).
  """
  dataset: str = "fmnist"
  epochs: float = 3.0
  per_class: int = 1000
  test_per_class: int = 200
  image_shape: tuple[int, int, int] = (28, 28, 1)
  seed: int = 0
  lr: float = 0.05
  batch_size: int = 64

  def train_config(self) -> TrainConfig:
    return TrainConfig(lr=self.lr, batch_size=self.batch_size, bn_train=True)

  def as_meta(self) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class Member:
  """A trained (or loaded) zoo model."""
  spec: ZooSpec
  path: str
  source: transfer.Source

  @property
  def name(self) -> str:
    return self.spec.name


def zoo_specs(families: Sequence[str], class_sets: Sequence[Sequence[int]],
              fractions: Sequence[float]) -> list[ZooSpec]:
  """Every family on every class set at fraction 1, plus the first class set at each other
  fraction (horizontal splits of the full source, as the paper splits all of ImageNet)."""
  for f in families:
    if f not in FAMILIES:
      raise InputError(f"--families {f!r} is unknown; expected some of {', '.join(FAMILIES)}")
  for fr in fractions:
    if not 0.0 < fr <= 1.0:
      raise InputError(f"--fractions {fr}: each fraction must be in (0, 1]")
  if not class_sets or not families:
    raise InputError("the zoo needs at least one family and one class set")
  specs = []
  for fam in families:
    for i, classes in enumerate(class_sets):
      for fr in (fractions if i == 0 else (1.0,)):
        spec = ZooSpec(fam, tuple(int(c) for c in classes), float(fr))
        if spec not in specs:
          specs.append(spec)
  return specs


def horizontal_subset(s: ImageSet, per_class: int, fraction: float, seed: int) -> ImageSet:
  """Per class, the first round(fraction * min(per_class, n_c)) images of a seeded permutation.

  The permutation depends only on (seed, class), so smaller fractions are subsets of larger ones.
  """
  keep = []
  for c in range(s.num_classes):
    idx = np.flatnonzero(s.labels == c)
    n = max(1, int(round(fraction * min(per_class, len(idx)))))
    keep.append(np.random.default_rng([seed, c]).permutation(idx)[:n])
  return s.take(np.sort(np.concatenate(keep)))


def param_count(source: transfer.Source) -> int:
  """Parameters a fine-tuned target inherits (the source minus its head and hidden dense)."""
  target = transfer.target_model(source, 2)
  shapes = models.abstract_variables(target, tuple(source.input_shape))["params"]
  kept = surgery.restrict_to(source.variables["params"], shapes)
  return surgery.count({k: v for k, v in kept.items() if k != "head"})


def train_member(spec: ZooSpec, settings: ZooSettings, data, compiled: Compiled
                 ) -> transfer.Source:
  """Trains one zoo member from scratch on its class subset and horizontal fraction."""
  sub = subset_classes(data, spec.classes)
  train = horizontal_subset(sub.train, settings.per_class, spec.fraction, settings.seed)
  test = cap_per_class(sub.test, settings.test_per_class)
  mean, std = channel_stats(train.images)
  model = models.get_model(spec.arch, sub.train.num_classes, **spec.config)
  variables = models.init_model(model, jax.random.PRNGKey(settings.seed), settings.image_shape)
  config = settings.train_config()
  num_steps = max(1, int(round(settings.epochs * steps_per_epoch(len(train), config.batch_size))))
  t0 = time.time()
  params, stats = train_classifier(model, variables, prenormalize(train.images, mean, std),
                                   train.labels, num_steps, config, compiled, settings.seed)
  acc = evaluate(model, params, stats, prenormalize(test.images, mean, std), test.labels,
                 compiled)
  variables = {"params": jax.tree.map(np.asarray, params)}
  if stats:
    variables["batch_stats"] = jax.tree.map(np.asarray, stats)
  meta = dict(source_spec=f"{settings.dataset}:{','.join(map(str, spec.classes))}",
              class_names=list(sub.class_names), source_test_acc=acc, steps=num_steps,
              n_train=len(train), n_test=len(test), train_seconds=round(time.time() - t0, 1),
              zoo=dict(family=spec.family, classes=list(spec.classes), fraction=spec.fraction,
                       settings=settings.as_meta()))
  return transfer.Source(spec.arch, models.model_config(model), variables,
                         tuple(settings.image_shape), tuple(mean), tuple(std), meta)


def scratch_member(like: Member, seed: int = 0) -> Member:
  """A random-init reference for `like`'s family: the same architecture and input
  normalisation, initialised with `seed` and never trained.

  Fine-tuned like the zoo, it measures what pretraining adds: when it lands within a
  group's spread, the group's ranking has next to nothing to find.
  """
  spec = dataclasses.replace(like.spec, fraction=0.0)
  src = like.source
  variables = models.init_model(src.model, jax.random.PRNGKey(seed), tuple(src.input_shape))
  variables = jax.tree.map(np.asarray, dict(variables))
  meta = dict(src.meta, source_test_acc=None, steps=0, n_train=0, train_seconds=0.0,
              zoo=dict(src.meta.get("zoo", {}), fraction=0.0))
  return Member(spec, "", transfer.Source(src.arch, src.config, variables, src.input_shape,
                                          src.mean, src.std, meta))


def _cached(path: str, spec: ZooSpec, settings: ZooSettings) -> transfer.Source | None:
  if not os.path.isdir(path):
    return None
  try:
    source = transfer.load_source(path)
  except InputError:
    return None
  zoo = source.meta.get("zoo", {})
  want = dict(family=spec.family, classes=list(spec.classes), fraction=spec.fraction,
              settings=settings.as_meta())
  return source if zoo == want else None


def build_zoo(specs: Sequence[ZooSpec], settings: ZooSettings, root: str | None = None, *,
              log: Callable[[str], None] | None = None) -> list[Member]:
  """Loads each member from `root/<name>`, training (and caching) the ones missing.

  Args:
    specs: the zoo (see `zoo_specs`).
    settings: training settings; a cached model trained with other settings is retrained.
    root: cache directory (default .cache/zoo).
    log: progress lines (e.g. `print`), or None: the plan (members to train, cached ones
      skipped), then done/total with an ETA after each member trained
      (`jtransfer.protocol.progress.GridProgress`).

  Returns:
    Members in the order of `specs`.
  """
  root = root or os.path.join(CACHE_ROOT, "zoo")
  data, compiled, out = None, Compiled(), []
  cached = [_cached(os.path.join(root, spec.name), spec, settings) for spec in specs]
  grid = progress.GridProgress({"zoo members": len(specs)},
                               saved=sum(s is not None for s in cached), emit=log)
  grid.announce("zoo")
  for spec, source in zip(specs, cached):
    path = os.path.join(root, spec.name)
    if source is None:
      if data is None:
        data = load_spec(settings.dataset, tuple(settings.image_shape), flag="--dataset")
      source = train_member(spec, settings, data, compiled)
      transfer.save_source(path, source)
      grid.finished(f"trained zoo member {spec.name}: source acc "
                    f"{source.meta['source_test_acc']:.4f}, {source.meta['n_train']} images, "
                    f"{source.meta['train_seconds']} s")
    out.append(Member(spec, path, source))
  return out


# ----------------------------------------------------------------------------- command line
def add_zoo_args(p: argparse.ArgumentParser) -> None:
  """Zoo flags, shared with experiments.model_selection."""
  g = p.add_argument_group("base-model zoo")
  g.add_argument("--families", default=",".join(FAMILIES),
                 help=f"comma list of {', '.join(FAMILIES)}")
  g.add_argument("--class-sets", default=DEFAULT_CLASS_SETS,
                 help="';'-separated comma lists of source class indices (the first is the full "
                      "source, split horizontally)")
  g.add_argument("--fractions", default=DEFAULT_FRACTIONS,
                 help="horizontal splits of the first class set: shares of its images")
  g.add_argument("--dataset", default="fmnist", help="source dataset spec without classes")
  g.add_argument("--epochs", type=float, default=3.0, help="zoo training epochs (paper: 30)")
  g.add_argument("--per-class", type=int, default=1000,
                 help="cap on source images per class before the fraction")
  g.add_argument("--source-test-per-class", type=int, default=200)
  g.add_argument("--zoo-lr", type=float, default=0.05, help="initial lr (paper: 0.01)")
  g.add_argument("--zoo-batch-size", type=int, default=64)
  g.add_argument("--zoo-root", default=None, help="cache directory (default .cache/zoo)")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--tiny", action="store_true",
                 help="a seconds-long zoo for smoke tests: " + json.dumps(TINY))


def zoo_from_args(args: argparse.Namespace, image_shape=(28, 28, 1)
                  ) -> tuple[list[ZooSpec], ZooSettings]:
  """Validated zoo specs and settings from `add_zoo_args` flags (`--tiny` overrides them)."""
  if args.tiny:
    for k, v in TINY.items():
      setattr(args, {"test_per_class": "source_test_per_class",
                     "batch_size": "zoo_batch_size"}.get(k, k), v)
  families = [f.strip() for f in args.families.split(",") if f.strip()]
  try:
    class_sets = [[int(c) for c in cs.split(",") if c.strip()]
                  for cs in args.class_sets.split(";") if cs.strip()]
    fractions = [float(v) for v in args.fractions.split(",") if v.strip()]
  except ValueError:
    raise InputError(f"--class-sets {args.class_sets!r} / --fractions {args.fractions!r}: "
                     "expected integers and numbers") from None
  if any(len(cs) < 2 for cs in class_sets):
    raise InputError(f"--class-sets {args.class_sets!r}: every set needs at least 2 classes")
  if args.epochs <= 0 or args.per_class < 1 or args.zoo_batch_size < 1 or args.zoo_lr <= 0:
    raise InputError("--epochs, --per-class, --zoo-batch-size and --zoo-lr must be positive")
  if parse_spec(args.dataset, flag="--dataset").classes is not None:
    raise InputError(f"--dataset {args.dataset!r}: give the dataset without a class list; "
                     "--class-sets picks the classes")
  settings = ZooSettings(dataset=args.dataset, epochs=args.epochs, per_class=args.per_class,
                         test_per_class=args.source_test_per_class,
                         image_shape=tuple(image_shape), seed=args.seed, lr=args.zoo_lr,
                         batch_size=args.zoo_batch_size)
  return zoo_specs(families, class_sets, fractions), settings


def zoo_table(members: Sequence[Member]) -> list[str]:
  """Markdown rows describing the zoo."""
  lines = ["| model | family | classes | fraction | train images | steps | source acc | "
           "params (transferred) |", "|---|---|---|---|---|---|---|---|"]
  for m in members:
    meta = m.source.meta
    lines.append(f"| {m.name} | {m.spec.family} | {','.join(map(str, m.spec.classes))} | "
                 f"{m.spec.fraction:g} | {meta['n_train']} | {meta['steps']} | "
                 f"{meta['source_test_acc']:.4f} | {param_count(m.source):,} |")
  return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """The flags of `main`."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_zoo_args(p)
  cli.add_results_flags(p, "results/model_zoo", resume_help="keep the records of an earlier run")
  return p.parse_args(argv)


@cli.interruptible("experiments.model_zoo", lambda argv: parse_args(argv))
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  made_by = cli.settings("experiments.model_zoo", args)
  cli.apply_devices(args)
  t0 = time.time()
  try:
    specs, settings = zoo_from_args(args)
    results = cli.open_results(args, made_by, parse_args)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr))
    members = build_zoo(specs, settings, args.zoo_root, log=log)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  done = results.done(("model",))
  for m in members:
    if (m.name,) not in done:
      results.add(dict(model=m.name, family=m.spec.family, classes=list(m.spec.classes),
                       fraction=m.spec.fraction, path=m.path, param_count=param_count(m.source),
                       **{k: m.source.meta[k] for k in ("source_test_acc", "n_train", "steps",
                                                        "train_seconds")}))
  results.write_json("results.json", results.records)
  text = "\n".join(["# Base-model zoo", "",
                    f"{len(members)} models; settings: `{json.dumps(settings.as_meta())}`; SGD "
                    "momentum 0.9, weight decay 5e-4, lr x0.1 at 7/30, 14/30, 21/30, 28/30 of "
                    "the run (the paper's 30-epoch schedule, shortened).", ""]
                   + zoo_table(members) + [""])
  results.write_text("report.md", text)
  return cli.finish(results, text, t0)


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
