"""Tables I and II of the CWL paper: Freeze vs Freeze+CWL and Finetune vs Finetune+CWL.

  python -m experiments.cwl_tables --out results/cwl_tables

runs the paper's tables on the embedded benchmark (both small archs, targets fmnist:1,5,7,8,9
and digits, k in {1,3,5,10}, 10 evaluation draws) under the protocol of docs/protocol.md,
through the study runner (`jtransfer.study`: one k-shot draw per (arch, target, k, repeat),
shared by all strategies):

  * every run trains until its validation accuracy has not improved for `--patience` steps (at
    most `--steps`) and keeps its best validation state;
  * each strategy's LR is chosen per (arch, target, k) on 2 tuning draws that are not
    evaluation draws (the paper's grids, finetune {1e-5,5e-5,1e-4,5e-4,1e-3}, freeze
    {1e-3,5e-3,1e-2,5e-2}, extended at an edge);
  * report.md: the tuned Tables I and II, a Claims section (Freeze+CWL > Freeze; more so
    without BN; Finetune+CWL >= Finetune; per draw, 95% CI, verdict), then the paper's
    protocol (best LR picked on the test set, labelled) with its paired rows, and the LR picked
    per draw on validation; accuracy_vs_shots.png.

A reduced run (vgg_s, one target, k in {1,5}, 3 draws, freeze pair only):

  python -m experiments.cwl_tables --arch vgg_s --target fmnist:1,5,7,8,9 --shots 1,5 \
      --repeats 3 --strategies freeze,freeze_cwl --test-per-class 200 --out results/cwl_reduced

Expected (published/cwl_tables, 837 runs, 2 x 2 x 4 cells): Freeze+CWL beats Freeze on vgg_s
(no BN), not on resnet_s; Finetune+CWL matches Finetune within a point. Paper claims tested:
CWL beats Freeze at few shots, more on VGG (no BN) than on ResNet; CWL does not hurt finetuning.
BatchNorm: `--bn` (default train) for Finetune and Finetune+CWL; Freeze and Freeze+CWL keep the
source's running statistics. published/cwl_tables predates the flag and ran frozen: it resumes
with `--bn frozen` (docs/protocol.md).
"""
from __future__ import annotations

import types
from typing import Sequence

from experiments import fewshot
from jtransfer import sources, study
from jtransfer.methods import transfer
from jtransfer.protocol import claims
from jtransfer.study import fewshot as hooks
from jtransfer.study import paper

LABELS = types.MappingProxyType({
    "freeze": "Freeze", "freeze_cwl": "Freeze + CWL", "finetune": "Finetune",
    "finetune_cwl": "Finetune + CWL", "finetune_lowconv": "Alg. 1 (low-lr conv) + CWL",
    "freeze_film": "Freeze + FiLM", "bitfit": "BitFit", "lpft": "LP-FT", "wise_ft": "WiSE-FT",
    "bss": "BSS", "cotuning": "Co-Tuning"})
# The later baselines (issue 20) are rows of the table they compare with, when --strategies
# names them: FiLM and BitFit beside CWL's per-channel scales, LP-FT, WiSE-FT, BSS beside
# finetuning.
TABLES = (
    study.Table("Table I: frozen convolutions vs weighting convolutions",
                ("freeze", "freeze_cwl", "finetune_lowconv", "freeze_film", "bitfit"),
                compare=("freeze_cwl", "freeze")),
    study.Table("Table II: finetuning vs finetuning with weighting convolutions",
                ("finetune", "finetune_cwl", "freeze", "lpft", "wise_ft", "bss", "cotuning"),
                compare=("finetune_cwl", "finetune")))
CLAIMS = (
    claims.Claim("CWL", "weighting convolutions beats frozen convolutions", "freeze_cwl",
                 "freeze", source="Table I"),
    claims.Claim("CWL", "weighting convolutions does not hurt finetuning", "finetune_cwl",
                 "finetune", at_least=True, margin=0.01, source="Table II"),
    # The later baselines against CWL and finetuning (evaluated when both arms run).
    claims.Claim("FiT", "FiLM (per-channel scale and shift) at least matches CWL (scale only)",
                 "freeze_film", "freeze_cwl", at_least=True, margin=0.01,
                 source="Shysheya et al. 2023"),
    claims.Claim("BitFit", "training only the biases beats frozen convolutions", "bitfit",
                 "freeze", source="Ben Zaken et al. 2022"),
    claims.Claim("LP-FT", "LP-FT at least matches fine-tuning", "lpft", "finetune",
                 at_least=True, margin=0.01, source="Kumar et al. 2022 (in-distribution)"),
    claims.Claim("WiSE-FT", "WiSE-FT at least matches the fine-tuned model it interpolates",
                 "wise_ft", "lpft", at_least=True, margin=0.01, source="Wortsman et al. 2022"),
    claims.Claim("BSS", "BSS beats fine-tuning at few shots", "bss", "finetune",
                 source="Chen et al. 2019, Table 1"),
    claims.Claim("Co-Tuning", "Co-Tuning beats fine-tuning", "cotuning", "finetune",
                 source="You et al. 2020, Table 1"),
) + fewshot.CLAIMS  # finetune > freeze on the far domain, not on the near one
BN_CLAIM = claims.Claim("CWL", "weighting helps more without BN (VGG) than with it (ResNet)",
                        "vgg_s", "resnet_s", source="Table I, section 4")


def reduced_lrs(name: str) -> tuple[float, ...]:
  """'--lrs reduced': two LRs per family, the same for a strategy and its CWL variant."""
  frozen = transfer.get_strategy(name).paper_lrs == transfer.FREEZE_LRS
  return (1e-2, 5e-2) if frozen else (1e-4, 1e-3)


def bn_claim(plan, rows: Sequence[dict]) -> list[dict]:
  """'CWL helps more without BN': per draw, (Freeze+CWL - Freeze) on vgg_s minus the same on
  resnet_s. The archs share their k-shot draws (the seed depends on k and the repeat only), so
  the gains pair by (target, k, repeat)."""
  if not {"freeze", "freeze_cwl"} <= set(plan.config.cells.arms):
    return []
  acc = {(r["arch"], r["target"], r["shots"], r["repeat"], r["arm"]): r["test_acc"]
         for r in rows if r.get("status", "ok") == "ok"}
  gains = [dict(arch=arch, target=target, shots=k, repeat=rep, test_acc=a - b)
           for (arch, target, k, rep, arm), a in acc.items()
           if arm == "freeze_cwl" and (b := acc.get((arch, target, k, rep, "freeze"))) is not None]
  return [claims.evaluate(BN_CLAIM, gains, ("target", "shots"), arm_field="arch")]


STUDY = study.Study(
    module="experiments.cwl_tables", title="# CWL Tables I and II (embedded benchmark)",
    arms=hooks.arms_with(LABELS, LABELS), tables=TABLES, claims=CLAIMS,
    extra_claims=bn_claim, sections=paper.sections, reduced_lrs=reduced_lrs,
    prepare=hooks.prepare(sources.study_source),
    check_data=hooks.check_data(sources.source_input_shape), plots=hooks.plot_accuracy,
    defaults={"shots": "1,3,5,10", "repeats": 10, "lrs": "paper", "steps": 1000,
              "patience": 200, "tune_repeats": 2, "out": "results/cwl_tables",
              "strategies": "freeze,freeze_cwl,finetune,finetune_cwl"}, doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the tables (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
