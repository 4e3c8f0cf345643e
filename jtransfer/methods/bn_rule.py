"""BatchNorm's mode while a strategy trains: the rule every strategy follows.

Two modes:
  * 'train': the model's train mode, as PyTorch's `model.train()`: BatchNorm normalises with
    each batch's statistics and updates its running averages, which evaluation then uses (and
    dropout or drop-path, in the few models that have them at a non-zero rate: mobilenet's
    0.2, inception's 0.5, is active);
  * 'frozen': BatchNorm normalises with the source's running statistics, never updated.

The rule: a strategy that updates the backbone's kernels (the fine-tuning family: finetune,
finetune_cwl, finetune_lowconv, finetune_lrd, last_k, surgical, l2, l2sp, delta_noatt, delta,
bss, lpft, wise_ft, cotuning, lora) supports both and runs the mode asked for; a strategy that
keeps every source kernel fixed (freeze, freeze_cwl, freeze_film, l2fe, bitfit, norm_tune,
ssf, conv_adapter, houlsby, adaptformer, vpt_*) keeps the source's statistics whatever is
asked, so a claim "X > freeze" never mixes a BN adaptation into a method that does not claim
one; `finetune_bn` always trains in train mode (its published records were made so). A
strategy declares its modes (`Strategy.bn_modes`); `resolve` picks the one it runs.

Train mode is the default of the study runner (`--bn train`) and of `jtransfer.api` (measured
in published/bn_mode: +1.3 [+0.6, +2.1] points over frozen statistics, docs/decisions.md).
`Strategy.build` called without `bn` keeps each strategy's own recipe (`Strategy.recipe_bn`:
the DELTA family's `delta.Config.bn_train`, train by default; `finetune_bn` train; the rest
frozen), which is also what every folder made before strategies took a mode ran. Models
without BatchNorm (vgg_s, the transformers at their default drop-path rate 0) compute the same
network in both modes.
"""
from __future__ import annotations

from typing import Optional, Sequence

from jtransfer.errors import InputError

TRAIN, FROZEN = "train", "frozen"
MODES = (TRAIN, FROZEN)
BOTH = MODES  # `Strategy.bn_modes` of the fine-tuning family
FROZEN_ONLY = (FROZEN,)  # of strategies that keep every source kernel fixed
TRAIN_ONLY = (TRAIN,)  # of `finetune_bn`


def check(bn: str, what: str = "bn") -> str:
  """`bn` when it names a mode; `InputError` naming `what` otherwise."""
  if bn not in MODES:
    raise InputError(f"{what} must be 'train' or 'frozen', got {bn!r}")
  return bn


def resolve(modes: Sequence[str], bn: Optional[str], recipe: str) -> str:
  """The mode a strategy supporting `modes` runs when asked for `bn` (None: its `recipe`):
  the one asked for when it supports it, else its only mode."""
  if bn is None:
    return recipe
  check(bn)
  return bn if bn in modes else modes[0]


def follows(modes: Sequence[str]) -> bool:
  """Whether a strategy supporting `modes` runs the mode asked for (the fine-tuning family)."""
  return set(MODES) <= set(modes)
