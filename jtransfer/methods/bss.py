"""BSS, Batch Spectral Shrinkage (Chen et al., "Catastrophic Forgetting Meets Negative
Transfer", NeurIPS 2019): fine-tuning with a penalty on the smallest singular values of the
batch's feature matrix,

  L = CE + eta * sum_{i=1..k} sigma_{-i}(F)^2,

F the (batch x d) head inputs ('features' tap), sigma_{-i} the i-th smallest of its
min(batch, d) singular values; the paper's k = 1 and eta = 0.001 (`eta` is tuned here like any
knob). As the authors' code (thuml/Batch-Spectral-Shrinkage, read, not copied): the SVD of the
features of each training batch; BN as the base 'finetune' strategy: the mode asked for (bn=
'train' or 'frozen', `jtransfer.methods.bn_rule`), running statistics without one.
"""
from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from jtransfer import models
from jtransfer.data.preprocess import normalize
from jtransfer.methods import bn_rule, transfer
from jtransfer.train import evaluate, optim

K = 1          # singular values penalised (the paper's k)
ETA = 1e-3     # the paper's eta
ETAS = (1e-4, 1e-3, 1e-2)


def spectral_penalty(features: jnp.ndarray, k: int = K) -> jnp.ndarray:
  """sum of the k smallest squared singular values of `features` (batch x d)."""
  s = jnp.linalg.svd(features.astype(jnp.float32), compute_uv=False)  # descending
  return jnp.sum(s[-k:] ** 2)


def bss_loss_fn(model, mean, std, eta: float, k: int = K, bn_train: bool = False) -> Callable:
  def loss_fn(params, batch_stats, batch, rng):
    logits, new_stats, taps = models.apply_model(model, params, batch_stats,
                                                  normalize(batch["image"], mean, std),
                                                  train=bn_train, taps=("features",), rng=rng)
    ce = evaluate.cross_entropy(logits, batch["label"])
    bss = spectral_penalty(taps["features"].reshape(logits.shape[0], -1), k)
    return ce + eta * bss, ({"ce": ce, "bss": bss}, new_stats if bn_train else batch_stats)
  return loss_fn


def build_bss(source: transfer.Source, num_classes: int, total_steps: int,
              eta: float = ETA, bn_train: bool = False) -> transfer.Setup:
  model = transfer.target_model(source, num_classes)
  return transfer.rule_setup(source, num_classes, [(".*", "all")], {"all": optim.adam(1.0)},
                             bss_loss_fn(model, source.mean, source.std, eta,
                                         bn_train=bn_train))


transfer.register(transfer.Strategy(
    "bss", transfer.FINETUNE_LRS, build_bss,
    description="finetune + eta x (smallest singular value of the batch features)^2 (BSS), "
                "Adam", knobs={"eta": ETAS}, knob_defaults={"eta": ETA}, bn_modes=bn_rule.BOTH))
