"""A CWL model pruned by |sigma|, measured as the CWL paper's Table IV measures it.

For each threshold tau, `prune_at_taus` removes every conv channel whose scale |sigma| < tau
(`prune.prune_by_sigma`, scales folded into the weights) and `removed` says what went: the
parameter and feature-map fractions kept and the channels kept per conv unit. The pruned model
is then finetuned on the k-shot set (all layers, Adam, BN in eval mode) for a number of epochs,
the paper's "FT@1" and "FT@30" rows: `finetune_curve` reads validation and test accuracy after
each epoch count at one learning rate, and `choose_per_epochs` picks, per epoch count, the
learning rate with the best validation accuracy (`protocol.tuning.tune`, extended at an edge),
so the test split reaches no choice. `latencies` times the jitted forwards of several models
round-robin (`train.evaluate.interleaved_latency_ms`), so a load change on a shared machine
slows the pruned and unpruned models alike.
"""
# No `from __future__ import annotations`: `Splits` is a NamedTuple, whose field annotations
# must stay objects for the API reference (as in `retrieval`).

import json
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

from jtransfer import models
from jtransfer.data import Batches
from jtransfer.data.base import ImageSet
from jtransfer.methods import prune, transfer
from jtransfer.protocol import tuning
from jtransfer.train import (accuracy, adam, fit, init_state, make_optimizer, make_train_step,
                             predict_logits)
from jtransfer.train.evaluate import forward_calls, interleaved_latency_ms


class Splits(NamedTuple):
  """One k-shot draw's images: the training set, validation (None: no choice can be made on
  it) and test."""
  train: ImageSet
  val: Optional[ImageSet]
  test: ImageSet

  def accs(self, forward: Callable, params, stats) -> dict:
    """{'val_acc' (None without validation images), 'test_acc'} of a model's eval forward."""
    acc = lambda s: accuracy(predict_logits(forward, params, stats, s.images), s.labels)
    return dict(val_acc=acc(self.val) if self.val is not None else None,
                test_acc=acc(self.test))


def prune_at_taus(params, batch_stats, config: Mapping, taus: Sequence[float],
                  residual: str = "group", multiple: int = 1) -> dict[float, prune.PruneResult]:
  """{tau: the model pruned at tau} of a CWL model (params holding its 'cwl' scales).

  Each tau prunes the same transferred model: the thresholds are a dose axis, not a sequence.
  `residual` and `multiple` are as `prune.prune_by_sigma`.
  """
  return {float(tau): prune.prune_by_sigma(params, batch_stats, config, None, float(tau),
                                           residual, multiple) for tau in taus}


def removed(res: prune.PruneResult) -> dict:
  """What pruning kept: {'params' (count), 'params_frac', 'feat_frac' (conv output channels
  over all units), 'kept' {unit: [kept, total]}}."""
  kept_maps, total_maps = res.feature_maps_kept
  return dict(params=res.params_kept, params_frac=res.params_kept / res.params_total,
              feat_frac=kept_maps / total_maps, kept={u: list(v) for u, v in res.kept.items()})


class Finetuner:
  """Finetunes a (pruned) model of one architecture: every layer, Adam at an injected LR, BN
  in eval mode. One compiled step and eval forward per model structure (its config), shared
  by every draw, tau and LR that prunes to the same widths."""

  def __init__(self, source: transfer.Source, batch_size: int):
    self.source, self.batch_size = source, batch_size
    self._built: dict = {}

  def compiled(self, config: Mapping, params):
    """(model, optimizer, train step, eval forward) of the structure `config`."""
    key = json.dumps(config, sort_keys=True, default=str)
    if key not in self._built:
      model = models.from_config(self.source.arch, dict(config))
      opt = make_optimizer(params, [(".*", "all")], {"all": adam(1.0)}, injected_lr=True)
      step = make_train_step(transfer.ce_loss_fn(model, self.source.mean, self.source.std),
                             opt)
      self._built[key] = (model, opt, step, transfer.eval_forward(model, self.source.mean,
                                                                  self.source.std))
    return self._built[key]

  def accs(self, config: Mapping, params, stats, splits: Splits) -> dict:
    """Validation and test accuracy of the model as it is (no finetuning)."""
    return splits.accs(self.compiled(config, params)[3], params, stats)

  def curve(self, config: Mapping, params, stats, splits: Splits, seed: int,
            epochs: Sequence[int], lr: float) -> dict[int, dict]:
    """{epochs: {'val_acc', 'test_acc'}} after each of `epochs` (ascending) epochs of the
    training set at `lr`, from one run (the counts are checkpoints of it)."""
    _, opt, step, forward = self.compiled(config, params)
    train = splits.train
    # seed + 1: the finetuning batches differ from the transfer's, which used `seed`.
    batches = Batches(train.images, train.labels, self.batch_size, seed + 1)
    state = init_state(params, stats, opt, seed, lr)
    out = {}
    for e in sorted(epochs):
      # `fit` runs up to a total step count from the state's own: one run, read at each count.
      state = fit(state, step, batches.at, e * batches.steps_per_epoch)
      out[e] = splits.accs(forward, state.params, state.batch_stats)
    return out


def choose_per_epochs(curve_at: Callable[[float], Mapping[int, Mapping]],
                      epochs: Sequence[int], lrs: Sequence[float], extend: int = 0,
                      validated: bool = True) -> dict:
  """Per epoch count, the LR with the best validation accuracy; test accuracy is read only at
  the choice.

  Args:
    curve_at: lr -> {epochs: {'val_acc', 'test_acc'}} (e.g. `Finetuner.curve`); each LR is
      run once, whatever the epoch counts that read it.
    epochs: the epoch counts.
    lrs: the LR grid (ascending), extended by `tuning.tune` up to `extend` values at an edge.
    validated: False (no validation images): the first LR, no choice.

  Returns:
    {'ft': {str(epochs): {'lr', 'edges', 'val_acc', 'test_acc'}}, 'ft_grid': [[lr,
    {str(epochs): {'val_acc', 'test_acc'}}], ...] every LR run, ascending}.
  """
  runs: dict = {}

  def at(lr: float) -> Mapping:
    if lr not in runs:
      runs[lr] = curve_at(lr)
    return runs[lr]

  ft = {}
  for e in epochs:
    if not validated:
      t = dict(choice={"lr": lrs[0]}, edges=[])
      at(lrs[0])
    else:
      t = tuning.tune({"lr": tuple(lrs)}, lambda p: at(p["lr"])[e]["val_acc"],
                      extend).to_dict()
    lr = t["choice"]["lr"]
    # at(): a one-LR grid is chosen without being scored, so it may not have run yet.
    ft[str(e)] = dict(lr=lr, edges=t["edges"], **at(lr)[e])
  grid = [[lr, {str(e): v for e, v in r.items()}] for lr, r in sorted(runs.items())]
  return dict(ft=ft, ft_grid=grid)


def measure(finetuner: Finetuner, config: Mapping, params, stats, splits: Splits, seed: int,
            epochs: Sequence[int], lrs: Sequence[float], extend: int = 0) -> dict:
  """A model as Table IV reads it: {'acc' (test), 'val_acc'} as it is, then 'ft' and
  'ft_grid' of `choose_per_epochs` (finetuned from it, the LR chosen per epoch count on
  validation; the first LR without validation images)."""
  accs = finetuner.accs(config, params, stats, splits)
  return dict(acc=accs["test_acc"], val_acc=accs["val_acc"], **choose_per_epochs(
      lambda lr: finetuner.curve(config, params, stats, splits, seed, epochs, lr), epochs,
      lrs, extend, validated=splits.val is not None))


def latencies(nets: Sequence[tuple], source: transfer.Source, batches: Sequence[int],
              runs: int) -> list[dict[str, float]]:
  """Per (model, params, stats) of `nets`: {str(batch): median ms} of its jitted eval forward,
  every net and batch size timed round-robin after two warm-up calls each."""
  calls = {}
  for i, (model, params, stats) in enumerate(nets):
    _, per_batch = forward_calls(transfer.eval_forward(model, source.mean, source.std), params,
                                 stats, source.input_shape, batches)
    calls.update({(i, b): call for b, call in per_batch.items()})
  times = interleaved_latency_ms(calls, runs=runs)
  return [{str(b): times[(i, b)] for b in batches} for i in range(len(nets))]


def save_pruned(path: str, source: transfer.Source, res: prune.PruneResult, meta: Mapping
                ) -> None:
  """Saves a pruned model as a `transfer.Source` (its widths config, the source's input
  shape and normalisation, `meta`), so `transfer.load_source(path)` reads it back."""
  variables = {"params": res.params, **({"batch_stats": res.batch_stats}
                                        if res.batch_stats else {})}
  transfer.save_source(path, transfer.Source(source.arch, res.config, variables,
                                              source.input_shape, source.mean, source.std,
                                              dict(meta)))


def claim_rows(records: Sequence[Mapping]) -> list[dict]:
  """Table IV's comparisons as rows for `protocol.claims.evaluate`: per draw ('repeat'), tau
  and finetuning epoch count, the pruned and finetuned model ('pruned_ft'), the unpruned model
  ('unpruned') and the unpruned model finetuned alike ('unpruned_ft', a control), each with
  its 'test_acc'.

  Args:
    records: one per (tau, draw): 'tau' (None: the unpruned model), 'repeat', 'acc' and
      'ft' {str(epochs): {'test_acc', ...}} (`measure`'s fields).
  """
  base = {r.get("repeat", 0): r for r in records if r["tau"] is None}
  out = []
  for r in records:
    b = base.get(r.get("repeat", 0))
    if r["tau"] is None or b is None:
      continue
    for e, ft in r["ft"].items():
      cell = dict(tau=r["tau"], epochs=int(e), repeat=r.get("repeat", 0))
      out += [dict(cell, arm="pruned_ft", test_acc=ft["test_acc"]),
              dict(cell, arm="unpruned", test_acc=b["acc"])]
      if e in b.get("ft", {}):
        out.append(dict(cell, arm="unpruned_ft", test_acc=b["ft"][e]["test_acc"]))
  return out
