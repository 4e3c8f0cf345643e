"""Sparse deep transfer on one target draw (Liu et al. 2017, steps 2-4), as the tables run it.

A `Unit` holds one (target, seed) draw (`TargetDraw`: training images, disjoint validation
images, capped test images) and runs on it:

* `transfer`: one Table 1 net (`hybrid.VARIANTS`) from the reference and the Sparse-SourceNet,
  at one point (lr, and lam, tau for the K+ nets), to a fixed step count or until validation
  stops improving; the record holds its accuracies and main-branch pruning rate.
* `connection_pruning`: the Sparse-TargetNet curve (Fig. 3): the trained Hybrid's main-branch
  kernels pruned to each rate in turn and retrained, with the total loss (K+) or CE alone (K-).
* `neuron_pruning` (Table 2): fc neurons with the lowest mean activation removed in steps,
  retrained, until validation accuracy falls below a level (undoing the last step).
* `run`: the four nets at their tuned points, both pruning curves, and neuron pruning from the
  sparsest K+ net still at the Standard-TransferNet's validation accuracy.

Compiled functions are shared by every unit of a study through one `Compiled`: a train step per
hybrid structure with the LR injected into the optimiser state (`injected_lr`) and lambda, tau
carried by the batch (`knowledge_loss`), so a whole lr x lambda x tau grid runs on one compile.

Methods sit below the protocol layer, so the stopping rule comes in as `converge` (the study
passes `jtransfer.protocol.fit_converged` under its budget); None trains fixed step counts.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from jtransfer.data import Dataset, ImageSet, sample_kshot
from jtransfer.data.fewshot import cap_per_class
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import hybrid, sparsity
from jtransfer.methods.hybrid_measure import kernel_total, main_rate
from jtransfer.methods.transfer import Source
from jtransfer.train import (FROZEN, accuracy, adam, cross_entropy, fit, init_state,
                             make_optimizer, make_train_step, predict_logits)

MAIN_KERNELS = (r"main/.*kernel",)
# converge(state, step_fn, batch_at, val_acc, cap, on_step) -> (state, info): trains up to the
# global step `cap` under a stopping rule and keeps the best validation state; info holds
# 'steps' (the last global step), 'best_step', 'stopped'.
Converge = Callable[..., tuple[Any, dict]]


@dataclasses.dataclass(frozen=True)
class UnitSettings:
  """What every unit of a study shares.

  Attributes:
    n_m, n_e: `hybrid.HybridConfig`'s top main layers re-initialised and reference layers in
      the extra branch.
    batch_size: training batch size.
    steps: a Table 1 net's step cap (or exact count without `converge`).
    target_rates: the connection pruning rates, increasing (cumulative rounds).
    target_steps: most retraining steps per rate.
    scope: how a rate is shared among layers (`sparsity.SCOPES`).
    neuron_from: the rate whose K+ net is neuron-pruned; None = the highest rate whose
      validation accuracy reaches the Standard-TransferNet's, else the lowest.
    neuron_layers: fc layers pruned, in order.
    neuron_frac: share of a layer's original neurons removed per iteration.
    neuron_steps: retraining steps per iteration.
    neuron_images_per_class: training images per class whose activations rank the neurons.
  """
  n_m: int = 2
  n_e: int = 2
  batch_size: int = 64
  steps: int = 1000
  target_rates: tuple[float, ...] = (0.8, 0.9, 0.95, 0.975)
  target_steps: int = 300
  scope: str = "erk"
  neuron_from: Optional[float] = None
  neuron_layers: tuple[str, ...] = ("fc6", "fc7")
  neuron_frac: float = 0.125
  neuron_steps: int = 50
  neuron_images_per_class: int = 50


@dataclasses.dataclass(frozen=True)
class TargetDraw:
  """One seed's split of a target: `shots` training images per class (fewer than asked when
  a class is small), disjoint validation images (None without), capped test images, and the
  training and validation rows of the target's training split they were drawn from."""
  name: str
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  val: Optional[ImageSet]
  test: ImageSet
  shots: int
  train_idx: np.ndarray
  val_idx: np.ndarray


def draw_target(data: Dataset, seed: int, train_per_class: int, val_per_class: int,
                test_per_class: int, log: Callable[[str], None] = lambda s: None
                ) -> TargetDraw:
  """The split of `data` for `seed` (`sample_kshot`); a class smaller than train_per_class +
  val_per_class trains on what its validation images leave (digits: ~89 per class)."""
  k = data.train.num_classes
  smallest = int(np.bincount(data.train.labels, minlength=k).min())
  shots = min(train_per_class, smallest - val_per_class)
  if shots < 1:
    raise InputError(f"--val-per-class {val_per_class} leaves no training images in a class "
                     f"of {smallest}")
  if shots < train_per_class:
    log(f"[unit] {data.name}: {shots} training images per class (smallest class has "
        f"{smallest}, {val_per_class} go to validation)")
  train_idx, val_idx = sample_kshot(data.train.labels, shots, seed, val_per_class=val_per_class,
                                    num_classes=k)
  return TargetDraw(data.name, data.train.images[train_idx], data.train.labels[train_idx], k,
                    data.train.take(val_idx) if len(val_idx) else None,
                    cap_per_class(data.test, test_per_class), shots, train_idx, val_idx)


def _host(tree):
  # Copies: the train step donates its state's buffers, which a zero-copy view would share.
  return jax.tree.map(lambda x: np.array(x), tree)


def knowledge_loss(hy: hybrid.Hybrid) -> Callable:
  """`hybrid.loss_fn` with lambda and tau read from the batch ('lam', 'tau': one value per
  example, all equal), so one compiled step serves a whole lambda x tau grid."""
  def fn(params, batch_stats, batch, rng):
    del rng
    x = normalize(batch["image"], hy.mean, hy.std)
    main, extra, ref = hybrid.branch_outputs(hy, params, x, batch.get("ref_logits"))
    ce = cross_entropy(main, batch["label"])
    if extra is None:
      return ce, ({"ce": ce}, batch_stats)
    kd = hybrid.soft_cross_entropy(extra, ref, batch["tau"][0])
    return ce + batch["lam"][0] * kd, ({"ce": ce, "kd": kd}, batch_stats)
  return fn


class Compiled:
  """Compiled functions keyed by hybrid structure, shared by every unit of a study: the
  main-branch forward (evaluation) and a masked Adam step whose LR is set per run."""

  def __init__(self):
    self._forward: dict[str, Any] = {}
    self._trainers: dict[str, hybrid.Trainer] = {}

  def acc(self, hy: hybrid.Hybrid, params, images, labels) -> float:
    """Main-branch accuracy of `params` on (images, labels)."""
    key = json.dumps([hy.config, hy.mean, hy.std], sort_keys=True)
    if key not in self._forward:
      self._forward[key] = hybrid.main_forward(hy)
    return accuracy(predict_logits(self._forward[key], {"main": params["main"]}, {}, images),
                    labels)

  def trainer(self, hy: hybrid.Hybrid, params, masks) -> hybrid.Trainer:
    """The step of params shaped like `params`: the reference frozen, masks in the state."""
    key = json.dumps([hy.config, sorted(params), hy.cut], sort_keys=True)
    if key not in self._trainers:
      rules = ([("reference/.*", FROZEN)] if "reference" in params else []) + [(".*", "all")]
      opt = sparsity.with_masks(make_optimizer(params, rules, {"all": adam(1.0)},
                                               injected_lr=True), masks)
      self._trainers[key] = hybrid.Trainer(opt, make_train_step(knowledge_loss(hy), opt))
    return self._trainers[key]


class Unit:
  """One (target, seed): the four transfer nets, connection and neuron pruning.

  Args:
    source: the dense Reference-SourceNet.
    sparse: (params, masks) of the Sparse-SourceNet.
    draw: the target split of this seed.
    seed: seeds the re-initialised layers and the batch order.
    settings: the study's `UnitSettings`.
    compiled: the study's `Compiled`.
    converge: the stopping rule (see the module docstring); None = fixed step counts.
    log: one line per finished piece.
    ticker: label -> on_step callback of a long run (or None), for progress lines.
  """

  def __init__(self, source: Source, sparse, draw: TargetDraw, seed: int,
               settings: UnitSettings, compiled: Compiled, converge: Optional[Converge] = None,
               log: Callable[[str], None] = lambda s: None,
               ticker: Callable[[str], Optional[Callable]] = lambda label: None):
    self.source, self.sparse, self.draw, self.seed = source, sparse, draw, seed
    self.cfg, self.compiled, self.log, self.ticker = settings, compiled, log, ticker
    # Without validation images there is nothing to converge on: fixed steps.
    self.converge = converge if draw.val is not None else None
    self.ref_logits = None

  def accs(self, hy, params, test: bool = True) -> dict:
    """{'val_acc', 'test_acc'} of the main branch (test None with `test=False`)."""
    d, acc = self.draw, self.compiled.acc
    val = acc(hy, params, d.val.images, d.val.labels) if d.val is not None else float("nan")
    return dict(val_acc=val, test_acc=acc(hy, params, d.test.images, d.test.labels)
                if test else None)

  def _val(self, hy) -> Callable:
    return lambda st: self.compiled.acc(hy, st.params, self.draw.val.images,
                                        self.draw.val.labels)

  def batches(self, params, hp: dict) -> Callable[[int], dict]:
    """batch_at(step) of the training images (+ reference logits, lambda and tau for K+)."""
    d, bs = self.draw, self.cfg.batch_size
    if "extra" not in params:
      return hybrid.knowledge_batches(d.images, d.labels, None, bs, self.seed)
    at = hybrid.knowledge_batches(d.images, d.labels, self.ref_logits, bs, self.seed)

    def batch_at(step):
      b = at(step)
      n = len(b["label"])
      return dict(b, lam=np.full(n, hp["lam"], np.float32),
                  tau=np.full(n, hp["tau"], np.float32))
    return batch_at

  def start(self, hy, params, masks, hp: dict):
    """(trainer, fresh state at the run's LR, batch_at)."""
    tr = self.compiled.trainer(hy, params, masks)
    state = sparsity.replace_masks(init_state(params, {}, tr.optimizer, self.seed, hp["lr"]),
                                   masks)
    return tr, state, self.batches(params, hp)

  def transfer(self, variant: str, hp: dict, test: bool = True):
    """Trains one Table 1 net at point `hp` ({'lr', 'lam', 'tau'}; lam, tau None for K-).

    Returns:
      (hybrid, params, masks, record); with `test=False` (a tuning run) the test split is
      never evaluated.
    """
    t0, cfg = time.time(), self.cfg
    knowledge = hybrid.VARIANTS[variant][1]
    hcfg = hybrid.variant_config(variant, n_m=cfg.n_m, n_e=cfg.n_e,
                                 **(dict(lam=hp["lam"], tau=hp["tau"]) if knowledge else {}))
    hy, params, masks = hybrid.init_hybrid(self.source, self.draw.num_classes, hcfg, self.seed,
                                           *self.sparse)
    if self.ref_logits is None and "reference" in params:
      self.ref_logits = hybrid.reference_logits(hy, params["reference"], self.draw.images)
    tr, state, batch_at = self.start(hy, params, masks, hp)
    on_step = self.ticker(f"{self.draw.name} seed {self.seed} {variant} lr={hp['lr']:g}")
    if self.converge is None:
      state = fit(state, tr.step, batch_at, cfg.steps, on_step=on_step)
      info = dict(steps=cfg.steps, best_step=cfg.steps, stopped="fixed")
    else:
      state, info = self.converge(state, tr.step, batch_at, self._val(hy), cfg.steps, on_step)
      info = {k: v for k, v in info.items() if k != "curve"}
    params = _host(state.params)
    record = dict(kind="transfer", role="eval" if test else "tune", variant=variant, **hp,
                  cap=cfg.steps, **info, rate=main_rate(params),
                  seconds=round(time.time() - t0, 1), **self.accs(hy, params, test))
    return hy, params, masks, record

  def connection_pruning(self, hy, params, masks, knowledge: bool, hp: dict,
                         on_point: Callable[[dict], None]) -> dict:
    """The Sparse-TargetNet curve from a trained net: one record per rate to `on_point`.

    Returns:
      rate -> (params, masks) after that rate's retraining.
    """
    params = params if knowledge else hybrid.drop_knowledge(params)
    dense_total = kernel_total(params)
    tr, state, batch_at = self.start(hy, params, masks, hp)
    kept = {}

    def converged(st, cap):
      # Validation patience inside each round, at most target_steps, best state kept.
      start = int(st.step)
      st, info = self.converge(st, tr.step, batch_at, self._val(hy), cap, None)
      return st, info["steps"] - start

    retrain = None if self.converge is None else converged

    def on_round(rnd, st):
      p = _host(st.params)
      kept[rnd.target] = (p, sparsity.current_masks(st))
      extra = {} if retrain is None else dict(retrain_steps=rnd.steps)
      on_point(dict(kind="target_prune", knowledge="K+" if knowledge else "K-",
                    rate=rnd.target, sparsity=main_rate(p, dense_total),
                    acc_pruned=rnd.metric_pruned, **extra, **self.accs(hy, p)))

    d = self.draw
    sparsity.prune_retrain(state, tr.step, batch_at, self.cfg.target_rates,
                           self.cfg.target_steps, patterns=MAIN_KERNELS, scope=self.cfg.scope,
                           evaluate=lambda p: self.compiled.acc(hy, p, d.test.images,
                                                                d.test.labels),
                           on_round=on_round, retrain=retrain)
    return kept

  def neuron_pruning(self, hy, params, masks, level: float, hp: dict) -> dict:
    """Prunes the fc layers' neurons in turn until validation accuracy drops below `level`
    (test accuracy without validation images); returns the Table 2 record."""
    cfg, d = self.cfg, self.draw
    dense_total = kernel_total(params)
    start_params, start = params, self.accs(hy, params)
    subset = np.concatenate([np.flatnonzero(d.labels == c)[:cfg.neuron_images_per_class]
                             for c in range(d.num_classes)])
    metric = "val_acc" if d.val is not None else "test_acc"
    history, current = [], start
    layers = [n for n, kind in hy.plan if kind == "dense"]
    for layer in cfg.neuron_layers:
      step_n = max(1, int(round(cfg.neuron_frac * params["main"][layer]["bias"].size)))
      while params["main"][layer]["bias"].size > step_n:
        acts = hybrid.neuron_activations(hy, params, d.images[subset], layers=[layer])
        keep = hybrid.lowest_neurons(acts[layer], step_n)
        hy2, p2, m2 = hybrid.prune_neurons(hy, params, masks, {layer: keep})
        tr, state, batch_at = self.start(hy2, p2, m2, hp)
        p2 = _host(fit(state, tr.step, batch_at, cfg.neuron_steps).params)
        got = self.accs(hy2, p2)
        ok = got[metric] >= level
        history.append(dict(layer=layer, neurons=int(keep.size), accepted=bool(ok),
                            rate=main_rate(p2, dense_total), **got))
        self.log(f"[neurons] {layer} -> {keep.size}: {metric} {got[metric]:.4f} "
                 f"(level {level:.4f}) {'kept' if ok else 'undone, next layer'}")
        if not ok:
          break
        hy, params, masks, current = hy2, p2, m2, got
    table = hybrid.fc_table(start_params, params, layers + ["head"])
    return dict(kind="neuron", history=history, widths=list(hy.config["dense_widths"]),
                table={k: {"neurons": list(v["neurons"]), "weights": list(v["weights"])}
                       for k, v in table.items()},
                rate=main_rate(params, dense_total),
                rate_before=main_rate(start_params, dense_total),
                level=level, stop_metric=metric, start=start, **current)

  def run(self, add: Callable[[dict], None], tuned: dict, variants: Sequence[str]) -> None:
    """Runs every piece at the tuned points, calling add(record) as each finishes.

    Args:
      add: called with each finished record.
      tuned: variant -> {'lr', 'lam', 'tau'} (the nets' choices; pruning uses the Hybrid's).
      variants: the Table 1 nets, 'standard' and 'hybrid' among them.
    """
    nets, recs = {}, {}
    for variant in variants:
      hy, params, masks, rec = self.transfer(variant, tuned[variant])
      nets[variant], recs[variant] = (hy, params, masks), rec
      add(rec)
      self.log(f"[transfer] {variant}: test {rec['test_acc']:.4f} val {rec['val_acc']:.4f} "
               f"rate {rec['rate']:.3f} steps {rec['steps']} ({rec['stopped']}) "
               f"({rec['seconds']} s)")
    hp = tuned["hybrid"]
    hy, params, masks = nets["hybrid"]
    log_point = lambda r: (add(dict(r, **hp)), self.log(
        f"[target_prune] {r['knowledge']} rate {r['rate']:.3f}: test {r['test_acc']:.4f}"))
    points = []
    kept = self.connection_pruning(hy, params, masks, True, hp,
                                   lambda r: (points.append(r), log_point(r)))
    self.connection_pruning(hy, params, masks, False, hp, log_point)
    metric = "val_acc" if self.draw.val is not None else "test_acc"
    level = recs["standard"][metric]
    rate = self.cfg.neuron_from
    if rate is None:  # as the paper: the sparsest net still at the standard level
      good = [r["rate"] for r in points if r[metric] >= level]
      rate = max(good) if good else min(self.cfg.target_rates)
    p_n, m_n = kept[rate]
    add(dict(self.neuron_pruning(hy, p_n, m_n, level, hp), from_rate=rate, **hp))
