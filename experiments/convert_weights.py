"""Convert a torchvision / timm checkpoint into a jtransfer source model.

  python -m experiments.convert_weights --arch resnet50 --weights resnet50.pth \
      --out sources/resnet50-imagenet [--input-shape 224,224,3] [--mean ... --std ...]
  python -m experiments.fewshot --arch resnet50 --source ckpt:sources/resnet50-imagenet \
      --target folder:/data/my_images --shots 1,5,10

Reads `.pth`/`.pt` (torch.load with weights_only=True: no arbitrary objects are unpickled),
`.safetensors` or `.npz`, maps every key to a jtransfer parameter path (see
`jtransfer.weights.torchvision`), and saves a `Source` (params, BN statistics, model config,
input shape, normalisation) with `transfer.save_source`. Every key of the checkpoint must be
used: otherwise the error lists the missing, unused and shape-mismatched keys. The default
normalisation is ImageNet's (mean 0.485,0.456,0.406, std 0.229,0.224,0.225, in [0, 1] units),
which torchvision's and most timm ResNet weights expect. The classification layer is kept
(its class count must match `--num-classes` when given) unless `--drop-head`, which gives
the source a freshly initialised head instead; few-shot strategies replace the head anyway.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Optional, Sequence

from jtransfer import surgery, weights
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.sources import IMAGENET_MEAN, IMAGENET_STD, convert
from jtransfer.study import edge
from jtransfer.study.config import flag, json_object
from jtransfer.study.flags import command_config
from jtransfer.study.tables import float_list


def parse_shape(text: str) -> tuple[int, int, int]:
  """'H,W,C' -> (H, W, C); InputError unless three positive integers with C in {1, 3}."""
  try:
    shape = tuple(int(v) for v in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1 or shape[2] not in (1, 3):
    raise InputError(f"--input-shape {text!r}: expected H,W,C with C 1 or 3, e.g. 224,224,3")
  return shape


def _floats(name: str):
  """A flag parser: a comma list of floats -> a tuple (`float_list`, naming the flag)."""
  return lambda text: tuple(float_list(text, name))


def _num_classes(text) -> int:
  """--num-classes: an int >= 1."""
  try:
    n = int(text)
  except ValueError:
    raise InputError(f"--num-classes must be an integer >= 1, got {text!r}") from None
  if n < 1:
    raise InputError(f"--num-classes must be >= 1, got {n}")
  return n


@dataclasses.dataclass(frozen=True)
class ConvertFlags:
  """convert_weights' flags, typed (`jtransfer.study.config.flag` fields)."""
  arch: Optional[str] = flag("--arch", None, "torchvision architecture", choices=weights.ARCHS,
                             required=True)
  weights: Optional[str] = flag("--weights", None, ".pth/.pt, .safetensors or .npz file",
                                required=True)
  out: Optional[str] = flag("--out", None, "directory for the source model (refused if it "
                            "holds anything)", required=True)
  overwrite: bool = flag("--overwrite", False, "move an existing --out aside (to "
                         "OUT.replaced-<UTC time>) first", action="store_true")
  input_shape: tuple = flag("--input-shape", (224, 224, 3), "H,W,C the source will take",
                            cli="224,224,3", parse=parse_shape)
  mean: tuple = flag("--mean", IMAGENET_MEAN, "per-channel mean in [0, 1] units (default "
                     "ImageNet)", cli=",".join(map(str, IMAGENET_MEAN)), parse=_floats("--mean"))
  std: tuple = flag("--std", IMAGENET_STD, "per-channel std in [0, 1] units (default "
                    "ImageNet)", cli=",".join(map(str, IMAGENET_STD)), parse=_floats("--std"))
  num_classes: Optional[int] = flag("--num-classes", None, "head size (default: the "
                                    "checkpoint's)", parse=_num_classes)
  drop_head: bool = flag("--drop-head", False, "do not import the classification layer; "
                         "initialise a new one", action="store_true")
  config: Optional[dict] = flag("--config", None, "JSON model config overrides for "
                                "non-standard widths, e.g. '{\"dense_widths\": [1024, 1024]}'",
                                parse=json_object("--config"))
  seed: int = flag("--seed", 0, "seeds a new head")


def parse_flags(argv: Sequence[str] | None = None) -> ConvertFlags:
  """The typed flags of `main` (argparse exits 2 on a malformed flag; a bad value raises
  `InputError`)."""
  return command_config(ConvertFlags, argv, __doc__)


def main(argv: Sequence[str] | None = None) -> int:
  """Converts --weights and saves the source in --out; the exit code (2 after a bad-input
  sentence, 130 after Ctrl-C with one line)."""
  return edge.model_command(parse_flags, _run, argv)


def _run(f: ConvertFlags) -> int:
  """`main` on parsed flags: convert, then save in --out and read it back."""
  t0 = time.time()
  if os.path.abspath(f.out) == os.path.abspath(os.path.dirname(f.weights) or "."):
    raise InputError(f"--out {f.out} is the folder holding --weights: choose another --out")
  edge.open_model_dir(f.out, f.overwrite, quiet=False, check_only=True)
  source = convert(f.arch, f.weights, input_shape=f.input_shape, mean=f.mean, std=f.std,
                   num_classes=f.num_classes, drop_head=f.drop_head, config=f.config,
                   seed=f.seed)
  edge.open_model_dir(f.out, f.overwrite, quiet=False)
  transfer.save_source(f.out, source)
  transfer.load_source(f.out)  # fails loudly now rather than in the first experiment
  n = surgery.count(source.variables["params"])
  print(f"saved {f.arch} ({n:,} params, head {source.meta['head']}, input "
        f"{','.join(map(str, source.input_shape))}) to {f.out} in {time.time() - t0:.1f} s; "
        f"use: --arch {f.arch} --source ckpt:{f.out}")
  return 0


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
