"""Save a torchvision model's state dict, on any torch wheel (the CPU one included).

  python -m experiments.export_torchvision resnet50 resnet50.pth --weights IMAGENET1K_V2
  python -m experiments.convert_weights --arch resnet50 --weights resnet50.pth --out sources/r50

`import torchvision` fails beside the CPU torch wheel ("operator torchvision::nms does not
exist"); this declares the missing detection ops first (`jtransfer.weights.torchvision_export`).
Without --weights the model has random weights (for recipe checks and tests).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from jtransfer.errors import InputError
from jtransfer.weights import torchvision_export


def main(argv: Sequence[str] | None = None) -> int:
  """Parses the flags, exports, prints one line; exit 2 with one sentence on bad input."""
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("arch", help="torchvision builder name, e.g. resnet50, mobilenet_v2")
  p.add_argument("out", help="output file (.pth, or .safetensors)")
  p.add_argument("--weights", default=None,
                 help="torchvision weights name (IMAGENET1K_V2, DEFAULT, ...; downloaded); "
                      "default random weights")
  p.add_argument("--seed", type=int, default=0, help="torch seed of random weights")
  args = p.parse_args(argv)
  try:
    n = torchvision_export.export(args.arch, args.out, args.weights, args.seed)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"saved {n} tensors of torchvision {args.arch} "
        f"({args.weights or 'random weights'}) to {args.out}")
  return 0


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
