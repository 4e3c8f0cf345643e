"""Norm tuning: train only the affine parameters of the normalisation layers, and the new head.

Where: every BatchNorm (`<unit>/bn/{scale,bias}`) and LayerNorm (`<unit>/norm/{scale,bias}`,
a transformer's `blockN/norm1/...`, `norm/...`, `.../ln.../...`) by the path rule `NORM_RULE`.
Nothing is inserted, so there is nothing to merge and no extra inference cost.

BN mode: eval mode with the source's running statistics (as every frozen-backbone strategy here:
freeze, bitfit, CWL, FiLM), so only the per-channel affine (gamma, beta) adapts; the statistics
are not re-estimated from the few target shots (batch statistics of a 1-5 shot batch are noisy,
and `finetune_bn` already covers the batch-statistics mode). LayerNorm has no running state.

References: BN affine tuning as in Frankle et al. 2021 (arXiv 2003.00152) and FiT (Shysheya et
al. 2023, arXiv 2206.08671, which train FiLM over BN); LayerNorm tuning of ViTs as in Basu et al.
2023 (arXiv 2302.14209, "Strong baselines for parameter efficient few-shot fine-tuning").
Optimiser: Adam, the freeze LR grid. No knobs.
"""
from __future__ import annotations

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import peft_paths, transfer
from jtransfer.train import optim

NORM_RULE = r"(.*/)?(bn|norm|ln|layernorm)[^/]*/(scale|bias)"


def build_norm_tune(source: transfer.Source, num_classes: int,
                    total_steps: int) -> transfer.Setup:
  """The norm-tuning Setup: norm scale/bias + head trained (Adam), the rest frozen.

  Raises:
    InputError: the model has no normalisation layer (e.g. vgg_s).
  """
  abstract = models.abstract_variables(transfer.target_model(source, num_classes),
                                       tuple(source.input_shape))["params"]
  if not surgery.select(abstract, [NORM_RULE], must_match=False):
    raise InputError(f"norm_tune: {source.arch} has no BatchNorm or LayerNorm to tune")
  return transfer.rule_setup(source, num_classes,
                             [(peft_paths.HEAD_RULE, "train"), (NORM_RULE, "train"),
                              (".*", optim.FROZEN)], {"train": optim.adam(1.0)})


transfer.register(transfer.Strategy(
    "norm_tune", transfer.FREEZE_LRS, build_norm_tune,
    description="only BN/LayerNorm scale and shift + new head trained, BN running stats, Adam"))
