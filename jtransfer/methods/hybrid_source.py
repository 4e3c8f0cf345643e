"""The Sparse-SourceNet stage of sparse deep transfer (Liu et al. 2017, step 1), with its cache.

The reference source model is pruned by iterative magnitude pruning on its own data
(`hybrid.sparse_source_net`: prune to each round's target, retrain with SGD, masks kept in
the optimiser); each round is measured on the source's test images. What this module adds to
`hybrid.sparse_source_net` is the stage as an experiment runs it: which source images are used
(`source_sets`), one row per round for a table (`SourceRow`), and the pruned net saved beside
the results so that a resumed run reloads it (`save_sparse_source`, `load_sparse_source`:
the masks are recovered from the zeros, which pruning leaves exactly zero).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional

import jax
import numpy as np

from jtransfer.data import Dataset, ImageSet
from jtransfer.data.fewshot import cap_per_class
from jtransfer.methods import hybrid, sparsity, transfer
from jtransfer.train import accuracy, predict_logits, sgd


@dataclasses.dataclass(frozen=True)
class SourcePruning:
  """How the Sparse-SourceNet is made.

  Attributes:
    sparsities: the target sparsity of each round, increasing (`sparsity.round_sparsities`).
    steps: SGD steps of retraining per round (momentum 0.9).
    lr: the SGD learning rate.
    batch_size: retraining batch size.
    max_train: most source training images used, a fixed random subset (0 = all).
    test_per_class: source test images per class measured after each round (0 = all).
    scope: how a round's target is shared among layers (`sparsity.SCOPES`).
  """
  sparsities: tuple[float, ...]
  steps: int = 100
  lr: float = 0.01
  batch_size: int = 128
  max_train: int = 6000
  test_per_class: int = 500
  scope: str = "erk"


@dataclasses.dataclass(frozen=True)
class SourceRow:
  """One row of the Sparse-SourceNet table: round 0 is the dense reference.

  Attributes:
    round: 0 (dense), 1, 2, ...
    target: the round's target sparsity.
    sparsity: the measured connection sparsity of every kernel together.
    acc_pruned: source test accuracy just after pruning (None for round 0).
    acc: source test accuracy after retraining (round 0: the reference's).
    layers: kernel path -> sparsity ({} for round 0).
  """
  round: int
  target: float
  sparsity: float
  acc_pruned: Optional[float]
  acc: float
  layers: dict


def source_sets(data: Dataset, max_train: int, test_per_class: int
                ) -> tuple[ImageSet, ImageSet]:
  """(retraining images, test images) of the source data: at most `max_train` training images
  (a subset fixed by seed 0, in split order) and the first `test_per_class` test images of
  each class."""
  train = data.train
  if max_train and len(train) > max_train:
    keep = np.random.default_rng(0).permutation(len(train))[:max_train]
    train = train.take(np.sort(keep))
  return train, cap_per_class(data.test, test_per_class)


def _host(tree):
  # Copies: the train step donates its state's buffers, which a zero-copy view would share.
  return jax.tree.map(lambda x: np.array(x), tree)


def prune_source(source: transfer.Source, data: Dataset, cfg: SourcePruning,
                 on_row: Optional[Callable[[SourceRow], None]] = None):
  """Makes the Sparse-SourceNet from the dense reference `source` on its source `data`.

  Args:
    source: the Reference-SourceNet (vgg_s).
    data: the source dataset (`source_sets` picks the images).
    cfg: the stage's settings.
    on_row: called with each row as it is measured (round 0 first), e.g. to save it.

  Returns:
    (params, masks, [SourceRow]).
  """
  train, test = source_sets(data, cfg.max_train, cfg.test_per_class)
  fwd = transfer.eval_forward(source.model, source.mean, source.std)
  acc = lambda p: accuracy(predict_logits(fwd, p, {}, test.images), test.labels)
  rows = [SourceRow(0, 0.0, 0.0, None, acc(source.variables["params"]), {})]
  if on_row is not None:
    on_row(rows[0])

  def on_round(rnd, state):
    rep = sparsity.sparsity_report(_host(state.params))
    rows.append(SourceRow(len(rows), rnd.target, rnd.sparsity, rnd.metric_pruned,
                          rnd.metric_retrained,
                          {p: l["sparsity"] for p, l in rep["layers"].items()}))
    if on_row is not None:
      on_row(rows[-1])

  params, masks, _ = hybrid.sparse_source_net(
      source, train.images, train.labels, cfg.sparsities, cfg.steps,
      tx=sgd(cfg.lr, momentum=0.9), batch_size=cfg.batch_size, scope=cfg.scope,
      evaluate_fn=acc, on_round=on_round)
  return params, masks, rows


def save_sparse_source(path: str, source: transfer.Source, params) -> None:
  """Saves the Sparse-SourceNet `params` as a source checkpoint at `path` (the reference's
  structure and normalisation, `meta['sparse_source'] = True`)."""
  transfer.save_source(path, transfer.Source(
      source.arch, source.config, {"params": params}, source.input_shape, source.mean,
      source.std, dict(source.meta, sparse_source=True)))


def load_sparse_source(path: str):
  """(params, masks) of a Sparse-SourceNet saved by `save_sparse_source`, or None when `path`
  holds none; the masks are its zero kernel entries."""
  if not os.path.isdir(path):
    return None
  params = _host(transfer.load_source(path).variables["params"])
  return params, sparsity.masks_from_zeros(params)
