"""The selection study's flags as typed configuration (`jtransfer.study.config.flag` fields):
the zoo, the ground truth's fine-tuning protocol and the score readings. A study's `extra`
dataclass inherits the groups it offers (experiments.model_selection takes all three); each
group turns its flags into the typed values the library computes from (`ZooFlags.zoo`,
`FineTuneFlags.protocol`, `ScoreFlags.settings`), `--tiny` applied there.

The flag names and destinations are the modules' before the study runner, so published
commands and settings fingerprints read the same.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from jtransfer.errors import InputError
from jtransfer.methods import selection
from jtransfer.scoring import SCORE_SETTINGS, SELECTION_FEATURES
from jtransfer.study.config import flag
from jtransfer.study.tables import positive_floats
from jtransfer.zoo.ground_truth import FineTuneProtocol
from jtransfer.zoo.members import FAMILIES, ZooSettings, ZooSpec, parse_zoo

DEFAULT_CLASS_SETS = "0,2,3,4,6;0,2,4;3,4,6"
DEFAULT_FRACTIONS = "1,0.3,0.1"
# --tiny: a seconds-long zoo and fine-tuning for smoke tests.
TINY_ZOO = dict(families="resnet_s_narrow", class_sets="0,2,3;4,6,8", fractions="1,0.5",
                epochs=0.5, per_class=20, source_test_per_class=10, zoo_batch_size=16)
TINY_FINETUNE = dict(train_per_class=4, test_per_class=5, steps=2, ft_batch_size=8)
_TINY_HELP = "seconds-long zoo and fine-tuning for smoke tests: "


@dataclasses.dataclass(frozen=True)
class ZooFlags:
  """The zoo's flags (`jtransfer.zoo.members`)."""
  families: str = flag("--families", ",".join(FAMILIES), f"comma list of {', '.join(FAMILIES)}")
  class_sets: str = flag("--class-sets", DEFAULT_CLASS_SETS, "';'-separated comma lists of "
                         "source class indices (the first is the full source, split "
                         "horizontally)")
  fractions: str = flag("--fractions", DEFAULT_FRACTIONS, "horizontal splits of the first "
                        "class set: shares of its images")
  dataset: str = flag("--dataset", "fmnist", "source dataset spec without classes")
  epochs: float = flag("--epochs", 3.0, "zoo training epochs (paper: 30)")
  per_class: int = flag("--per-class", 1000, "cap on source images per class before the "
                        "fraction")
  source_test_per_class: int = flag("--source-test-per-class", 200, "cap on source test "
                                    "images per class (the source accuracy)")
  zoo_lr: float = flag("--zoo-lr", 0.05, "initial lr (paper: 0.01)")
  zoo_batch_size: int = flag("--zoo-batch-size", 64, "zoo training batch size")
  zoo_root: Optional[str] = flag("--zoo-root", None, "cache directory (default: zoo/ under "
                                  "$JTRANSFER_CACHE, else .cache/zoo)")
  seed: int = flag("--seed", 0, "seeds the zoo, the target draws and every run")
  tiny: bool = flag("--tiny", False, _TINY_HELP + json.dumps(TINY_ZOO), action="store_true")

  def zoo(self, image_shape=(28, 28, 1)) -> tuple[list[ZooSpec], ZooSettings]:
    """The zoo's members and training settings (`TINY_ZOO` under --tiny).

    Raises:
      InputError: a bad family, class set, fraction, dataset or training setting.
    """
    f = dataclasses.replace(self, **TINY_ZOO) if self.tiny else self
    specs = parse_zoo(f.families, f.class_sets, f.fractions, f.dataset)
    if f.epochs <= 0 or f.per_class < 1 or f.zoo_batch_size < 1 or f.zoo_lr <= 0:
      raise InputError("--epochs, --per-class, --zoo-batch-size and --zoo-lr must be positive")
    return specs, ZooSettings(dataset=f.dataset, epochs=f.epochs, per_class=f.per_class,
                              test_per_class=f.source_test_per_class,
                              image_shape=tuple(image_shape), seed=f.seed, lr=f.zoo_lr,
                              batch_size=f.zoo_batch_size)


@dataclasses.dataclass(frozen=True)
class FineTuneFlags:
  """The ground truth's fine-tuning and protocol flags (`jtransfer.zoo.ground_truth`,
  docs/protocol.md)."""
  train_per_class: int = flag("--train-per-class", 50, "labelled target images per class "
                              "(fine-tuning and metrics)")
  test_per_class: int = flag("--test-per-class", 200, "cap on target test images per class")
  steps: int = flag("--steps", 1000, "fine-tuning SGD steps (the cap of a converged run)")
  ft_lr: float = flag("--ft-lr", 0.01, "SGD LR of a fixed-steps run (--val-per-class 0)")
  ft_batch_size: int = flag("--ft-batch-size", 50, "fine-tuning batch size")
  data_dir: Optional[str] = flag("--data-dir", None, "TFDS data_dir or Fashion-MNIST "
                                 "directory")
  val_per_class: int = flag("--val-per-class", 20, "validation images per class, disjoint "
                            "from the training draw: each fine-tuning run stops by validation "
                            "patience, its LR is chosen on it; 0 = the paper's fixed --steps "
                            "at --ft-lr, no validation")
  ft_lrs: str = flag("--ft-lrs", "0.003,0.01,0.03", "SGD LR grid, one chosen per run by "
                     "validation accuracy")
  patience: int = flag("--patience", 100, "stop a run once its validation accuracy has not "
                       "improved for this many steps")
  eval_every: int = flag("--eval-every", 10, "steps between validation evaluations of a run")
  # Default 0: the folders published before session 10 ran without extension, and their
  # commands must still mean what they ran. New runs should pass --tune-extend 1 or more.
  tune_extend: int = flag("--tune-extend", 0, "when a chosen value is the first or last of "
                          "its grid, extend that grid by up to this many values on that side")
  seed: int = flag("--seed", 0, "seeds the zoo, the target draws and every run")
  tiny: bool = flag("--tiny", False, _TINY_HELP + json.dumps(TINY_FINETUNE),
                    action="store_true")

  def protocol(self) -> FineTuneProtocol:
    """The typed protocol (`TINY_FINETUNE` under --tiny).

    Raises:
      InputError: a bad value, one sentence naming its flag.
    """
    f = dataclasses.replace(self, **TINY_FINETUNE) if self.tiny else self
    return FineTuneProtocol(
        steps=f.steps, lr=f.ft_lr, lrs=tuple(positive_floats(f.ft_lrs, "--ft-lrs")),
        batch_size=f.ft_batch_size, train_per_class=f.train_per_class,
        test_per_class=f.test_per_class, val_per_class=f.val_per_class, patience=f.patience,
        eval_every=f.eval_every, tune_extend=f.tune_extend, seed=f.seed)


@dataclasses.dataclass(frozen=True)
class ScoreFlags:
  """The score readings (the papers' open readings), stored in every record."""
  map_tap: str = flag("--map-tap", SCORE_SETTINGS["map_tap"], "map S1..S6 read: 'conv', the "
                      "last conv layer's output (the paper), or 'pooled', the 'last_conv' tap "
                      "(after vgg_s's last max pool)", choices=selection.MAP_TAPS)
  selection_features: str = flag(
      "--selection-features", SCORE_SETTINGS["selection_features"], "LogME / H-score "
      "features: 'target', the fine-tuned target's head input, or 'source', the source's "
      "penultimate layer (fc7 for vgg_s)", choices=SELECTION_FEATURES)
  logme: str = flag("--logme", SCORE_SETTINGS["logme_variant"], "LogME as the authors' "
                    "published code ('published', comparable with published numbers) or the "
                    "exact evidence ('exact')", choices=selection.LOGME_VARIANTS)

  def settings(self) -> dict:
    """{'map_tap', 'selection_features', 'logme_variant'} (`scoring.source_scores`'s)."""
    return dict(map_tap=self.map_tap, selection_features=self.selection_features,
                logme_variant=self.logme)
