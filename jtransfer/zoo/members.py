"""The zoo of base models for base-model selection (sec. 4.1 of base-model-selection-metrics):
its members (an architecture family on a class-wise or horizontal subset of a source dataset),
how each is trained and cached, and its random-init references.

  specs = zoo_specs(["vgg_s", "resnet_s"], [(0, 2, 3, 4, 6), (0, 2, 4)], [1.0, 0.3])
  members = build_zoo(specs, ZooSettings(epochs=3), root=".cache/zoo")

Members train with `jtransfer.zoo.training` (SGD, the paper's step decay compressed to the run,
BN in train mode) and are cached as `transfer.save_source` folders under `root/<name>`; a cached
member trained with other `ZooSettings` is retrained.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Sequence

import jax
import numpy as np

from jtransfer import models, surgery
from jtransfer.data import ImageSet, channel_stats, load_spec, parse_spec
from jtransfer.data.fewshot import cap_per_class, subset_classes
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.protocol import progress
from jtransfer.zoo.training import (Compiled, TrainConfig, evaluate, prenormalize,
                                    steps_per_epoch, train_classifier)

# family -> (registered arch, config overrides)
FAMILIES: dict[str, tuple[str, dict]] = {
    "vgg_s": ("vgg_s", {}),
    "resnet_s": ("resnet_s", {}),
    "resnet_s_narrow": ("resnet_s", {"stage_widths": (16, 32, 64), "stem_width": 16}),
}
DEFAULT_ROOT = os.path.join(".cache", "zoo")


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
    """The member's folder and record name, e.g. 'vgg_s-c0_2_4-f100'."""
    if self.fraction == 0:
      return f"{self.family}-scratch"
    return f"{self.family}-c{'_'.join(map(str, self.classes))}-f{round(100 * self.fraction)}"

  @property
  def arch(self) -> str:
    """The registered architecture of the family."""
    return FAMILIES[self.family][0]

  @property
  def config(self) -> dict:
    """The family's config overrides (a fresh copy)."""
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
    """The members' schedule: SGD at `lr`, BN in train mode."""
    return TrainConfig(lr=self.lr, batch_size=self.batch_size, bn_train=True)

  def as_meta(self) -> dict:
    """JSON form, as stored in each member's meta (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclasses.dataclass
class Member:
  """A trained (or loaded) zoo model."""
  spec: ZooSpec
  path: str
  source: transfer.Source

  @property
  def name(self) -> str:
    """The spec's name."""
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

def parse_zoo(families: str, class_sets: str, fractions: str, dataset: str
              ) -> list[ZooSpec]:
  """The zoo from its text form: comma-separated families, ';'-separated comma lists of class
  indices (the first set is the full source, split horizontally), comma-separated fractions.

  Raises:
    InputError: an unknown family, a non-numeric entry, a set of fewer than 2 classes, a
      fraction outside (0, 1], or a dataset spec that carries its own class list.
  """
  fams = [f.strip() for f in families.split(",") if f.strip()]
  try:
    sets = [[int(c) for c in cs.split(",") if c.strip()] for cs in class_sets.split(";")
            if cs.strip()]
    fracs = [float(v) for v in fractions.split(",") if v.strip()]
  except ValueError:
    raise InputError(f"--class-sets {class_sets!r} / --fractions {fractions!r}: expected "
                     "integers and numbers") from None
  if any(len(cs) < 2 for cs in sets):
    raise InputError(f"--class-sets {class_sets!r}: every set needs at least 2 classes")
  if parse_spec(dataset, flag="--dataset").classes is not None:
    raise InputError(f"--dataset {dataset!r}: give the dataset without a class list; "
                     "--class-sets picks the classes")
  return zoo_specs(fams, sets, fracs)


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


def scratch_references(members: Sequence[Member], seed: int = 0) -> list[Member]:
  """One random-init reference per family (`scratch_member`), shaped and normalised as the
  family's first member."""
  first: dict = {}
  for m in members:
    first.setdefault(m.spec.family, m)
  return [scratch_member(m, seed) for m in first.values()]


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
    root: cache directory (default `DEFAULT_ROOT`, .cache/zoo of the working directory).
    log: progress lines (e.g. `print`), or None: the plan (members to train, cached ones
      skipped), then done/total with an ETA after each member trained
      (`jtransfer.protocol.progress.GridProgress`).

  Returns:
    Members in the order of `specs`.
  """
  root = root or DEFAULT_ROOT
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
