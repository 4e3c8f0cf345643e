"""Pretrain a source model on a dataset (class subset) and save it with its config.

  python -m experiments.pretrain --arch resnet_s --source fmnist:0,2,3,4,6 --epochs 2 \
      --out .cache/sources/resnet_s-fmnist

The command line of `jtransfer.sources.pretrain`; a study's dataset-spec `--source` is trained on
first use and cached by `jtransfer.sources.source_for`.
Expected: ~2.5 min per small arch on 2 CPU cores, source test accuracy ~0.85-0.9.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Optional

from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.sources import DEFAULT_SHAPE, DEFAULT_SOURCE, pretrain, recipe_for
from jtransfer.study import edge
from jtransfer.study.config import Devices, flag, json_object, number
from jtransfer.study.flags import command_config


def _shape(text) -> tuple[int, ...]:
  try:
    return tuple(int(v) for v in str(text).split(","))
  except ValueError:
    raise InputError(f"--image-shape {text!r}: expected H,W,C, e.g. 28,28,1") from None


def _max_train(text) -> int:
  try:
    return int(text)
  except ValueError:
    raise InputError(f"--max-train must be an integer, got {text!r}") from None


@dataclasses.dataclass(frozen=True)
class PretrainFlags(Devices):
  """experiments.pretrain's flags, typed (`jtransfer.study.config.flag` fields; --devices and
  the multi-host flags from `Devices`)."""
  arch: Optional[str] = flag("--arch", None, "architecture", choices=models.names(),
                             required=True)
  source: str = flag("--source", DEFAULT_SOURCE, "dataset spec, e.g. fmnist:0,2,3,4,6")
  epochs: float = flag("--epochs", 2.0, "training epochs")
  batch_size: int = flag("--batch-size", 128, "images per step")
  lr: Optional[float] = flag("--lr", None, "initial learning rate (default: the optimizer's, "
                            "SGD 0.05, AdamW 0.001)", parse=number("--lr"))
  optimizer: Optional[str] = flag("--optimizer", None, "sgd or adamw (default: the arch's "
                                  "recipe, AdamW for a transformer, else SGD)",
                                  choices=("sgd", "adamw"))
  seed: int = flag("--seed", 0, "seeds the init and the batches")
  image_shape: tuple = flag("--image-shape", DEFAULT_SHAPE, "H,W,C",
                            cli=",".join(map(str, DEFAULT_SHAPE)), parse=_shape)
  max_train: Optional[int] = flag("--max-train", None, "cap on training images",
                                  parse=_max_train)
  config: Optional[dict] = flag("--config", None, "model config overrides as JSON, e.g. "
                                '\'{"stage_widths": [16, 32, 64]}\'',
                                parse=json_object("--config"))
  ckpt_dir: Optional[str] = flag("--ckpt-dir", None, "checkpoint (and resume) directory")
  ckpt_every: int = flag("--ckpt-every", 100, "steps between checkpoints")
  augment: str = flag("--augment", "none", "training augmentation (jtransfer.data.augment): "
                      "none, flip, crop, rrc, crop+flip, rrc+flip")
  quiet: bool = flag("--quiet", False, "no progress output", action="store_true")
  out: Optional[str] = flag("--out", None, "directory to save the model in (refused if it "
                            "holds anything)", required=True)
  overwrite: bool = flag("--overwrite", False, "move an existing --out aside (to "
                         "OUT.replaced-<UTC time>) first", action="store_true")


def parse_flags(argv=None) -> PretrainFlags:
  """The typed flags of `main` (argparse exits 2 on a malformed flag; a bad value raises
  `InputError`)."""
  return command_config(PretrainFlags, argv, __doc__)


def main(argv=None) -> int:
  """Pretrains --arch on --source and saves it in --out; the exit code (2 after a bad-input
  sentence, 130 after Ctrl-C with one line saying what is kept)."""
  return edge.model_command(parse_flags, _run, argv)


def _run(f: PretrainFlags) -> int:
  """`main` on parsed flags: pretrain, then save in --out (refused first if it holds anything)."""
  edge.apply_devices(f)
  # Before training: an --out holding anything is refused now, not after minutes of work.
  edge.open_model_dir(f.out, f.overwrite, f.quiet, check_only=True)
  optimizer = f.optimizer or recipe_for(f.arch)
  source = pretrain(f.arch, f.source, epochs=f.epochs, batch_size=f.batch_size, lr=f.lr,
                    optimizer=optimizer,
                    seed=f.seed, image_shape=f.image_shape, max_train=f.max_train,
                    log_path=f.out + ".metrics.jsonl", model_config=f.config,
                    checkpoint_dir=f.ckpt_dir, checkpoint_every=f.ckpt_every,
                    progress=not f.quiet, augment_recipe=f.augment)
  edge.open_model_dir(f.out, f.overwrite, f.quiet)
  transfer.save_source(f.out, source)
  print(f"saved {f.arch} to {f.out}: source test accuracy "
        f"{source.meta['source_test_acc']:.4f}")
  return 0


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
