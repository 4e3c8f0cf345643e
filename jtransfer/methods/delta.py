"""DELTA (Li et al., ICLR 2019) and its baselines L2, L2-SP, L2-FE: regularisers and strategies.

Faithful to the authors' PyTorch code (github.com/lixingjian/DELTA, train.py, channel_eval.py):
  * every strategy but L2 minimises CE + alpha * Omega + beta * 0.5 * ||head||^2, with no
    weight decay; L2 is plain SGD with weight decay 1e-4 on every parameter;
  * Omega: L2-SP `0.5 * ||w - w0||^2` over every source-initialised parameter (BN scale and
    bias included; BN running stats are not parameters; the new head is excluded);
    DELTA w/o ATT `0.5 * sum_l ||FM_t - FM_s||^2`; DELTA
    `sum_l 0.5 * sum_{b,c} C * w_c * ||FM_t[b,c] - FM_s[b,c]||^2 / (H*W)` (summed over the
    batch, not averaged);
  * FM = the raw conv output (before BN) of the last conv of the last block of each stage
    (on a ViT or Swin: block outputs, token x channel, see `delta_tokens`);
    source maps come from the frozen source (running BN stats) under stop_gradient;
  * attention w (one vector per tapped layer): a linear head trained on frozen source features
    (L2-FE), then per channel the CE increase when that channel's kernel slice is zeroed,
    averaged over a few training batches, z-scored (ddof=0), softmax(z / 5); BatchNorm as
    channel_eval.py by default (Config.att_bn 'authors': the head trains with the backbone in
    train mode, whose passes move the running statistics to the target images; the ablation
    runs in eval mode with those statistics);
  * SGD momentum 0.9; lr decays x0.1 at 67% of training, exponentially (explr, default) or in
    one step (steplr); the target trains with BN in train mode (batch statistics), as
    `model.train()` does in the authors' code.

Strategies registered here: 'l2fe', 'l2', 'l2sp', 'delta_noatt', 'delta'. The attention weights
are per-run constants in params['frozen']['attention'], computed in `Setup.init` from that run's
training images only, and cached per (source, images, labels). Every strategy takes its
hyper-parameters as knobs: `alpha` (tuned) and `config`, a `Config` (beta, schedule, taps, the
attention probe's settings; default `Config()`), e.g.
`get_strategy('delta').build(source, 10, 500, alpha=0.1, config=Config(schedule='step'))`.
BatchNorm: L2, L2-SP, DELTA w/o ATT and DELTA follow the mode asked for (`bn='train'` or
'frozen' sets `Config.bn_train`, `jtransfer.methods.bn_rule`); without `bn`, `Config.bn_train`
(train, the authors' code). L2-FE keeps the source's statistics (head only).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional

import numpy as np

from jtransfer.methods import bn_rule, transfer
# The attention, the losses and the config live in their own modules; every name stays
# importable from here.
from jtransfer.methods.delta_attention import (  # noqa: F401
    _ablate_output, ablation_fn, _attention_batches, _ATTENTION_CACHE, attention_from_losses,
    attention_weights, AttentionComputer, _CACHE_SIZE, channel_chunk, channel_loss_increase,
    _digest, _features_fn, _probe_one_batch, _probe_step, source_fingerprint, tap_map_bytes,
    _train_features_fn, train_probe, train_probe_bn_train, _weighted_ce)
from jtransfer.methods.delta_config import (  # noqa: F401
    ATT_BN_MODES, Config, FROZEN_KEY, SCHEDULES)
from jtransfer.methods.delta_loss import (  # noqa: F401
    attention_distance, _check_maps, default_taps, feature_distance, KINDS, l2, l2sp,
    make_loss_fn, _maps_fn, _network, private_l2, private_subtree, resolve_taps, source_maps,
    _source_maps_for, SourceMaps, starting_point)
from jtransfer.train import optim, schedules


# ----------------------------------------------------------------------------- strategies


def lr_schedule(config: Config, total_steps: int) -> optim.Schedule:
  """The unit-lr schedule (the run's lr multiplies it): x0.1 at `decay_fraction` of training."""
  epochs = max(1, total_steps // config.steps_per_epoch)
  decay_epochs = int(config.decay_fraction * epochs) + 1
  if config.schedule == "exp":
    return schedules.exponential_per_epoch(1.0, config.steps_per_epoch, decay_epochs)
  if config.schedule == "step":
    return schedules.milestones(1.0, [decay_epochs * config.steps_per_epoch])
  return schedules.constant(1.0)


@functools.lru_cache(maxsize=16)
def _eval_forward(model, mean: tuple, std: tuple) -> Callable:
  return transfer.eval_forward(model, mean, std)


def _forward(model, source: transfer.Source) -> Callable:
  """Eval forward without the per-run constants, so every setup of the model (and every run,
  whatever its constants' shapes) shares one compiled function per input shape."""
  jitted = _eval_forward(model, tuple(source.mean), tuple(source.std))
  return lambda params, batch_stats, images: jitted(_network(params), batch_stats, images)


def build_setup(source: transfer.Source, num_classes: int, total_steps: int, kind: str,
                config: Optional[Config] = None) -> transfer.Setup:
  """A Setup for 'l2', 'l2sp', 'fm' (DELTA w/o ATT) or 'att' (DELTA) with `config`.

  `init(seed, images, labels)` loads the source, seeds the head and, for 'att' and 'fm', puts
  the run's constants under params['frozen'] (never trained): 'attention' (computed from the
  run's training images only) and 'source' (their source maps, see `SourceMaps`).
  """
  config = (config or Config()).validate()
  model = transfer.target_model(source, num_classes)
  params, _ = transfer.init_target(source, model, 0)
  w0 = starting_point(source.variables["params"], params)
  taps = resolve_taps(source, model, config) if kind in ("fm", "att") else ()
  sgd = optim.sgd(lr_schedule(config, total_steps), momentum=config.momentum,
                  weight_decay=config.weight_decay if kind == "l2" else 0.0)
  source_fn = _source_maps_for(model, source, w0, taps, config) if taps else None
  attention = AttentionComputer(source, model, taps, config) if kind == "att" else None

  def init(seed, images, labels):
    p, stats = transfer.init_target(source, model, seed)
    frozen = {}
    if attention is not None:
      frozen["attention"] = attention(images, labels)
    table = source_fn.table(images) if source_fn is not None else None
    if table is not None:
      frozen["source"] = table
    return (dict(p, **{FROZEN_KEY: frozen}) if frozen else p), stats

  rules = [(".*", "all")]
  if taps:
    # Every path the per-run constants can have, so the 'frozen' rule matches; their shapes
    # depend on the run and do not matter to the labels.
    rules.insert(0, (f"{FROZEN_KEY}/.*", optim.FROZEN))
    frozen = {"source": {"images": np.zeros(0, np.uint8), "keys": np.zeros(0, np.float32),
                         "maps": {t: np.zeros(0, np.float32) for t in taps}}}
    if attention is not None:
      frozen["attention"] = {t: np.zeros(0, np.float32) for t in taps}
    params = dict(params, **{FROZEN_KEY: frozen})
  optimizer = optim.make_optimizer(params, rules, {"all": sgd}, injected_lr=True)
  loss_fn = make_loss_fn(model, source, kind, w0, taps, config, source_fn)
  return transfer.Setup(model, init, optimizer, loss_fn, _forward(model, source))


def build_l2fe(source: transfer.Source, num_classes: int, total_steps: int,
               config: Optional[Config] = None) -> transfer.Setup:
  """L2-FE: frozen source features (BN running stats), a linear head trained by SGD with
  CE + beta * 0.5 * ||head||^2, the beta term as coupled weight decay (the same gradient)."""
  config = (config or Config()).validate()
  sgd = optim.sgd(lr_schedule(config, total_steps), momentum=config.momentum,
                  weight_decay=config.beta)
  return transfer.rule_setup(source, num_classes, [("head/.*", "head"), (".*", optim.FROZEN)],
                             {"head": sgd})


PAPER_LRS = (0.01,)  # ResNet-101 in the paper and the authors' run.sh
# alpha grids chosen on validation (the paper picks alpha by 5-fold cross-validation). DELTA w/o
# ATT sums its distance over positions and channels without DELTA's per-channel weights, about
# H*W times stiffer at the same alpha, so its grid sits lower (at 0.01 it diverges at lr 0.01).
ALPHAS = (1e-3, 1e-2, 1e-1)
ALPHAS_NOATT = (1e-5, 1e-4, 1e-3)
CV_FOLDS = 5
# The strategies registered here: each takes a `config` knob (a `Config`).
CONFIG_STRATEGIES = ("l2fe", "l2", "l2sp", "delta_noatt", "delta")


def _build(kind: str):
  def build(source, num_classes, total_steps, alpha=None, config: Optional[Config] = None,
            bn_train: Optional[bool] = None):
    config = config or Config()
    if bn_train is not None:  # the mode asked for (`bn`) wins over the config's
      config = dataclasses.replace(config, bn_train=bool(bn_train))
    if kind == "l2":
      return build_setup(source, num_classes, total_steps, kind, config)
    alpha = _alpha_default(kind, config) if alpha is None else float(alpha)
    config = dataclasses.replace(config, **{"alpha_noatt" if kind == "fm" else "alpha": alpha})
    return build_setup(source, num_classes, total_steps, kind, config)
  return build


def _alpha_default(kind: str, config: Optional[Config] = None) -> float:
  """The alpha a strategy uses when its `alpha` knob is not given."""
  config = config or Config()
  if kind == "fm":
    return config.alpha_noatt if config.alpha_noatt is not None else ALPHAS_NOATT[1]
  return config.alpha


transfer.register(transfer.Strategy(
    "l2fe", PAPER_LRS, build_l2fe, head_only=True,
    description="L2-FE: frozen features, linear head, SGD, beta * 0.5 ||head||^2"))
transfer.register(transfer.Strategy(
    "l2", PAPER_LRS, _build("l2"),
    description="L2: all layers, SGD weight decay 1e-4", bn_modes=bn_rule.BOTH,
    recipe_bn=bn_rule.TRAIN))
transfer.register(transfer.Strategy(
    "l2sp", PAPER_LRS, _build("l2sp"), knobs={"alpha": ALPHAS},
    knob_defaults={"alpha": _alpha_default("l2sp")}, cv_folds=CV_FOLDS,
    description="L2-SP: CE + alpha 0.5||w - w0||^2 + beta 0.5||head||^2, SGD",
    bn_modes=bn_rule.BOTH, recipe_bn=bn_rule.TRAIN))
transfer.register(transfer.Strategy(
    "delta_noatt", PAPER_LRS, _build("fm"), knobs={"alpha": ALPHAS_NOATT},
    knob_defaults={"alpha": _alpha_default("fm")}, cv_folds=CV_FOLDS,
    description="DELTA w/o ATT: CE + alpha 0.5 sum ||FM_t - FM_s||^2 + beta head term, SGD",
    bn_modes=bn_rule.BOTH, recipe_bn=bn_rule.TRAIN))
transfer.register(transfer.Strategy(
    "delta", PAPER_LRS, _build("att"), knobs={"alpha": ALPHAS},
    knob_defaults={"alpha": _alpha_default("att")}, cv_folds=CV_FOLDS,
    description="DELTA: attention-weighted feature-map distance + beta head term, SGD",
    bn_modes=bn_rule.BOTH, recipe_bn=bn_rule.TRAIN))
