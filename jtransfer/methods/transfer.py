"""Transfer a pretrained source to a new task: the source model, strategies, and one run.

A `Strategy` turns (source, number of target classes, learning rate) into a `Setup`: the target
model, its initial variables, an `Optimizer` (which params train) and a `loss_fn` for the generic
train step. Method files (cwl, delta, ...) add strategies with `register`. BatchNorm's mode is
one setting every `build` takes (`bn=`, the rule of `jtransfer.methods.bn_rule`).
"""
from __future__ import annotations

import dataclasses
import inspect
import sys
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import numpy as np

from jtransfer import checks, models, surgery
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import bn_rule
from jtransfer.methods.strategy_build import checked_build, strategy_doc
from jtransfer.train import evaluate, optim


@dataclasses.dataclass(frozen=True)
class Source:
  """A pretrained model and what it needs from its inputs.

  Attributes:
    arch: registered architecture name.
    config: the model config (as `models.model_config`), head sized for the source classes.
    variables: {'params', maybe 'batch_stats'} as numpy trees.
    input_shape: (H, W, C) the model was trained at.
    mean, std: per-channel normalisation in [0, 1] units.
    meta: everything else saved with it (source spec, accuracy, ...).
  """
  arch: str
  config: dict
  variables: dict
  input_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  meta: dict = dataclasses.field(default_factory=dict)

  @property
  def model(self) -> nn.Module:
    return models.from_config(self.arch, self.config)


@dataclasses.dataclass
class Setup:
  """What a strategy trains, built once per (strategy, source, target) and reused across runs.

  The learning rate is not baked in (the optimizer has `injected_lr`), so one compiled train
  step and one compiled eval forward serve every run of a grid.

  Attributes:
    model: the target model.
    init: (seed, train_images, train_labels) -> (params, batch_stats): source weights loaded,
      new layers seeded. The run's training images (uint8) and labels are given for
      strategies that derive per-run constants from them (e.g. DELTA's attention weights,
      stored as frozen params so they reach `loss_fn` like any other leaf).
    optimizer: which params train and how; `optimizer.init(params, lr)`.
    loss_fn: for the generic train step.
    forward: (params, batch_stats, uint8 images) -> logits, eval mode, jitted.
    finalize: optional (trained params, initial params) -> the params evaluated and kept, for
      strategies that transform the trained weights (WiSE-FT's interpolation); None = as
      trained.
  """
  model: nn.Module
  init: Callable[[int, np.ndarray, np.ndarray], tuple[Any, Any]]
  optimizer: optim.Optimizer
  loss_fn: Callable
  forward: Callable
  finalize: Optional[Callable] = None

  def __post_init__(self):
    # Python callers pass their own arrays here: float pixels (divided by 255 a second time
    # in the step) and labels past the head (a NaN loss, no error) are refused on the host.
    init, num_classes = self.init, getattr(self.model, "num_classes", None)

    def checked_init(seed, images=None, labels=None):
      if images is not None:
        checks.check_pixels(images, "Setup.init images")
      if labels is not None and num_classes is not None:
        checks.check_labels(labels, num_classes, "Setup.init labels")
      # Some strategies' inits take the run's images and labels as optional (CWL, FiLM).
      return init(seed) if images is None and labels is None else init(seed, images, labels)

    self.init = checked_init


def target_model(source: Source, num_classes: int, **overrides) -> nn.Module:
  """The source architecture with a new `num_classes` head on the conv features.

  As in the CWL paper, the target keeps all conv layers and adds one fully connected layer:
  hidden dense layers of the source (fc6, fc7) are dropped.
  """
  config = dict(source.config, num_classes=num_classes, **overrides)
  if "dense_widths" in config:
    config["dense_widths"] = []
  return models.from_config(source.arch, config)


def init_target(source: Source, model: nn.Module, seed: int,
                dont_load: tuple[str, ...] = ("head/.*",)) -> tuple[Any, Any]:
  """Fresh variables for `model` with every source param loaded except `dont_load`."""
  abstract = models.abstract_variables(model, tuple(source.input_shape))
  new_paths = surgery.select(abstract["params"], dont_load, what="dont_load")
  fresh = models.init_params_subset(model, jax.random.PRNGKey(seed), source.input_shape,
                                    new_paths)
  # Source layers the target does not have (fc6, fc7) are dropped by restrict_to; every target
  # param must come from the source unless `dont_load` says otherwise.
  loaded = surgery.merge_params(
      abstract["params"], surgery.restrict_to(source.variables["params"], abstract["params"]),
      dont_load, what="source model")
  fresh_flat = surgery.flatten(fresh)
  params = surgery.map_with_path(lambda p, v: fresh_flat[p] if p in fresh_flat else v, loaded)
  stats = abstract.get("batch_stats", {})
  if stats:
    stats = surgery.merge_params(stats, surgery.restrict_to(source.variables["batch_stats"],
                                                            stats), what="source BN stats")
  return params, stats


def ce_loss_fn(model: nn.Module, mean, std, *, bn_train: bool = False,
               apply: Callable = models.apply_model) -> Callable:
  """Cross-entropy loss_fn for the generic step. BN in eval mode unless `bn_train`; `apply`
  runs the model (`models.apply_model`, or a reparametrised one such as CWL's or FiLM's)."""

  def loss_fn(params, batch_stats, batch, rng):
    x = normalize(batch["image"], mean, std)
    logits, new_stats, _ = apply(model, params, batch_stats, x, train=bn_train, rng=rng)
    ce = evaluate.cross_entropy(logits, batch["label"])
    return ce, ({"ce": ce}, new_stats if bn_train else batch_stats)

  return loss_fn


def eval_forward(model: nn.Module, mean, std, apply: Callable = models.apply_model) -> Callable:
  """Jitted eval-mode forward from pixels in [0, 255] to logits (`apply` as in `ce_loss_fn`).

  uint8 from the data pipeline, or float pixels on the same scale (augmentation's crops and
  distillation's teacher pass on device, `methods/distill.py`); raw user arrays are checked
  where they enter (`Setup.init`, `jtransfer.api`), not here."""
  @jax.jit
  def forward(params, batch_stats, images):
    logits, _, _ = apply(model, params, batch_stats, normalize(images, mean, std))
    return logits
  return forward


# ----------------------------------------------------------------------------- strategies
@dataclasses.dataclass(frozen=True)
class Strategy:
  """A transfer strategy.

  Attributes:
    name: flag value in `--strategies`.
    paper_lrs: the learning-rate grid of `--lrs paper`.
    build: (source, num_classes, total_steps) -> Setup; total_steps is the length of every
      run, for schedules.
    head_only: trains only a new head on a frozen backbone with BN in eval mode, so backbone
      features can be computed once and cached (same accuracies as the full forward).
    description: one line for reports.
    knobs: the method's own hyper-parameters besides the LR, name -> validation grid (sorted);
      `build` takes each as a keyword argument.
    knob_defaults: the paper's value of each knob (what `build` uses when not given).
    cv_folds: the paper chooses the knobs by this many-fold cross-validation on the training
      pool (0: on a validation set).
    knob_bounds: knob -> (low, high): tuning never extends that knob's grid past them.
    doc: what it trains, with which optimiser and loss, its BN mode and its source; default
      the docstring of the module that defines `build` (each method file documents its
      strategies there). With the fields above it becomes the object's `__doc__`, so
      `help(get_strategy(name))` shows it.
    bn_modes: the BatchNorm modes it supports (`bn_rule`: ('train', 'frozen') for the
      fine-tuning family, whose `build` takes `bn_train`; ('frozen',) for strategies that
      keep every source kernel fixed, the default).
    recipe_bn: the mode `build` runs without a `bn` (the strategy's own recipe, and what
      folders made before strategies took a mode ran).

  `build` is wrapped so that knobs it does not take are refused naming the ones it does, and
  it takes the reserved keyword `bn` ('train' or 'frozen'; `bn_rule.resolve`): a strategy
  that supports the mode asked for runs it, any other runs its only mode.
  """
  name: str
  paper_lrs: tuple[float, ...]
  build: Callable[..., Setup]
  head_only: bool = False
  description: str = ""
  knobs: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
  knob_defaults: Mapping[str, float] = dataclasses.field(default_factory=dict)
  cv_folds: int = 0
  knob_bounds: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=dict)
  doc: str = ""
  bn_modes: tuple[str, ...] = bn_rule.FROZEN_ONLY
  recipe_bn: str = bn_rule.FROZEN

  def __post_init__(self):
    # Frozen: set through object.__setattr__, once, at construction.
    object.__setattr__(self, "__doc__", strategy_doc(self))
    object.__setattr__(self, "build", checked_build(self, self.build))

  def bn_mode(self, bn: Optional[str]) -> str:
    """The BatchNorm mode its runs train in when asked for `bn` (None: `recipe_bn`)."""
    return bn_rule.resolve(self.bn_modes, bn, self.recipe_bn)


STRATEGIES: dict[str, Strategy] = {}


_IMPORTED = []


def _import_methods() -> None:
  # Each method module registers its strategies when imported; import them all, once per
  # process: a long grid must not pick up a method file added to the tree while it runs.
  if _IMPORTED:
    return
  import importlib
  import pkgutil
  import jtransfer.methods as pkg
  for info in pkgutil.iter_modules(pkg.__path__):
    importlib.import_module(f"jtransfer.methods.{info.name}")
  _IMPORTED.append(True)


FINETUNE_LRS = (1e-5, 5e-5, 1e-4, 5e-4, 1e-3)  # CWL paper, finetuning runs
FREEZE_LRS = (1e-3, 5e-3, 1e-2, 5e-2)  # CWL paper, freeze runs


def register(strategy: Strategy) -> Strategy:
  """Adds a strategy to `STRATEGIES` (name must be new)."""
  if strategy.name in STRATEGIES:
    raise ValueError(f"strategy {strategy.name!r} registered twice")
  STRATEGIES[strategy.name] = strategy
  return strategy


def get_strategy(name: str) -> Strategy:
  """The registered strategy `name` (method modules register theirs on import)."""
  _import_methods()
  if name not in STRATEGIES:
    raise InputError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
  return STRATEGIES[name]


def rule_setup(source: Source, num_classes: int, rules: list[tuple[str, str]],
               groups: dict, loss_fn: Optional[Callable] = None,
               bn_train: bool = False) -> Setup:
  """A Setup from optimizer rules over the standard target model (CE loss by default, BN in
  train mode with `bn_train`)."""
  model = target_model(source, num_classes)
  params, _ = init_target(source, model, 0)
  optimizer = optim.make_optimizer(params, rules, groups, injected_lr=True)
  return Setup(model, lambda seed, images=None, labels=None: init_target(source, model, seed),
               optimizer,
               loss_fn or ce_loss_fn(model, source.mean, source.std, bn_train=bn_train),
               eval_forward(model, source.mean, source.std))


def _build_freeze(source, num_classes, total_steps):
  return rule_setup(source, num_classes, [("head/.*", "head"), (".*", optim.FROZEN)],
                    {"head": optim.adam(1.0)})


def _build_finetune(source, num_classes, total_steps, bn_train: bool = False):
  return rule_setup(source, num_classes, [(".*", "all")], {"all": optim.adam(1.0)},
                    bn_train=bn_train)


def _build_finetune_bn(source, num_classes, total_steps):
  model = target_model(source, num_classes)
  return rule_setup(source, num_classes, [(".*", "all")], {"all": optim.adam(1.0)},
                    ce_loss_fn(model, source.mean, source.std, bn_train=True))


register(Strategy("freeze", FREEZE_LRS, _build_freeze, head_only=True,
                  description="conv layers frozen (BN running stats), new linear head, Adam",
                  doc="Trains only a new linear head (Adam at the run's LR, no weight decay) "
                      "on the frozen source backbone; BN in eval mode with the source's "
                      "running statistics; cross-entropy loss. The CWL paper's 'freeze'."))
register(Strategy("finetune", FINETUNE_LRS, _build_finetune,
                  description="all layers trained, new linear head, Adam",
                  doc="Trains every parameter (Adam at the run's LR, no weight decay) from the "
                      "source weights plus a new linear head; cross-entropy loss. The CWL "
                      "paper's 'finetune'. BN: bn='train' (the study runner's and the API's "
                      "default) as 'finetune_bn'; bn='frozen' (and build without bn) the "
                      "source's running statistics, not updated (every folder published before "
                      "--bn).", bn_modes=bn_rule.BOTH))
# BN in train mode: batch statistics in the forward, running averages updated (evaluation uses
# them), as torchvision's finetuning recipes and the independent PyTorch run of issue 16 do.
register(Strategy("finetune_bn", FINETUNE_LRS, _build_finetune_bn,
                  description="all layers trained, BN batch stats while training (running "
                              "averages updated), new linear head, Adam",
                  doc="As 'finetune' (Adam, every parameter, new head, cross-entropy), but BN "
                      "in train mode: batch statistics in the forward pass and running "
                      "averages updated, which evaluation then uses (torchvision's recipe); "
                      "always, whatever bn asks (its published records were made so).",
                  bn_modes=bn_rule.TRAIN_ONLY, recipe_bn=bn_rule.TRAIN))


# ----------------------------------------------------------------------------- features
def extract_features(source: Source, num_classes: int, images: np.ndarray,
                     batch_size: int = 500) -> np.ndarray:
  """Input of the target head (the 'features' tap) for uint8 `images`, eval mode.

  The jitted extractor is built once per (source, num_classes) and reused across calls.
  """
  key = (id(source), num_classes)
  if key not in _EXTRACTORS or _EXTRACTORS[key][0] is not source:
    model = target_model(source, num_classes)
    params, stats = init_target(source, model, 0)

    @jax.jit
    def feats(params, stats, x):
      _, _, taps = models.apply_model(model, params, stats,
                                      normalize(x, source.mean, source.std), taps=("features",))
      return taps["features"]

    _EXTRACTORS[key] = (source, feats, params, stats)
  _, feats, params, stats = _EXTRACTORS[key]
  return evaluate.predict_logits(feats, params, stats, images, batch_size)


_EXTRACTORS: dict = {}


def head_loss_fn() -> Callable:
  """CE loss of a linear head (params {'head': {kernel, bias}}) applied to cached features."""

  def loss_fn(params, batch_stats, batch, rng):
    logits = batch["image"] @ params["head"]["kernel"] + params["head"]["bias"]
    ce = evaluate.cross_entropy(logits, batch["label"])
    return ce, ({"ce": ce}, batch_stats)

  return loss_fn


def head_forward(params, batch_stats, feats):
  return feats @ params["head"]["kernel"] + params["head"]["bias"]


def validate_source_input(source: Source, image_shape: tuple[int, ...], what: str) -> None:
  if tuple(image_shape) != tuple(source.input_shape):
    raise InputError(f"{what} images are {tuple(image_shape)} but the source model takes "
                     f"{tuple(source.input_shape)}")


def hp_string(knobs: Mapping[str, float]) -> str:
  """Canonical text of knob values ('alpha=0.01,beta=0.01'; '' for none), a record field."""
  return ",".join(f"{k}={float(v):.6g}" for k, v in sorted(knobs.items()))


def parse_hp(text: str) -> dict[str, float]:
  """Inverse of `hp_string`."""
  return {k: float(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}


def lr_grid(strategy: Strategy, lrs: Optional[str]) -> tuple[float, ...]:
  """`--lrs` value: 'paper' (the strategy's grid) or a comma list of floats."""
  if lrs in (None, "paper"):
    return strategy.paper_lrs
  try:
    values = tuple(float(v) for v in lrs.split(","))
  except ValueError:
    raise InputError(f"--lrs {lrs!r}: expected 'paper' or a comma list of numbers") from None
  if any(not np.isfinite(v) or v <= 0 for v in values):
    raise InputError(f"--lrs {lrs!r}: learning rates must be finite numbers > 0")
  return values


# ----------------------------------------------------------------------------- persistence
def save_source(directory: str, source: Source) -> None:
  """Saves a source model with its config (no pickled classes), atomically."""
  from jtransfer.train import checkpoint
  meta = dict(source.meta, arch=source.arch, config=source.config,
              input_shape=list(source.input_shape), mean=list(source.mean), std=list(source.std))
  checkpoint.save_model(directory, source.variables, meta)


def load_source(directory: str) -> Source:
  """Loads a source saved by `save_source` (or converted from torchvision weights)."""
  from jtransfer.train import checkpoint
  variables, meta = checkpoint.load_model(directory)
  meta = dict(meta)
  try:
    arch, config = meta.pop("arch"), meta.pop("config")
    shape, mean, std = meta.pop("input_shape"), meta.pop("mean"), meta.pop("std")
  except KeyError as e:
    raise InputError(f"model checkpoint {directory} lacks {e} in meta.json") from None
  source = Source(arch, config, variables, tuple(shape), tuple(mean), tuple(std), meta)
  model = source.model
  fresh = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0), tuple(shape)))
  surgery.merge_params(fresh["params"], variables["params"], what=f"checkpoint {directory}")
  return source
