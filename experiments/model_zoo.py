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
`jtransfer.zoo.training`, its flags `jtransfer.zoo.flags.ZooFlags`; this module declares it as a
study (`jtransfer.study`): one record per member (arm = the member's name), the report its table.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from jtransfer import sources, study
from jtransfer.study import records as rec
from jtransfer.study.draws import Draw
from jtransfer.zoo.flags import ZooFlags
from jtransfer.zoo.members import build_zoo, param_count, zoo_table


def log_of(config):
  """Progress lines to stderr, or None under --quiet."""
  return None if config.output.quiet else (lambda s: print(s, file=sys.stderr))


def members_of(config, log=None):
  """The zoo of the flags, each member loaded from the cache or trained (and cached)."""
  specs, settings = config.extra.zoo()
  root = config.extra.zoo_root or os.path.join(sources.cache_root(), "zoo")
  return build_zoo(specs, settings, root, log=log)


def run(_, config, results) -> list[dict]:
  """Builds the zoo; one record per member not yet recorded (all records returned)."""
  members = members_of(config, log_of(config))
  done = {rec.key(r) for r in rec.read(results.records, ())}
  for m in members:
    meta = m.source.meta
    r = rec.make(m.name, {}, Draw("eval", 0), {}, {"source_test_acc": meta["source_test_acc"]},
                 extra=dict(family=m.spec.family, classes=list(m.spec.classes),
                            fraction=m.spec.fraction, path=m.path,
                            param_count=param_count(m.source), n_train=meta["n_train"],
                            steps=meta["steps"], train_seconds=meta["train_seconds"]))
    if rec.key(r) not in done:
      results.add(r)
  results.write_json("zoo.json", zoo_table(members))
  return results.records


def report(plan, records, folder) -> tuple[str, dict]:
  """The zoo's table (zoo.json, written beside the records)."""
  with open(os.path.join(folder, "zoo.json")) as f:
    table = json.load(f)
  specs, settings = plan["zoo"]
  text = "\n".join(["# Base-model zoo", "",
                    f"{len(specs)} models; settings: `{json.dumps(settings.as_meta())}`; SGD "
                    "momentum 0.9, weight decay 5e-4, lr x0.1 at 7/30, 14/30, 21/30, 28/30 of "
                    "the run (the paper's 30-epoch schedule, shortened).", ""] + table + [""])
  return text, {"models": [r["arm"] for r in rec.read(records, ())]}


STUDY = study.Study(
    module="experiments.model_zoo", title="# Base-model zoo", cell_fields=(),
    groups=("output",), hidden=frozenset({"shard"}), extra=ZooFlags,
    defaults={"out": "results/model_zoo"}, check=lambda c: c.extra.zoo(),
    plan=lambda c: {"zoo": c.extra.zoo()}, run=run, report=report,
    record_key=lambda r: rec.key(rec.read([r], ())[0]), doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Builds the zoo and writes its table (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
