"""DELTA's hyper-parameters as one typed, validated dataclass (`Config`), and its constants.

The strategies of `jtransfer.methods.delta` take a `Config` as their `config` knob; nothing
reads it from a module global or the environment.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from jtransfer.errors import InputError


FROZEN_KEY = "frozen"  # top-level params key of per-run constants (never trained)
SCHEDULES = ("exp", "step", "constant")
# BatchNorm during the attention probe (Config.att_bn); see `AttentionComputer`.
ATT_BN_MODES = ("authors", "eval", "train")


# ----------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class Config:
  """Hyper-parameters of the DELTA family (defaults: the paper and the authors' code).

  Attributes:
    alpha: weight of Omega (0.01; the authors use 0.1 on Stanford Dogs; the paper picks it
      per experiment by 5-fold cross-validation).
    alpha_noatt: alpha of DELTA w/o ATT when set (None: `alpha`). Its plain sum over batch,
      positions and channels is about H*W times DELTA's per-element weight, so the same alpha
      makes it far stiffer (at lr 0.01 it diverges on the small nets here).
    beta: weight of 0.5 * ||head||^2.
    weight_decay: the L2 baseline's SGD weight decay.
    schedule: 'exp' (lr x exp(log 0.1 / D) per epoch), 'step' (x0.1 at D) or 'constant',
      with D = int(decay_fraction * epochs) + 1 as the authors.
    decay_fraction: where the lr reaches x0.1 (0.67: 6000 of 9000 iterations).
    steps_per_epoch: train steps per epoch for the schedules (1: a k-shot set fits a batch).
    momentum: SGD momentum.
    bn_train: the target's BN uses batch statistics while training (the authors' code).
    taps: arch -> tapped conv-unit names, overriding `default_taps`.
    temperature: softmax temperature of the attention.
    att_batch_size, att_batches: the attention averages over at most this many batches.
    att_head_epochs, att_head_min_steps: the L2-FE probe trains this many epochs (SGD lr
      0.01, momentum 0.9, weight decay 1e-4, x0.1 at 60%), but at least this many steps: on a
      k-shot set an epoch is one step, and 10 steps leave the head at its random init.
    att_max_images: channels ablated per vectorised call times batch size stays below this
      (the suffix after a tap runs on that many images at once).
    att_max_mb: and (channels per call) x (batch size) x (the tap's map, bytes per image)
      stays below this many MB: the ablation's memory follows the suffix's activations, which
      grow with the map (resnet50 at 224 px, 4 images: 17.0 GB peak at 4096 images per call,
      docs/decisions.md, "DELTA"), so this bound, not the image count, keeps large inputs in memory.
    att_probe_loop: run the 'authors' probe step by step even when every batch holds all the
      images (the closed form of `_probe_one_batch` gives the same result in 2 forwards).
    att_bn: BatchNorm in the attention probe (no effect on models without BN):
      'authors' (default), as the authors' channel_eval.py: the L2-FE head trains with the
        backbone in train mode (`model.train()`: features from each probe batch's own
        statistics, and those forward passes update the running statistics, torch momentum
        0.1), then the channel ablation runs in eval mode (`model.eval()` in feature_weight)
        with the running statistics so updated on the target images;
      'eval': source running statistics throughout (probe features and ablation);
      'train': batch statistics throughout: the probe as 'authors', and each ablation forward
        normalises with its own attention batch's statistics (batches are not padded then).
    source_cache_mb: the source maps of a run's training images are computed once and looked
      up in the loss when they fit in this many MB (0: a live source forward every step).
  """
  alpha: float = 0.01
  alpha_noatt: Optional[float] = None
  beta: float = 0.01
  weight_decay: float = 1e-4
  schedule: str = "exp"
  decay_fraction: float = 0.67
  steps_per_epoch: int = 1
  momentum: float = 0.9
  bn_train: bool = True
  taps: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  temperature: float = 5.0
  att_batch_size: int = 32
  att_batches: int = 4
  att_head_epochs: int = 10
  att_head_min_steps: int = 200
  att_max_images: int = 4096
  att_max_mb: float = 512.0
  att_probe_loop: bool = False
  att_bn: str = "authors"
  source_cache_mb: float = 256.0

  def validate(self) -> "Config":
    weights = {"alpha": self.alpha, "alpha_noatt": self.alpha_noatt, "beta": self.beta,
               "weight_decay": self.weight_decay}
    for name, value in weights.items():
      if value is not None and not value >= 0:
        raise InputError(f"DELTA {name} must be a number >= 0, got {value!r}")
    if self.schedule not in SCHEDULES:
      raise InputError(f"DELTA schedule {self.schedule!r}: expected one of {', '.join(SCHEDULES)}")
    if not 0 < self.decay_fraction <= 1:
      raise InputError(f"DELTA decay_fraction must be in (0, 1], got {self.decay_fraction}")
    if self.att_bn not in ATT_BN_MODES:
      raise InputError(f"DELTA att_bn {self.att_bn!r}: expected one of {', '.join(ATT_BN_MODES)}")
    if self.temperature <= 0:
      raise InputError(f"DELTA temperature must be > 0, got {self.temperature}")
    for name in ("steps_per_epoch", "att_batch_size", "att_batches", "att_head_epochs",
                 "att_max_images"):
      if int(getattr(self, name)) < 1:
        raise InputError(f"DELTA {name} must be an integer >= 1, got {getattr(self, name)}")
    if not self.att_max_mb > 0:
      raise InputError(f"DELTA att_max_mb must be > 0, got {self.att_max_mb}")
    return self
