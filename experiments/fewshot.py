"""Few-shot transfer of a pretrained source to a k-shot target: strategies side by side.

  python -m experiments.fewshot --arch vgg_s,resnet_s --source fmnist:0,2,3,4,6 \
      --target 'fmnist:1,5,7,8,9' --target digits --shots 1,3,5,10 --repeats 10 \
      --strategies freeze,finetune --lrs paper --out results/fewshot

writes results.jsonl (one record per finished run), results.json, report.md and
accuracy_vs_shots.png. With no flags it runs the embedded demo grid (`make demo`, a few minutes
on 2 CPU cores): resnet_s, both embedded targets, freeze and finetune, k = 1, 5
evaluation draws and 1 tuning draw, 2 LRs per strategy (extended at an edge), runs capped at
500 steps with patience 100, 300 test images per class, evaluation draws at the tuned LR only
(no test-selected 'best over LR' grid). The full grid is `FULL_GRID`'s command (its report
says so).

Protocol (docs/protocol.md, `jtransfer.protocol`): for each (arch, target, k) and draw one
stratified k-shot set plus a disjoint validation set (`--val-per-class`) from the target's train
split, shared by every strategy and LR (paired comparison). Every run trains full batches of the
k-shot set (at most `--batch-size`) until its validation accuracy has not improved for
`--patience` steps (at most `--steps`) and keeps its best validation state. Each strategy's LR
(and its own knobs, e.g. DELTA's alpha) is chosen on `--tune-repeats` tuning draws that are
never evaluation draws and never see the test split (by k-fold CV where the paper does); the
evaluation draws run at that choice and, under `--paper-grid`, over the whole LR grid too. The
report gives the tuned figure with its claims (per-draw differences, 95% CI, verdict), then the
paper's test-selected best over LR, labelled, and the LR chosen per draw on validation.
Frozen-backbone strategies with BN in eval mode train their head on backbone features computed
once per (arch, target). BatchNorm: `--bn train` (the default: `finetune` trains with batch
statistics, PyTorch's model.train()) or `--bn frozen` (the source's running statistics, the mode
of every folder made before the flag); strategies that keep every source kernel fixed always
keep the source's statistics (docs/protocol.md, `jtransfer.methods.bn_rule`).

Any registered strategy may be an arm (`--strategies`); the grid, resume, shards and report are
the study runner's (`jtransfer.study`); this module declares the claims it tests.
"""
from __future__ import annotations

import dataclasses

from typing import Sequence

from jtransfer import sources, study
from jtransfer.protocol import claims
from jtransfer.study import fewshot as hooks
from jtransfer.study import flags
from jtransfer.study.report import make_report

# The CWL paper's reading of its Table II (section 4): fine-tuning pays on a domain far from
# the source (digits from clothes), not on a near one (other clothes). The near domain: the
# embedded Fashion-MNIST targets (the other half of the source's classes, either direction).
NEAR_TARGETS = ("fmnist:1,5,7,8,9", "fmnist:0,2,3,4,6")
CLAIMS = (
    claims.Claim("CWL", "fine-tuning beats freezing on a far domain", "finetune", "freeze",
                 where={"target": ("digits",)}, source="Table II, section 4"),
    claims.Claim("CWL", "fine-tuning does not beat freezing on a near domain", "freeze",
                 "finetune", at_least=True, margin=0.01,
                 where={"target": NEAR_TARGETS}, source="Table II, section 4"),
)

# The embedded default is a demo grid (`make demo`: at most 5 minutes on an idle 2-core CPU,
# BUILD_NOTES.md "How long things take"): one arch, k = 1, the protocol whole (tuning
# draw, patience, validation selection, paired draws), no paper grid. Only flags that every
# published experiments.fewshot folder names in its argv may change here, so those folders
# parse and regenerate as before (tests/test_study_flags.py).
DEMO_DEFAULTS = {"arch": "resnet_s", "shots": "1", "repeats": 5, "paper_grid": False}
# The grid the defaults were before the demo (177 runs, 38.7 min loaded): both small archs,
# k = 1, 5, 10, the paper grid too.
FULL_GRID = ("python -m experiments.fewshot --arch vgg_s,resnet_s --shots 1,5,10 --repeats 2 "
             "--paper-grid --out results/fewshot_full")


def report(plan, records, folder):
  """The study's report (`jtransfer.study.report.make_report`), plus, for the embedded demo
  grid, the command of the full grid."""
  text, summary = make_report(plan, records)
  if is_demo(plan.config):
    text = text.rstrip("\n") + (
        "\n\nThis is the embedded demo grid (resnet_s, k = 1, evaluation at the tuned LR "
        f"only). The full grid, both archs and k = 1, 5, 10 with the paper grid: `{FULL_GRID}`"
        " (about 40 min on 2 loaded CPU cores).\n")
  return text, summary


def is_demo(config) -> bool:
  """Whether `config` runs the embedded default grid (whatever its --out and output flags):
  today's default command line (which states --bn train), or, for a folder made before --bn,
  the default grid of its time."""
  demo = flags.parse(STUDY, flags.stated_argv(STUDY, []))
  p = config.protocol
  if not p.bn_stated:
    p = dataclasses.replace(p, bn=demo.protocol.bn, bn_stated=True)
  return (config.cells, p, config.source) == (demo.cells, demo.protocol, demo.source)


STUDY = study.Study(
    module="experiments.fewshot", title="# Few-shot transfer", claims=CLAIMS,
    prepare=hooks.prepare(sources.study_source),
    check_data=hooks.check_data(sources.source_input_shape),
    plots=hooks.plot_accuracy, defaults={"out": "results/fewshot", **DEMO_DEFAULTS},
    report=report, doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
