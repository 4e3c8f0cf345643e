"""Sparse deep transfer (Liu, Wang & Qiao, AAAI 2017) on VGG-style nets without BN.

Three stages, all over plain param trees of `vgg_s` (conv units conv1_1..conv3_2, flatten,
dense fc6, fc7, `head`):

* Sparse-SourceNet (`sparse_source_net`): iterative magnitude pruning of the source model's
  connections on the source data, retraining between rounds, masks kept in the optimiser.
* Hybrid-TransferNet: params `{'main', 'extra', 'reference'}`.
  - main: the Sparse-SourceNet with a new K-class head; its top `n_m` layers are made dense and
    re-initialised (paper, AlexNet: fc7 and the output layer, so n_m = 2); the other layers
    keep their masks while training (the main branch stays sparse).
  - reference: the dense Reference-SourceNet, frozen; p_R = softmax(a_R / tau), tau = 4.
  - extra: a copy of the reference's top `n_e` layers (paper: fc7 and the *source* output layer,
    n_e = 2), fed by the main branch's layer N - n_e (fc6 after ReLU here).
  - loss = CE(p_main, y) + lam * CE(p_extra^tau, p_R^tau) with CE(p, q) = -sum q log p.
  Class mismatch: the paper's target classes never meet the source classes in one softmax.
  The main head is over the K target classes; the reference and the extra branch both keep the
  *source* output layer (ImageNet's 1000 classes for AlexNet), so the knowledge term compares
  two distributions over the source classes, computed on target images. That is what is
  implemented: `extra/head` and `reference/head` have the source class count.
  Ablations (Table 1): 'standard' (S-K-: dense main, no extra branch), 'S+K-', 'S-K+', 'hybrid'.
* Sparse-TargetNet: iterative connection pruning of the main branch retrained with the total
  loss (`K+`) or CE alone (`K-`), then neuron pruning of the FC layers by mean post-ReLU
  activation (`neuron_activations`, taps 'fc6_act'/'fc7_act'), removing neurons by slicing
  (`prune_neurons`: kernel columns and biases, the next layer's input rows, the extra branch's
  input rows, and the `dense_widths` config).

The branches run through `run_layers` (`hybrid_layers`), a pure re-implementation of the vgg_s
forward pass that can start and stop at any layer (checked against `models.apply_model` in the
tests).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jtransfer import models, surgery
from jtransfer.data import Batches
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import sparsity, transfer
# (re-exported: callers import the forward pass from here)
from jtransfer.methods.hybrid_layers import _layer, layer_plan, run_layers  # noqa: F401
from jtransfer.train import evaluate, init_state, make_optimizer, make_train_step, optim

VARIANTS = {"standard": (False, False), "S+K-": (True, False), "S-K+": (False, True),
            "hybrid": (True, True)}
VARIANT_NAMES = {"standard": "Standard-TransferNet", "S+K-": "Hybrid-TransferNet(S+K-)",
                 "S-K+": "Hybrid-TransferNet(S-K+)", "hybrid": "Hybrid-TransferNet"}



# ----------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class HybridConfig:
  """Attributes:
    n_m: top layers of the main branch re-initialised (and dense): 2 = fc7 + head.
    n_e: top reference layers copied into the extra branch: 2 = fc7 + source head, attached
      to the main branch's fc6 output.
    tau: softmax temperature of the knowledge term.
    lam: weight of the knowledge term (paper: 1; 2 for VGG-16).
    sparse: S+ (main branch from the Sparse-SourceNet, masks kept) or S- (dense reference).
    knowledge: K+ (extra branch and knowledge term) or K-.
  """
  n_m: int = 2
  n_e: int = 2
  tau: float = 4.0
  lam: float = 1.0
  sparse: bool = True
  knowledge: bool = True


def variant_config(variant: str, **overrides) -> HybridConfig:
  """The HybridConfig of a Table 1 variant ('standard', 'S+K-', 'S-K+', 'hybrid')."""
  if variant not in VARIANTS:
    raise InputError(f"variant {variant!r}: expected one of {', '.join(VARIANTS)}")
  s, k = VARIANTS[variant]
  return HybridConfig(sparse=s, knowledge=k, **overrides)


@dataclasses.dataclass(frozen=True)
class Hybrid:
  """A Hybrid-TransferNet's structure (arrays live in the params tree).

  Attributes:
    config: main-branch model config (vgg_s, K-class head; `dense_widths` shrink on neuron
      pruning).
    source_config: the reference's config (source-class head).
    hcfg: the HybridConfig.
    mean, std: input normalisation of the source.
  """
  config: dict
  source_config: dict
  hcfg: HybridConfig
  mean: tuple
  std: tuple

  @property
  def plan(self) -> list[tuple[str, str]]:
    return layer_plan(self.config)

  @property
  def cut(self) -> int:
    """Index of the first layer of the extra branch: it reads layer cut - 1 of main."""
    return len(self.plan) - self.hcfg.n_e

  @property
  def reinit(self) -> list[str]:
    """Names of the main branch's re-initialised top layers."""
    return [n for n, _ in self.plan[len(self.plan) - self.hcfg.n_m:]]

  @property
  def extra_layers(self) -> list[str]:
    return [n for n, _ in self.plan[self.cut:]]

  def main_model(self):
    return models.from_config("vgg_s", self.config)


def _check_hcfg(hcfg: HybridConfig, plan) -> None:
  n = len(plan)
  if not 1 <= hcfg.n_m <= n:
    raise InputError(f"n_m must be in [1, {n}] (the head is always new), got {hcfg.n_m}")
  if not 1 <= hcfg.n_e < n:
    raise InputError(f"n_e must be in [1, {n - 1}], got {hcfg.n_e}")
  if not hcfg.tau > 0 or hcfg.lam < 0:
    raise InputError(f"tau must be > 0 and lam >= 0, got tau={hcfg.tau}, lam={hcfg.lam}")


def init_hybrid(reference: transfer.Source, num_classes: int, hcfg: HybridConfig, seed: int,
                sparse_params=None, sparse_masks=None):
  """Builds a Hybrid-TransferNet variant.

  Args:
    reference: the dense Reference-SourceNet (vgg_s with its source head and fc layers).
    num_classes: target classes K.
    hcfg: which variant and its hyper-parameters.
    seed: seeds the re-initialised top layers.
    sparse_params, sparse_masks: the Sparse-SourceNet's params and masks (needed when
      `hcfg.sparse`).

  Returns:
    (hybrid, params, masks): params {'main', ['extra', 'reference']}; masks cover every main
    kernel (all True for the re-initialised and, with S-, every layer) so later connection
    pruning reuses the same masked optimiser structure.
  """
  if reference.arch != "vgg_s":
    raise InputError(f"the hybrid net is implemented for vgg_s, got {reference.arch}")
  config = dict(reference.config, num_classes=num_classes)
  plan = layer_plan(config)
  _check_hcfg(hcfg, plan)
  if hcfg.sparse and sparse_params is None:
    raise InputError("a sparse (S+) variant needs the Sparse-SourceNet's params")
  hybrid = Hybrid(config, dict(reference.config), hcfg, tuple(reference.mean),
                  tuple(reference.std))
  ref = jax.tree.map(np.asarray, reference.variables["params"])
  base = jax.tree.map(np.asarray, sparse_params) if hcfg.sparse else ref
  model = hybrid.main_model()
  abstract = models.abstract_variables(model, tuple(reference.input_shape))["params"]
  new_paths = [p for p in surgery.paths(abstract) if p.split("/")[0] in hybrid.reinit]
  fresh = surgery.flatten(jax.tree.map(np.asarray, models.init_params_subset(
      model, jax.random.PRNGKey(seed), reference.input_shape, new_paths)))
  loaded = surgery.flatten(base)
  main = surgery.map_with_path(lambda p, _: fresh[p] if p in fresh else loaded[p], abstract)
  kept = {p: m for p, m in surgery.flatten(sparse_masks or {}).items()
          if hcfg.sparse and m is not None and p.split("/")[0] not in hybrid.reinit}
  masks = {"main": sparsity.full_masks(main, masks=_unflat(main, kept))}
  params = {"main": sparsity.apply_masks(main, masks["main"])}
  if hcfg.knowledge:
    params["extra"] = {n: jax.tree.map(np.copy, ref[n]) for n in hybrid.extra_layers}
    params["reference"] = ref
  return hybrid, params, masks


def _unflat(template, flat: Mapping[str, Any]) -> dict:
  return surgery.split(surgery.map_with_path(lambda p, v: flat.get(p), template),
                       surgery.map_with_path(lambda p, v: p in flat, template))[0]


# ----------------------------------------------------------------------------- loss
def soft_cross_entropy(logits: jax.Array, target_logits: jax.Array, tau: float) -> jax.Array:
  """Mean over the batch of CE(softmax(logits/tau), softmax(target/tau)) = -sum q log p."""
  q = jax.nn.softmax(target_logits.astype(jnp.float32) / tau)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32) / tau)
  return -jnp.mean(jnp.sum(q * logp, axis=-1))


def branch_outputs(hybrid: Hybrid, params, x: jax.Array, ref_logits=None):
  """(main logits, extra logits or None, reference logits or None) for normalised `x`."""
  plan, cut = hybrid.plan, hybrid.cut
  h = run_layers(params["main"], x, plan[:cut])
  main = run_layers(params["main"], h, plan[cut:])
  if "extra" not in params:
    return main, None, None
  extra = run_layers(params["extra"], h, layer_plan(hybrid.source_config)[cut:])
  if ref_logits is None:
    ref_logits = run_layers(params["reference"], x, layer_plan(hybrid.source_config))
  return main, extra, lax.stop_gradient(ref_logits)


def loss_fn(hybrid: Hybrid, lam: Optional[float] = None) -> Callable:
  """The total loss for the generic train step: CE(main, y) + lam * knowledge term.

  Reference logits come from `batch['ref_logits']` when present (the reference is frozen and
  deterministic, so they can be computed once per image), else from `params['reference']`.
  Params without 'extra' (K- variants) give the CE alone.
  """
  lam = hybrid.hcfg.lam if lam is None else lam
  tau = hybrid.hcfg.tau

  def fn(params, batch_stats, batch, rng):
    del rng
    x = normalize(batch["image"], hybrid.mean, hybrid.std)
    main, extra, ref = branch_outputs(hybrid, params, x, batch.get("ref_logits"))
    ce = evaluate.cross_entropy(main, batch["label"])
    if extra is None:
      return ce, ({"ce": ce}, batch_stats)
    kd = soft_cross_entropy(extra, ref, tau)
    return ce + lam * kd, ({"ce": ce, "kd": kd}, batch_stats)

  return fn


def main_forward(hybrid: Hybrid) -> Callable:
  """Jitted (params, batch_stats, uint8 images) -> main-branch logits (what is evaluated)."""
  @jax.jit
  def forward(params, batch_stats, images):
    x = normalize(images, hybrid.mean, hybrid.std)
    return run_layers(params["main"], x, hybrid.plan)
  return forward


def reference_logits(hybrid: Hybrid, reference_params, images: np.ndarray) -> np.ndarray:
  """Reference-SourceNet logits (over source classes) for uint8 `images`."""
  plan = layer_plan(hybrid.source_config)
  fwd = jax.jit(lambda p, s, im: run_layers(p, normalize(im, hybrid.mean, hybrid.std), plan))
  return evaluate.predict_logits(fwd, reference_params, {}, images)


def knowledge_batches(images: np.ndarray, labels: np.ndarray, ref_logits: Optional[np.ndarray],
                      batch_size: int, seed: int) -> Callable[[int], dict]:
  """batch_at(step) over (images, labels[, ref_logits]), shuffled as `Batches` does."""
  order = Batches(np.arange(len(labels)), np.arange(len(labels)), batch_size, seed)

  def at(step):
    idx = order.at(step)["label"]
    batch = {"image": images[idx], "label": labels[idx]}
    if ref_logits is not None:
      batch["ref_logits"] = ref_logits[idx]
    return batch

  return at


# ----------------------------------------------------------------------------- training
def make_masked_optimizer(params, masks, tx) -> sparsity.MaskedOptimizer:
  """Everything but the reference trains with `tx`; masked entries stay zero."""
  rules = ([("reference/.*", optim.FROZEN)] if "reference" in params else []) + [(".*", "all")]
  return sparsity.with_masks(make_optimizer(params, rules, {"all": tx}), masks)


def drop_knowledge(params) -> dict:
  """The main branch alone (a K- model from a K+ one)."""
  return {"main": params["main"]}


@dataclasses.dataclass
class Trainer:
  """A masked optimizer and its compiled step for one hybrid structure.

  The step depends only on the structure (layer shapes, which branches, which paths are
  masked), not on mask values or data, so one Trainer serves every variant and run of that
  structure: `state` installs the run's masks in the optimiser state.
  """
  optimizer: sparsity.MaskedOptimizer
  step: Callable

  def state(self, params, masks, seed: int):
    return sparsity.replace_masks(init_state(params, {}, self.optimizer, seed), masks)


def make_trainer(hybrid: Hybrid, params, masks, tx, lam: Optional[float] = None) -> Trainer:
  """A Trainer for params shaped like `params` (K- when they have no 'extra')."""
  opt = make_masked_optimizer(params, masks, tx)
  return Trainer(opt, make_train_step(loss_fn(hybrid, lam), opt))


def main_sparsity(params) -> dict:
  """Connection sparsity of the main branch's kernels (per layer and total)."""
  return sparsity.sparsity_report(params["main"])


# ----------------------------------------------------------------------------- Sparse-SourceNet
def sparse_source_net(source: transfer.Source, images: np.ndarray, labels: np.ndarray,
                      sparsities: Sequence[float], steps_per_round: int, *, tx,
                      batch_size: int = 128, seed: int = 0, scope: str = "global",
                      evaluate_fn: Optional[Callable[[Any], float]] = None,
                      on_round: Optional[Callable] = None):
  """Iterative magnitude pruning of the source's kernels on its own data (Han et al. 2015).

  Returns:
    (params, masks, [sparsity.PruneRound]).
  """
  model = source.model
  params = jax.tree.map(np.asarray, source.variables["params"])
  masks = sparsity.full_masks(params)
  opt = sparsity.with_masks(make_optimizer(params, [(".*", "all")], {"all": tx}), masks)
  step = make_train_step(transfer.ce_loss_fn(model, source.mean, source.std), opt)
  state = init_state(params, {}, opt, seed)
  state, history = sparsity.prune_retrain(
      state, step, Batches(images, labels, batch_size, seed).at, sparsities, steps_per_round,
      scope=scope, evaluate=evaluate_fn, on_round=on_round)
  params = jax.tree.map(np.asarray, state.params)
  return params, sparsity.current_masks(state), history


# ----------------------------------------------------------------------------- neurons
def neuron_activations(hybrid: Hybrid, params, images: np.ndarray,
                       layers: Sequence[str] = ("fc6", "fc7")) -> dict[str, np.ndarray]:
  """Mean post-ReLU activation of each neuron of `layers` over `images` (taps '<layer>_act')."""
  model = hybrid.main_model()
  taps = tuple(f"{l}_act" for l in layers)

  @jax.jit
  def acts(p, x):
    _, _, got = models.apply_model(model, p, {}, normalize(x, hybrid.mean, hybrid.std),
                                   taps=taps)
    return [jnp.sum(got[t], axis=0) for t in taps]

  total = None
  for start in range(0, len(images), 256):
    part = [np.asarray(a, np.float64) for a in acts(params["main"], images[start:start + 256])]
    total = part if total is None else [t + p for t, p in zip(total, part)]
  return {l: t / len(images) for l, t in zip(layers, total)}


def lowest_neurons(activation: np.ndarray, count: int) -> np.ndarray:
  """Indices to keep after removing the `count` lowest-activated neurons (ties: lower index
  removed first), in increasing order. At least one neuron is kept."""
  count = min(int(count), activation.size - 1)
  order = np.argsort(activation, kind="stable")
  return np.sort(order[count:])


def _slice_dense(tree: dict, layer: str, nxt: str, keep: np.ndarray) -> dict:
  tree = dict(tree)
  if layer in tree:
    tree[layer] = {k: (v[..., keep] if v is not None else None)
                   for k, v in tree[layer].items()}
  if nxt in tree and tree[nxt].get("kernel") is not None:
    tree[nxt] = dict(tree[nxt], kernel=tree[nxt]["kernel"][keep, :])
  return tree


def prune_neurons(hybrid: Hybrid, params, masks, keep: Mapping[str, np.ndarray]):
  """Removes FC neurons by slicing: the layer's kernel columns and biases, the next layer's
  input rows (main and, when it reads this layer, the extra branch), masks alike, and the
  config's `dense_widths`.

  Args:
    keep: layer name ('fc6', ...) -> sorted indices of the neurons to keep.

  Returns:
    (hybrid, params, masks) of the smaller net; a removed neuron whose output was zero leaves
    every output unchanged.
  """
  names = [n for n, _ in hybrid.plan]
  widths = list(hybrid.config["dense_widths"])
  params, masks = dict(params), dict(masks)
  for layer, idx in keep.items():
    if not (layer.startswith("fc") and layer in names):
      raise InputError(f"neuron pruning takes hidden dense layers {names[-len(widths) - 1:-1]}, "
                       f"got {layer!r}")
    idx = np.asarray(idx)
    i = names.index(layer)
    width = params["main"][layer]["kernel"].shape[1]
    if idx.ndim != 1 or idx.size < 1 or np.any(np.diff(idx) <= 0) or idx[-1] >= width:
      raise InputError(f"keep[{layer!r}] must be increasing indices in [0, {width}), at least "
                       "one")
    nxt = names[i + 1]
    params["main"] = _slice_dense(params["main"], layer, nxt, idx)
    masks["main"] = _slice_dense(masks["main"], layer, nxt, idx)
    if "extra" in params and i + 1 == hybrid.cut:
      params["extra"] = _slice_dense(params["extra"], "", nxt, idx)
    widths[i - (len(names) - 1 - len(widths))] = int(idx.size)
  config = dict(hybrid.config, dense_widths=widths)
  return dataclasses.replace(hybrid, config=config), params, masks


def fc_table(params_before, params_after, layers: Sequence[str]) -> dict[str, dict]:
  """Table 2 rows: neurons and non-zero weights before/after per layer, and the total."""
  rows = {}
  for l in layers:
    b, a = params_before["main"][l]["kernel"], params_after["main"][l]["kernel"]
    rows[l] = dict(neurons=(int(b.shape[1]), int(a.shape[1])),
                   weights=(int(np.count_nonzero(b)), int(np.count_nonzero(a))))
  rows["total"] = dict(
      neurons=tuple(sum(r["neurons"][j] for r in rows.values()) for j in (0, 1)),
      weights=tuple(sum(r["weights"][j] for r in rows.values()) for j in (0, 1)))
  return rows
