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

The zoo itself (members, training, caching) is `jtransfer.zoo.members` and
`jtransfer.zoo.training`; this module is its command line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Sequence

from experiments import cli
from jtransfer.errors import InputError
# (the zoo's library; experiments.truncation imports these three from here)
from jtransfer.zoo.training import Compiled, TrainConfig, prenormalize  # noqa: F401
from jtransfer.zoo.members import (FAMILIES, ZooSettings, ZooSpec, build_zoo, param_count,
                                   parse_zoo, zoo_table)

# The CLI edge reads the cache location from the environment; the library takes a root.
CACHE_ROOT = os.path.join(os.environ.get("JTRANSFER_CACHE", ".cache"), "zoo")
DEFAULT_CLASS_SETS = "0,2,3,4,6;0,2,4;3,4,6"
DEFAULT_FRACTIONS = "1,0.3,0.1"
TINY = dict(families="resnet_s_narrow", class_sets="0,2,3;4,6,8", fractions="1,0.5",
            epochs=0.5, per_class=20, test_per_class=10, batch_size=16)


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
  specs = parse_zoo(args.families, args.class_sets, args.fractions, args.dataset)
  if args.epochs <= 0 or args.per_class < 1 or args.zoo_batch_size < 1 or args.zoo_lr <= 0:
    raise InputError("--epochs, --per-class, --zoo-batch-size and --zoo-lr must be positive")
  settings = ZooSettings(dataset=args.dataset, epochs=args.epochs, per_class=args.per_class,
                         test_per_class=args.source_test_per_class,
                         image_shape=tuple(image_shape), seed=args.seed, lr=args.zoo_lr,
                         batch_size=args.zoo_batch_size)
  return specs, settings


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
    members = build_zoo(specs, settings, args.zoo_root or CACHE_ROOT, log=log)
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
