"""Fine-tuning with BatchNorm's running statistics frozen vs BatchNorm in train mode (issue 29).

  python -m experiments.bn_mode --out results/bn_mode

runs, for both small archs (vgg_s without BN, resnet_s with BN) pretrained on Fashion-MNIST
{0,2,3,4,6}, on both embedded targets (Fashion-MNIST {1,5,7,8,9}, digits), at k = 1, 3, 5, 10
per class, 10 evaluation draws per cell:
  * `finetune`: every parameter trained, BatchNorm normalising with the source's running
    statistics (`finetune` under `--bn frozen`, the mode of every folder made before --bn);
  * `finetune_bn`: every parameter trained, BatchNorm in train mode (batch statistics, running
    statistics updated), as PyTorch users and DELTA's authors fine-tune.
Both arms share the LR grid (1e-4, 1e-3, extended at an edge) and the budget (cap 300 steps,
stop after 60 steps without a validation gain, checked every 10). Tuning is nested: each
evaluation draw chooses its LR on its own validation split, never its test images, so the
per-draw differences carry the selection noise; ties go to the smaller LR for both arms. An arm
at the step cap in more than 10% of its evaluation runs is flagged "not converged" and its claim
reads "not tested" (`--cap-share 0.1`).

What it measures: the paired difference finetune_bn - finetune per draw (same k-shot draw for
both arms), per cell and pooled, as the registered claim `bn.train_mode_gt_frozen_stats`
(experiments/claims_registry/bn.py, registered before any run) reads it: superiority on
resnet_s. vgg_s has no BatchNorm, so there the two arms are the same network: its rows are a
control whose differences must be exactly 0 (a claim over them reads "not tested"). The
measurement decided which mode fine-tuning uses by default: train (`--bn train`,
docs/decisions.md, "BN mode of fine-tuning").

The study pins its own modes: it does not offer `--bn` (the flag is hidden, its mode fixed to
frozen), so `finetune` stays the frozen arm, `finetune_bn` the train one, and its published
folders (made before --bn, with frozen `finetune`) stay valid; `--bn train` is refused by the
parser (exit 2).

Cost: 16 cells x 2 arms x (2 LRs x 10 nested tuning runs + 10 evaluation runs), ~1000-1200 runs
of <= 300 steps; at the ~6 s per resnet_s run measured by published/bn_mode_resnet_s_k10 (33
runs, 200 s) about 2 hours on the 2 CPU cores, unloaded (not run here: the machine is shared).
Smoke test (tiny source, a few steps): tests/test_bn_mode.py.
"""
from __future__ import annotations

from typing import Sequence

from jtransfer import sources, study
from jtransfer.protocol import claims
from jtransfer.study import fewshot as hooks

ARMS = ("finetune", "finetune_bn")
LABELS = {"finetune": "Finetune (BN stats frozen)", "finetune_bn": "Finetune (BN train mode)"}
# The registered claim's text (experiments/claims_registry/bn.py finds the folder's row by it).
CLAIM_TEXT = "BatchNorm in train mode beats frozen running statistics when fine-tuning"
CLAIMS = (
    claims.Claim("BN mode", CLAIM_TEXT, "finetune_bn", "finetune",
                 where={"arch": ("resnet_s",)}, source="issue 29 item 11"),
    # The control: vgg_s has no BN, so the arms coincide and the claim is not tested there.
    claims.Claim("BN mode", "control: without BatchNorm the two modes are the same network",
                 "finetune_bn", "finetune", where={"arch": ("vgg_s",)},
                 source="issue 29 item 11"),
)

STUDY = study.Study(
    module="experiments.bn_mode", title="# Fine-tuning: BatchNorm statistics frozen vs train mode",
    arms=hooks.arms_with(ARMS, LABELS), claims=CLAIMS,
    prepare=hooks.prepare(sources.study_source),
    check_data=hooks.check_data(sources.source_input_shape), plots=hooks.plot_accuracy,
    defaults={"shots": "1,3,5,10", "repeats": 10, "lrs": "1e-4,1e-3", "steps": 300,
              "patience": 60, "tuning": "nested", "cv_folds": "0", "cap_share": "0.1",
              "paper_grid": False, "strategies": ",".join(ARMS), "out": "results/bn_mode",
              "bn": "frozen"},
    # Its arms are the two modes: a study-wide --bn would make `finetune` the same as
    # `finetune_bn`, so the flag is not offered.
    hidden=frozenset({"bn"}), doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
