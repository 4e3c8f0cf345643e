"""Issue 31's table: parameter-efficient transfer beside CWL, tuned with equal budgets.

  python -m experiments.peft_table --arch resnet_s --out results/peft_resnet_s
  python -m experiments.peft_table --arch vgg_s --out results/peft_vgg_s \
      --strategies "$(python -m experiments.peft_table --arms vgg_s)"
  python -m experiments.peft_table --arch vit_s28 --out results/peft_vit_s28 \
      --strategies "$(python -m experiments.peft_table --arms vit_s28)"

One invocation per arch, because the methods that apply differ (`ARMS`): on resnet_s freeze,
BitFit, FiLM, CWL (frozen and finetuned), SSF, LoRA, BN tuning, last-k and surgical partial
tuning, finetune with layer-wise LR decay, Conv-Adapter, finetune; on vgg_s the same without BN
tuning and Conv-Adapter (no BN, no residual blocks); on vit_s28 freeze, BitFit, SSF, LoRA,
LayerNorm tuning, partial tuning, Houlsby and AdaptFormer adapters, VPT shallow and deep,
finetune. CWL and FiLM run on transformers too (one scale, and a shift, per output channel of
every qkv/proj/fc1/fc2: methods/cwl_linear.py, methods/film.py) but are not vit_s28 arms here:
experiments/claims_registry/peft.py reads `ARMS` to find each claim's folders, so adding them
would change registered claims' evidence after registration. The vit_s28 source (Fashion-MNIST classes
{0,2,3,4,6}, like the CNNs') is pretrained on first use and cached under .cache/sources; to
make it beforehand, `python -m experiments.pretrain --arch vit_s28 --out DIR` and pass
`--source ckpt:DIR`. Grid: both targets (fmnist:1,5,7,8,9 and digits), k in {1, 5, 10},
10 evaluation draws, protocol of docs/protocol.md (early stopping on validation, best state).

Tuning budget (`Study.tune_budget`, enforced by the runner): every method gets exactly
`BUDGET` = 12 grid points on each of 2 tuning draws per (arch, target, k): its knob grid kept
(LoRA rank 2/4/8, adapter reductions, VPT tokens 1/5/10/50, partial k/block, LR decay) times an
LR grid spaced over its paper LR range (12 LRs without a knob, 4 with a 3-valued knob, 3 with
VPT's 4), never extended at an edge: 24 tuning runs per method and cell, then 10 evaluation
runs at the chosen point. Every record carries `peft_cost` (trained parameters, extra inference
FLOPs after merging); the table shows both.

Expected runtime: 34 runs per method and cell (24 tuning + 10 evaluation), 11-13 methods,
6 cells per arch: ~2,650 runs for resnet_s and vit_s28, ~2,250 for vgg_s, ~7,550 in all.
Measured on the shared 2-core CPU (vit_s28, SSF, k = 10 on digits): ~9 s per run of overhead
(setup, data, evaluation) plus ~0.6 s per step, so a run stopped by patience 200 after ~300
steps costs ~3 min: weeks for the grid on that CPU. Run it on an accelerator (frozen runs
batch there, --batch-runs) or split it with --shard I/N and `experiments.publish merge`.
Claims (registered before any run in
experiments/claims_registry/peft.py): LoRA >= finetune; each method > freeze; the tuned
methods within a point of each other (each within half a point of LoRA); SSF > CWL.
BatchNorm (`--bn`, default train): the arms that update kernels (finetune, finetune_cwl,
finetune_lrd, last_k, surgical, LoRA) train in that mode; the others keep the source's running
statistics, so "X > freeze" never mixes in a BN adaptation (docs/protocol.md).
"""
from __future__ import annotations

import sys
import types
from typing import Sequence

from jtransfer import sources, study
from jtransfer.errors import InputError
from jtransfer.protocol import claims
from jtransfer.study import fewshot as hooks

BUDGET = 12  # tuning points per method: 12 x 1, 4 x 3 and 3 x 4 (LRs x knob values)
LABELS = types.MappingProxyType({
    "freeze": "Freeze", "bitfit": "BitFit", "freeze_film": "Freeze + FiLM",
    "freeze_cwl": "Freeze + CWL", "finetune_cwl": "Finetune + CWL", "ssf": "SSF", "lora": "LoRA",
    "norm_tune": "Norm tuning", "last_k": "Last-k blocks", "surgical": "Surgical (one block)",
    "finetune_lrd": "Finetune + LR decay", "conv_adapter": "Conv-Adapter",
    "houlsby": "Houlsby adapter", "adaptformer": "AdaptFormer", "vpt_shallow": "VPT-shallow",
    "vpt_deep": "VPT-deep", "finetune": "Finetune"})
_CNN = ("freeze", "bitfit", "freeze_film", "freeze_cwl", "ssf", "lora", "last_k", "surgical",
        "finetune_cwl", "finetune_lrd", "finetune")
# The arms that apply to each arch (a method that does not apply refuses to build).
ARMS = types.MappingProxyType({
    "resnet_s": _CNN[:6] + ("norm_tune", "conv_adapter") + _CNN[6:],
    "vgg_s": _CNN,
    "vit_s28": ("freeze", "bitfit", "ssf", "lora", "norm_tune", "houlsby", "adaptformer",
                "vpt_shallow", "vpt_deep", "last_k", "surgical", "finetune_lrd", "finetune")})
REFERENCE = "lora"  # the equivalence claims' common reference (every benchmark lists LoRA)
# Claim texts: experiments/claims_registry/peft.py finds the folders' results by them.
LORA_GE_FINETUNE = "LoRA at least matches fine-tuning"
SSF_GT_CWL = "the shift matters: SSF (scale and shift after every op) beats CWL (scale only)"


def beats_freeze(arm: str) -> str:
  """The text of the claim '`arm` beats freeze'."""
  return f"{LABELS[arm]} beats a frozen backbone with a trained head"


def near_reference(arm: str) -> str:
  """The text of the claim '`arm` lies within half a point of LoRA'."""
  return f"{LABELS[arm]} lies within half a point of LoRA (tuned methods within a point)"


_ALL = tuple(dict.fromkeys(a for arms in ARMS.values() for a in arms))
# The module's own reading; the registry decides equivalence claims with its own kind, margin.
CLAIMS = (
    claims.Claim("LoRA", LORA_GE_FINETUNE, "lora", "finetune", at_least=True, margin=1 / 898,
                 source="Hu et al. 2022"),
    claims.Claim("SSF", SSF_GT_CWL, "ssf", "freeze_cwl", source="Lian et al. 2022"),
    *(claims.Claim("PEFT", beats_freeze(a), a, "freeze", source="issue 31")
      for a in _ALL if a != "freeze"),
    *(claims.Claim("PEFT", near_reference(a), a, REFERENCE, at_least=True, margin=0.005,
                   source="issue 31 (a 2025 unifying study)")
      for a in _ALL if a not in ("freeze", REFERENCE)))


def check(config) -> None:
  """Refuses an arm that does not apply to an --arch (it would fail every run)."""
  for arch in config.cells.archs:
    wrong = [a for a in config.cells.arms if arch in ARMS and a not in ARMS[arch]]
    if wrong:
      raise InputError(f"--strategies {','.join(wrong)} do not apply to --arch {arch}; its "
                       f"arms are {','.join(ARMS[arch])}")


STUDY = study.Study(
    module="experiments.peft_table", title="# Parameter-efficient transfer (issue 31)",
    arms=hooks.arms_with(LABELS, LABELS), claims=CLAIMS, tune_budget=BUDGET, check=check,
    prepare=hooks.prepare(sources.study_source),
    check_data=hooks.check_data(sources.source_input_shape), plots=hooks.plot_accuracy,
    defaults={"arch": "resnet_s", "shots": "1,5,10", "repeats": 10, "lrs": "paper",
              "steps": 1000, "patience": 200, "tune_repeats": 2, "paper_grid": False,
              "out": "results/peft_resnet_s", "strategies": ",".join(ARMS["resnet_s"])},
    doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the table (`jtransfer.study.main`); `--arms ARCH` prints that arch's arms."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--arms"]:
    if len(argv) != 2 or argv[1] not in ARMS:
      print(f"error: --arms takes one of {', '.join(ARMS)}", file=sys.stderr)
      return 2
    print(",".join(ARMS[argv[1]]))
    return 0
  return study.main(STUDY, argv)


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  sys.exit(main())
