"""Base-model selection: transferability scores, and how well they rank models.

Three groups of pure functions (docs/decisions.md, "Base-model selection"), each in its own
module (`smetrics`, `transferability`, `selection_eval`) and re-exported here:

* Feature-map metrics S1..S6 (base-model-selection-metrics) on last-conv maps (N, H, W, C), post-ReLU,
  channels last. They are accumulated chunk by chunk from sufficient statistics, so thousands of
  full-size maps never have to sit in memory together:
  `feature_map_metrics(maps, labels, chunk_size=64)`, or `feature_map_metrics_from_batches(it)` for an
  iterator of (maps, labels) batches, or `feature_map_stats` / `merge_stats` / `metrics_from_stats`
  to spread the work yourself (over hosts, over time).
* Label-aware scores from the literature: `logme` and `h_score` on penultimate features (N, D),
  `leep` on source-model softmax outputs (N, K_src), `nce` on source hard predictions.
* Evaluation: `normalize_metrics` (every metric to [-1, 1], S2/S4/S5/S6 negated so larger is better),
  `combine` and `alpha_sweep` for C_ij(alpha) = (1 - alpha) S_i + alpha S_j, `spearman`,
  `weighted_tau`, and `rank_correlations`, which treats target-blind baselines
  (`target_blind_scores`: source accuracy, parameter count) exactly like any other score.

Every score is oriented so that it can be compared with fine-tuned accuracy by rank correlation;
S2, S4, S5, S6 are "smaller is better" in raw form (see `SMALLER_IS_BETTER`).

Example:
  maps, labels = ...                        # (N, H, W, C) last-conv maps of one model on one task
  m = feature_map_metrics(maps, labels)     # {'S1': ..., ..., 'S6': ...}
  entries = [m_model_task, ...]             # one dict per (model, task)
  norm = normalize_metrics(stack_metrics(entries))
  sweep = alpha_sweep(norm['S5'], norm['S6'], accuracy, groups=arch_target)
  sweep.best_alpha, sweep.best_mean         # paper: C_56(0.574), mean Spearman 0.7514
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import traverse_util

from jtransfer.errors import InputError
# The three groups live in their own modules; every public name stays importable from here.
from jtransfer.methods.selection_eval import (  # noqa: F401
    AlphaSweep, RankSummary, alpha_sweep, combine, normalize_metrics, rank_correlations, ranks,
    spearman, stack_metrics, sweep_pairs, target_blind_scores, weighted_tau)
from jtransfer.methods.smetrics import (  # noqa: F401
    METRIC_NAMES, S6_APPENDIX, S6_SIGNS, SMALLER_IS_BETTER, FeatureMapStats,
    feature_map_metrics, feature_map_metrics_from_batches, feature_map_stats, merge_stats,
    metrics_from_stats)
from jtransfer.methods.transferability import (  # noqa: F401
    LOGME_VARIANTS, h_score, leep, logme, nce)


# Which map S1..S6 (and MAC retrieval) read: 'conv' = the last conv layer's output after its
# activation, as the selection paper says ("featuremaps of the last convolutional layer") and
# MAC is defined (Tolias et al.); 'pooled' = the model's 'last_conv' tap, which for VGG and
# AlexNet comes after the last max pool (vgg_s: 7x7 -> 3x3, the last row and column dropped).
# For ResNets both are the last block's output.
MAP_TAPS = ("conv", "pooled")
# Pseudo-tap name for `apply_with_taps`: the output of the model's last conv unit (or block).
LAST_CONV_OUTPUT = "last_conv_output"


# ------------------------------------------------------------------------------------------------
# Which map: the last conv layer's output, or the model's 'last_conv' tap
# ------------------------------------------------------------------------------------------------


def map_tap_name(map_tap: str) -> str:
  """The tap name `apply_with_taps` takes for a `MAP_TAPS` choice.

  Args:
    map_tap: 'conv' (the last conv layer's output, the default everywhere) or 'pooled' (the
      model's 'last_conv' tap, after the last max pool in VGG / AlexNet).

  Returns:
    `LAST_CONV_OUTPUT` or 'last_conv'.

  Raises:
    InputError: an unknown choice.
  """
  if map_tap not in MAP_TAPS:
    raise InputError(f"map tap {map_tap!r} is not one of {', '.join(MAP_TAPS)}")
  return LAST_CONV_OUTPUT if map_tap == "conv" else "last_conv"


def _conv_unit_classes() -> tuple[type, ...]:
  from jtransfer.models.common import ConvUnit
  from jtransfer.models.inception import InceptionBlock
  from jtransfer.models.mobilenet import InvertedResidual
  from jtransfer.models.resnet import BLOCKS
  return (ConvUnit, InceptionBlock, *BLOCKS.values(), InvertedResidual)


def _last_conv_is_the_map() -> tuple[type, ...]:
  from jtransfer.models.convnext import ConvNeXt
  from jtransfer.models.densenet import DenseNet
  from jtransfer.models.swin import Swin
  from jtransfer.models.vit import ViT
  return (ConvNeXt, DenseNet, Swin, ViT)


def apply_with_taps(model, params, batch_stats, x: jax.Array, taps: Sequence[str]
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Eval-mode forward (running BN statistics) returning logits and feature taps; jit-able.

  As `jtransfer.models.apply_model(..., taps=taps)`, plus the pseudo-tap `LAST_CONV_OUTPUT`: the
  output of the model's last top-level conv unit or residual block, i.e. the last conv layer
  after its BN and ReLU, before any pooling. It is captured with Flax's capture_intermediates
  (the unit's `__call__` result), so the models need no extra tap. For vgg_s that is conv3_2's
  (N, 7, 7, 128) output at 28x28 input, where 'last_conv' is its 3x3 max pool; for a ResNet it
  equals 'last_conv'; for a truncated model (`truncate_after`) it is the map at the cut.

  Args:
    model: a Flax module from `jtransfer.models`.
    params: its 'params' tree.
    batch_stats: its 'batch_stats' tree, or None / {} without BN.
    x: (N, H, W, C) normalised inputs.
    taps: tap names (see `jtransfer.models.available_taps`) and/or `LAST_CONV_OUTPUT`.

  Returns:
    (logits, {tap: array}).

  Raises:
    InputError: an unknown tap name, or a model without conv units.
  """
  taps = tuple(taps)
  from jtransfer import models
  if LAST_CONV_OUTPUT not in taps:
    logits, _, got = models.apply_model(model, params, batch_stats, x, taps=taps or None)
    return logits, got
  if isinstance(model, _last_conv_is_the_map()):
    # The map before pooling follows a final norm (DenseNet's norm5 + ReLU) or sits inside
    # blocks that are not conv units (ConvNeXt; a transformer's normed tokens on their grid):
    # the models tap it as 'last_conv', also at a truncation cut.
    wanted = tuple(t for t in taps if t != LAST_CONV_OUTPUT) + ("last_conv",)
    logits, _, got = models.apply_model(model, params, batch_stats, x, taps=wanted)
    return logits, dict({t: got[t] for t in taps if t != LAST_CONV_OUTPUT},
                        **{LAST_CONV_OUTPUT: got["last_conv"]})
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  units = _conv_unit_classes()
  logits, state = model.apply(
      variables, x, train=False, mutable=["intermediates"],
      capture_intermediates=lambda mdl, method: (method == "__call__" and len(mdl.path) == 1
                                                 and isinstance(mdl, units)))
  flat = traverse_util.flatten_dict(state["intermediates"], sep="/")
  # Units run (and are recorded) in call order: the last captured one is the last conv unit.
  called = [k for k in flat if k.endswith("/__call__")]
  if not called:
    raise InputError(f"{type(model).__name__} has no conv unit whose output could be tapped")
  got = {LAST_CONV_OUTPUT: flat[called[-1]][0]}
  sown = {k[:-len("/out")] if k.endswith("/out") else k: v for k, v in flat.items()
          if not k.endswith("/__call__")}
  missing = [t for t in taps if t != LAST_CONV_OUTPUT and t not in sown]
  if missing:
    raise InputError(f"unknown tap name(s) {missing} for {type(model).__name__}; available: "
                     f"{sorted(sown) + [LAST_CONV_OUTPUT]}")
  got.update({t: sown[t] for t in taps if t != LAST_CONV_OUTPUT})
  return logits, got


# ------------------------------------------------------------------------------------------------
# Feature-map metrics S1..S6
# ------------------------------------------------------------------------------------------------

