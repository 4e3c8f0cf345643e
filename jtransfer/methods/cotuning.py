"""Co-Tuning (You et al., "Co-Tuning for Transfer Learning", NeurIPS 2020).

Fine-tuning keeps the source classifier beside the new target head and trains it too, against
soft source labels translated from the target labels: with r = p(y_s | y_t), the category
relationship,

  L = CE(target_head(f(x)), y_t) + lam * CE(source_head(f(x)), r[y_t]).

r is learnt before fine-tuning by the paper's direct approach: the source model's softmax over
its own classes, averaged over the run's training images of each target class (the authors'
code, thuml/Cotuning `direct_relationship_learning`, read, not copied; the calibrated reverse
approach they prefer for large target sets needs a held-out split the k-shot draws do not
have). The source branch is the source architecture whole (vgg_s keeps its fc6/fc7, trained
with its head, under params['cotuning']) on the target's shared conv backbone, so each step
runs the backbone twice. r is a per-run constant under params['frozen']. BN in the mode asked
for (`jtransfer.methods.bn_rule`) and Adam, as 'finetune'; lam is a knob tuned on validation (the authors' default 2.3 is the paper
value).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models, surgery
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import bn_rule, transfer
from jtransfer.train import evaluate, optim

COTUNING_KEY = "cotuning"
FROZEN_KEY = "frozen"  # per-run constants, never trained (as DELTA's)
LAM = 2.3
LAMS = (1.0, 2.3, 5.0)


def relationship(source_logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """r[t] = mean softmax(source logits) over the images of target class t: (K_t, K_s).

  Raises:
    InputError: a target class has no image.
  """
  z = np.asarray(source_logits, np.float64)
  p = np.exp(z - z.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  labels = np.asarray(labels)
  missing = [t for t in range(num_classes) if not np.any(labels == t)]
  if missing:
    raise InputError(f"Co-Tuning's relationship needs an image of every target class; "
                     f"classes {missing} have none")
  return np.stack([p[labels == t].mean(axis=0) for t in range(num_classes)]).astype(np.float32)


def _network(params) -> dict:
  return {k: v for k, v in params.items() if k not in (COTUNING_KEY, FROZEN_KEY)}


def source_branch_params(params) -> dict:
  """The source model's params: the target's shared backbone plus the source-only layers."""
  backbone = {k: v for k, v in _network(params).items() if k != "head"}
  return surgery.combine(backbone, params[COTUNING_KEY])


def cotuning_loss_fn(model, source_model, mean, std, lam: float,
                     bn_train: bool = False) -> Callable:
  def loss_fn(params, batch_stats, batch, rng):
    x = normalize(batch["image"], mean, std)
    logits, new_stats, _ = models.apply_model(model, _network(params), batch_stats, x,
                                              train=bn_train, rng=rng)
    # The source branch shares the backbone and sees the same batch: in train mode its BN
    # layers normalise with the same batch statistics, so the target pass's update serves both.
    src_logits, _, _ = models.apply_model(source_model, source_branch_params(params),
                                          batch_stats, x, train=bn_train, rng=rng)
    ce = evaluate.cross_entropy(logits, batch["label"])
    soft = params[FROZEN_KEY]["relationship"][batch["label"]]
    co = -jnp.mean(jnp.sum(soft * jax.nn.log_softmax(src_logits.astype(jnp.float32)), axis=-1))
    return ce + lam * co, ({"ce": ce, "cotuning": co}, new_stats if bn_train else batch_stats)
  return loss_fn


def build_cotuning(source: transfer.Source, num_classes: int, total_steps: int,
                   lam: float = LAM, bn_train: bool = False) -> transfer.Setup:
  model = transfer.target_model(source, num_classes)
  source_model = source.model
  src_params = source.variables["params"]
  src_forward = transfer.eval_forward(source_model, source.mean, source.std)
  target_keys = set(transfer.init_target(source, model, 0)[0])

  def init(seed, images=None, labels=None):
    params, stats = transfer.init_target(source, model, seed)
    own = {k: jax.tree.map(jnp.asarray, v) for k, v in src_params.items()
           if k not in target_keys or k == "head"}
    if images is not None and labels is not None:
      src_logits = np.asarray(src_forward(src_params, source.variables.get("batch_stats", {}),
                                          images))
      r = relationship(src_logits, labels, num_classes)
    else:  # shapes only (building the optimizer)
      k_src = src_params["head"]["bias"].shape[0]
      r = np.full((num_classes, k_src), 1.0 / k_src, np.float32)
    return {**params, COTUNING_KEY: own, FROZEN_KEY: {"relationship": jnp.asarray(r)}}, stats

  params, _ = init(0)
  optimizer = optim.make_optimizer(params, [(f"{FROZEN_KEY}/.*", optim.FROZEN), (".*", "all")],
                                   {"all": optim.adam(1.0)}, injected_lr=True)
  forward = transfer.eval_forward(model, source.mean, source.std)
  return transfer.Setup(model, init, optimizer,
                        cotuning_loss_fn(model, source_model, source.mean, source.std, lam,
                                         bn_train),
                        lambda p, s, images: forward(_network(p), s, images))


transfer.register(transfer.Strategy(
    "cotuning", transfer.FINETUNE_LRS, build_cotuning,
    description="finetune + lam x CE of the kept source head against p(y_s | y_t) (Co-Tuning), "
                "Adam", knobs={"lam": LAMS}, knob_defaults={"lam": LAM}, bn_modes=bn_rule.BOTH))
