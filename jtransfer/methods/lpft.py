"""LP-FT (Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022) and WiSE-FT (Wortsman et al., "Robust fine-tuning of
zero-shot models", CVPR 2022).

  * lpft: linear probe first, then fine-tune every layer from the probed head. The probe is an
    L2-regularised multinomial logistic regression (scikit-learn, lbfgs, C = `PROBE_C`) on the
    frozen backbone's head inputs of the run's training images, fitted to convergence in the
    run's `init`, as the LP-FT paper's probe; fine-tuning then runs as 'finetune' (Adam, BN
    in the mode asked for, `jtransfer.methods.bn_rule`; the finetune LR grid).
  * wise_ft: the same run, then the weights interpolated back toward the start, theta =
    (1 - alpha) theta_0 + alpha theta_ft, with theta_0 the backbone as loaded plus the probed
    head (WiSE-FT's "zero-shot" end for a model without a zero-shot head); alpha is a knob in
    (0, 1], tuned on validation (grid `ALPHAS`, never extended past 1).
"""
from __future__ import annotations

import jax
import numpy as np

from jtransfer.errors import InputError
from jtransfer.methods import bn_rule, transfer
from jtransfer.train import optim

PROBE_C = 1.0
ALPHAS = (0.25, 0.5, 0.75, 1.0)
ALPHA = 0.5


def probe_head(features: np.ndarray, labels: np.ndarray, num_classes: int,
               c: float = PROBE_C) -> dict:
  """{'kernel' (d, K), 'bias' (K,)} of a logistic regression fitted on `features`.

  Classes absent from `labels` get zero weights and a large negative bias (never predicted);
  with two classes present the binary model is split symmetrically into two logits.
  """
  from sklearn.linear_model import LogisticRegression
  x = np.asarray(features, np.float64)
  y = np.asarray(labels)
  present = np.unique(y)
  if present.size < 2:
    raise InputError("LP-FT's linear probe needs at least 2 classes in the training images")
  lr = LogisticRegression(C=c, max_iter=5000).fit(x, y)
  coef, icpt = lr.coef_, lr.intercept_
  if present.size == 2:  # one logit w.x + b for class 1 against class 0
    coef, icpt = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-icpt / 2, icpt / 2])
  kernel = np.zeros((x.shape[1], num_classes), np.float32)
  bias = np.full((num_classes,), -1e4, np.float32)
  kernel[:, present] = coef.T
  bias[present] = icpt
  return {"kernel": kernel, "bias": bias}


def interpolate(params, start, alpha: float):
  """(1 - alpha) start + alpha params, leaf by leaf."""
  return jax.tree.map(lambda p, s: (1.0 - alpha) * s + alpha * p, params, start)


def build_lpft(source: transfer.Source, num_classes: int, total_steps: int,
               alpha: float | None = None, bn_train: bool = False) -> transfer.Setup:
  # The probe's features are the source's in eval mode (running statistics) in both modes:
  # the linear probe fits the frozen network; the fine-tuning after it follows `bn_train`.
  setup = transfer.rule_setup(source, num_classes, [(".*", "all")], {"all": optim.adam(1.0)},
                              bn_train=bn_train)
  base_init = setup.init

  def init(seed, images=None, labels=None):
    params, stats = base_init(seed, images, labels)
    if images is not None and labels is not None:
      feats = transfer.extract_features(source, num_classes, images)
      head = probe_head(feats, labels, num_classes)
      params = dict(params, head={k: jax.numpy.asarray(v, params["head"][k].dtype)
                                  for k, v in head.items()})
    return params, stats

  finalize = None
  if alpha is not None:
    if not 0.0 < alpha <= 1.0:
      raise InputError(f"WiSE-FT alpha must lie in (0, 1], got {alpha}")
    finalize = lambda params, start: interpolate(params, start, alpha)
  return transfer.Setup(setup.model, init, setup.optimizer, setup.loss_fn, setup.forward,
                        finalize)


transfer.register(transfer.Strategy(
    "lpft", transfer.FINETUNE_LRS, build_lpft,
    description="linear probe (logistic regression) to convergence, then all layers trained "
                "from it (LP-FT), Adam", bn_modes=bn_rule.BOTH))
transfer.register(transfer.Strategy(
    "wise_ft", transfer.FINETUNE_LRS,
    lambda s, k, n, alpha=ALPHA, bn_train=False: build_lpft(s, k, n, alpha, bn_train),
    description="LP-FT, then weights interpolated toward the start by alpha (WiSE-FT)",
    knobs={"alpha": ALPHAS}, knob_defaults={"alpha": ALPHA}, knob_bounds={"alpha": (0.0, 1.0)},
    bn_modes=bn_rule.BOTH))
