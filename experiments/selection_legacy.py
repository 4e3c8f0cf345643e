"""LEGACY: the argparse form of the selection study's flags and ground truth, for
experiments.truncation until it is declared on the study runner (then delete this module).

The flags come from the typed groups of `jtransfer.zoo.flags` (one definition); the adapters
turn the parsed namespace into `jtransfer.zoo.ground_truth`'s typed protocol.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Sequence

from jtransfer.data import parse_spec
from jtransfer.study.config import flag_fields, target_list
from jtransfer.zoo import ground_truth as gt
from jtransfer.zoo.flags import TINY_FINETUNE, FineTuneFlags, ScoreFlags  # noqa: F401
from jtransfer.zoo.training import Compiled, TrainConfig

DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")


def _add(p: argparse.ArgumentParser, cls, skip: Sequence[str] = ()) -> None:
  for f in flag_fields(cls):
    m = f.metadata
    if m["dest"] in skip:
      continue
    kw = dict(dest=m["dest"], help=m["help"], default=m["cli"])
    if m["choices"]:
      kw["choices"] = m["choices"]
    elif isinstance(m["cli"], (int, float)):
      kw["type"] = type(m["cli"])
    p.add_argument(m["flag"], **kw)


def add_finetune_args(p: argparse.ArgumentParser) -> None:
  """Fine-tuning flags (`FineTuneFlags` less --seed and --tiny, which truncation declares)."""
  _add(p, FineTuneFlags, ("seed", "tiny", "val_per_class", "ft_lrs", "patience", "eval_every",
                          "tune_extend"))


def add_protocol_args(p: argparse.ArgumentParser) -> None:
  """The ground truth's protocol flags (docs/protocol.md)."""
  _add(p, FineTuneFlags, [f.metadata["dest"] for f in flag_fields(FineTuneFlags)
                          if f.metadata["dest"] not in ("val_per_class", "ft_lrs", "patience",
                                                        "eval_every", "tune_extend")])


def add_score_args(p: argparse.ArgumentParser, *, maps: bool = True) -> None:
  """Score flags (`ScoreFlags`; without --map-tap / --selection-features unless `maps`)."""
  _add(p, ScoreFlags, () if maps else ("map_tap", "selection_features"))


def _flags(args) -> FineTuneFlags:
  return FineTuneFlags(**{f.name: vars(args)[f.name] for f in dataclasses.fields(FineTuneFlags)})


def protocol_from_args(args) -> gt.FineTuneProtocol:
  """The typed protocol of the parsed flags (--tiny applied)."""
  return _flags(args).protocol()


def finetune_config(args) -> TrainConfig:
  """The flags' fine-tuning schedule (validated); --tiny rewrites the flags it shrinks, as
  truncation reads them."""
  if args.tiny:
    for k, v in TINY_FINETUNE.items():
      setattr(args, k, v)
  return protocol_from_args(args).train_config()


def target_specs(args, default=DEFAULT_TARGETS) -> list[str]:
  """The --target specs (default `default`), each parsed."""
  specs = list(target_list(args.target, default))
  for t in specs:
    parse_spec(t, flag="--target")
  return specs


def check_protocol_args(args) -> list[float]:
  """The protocol flags' checks; returns the LR grid."""
  return list(protocol_from_args(args).lrs)


def ground_truth(source, task, args, config: TrainConfig, compiled: Compiled, ticker=None,
                 **overrides) -> dict:
  """`ground_truth.ground_truth` under the flags' protocol (which carries `config` too)."""
  return gt.ground_truth(source, task, protocol_from_args(args), compiled, ticker, **overrides)


def finetune_text(args, chosen_per: str = "run") -> str:
  """`ground_truth.finetune_text` of the flags' protocol."""
  return gt.finetune_text(protocol_from_args(args), chosen_per)


def ground_truth_kind(args) -> str:
  """`ground_truth.ground_truth_kind` of the flags' protocol."""
  return gt.ground_truth_kind(protocol_from_args(args))


def check_resume_protocol(records: Sequence[dict], args) -> None:
  """`ground_truth.check_resume` with the flags' --tune-extend."""
  gt.check_resume(records, args.tune_extend)
