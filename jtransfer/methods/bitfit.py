"""BitFit (Ben Zaken et al., ACL 2022): train only the bias terms, and the new head.

On a CNN the biases are the conv biases (units without BN, e.g. vgg_s) and the BN shifts
(units with BN, e.g. resnet_s); BN keeps its running statistics (eval mode) as in every
frozen-backbone strategy here. It is the additive counterpart of CWL's per-channel scales
(`methods/cwl.py`) and half of FiLM's scale-and-shift (`methods/film.py`). Adam, the freeze LR
grid (the new head, trained at the same LR, dominates the early steps).
"""
from __future__ import annotations

from jtransfer.methods import transfer
from jtransfer.train import optim

BIAS_RULE = ".*/bias"


def build_bitfit(source: transfer.Source, num_classes: int, total_steps: int) -> transfer.Setup:
  return transfer.rule_setup(source, num_classes,
                             [("head/.*", "train"), (BIAS_RULE, "train"), (".*", optim.FROZEN)],
                             {"train": optim.adam(1.0)})


transfer.register(transfer.Strategy(
    "bitfit", transfer.FREEZE_LRS, build_bitfit,
    description="only biases (conv biases, BN shifts) and the new head trained, BN running "
                "stats, Adam"))
