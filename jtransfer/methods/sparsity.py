"""Connection sparsity: magnitude masks, pruning schedules, and masking inside the optimiser.

A *mask tree* has the nesting of the params tree; a leaf is a bool array shaped like the param
(True = kept) or None, and a path may be absent: both mean "not pruned". Masks are made on the
host (numpy) between training phases.

During training the masks live in the optimiser state, as in jaxpruner's post-update masking:
`masking(masks)` is an optax transform placed last in the chain that zeroes the update of every
pruned entry. Pruned weights are set to zero once (`apply_masks`), and as their update is always
exactly 0 they stay exactly 0, whatever momentum or Adam statistics accumulate. Because the
masks are state, not constants, `replace_masks` can tighten them between pruning rounds and the
same compiled train step (`jtransfer.train.make_train_step`) keeps running.

Schedules: `polynomial_sparsity` is the gradual schedule of Zhu & Gupta (2017),
s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3; `round_sparsities` gives the per-round
targets of iterative prune-retrain (Han et al. 2015) as polynomial, linear or geometric steps.
"""
# No `from __future__ import annotations` here: a NamedTuple's field annotations must stay
# objects for the API reference (pdoc cannot resolve postponed ones on a NamedTuple's
# generated __new__, mitmproxy/pdoc issue 765).

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jtransfer import surgery
from jtransfer.errors import InputError
from jtransfer.train import optim

# Han et al. prune connections, i.e. weights; biases are few and left alone.
KERNELS = (r".*kernel",)
SCOPES = ("layer", "global", "erk")


# ----------------------------------------------------------------------------- masks
def check_fraction(value: float, what: str) -> float:
  """`value` as a float in [0, 1], else InputError naming `what` (NaN fails too)."""
  if not (isinstance(value, (int, float, np.floating)) and 0.0 <= float(value) <= 1.0):
    raise InputError(f"{what} must be a fraction in [0, 1], got {value!r}")
  return float(value)


def _flat_masks(masks: Optional[Mapping]) -> dict[str, np.ndarray]:
  if not masks:
    return {}
  return {p: np.asarray(m, bool) for p, m in surgery.flatten(masks).items() if m is not None}


def magnitude_masks(params, sparsity: float, *, patterns: Sequence[str] = KERNELS,
                    scope: str = "global", previous: Optional[Mapping] = None) -> dict:
  """Masks that prune the smallest-magnitude entries of the params matched by `patterns`.

  Args:
    params: the params tree (arrays).
    sparsity: fraction of the matched entries to prune, allotted by `scope`:
      'layer': every leaf gets round(sparsity * size) zeros;
      'global': round(sparsity * total) zeros under one magnitude threshold across layers
        (prunes layers of small weights, i.e. wide fan-in, hardest; it can empty a layer);
      'erk': per-layer rates from the Erdos-Renyi-Kernel rule (`erk_sparsities`, Evci et al.
        2020), then magnitude pruning within each layer: small layers stay denser, large
        ones sparser, and the total is `sparsity` up to rounding.
    patterns: regexes over param paths selecting the prunable leaves (default: kernels).
    scope: 'layer', 'global' or 'erk'.
    previous: masks of an earlier round: entries pruned there stay pruned (they rank below
      every kept entry, and stay pruned when `sparsity` is below the earlier rate), so
      iterative rounds only ever add zeros.

  Returns:
    A mask tree with a bool leaf for every matched path and nothing elsewhere.

  Raises:
    InputError: bad sparsity or scope, or a pattern that matches no path.
  """
  sparsity = check_fraction(sparsity, "sparsity")
  if scope not in SCOPES:
    raise InputError(f"scope {scope!r}: expected one of {', '.join(SCOPES)}")
  flat = surgery.flatten(params)
  chosen = surgery.select(params, patterns, what="prune")
  prev = _flat_masks(previous)
  # Score |w|, with earlier-pruned entries at -1 so they are pruned first, then the ordering
  # is made strict by a stable sort, so exactly the requested count is pruned despite ties.
  scores = {}
  for p in chosen:
    s = np.abs(np.asarray(flat[p], np.float64)).ravel()
    if p in prev:
      s = np.where(prev[p].ravel(), s, -1.0)
    scores[p] = s
  out = {}
  if scope in ("layer", "erk"):
    rates = (erk_sparsities({p: np.shape(flat[p]) for p in chosen}, sparsity)
             if scope == "erk" else dict.fromkeys(chosen, sparsity))
    for p in chosen:
      out[p] = _keep_largest(scores[p], int(round(rates[p] * scores[p].size)))
  else:
    allscores = np.concatenate([scores[p] for p in chosen])
    keep = _keep_largest(allscores, int(round(sparsity * allscores.size)))
    start = 0
    for p in chosen:
      n = scores[p].size
      out[p], start = keep[start:start + n], start + n
  # Entries pruned earlier stay pruned even when `sparsity` is below the earlier rate.
  out = {p: out[p].reshape(np.shape(flat[p])) & prev.get(p, True) for p in chosen}
  return _unflatten_like(params, out)


def erk_sparsities(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
  """Per-layer sparsities of the Erdos-Renyi-Kernel rule with `sparsity` overall.

  Layer l keeps density eps * sum(shape_l) / prod(shape_l) (a conv kernel (kh, kw, in, out)
  gives (kh + kw + in + out) / (kh kw in out), a dense (in, out) gives (in + out) / (in out)),
  eps chosen so the kept entries total (1 - sparsity) * all; layers whose density would pass
  1 are kept dense and eps is solved again over the rest (RigL's allocation).
  """
  sparsity = check_fraction(sparsity, "sparsity")
  size = {p: int(np.prod(s)) for p, s in shapes.items()}
  raw = {p: float(np.sum(s)) / size[p] for p, s in shapes.items()}
  budget = (1.0 - sparsity) * sum(size.values())
  dense: set[str] = set()
  while True:
    rest = [p for p in shapes if p not in dense]
    left = budget - sum(size[p] for p in dense)
    weight = sum(raw[p] * size[p] for p in rest)
    eps = left / weight if weight > 0 else 0.0
    over = [p for p in rest if eps * raw[p] > 1.0]
    if not over:
      break
    dense.update(over)
  return {p: 0.0 if p in dense else float(np.clip(1.0 - eps * raw[p], 0.0, 1.0))
          for p in shapes}


def _keep_largest(scores: np.ndarray, num_pruned: int) -> np.ndarray:
  keep = np.ones(scores.size, bool)
  if num_pruned > 0:
    keep[np.argsort(scores, kind="stable")[:num_pruned]] = False
  return keep


def _unflatten_like(params, leaves: Mapping[str, Any]) -> dict:
  """A sparse tree with `leaves` at their paths (tuple keys: names may contain '/')."""
  return surgery.split(surgery.map_with_path(lambda p, v: leaves.get(p), params),
                       surgery.map_with_path(lambda p, v: p in leaves, params))[0]


def apply_masks(params, masks: Optional[Mapping]):
  """Params with every pruned entry set to exactly zero (unmasked leaves unchanged)."""
  flat = _flat_masks(masks)
  unknown = sorted(set(flat) - set(surgery.paths(params)))
  if unknown:
    raise InputError(f"masks name paths the params do not have: {unknown[:5]}")

  def one(path, leaf):
    if path not in flat:
      return leaf
    m = flat[path]
    if np.shape(m) != np.shape(leaf):
      raise InputError(f"mask for {path} has shape {np.shape(m)}, param {np.shape(leaf)}")
    if isinstance(leaf, np.ndarray):
      return np.where(m, leaf, np.zeros((), leaf.dtype))
    return jnp.where(m, leaf, jnp.zeros((), leaf.dtype))

  return surgery.map_with_path(one, params)


def sparsity_report(params, *, patterns: Sequence[str] = KERNELS) -> dict[str, Any]:
  """Exact-zero counts of the leaves matched by `patterns`, per layer and in total.

  Returns:
    {'layers': {path: {'size', 'zeros', 'sparsity'}}, 'size', 'zeros', 'sparsity'}.
  """
  flat = surgery.flatten(params)
  layers = {}
  for p in surgery.select(params, patterns, what="sparsity report"):
    v = np.asarray(flat[p])
    zeros = int(np.sum(v == 0))
    layers[p] = dict(size=int(v.size), zeros=zeros, sparsity=zeros / max(1, v.size))
  size = sum(l["size"] for l in layers.values())
  zeros = sum(l["zeros"] for l in layers.values())
  return dict(layers=layers, size=size, zeros=zeros, sparsity=zeros / max(1, size))


def mask_sparsity(masks: Mapping) -> dict[str, Any]:
  """Fraction pruned per masked leaf and over all masked entries: {'layers', 'sparsity'}."""
  flat = _flat_masks(masks)
  layers = {p: float(1 - m.mean()) for p, m in flat.items()}
  size = sum(m.size for m in flat.values())
  pruned = sum(int((~m).sum()) for m in flat.values())
  return dict(layers=layers, sparsity=pruned / max(1, size))


# ----------------------------------------------------------------------------- schedules
def polynomial_sparsity(step, *, initial: float, final: float, begin_step: int,
                        end_step: int, frequency: int = 1, power: float = 3.0):
  """Zhu & Gupta's gradual pruning schedule (TF model-optimization's PolynomialDecay).

  s(t) = final + (initial - final) * (1 - (t' - begin) / (end - begin)) ** power, with t'
  the step clipped to [begin, end] and rounded down to a multiple of `frequency` past
  `begin` (the mask is updated only every `frequency` steps). Works on ints and jax arrays.
  """
  check_fraction(initial, "initial sparsity")
  check_fraction(final, "final sparsity")
  if end_step <= begin_step or frequency < 1:
    raise InputError(f"polynomial schedule needs end_step > begin_step and frequency >= 1, got "
                     f"begin {begin_step}, end {end_step}, frequency {frequency}")
  t = jnp.clip(jnp.asarray(step), begin_step, end_step)
  t = begin_step + ((t - begin_step) // frequency) * frequency
  frac = (t - begin_step) / (end_step - begin_step)
  return final + (initial - final) * (1.0 - frac) ** power


def round_sparsities(final: float, rounds: int, *, initial: float = 0.0,
                     kind: str = "polynomial", power: float = 3.0) -> list[float]:
  """Target sparsity after each of `rounds` prune-retrain rounds, ending at `final`.

  kind 'polynomial': Zhu & Gupta at round r of n, final + (initial - final)(1 - r/n)^power
  (prunes hard early, gently late); 'linear': equal steps; 'geometric': the kept fraction
  shrinks by the same factor every round (Han et al.'s iterative pruning at a fixed rate).
  """
  check_fraction(final, "final sparsity")
  check_fraction(initial, "initial sparsity")
  if rounds < 1:
    raise InputError(f"rounds must be >= 1, got {rounds}")
  r = np.arange(1, rounds + 1) / rounds
  if kind == "polynomial":
    s = final + (initial - final) * (1 - r) ** power
  elif kind == "linear":
    s = initial + (final - initial) * r
  elif kind == "geometric":
    if final >= 1.0:
      raise InputError("geometric schedule needs final sparsity < 1")
    s = 1 - (1 - initial) * ((1 - final) / (1 - initial)) ** r
  else:
    raise InputError(f"schedule kind {kind!r}: expected polynomial, linear or geometric")
  return [float(v) for v in s]


# ----------------------------------------------------------------------------- optimiser
class MaskState(NamedTuple):
  """State of `masking`: a mask tree shaped like the updates (None for unmasked leaves)."""
  masks: Any


def _aligned(template, masks: Optional[Mapping]):
  """Masks rearranged to the nesting of `template` (None where a leaf has no mask)."""
  flat = _flat_masks(masks)

  def one(path, leaf):
    if path not in flat:
      return None
    if np.shape(flat[path]) != np.shape(leaf):
      raise InputError(f"mask for {path} has shape {np.shape(flat[path])}, param "
                       f"{np.shape(leaf)}")
    return jnp.asarray(flat[path])

  return surgery.map_with_path(one, template)


def masking(masks: Optional[Mapping]) -> optax.GradientTransformation:
  """An optax transform zeroing the updates of pruned entries; put it last in the chain.

  Args:
    masks: mask tree; paths the params do not have are ignored (e.g. masks of frozen params
      when the transform sees only the trainable sub-tree).
  """

  def init(params):
    wanted = _flat_masks(masks)
    here = set(surgery.paths(params))
    return MaskState(_aligned(params, {p: m for p, m in wanted.items() if p in here}))

  def update(updates, state, params=None):
    del params
    new = jax.tree.map(lambda m, u: u if m is None else jnp.where(m, u, jnp.zeros_like(u)),
                       state.masks, updates, is_leaf=lambda x: x is None)
    return new, state

  return optax.GradientTransformation(init, update)


@dataclasses.dataclass(frozen=True)
class MaskedOptimizer(optim.Optimizer):
  """An `Optimizer` whose `tx` ends with `masking`; its state is (inner state, MaskState).

  Attributes:
    base: the optimizer being masked (its `init` still handles `injected_lr`).
    masks: the initial masks.
  """
  base: Optional[optim.Optimizer] = None
  masks: Any = None

  def init(self, params, lr: float | None = None):
    inner = self.base.init(params, lr)
    return (inner, masking(self.masks).init(surgery.split(params, self.trainable)[0]))


def with_masks(optimizer: optim.Optimizer, masks: Mapping) -> MaskedOptimizer:
  """`optimizer` with pruned entries' updates zeroed after every step.

  The params passed to `init_state` must already be masked (`apply_masks`): entries that
  start at zero and never get a non-zero update stay exactly zero. Every leaf that should ever
  be pruned must have a mask now (all True if not pruned yet), so that `replace_masks` keeps
  the state's structure and the compiled step.
  """
  if isinstance(optimizer, MaskedOptimizer):
    raise InputError("optimizer is already masked; use replace_masks to change its masks")
  return MaskedOptimizer(tx=optax.chain(optimizer.tx, masking(masks)),
                         full_tx=optax.chain(optimizer.full_tx, masking(masks)),
                         labels=optimizer.labels, trainable=optimizer.trainable,
                         injected_lr=optimizer.injected_lr, groups=optimizer.groups,
                         base=optimizer, masks=masks)


def replace_masks(state, masks: Mapping):
  """A TrainState of a `MaskedOptimizer` run with new masks: params masked, mask state swapped.

  The new masks must cover exactly the paths masked at init (same state structure, same
  compiled step); masks of paths outside the trained sub-tree are ignored. The inner
  optimiser state (momentum, Adam moments) is kept.
  """
  inner, old = state.opt_state
  template = surgery.flatten(old.masks)
  old_paths = {p for p, m in template.items() if m is not None}
  new_flat = {p: m for p, m in _flat_masks(masks).items() if p in template}
  missing = sorted(old_paths - set(new_flat))
  extra = sorted(set(new_flat) - old_paths)
  if missing or extra:
    raise InputError(f"replace_masks needs masks for exactly the paths masked at init; "
                     f"missing {missing[:5]}, not masked at init {extra[:5]}")
  params = apply_masks(state.params, _unflatten_like(state.params, new_flat))
  return state.replace(params=params, opt_state=(inner, MaskState(_aligned(old.masks,
                                                                           new_flat))))


def current_masks(state) -> dict:
  """The masks held by a `MaskedOptimizer` run's state (numpy; unmasked leaves absent)."""
  _, ms = state.opt_state
  flat = {p: np.asarray(m) for p, m in surgery.flatten(ms.masks).items() if m is not None}
  return _unflatten_like(ms.masks, flat)


def full_masks(params, patterns: Sequence[str] = KERNELS,
               masks: Optional[Mapping] = None) -> dict:
  """All-True masks for every path matched by `patterns`, with `masks` laid over them."""
  flat = surgery.flatten(params)
  given = _flat_masks(masks)
  leaves = {p: given.get(p, np.ones(np.shape(flat[p]), bool))
            for p in surgery.select(params, patterns, what="prune")}
  return _unflatten_like(params, leaves)


def masks_from_zeros(params, patterns: Sequence[str] = KERNELS) -> dict:
  """Masks of a pruned model read back from its exact zeros (a trained weight is never
  exactly 0.0 in practice), e.g. after loading a saved sparse model."""
  flat = surgery.flatten(params)
  return _unflatten_like(params, {p: np.asarray(flat[p]) != 0
                                  for p in surgery.select(params, patterns, what="prune")})


# ----------------------------------------------------------------------------- prune-retrain
@dataclasses.dataclass
class PruneRound:
  """One prune-retrain round: target sparsity, measured sparsity, metric before/after."""
  target: float
  sparsity: float
  metric_pruned: Optional[float]
  metric_retrained: Optional[float]
  steps: int


def prune_retrain(state, step_fn: Callable, batch_at: Callable[[int], Any],
                  sparsities: Sequence[float], steps_per_round: int, *,
                  patterns: Sequence[str] = KERNELS, scope: str = "global",
                  evaluate: Optional[Callable[[Any], float]] = None,
                  on_round: Optional[Callable[[PruneRound, Any], None]] = None,
                  retrain: Optional[Callable[[Any, int], tuple[Any, int]]] = None):
  """Iterative magnitude pruning (Han et al. 2015): prune to each target, retrain, repeat.

  Args:
    state: a TrainState whose optimizer is a `MaskedOptimizer` covering `patterns`.
    step_fn: the compiled step for that optimizer (masks are state: reused every round).
    batch_at: batch of a global step (batches continue across rounds).
    sparsities: increasing targets, one per round (e.g. `round_sparsities`).
    steps_per_round: retraining steps after each prune.
    patterns, scope: see `magnitude_masks` (measured over the trainable params).
    evaluate: params -> metric (e.g. test accuracy), recorded after pruning and retraining.
    on_round: called with each finished round and the state (for incremental results).
    retrain: `(state, cap) -> (state, steps trained)`, how each round retrains up to the
      global step `cap` (e.g. `protocol.fit_converged` under validation patience, keeping
      the best validation state); None trains exactly `steps_per_round` steps.

  Returns:
    (state, [PruneRound]).
  """
  from jtransfer.train import fit
  history = []
  for target in sparsities:
    masks = magnitude_masks(jax.tree.map(np.asarray, state.params), target, patterns=patterns,
                            scope=scope, previous=current_masks(state))
    state = replace_masks(state, masks)
    pruned = evaluate(state.params) if evaluate else None
    cap = int(state.step) + steps_per_round
    if retrain is None:
      state, trained = fit(state, step_fn, batch_at, cap), steps_per_round
    else:
      state, trained = retrain(state, cap)
    got = sparsity_report(jax.tree.map(np.asarray, state.params), patterns=patterns)
    rnd = PruneRound(target, got["sparsity"], pruned,
                     evaluate(state.params) if evaluate else None, int(trained))
    history.append(rnd)
    if on_round is not None:
      on_round(rnd, state)
  return state, history
