"""How well scores rank models: normalisation, combination, alpha sweep, rank correlation.

`normalize_metrics` (every metric to [-1, 1], S2/S4/S5/S6 negated so larger is better),
`combine` and `alpha_sweep` for C_ij(alpha) = (1 - alpha) S_i + alpha S_j, `spearman`,
`weighted_tau`, and `rank_correlations`, which treats target-blind baselines
(`target_blind_scores`: source accuracy, parameter count) exactly like any other score.
`jtransfer.methods.selection` re-exports every name.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
import numpy.typing as npt
import scipy.stats

from jtransfer.errors import InputError
from jtransfer.methods.smetrics import SMALLER_IS_BETTER


# ------------------------------------------------------------------------------------------------
# Normalisation, combination, alpha sweep
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AlphaSweep:
  """Spearman of C_ij(alpha) against accuracy, per alpha and per group.

  Attributes:
    alphas: (A,) alpha values, 0 to 1.
    groups: group labels, in order of first appearance.
    spearman: (A, G) Spearman per alpha and group (NaN where C_ij is constant in a group).
    mean: (A,) mean over groups.
    var: (A,) population variance (ddof 0) over groups.
    best_alpha: alpha with the largest mean (the smallest such alpha on ties; NaN means skipped).
    best_mean: mean Spearman at best_alpha.
    best_var: variance over groups at best_alpha.
  """
  alphas: np.ndarray
  groups: tuple
  spearman: np.ndarray
  mean: np.ndarray
  var: np.ndarray
  best_alpha: float
  best_mean: float
  best_var: float


def stack_metrics(entries: Sequence[Mapping[str, float]]) -> dict[str, np.ndarray]:
  """Turns one metrics dict per (model, task) entry into one array per metric.

  Args:
    entries: e.g. the outputs of `feature_map_metrics`, all with the same keys.

  Returns:
    {name: (E,) float64 array}, entries in the given order.

  Raises:
    InputError: no entries, or entries with different keys.
  """
  if not entries:
    raise InputError("stack_metrics got no entries")
  keys = list(entries[0])
  for i, e in enumerate(entries):
    if set(e) != set(keys):
      raise InputError(f"stack_metrics: entry {i} has keys {sorted(e)}, expected {sorted(keys)}")
  return {key: np.array([e[key] for e in entries], np.float64) for key in keys}


def normalize_metrics(metrics: Mapping[str, npt.ArrayLike], *,
                      negate: Iterable[str] = SMALLER_IS_BETTER) -> dict[str, np.ndarray]:
  """Scales each metric to [-1, 1] over all the entries given; negates smaller-is-better ones.

  Min-max scaling, 2 (x - min) / (max - min) - 1, over every (model, task) entry at once, as the
  paper scales "considering all the network architectures and target tasks"; then metrics named in
  `negate` are multiplied by -1 so that larger is better for all. A metric constant over all
  entries maps to 0. NaN entries stay NaN and are ignored for min and max.

  Args:
    metrics: {name: (E,) values}, one value per entry (see `stack_metrics`).
    negate: names to negate; by default S2, S4, S5, S6. Names absent from `metrics` are ignored.

  Returns:
    {name: (E,) float64 array in [-1, 1]}.

  Raises:
    InputError: a metric that is not a non-empty 1-D array.
  """
  negate = set(negate)
  out = {}
  for name, values in metrics.items():
    x = np.asarray(values, np.float64)
    if x.ndim != 1 or x.size == 0 or np.all(np.isnan(x)):
      raise InputError(f"normalize_metrics: expected {name!r} as a non-empty 1-D array of numbers, "
                       f"got shape {x.shape}")
    lo, hi = np.nanmin(x), np.nanmax(x)
    scaled = np.zeros_like(x) if hi == lo else 2.0 * (x - lo) / (hi - lo) - 1.0
    scaled[np.isnan(x)] = np.nan
    out[name] = -scaled if name in negate else scaled
  return out


def combine(s_i: npt.ArrayLike, s_j: npt.ArrayLike, alpha: float) -> np.ndarray:
  """C_ij(alpha) = (1 - alpha) S_i + alpha S_j, on normalised metrics.

  Args:
    s_i: (E,) normalised metric i.
    s_j: (E,) normalised metric j.
    alpha: weight of S_j, in [0, 1].

  Returns:
    (E,) combined metric.

  Raises:
    InputError: shapes differ or alpha outside [0, 1].
  """
  s_i, s_j = np.asarray(s_i, np.float64), np.asarray(s_j, np.float64)
  if s_i.shape != s_j.shape:
    raise InputError(f"combine: metrics have different shapes {s_i.shape} and {s_j.shape}")
  if not 0.0 <= alpha <= 1.0:
    raise InputError(f"combine: alpha must be in [0, 1], got {alpha}")
  return (1.0 - alpha) * s_i + alpha * s_j


def alpha_sweep(s_i: npt.ArrayLike, s_j: npt.ArrayLike, target: npt.ArrayLike,
                groups: Sequence[Hashable] | None = None, *, step: float = 0.001) -> AlphaSweep:
  """Spearman of C_ij(alpha) with the target for alpha = 0, step, ..., 1, per group.

  Spearman is computed per group (e.g. per (architecture, target task), ranking the models of that
  group) and then averaged over groups, as in the paper's Fig. 3 and its C_56(0.574) = 0.7514.

  Args:
    s_i: (E,) normalised metric i (see `normalize_metrics`).
    s_j: (E,) normalised metric j.
    target: (E,) fine-tuned accuracy per entry.
    groups: (E,) group label per entry (any hashable: strings, tuples); None for one group.
    step: alpha increment; 1 / step should be a whole number.

  Returns:
    An `AlphaSweep`.

  Raises:
    InputError: shape mismatch, a group with fewer than 2 entries, bad step.
  """
  s_i, s_j, target = _check_vectors(s_i, s_j, target, what="alpha_sweep")
  if not 0.0 < step <= 1.0:
    raise InputError(f"alpha_sweep: step must be in (0, 1], got {step}")
  alphas = np.linspace(0.0, 1.0, int(round(1.0 / step)) + 1)
  labels, index = _split_groups(groups, len(target), "alpha_sweep")
  rho = np.stack([_spearman_rows(np.outer(1.0 - alphas, s_i[idx]) + np.outer(alphas, s_j[idx]),
                                 target[idx]) for idx in index], axis=1)
  mean, var = rho.mean(axis=1), rho.var(axis=1)
  best = int(np.nanargmax(mean)) if np.any(np.isfinite(mean)) else 0
  return AlphaSweep(alphas=alphas, groups=labels, spearman=rho, mean=mean, var=var,
                    best_alpha=float(alphas[best]), best_mean=float(mean[best]),
                    best_var=float(var[best]))


def sweep_pairs(normalized: Mapping[str, npt.ArrayLike], target: npt.ArrayLike,
                groups: Sequence[Hashable] | None = None, *,
                step: float = 0.001) -> dict[tuple[str, str], AlphaSweep]:
  """`alpha_sweep` for every pair (i, j), i before j in the mapping's order (paper Fig. 3).

  Args:
    normalized: {name: (E,)} normalised metrics, e.g. S1..S6.
    target: (E,) fine-tuned accuracy.
    groups: (E,) group labels, or None.
    step: alpha increment.

  Returns:
    {(name_i, name_j): AlphaSweep}.
  """
  names = list(normalized)
  return {(a, b): alpha_sweep(normalized[a], normalized[b], target, groups, step=step)
          for n, a in enumerate(names) for b in names[n + 1:]}


def _spearman_rows(values: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Spearman of each row of `values` (A, M) with `target` (M,): Pearson of average ranks."""
  rv = scipy.stats.rankdata(values, axis=1)
  rt = scipy.stats.rankdata(target)
  rv -= rv.mean(axis=1, keepdims=True)
  rt -= rt.mean()
  den = np.sqrt(np.sum(rv * rv, axis=1) * np.sum(rt * rt))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, rv @ rt / den, np.nan)


# ------------------------------------------------------------------------------------------------
# Rank correlation and target-blind baselines
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RankSummary:
  """Rank correlation of one scorer with accuracy, per group.

  Attributes:
    groups: group labels, in order of first appearance.
    spearman: (G,) Spearman per group.
    weighted_tau: (G,) weighted Kendall tau per group.
  """
  groups: tuple
  spearman: np.ndarray
  weighted_tau: np.ndarray

  def as_dict(self) -> dict:
    """Means, population variances (ddof 0) and per-group values, JSON-ready."""
    return {
        "spearman_mean": float(np.mean(self.spearman)),
        "spearman_var": float(np.var(self.spearman)),
        "weighted_tau_mean": float(np.mean(self.weighted_tau)),
        "weighted_tau_var": float(np.var(self.weighted_tau)),
        "per_group": {str(g): {"spearman": float(r), "weighted_tau": float(t)}
                      for g, r, t in zip(self.groups, self.spearman, self.weighted_tau)},
    }


def spearman(scores: npt.ArrayLike, target: npt.ArrayLike) -> float:
  """Spearman rank correlation (average ranks for ties); NaN if either side is constant.

  Args:
    scores: (M,) predicted transferability, larger meaning better.
    target: (M,) fine-tuned accuracy.

  Returns:
    rho in [-1, 1].
  """
  scores, target = _check_vectors(scores, target, what="spearman")
  if np.ptp(scores) == 0 or np.ptp(target) == 0:
    return float("nan")
  return float(scipy.stats.spearmanr(scores, target).statistic)


def weighted_tau(scores: npt.ArrayLike, target: npt.ArrayLike) -> float:
  """Weighted Kendall tau (scipy.stats.weightedtau, hyperbolic weights on rank).

  Swaps among the top-ranked models weigh more than swaps among the bottom ones, which is what
  matters when the score is used to pick a model. scipy averages the weighting by `scores`' ranking
  and by `target`'s.

  Args:
    scores: (M,) predicted transferability, larger meaning better.
    target: (M,) fine-tuned accuracy.

  Returns:
    tau_w in [-1, 1] (NaN if either side is constant).
  """
  scores, target = _check_vectors(scores, target, what="weighted_tau")
  if np.ptp(scores) == 0 or np.ptp(target) == 0:
    return float("nan")
  return float(scipy.stats.weightedtau(scores, target).statistic)


def ranks(scores: npt.ArrayLike) -> np.ndarray:
  """1-based ranks, 1 = largest score (predicted best), ties sharing their average rank.

  Args:
    scores: (M,) scores.

  Returns:
    (M,) float ranks.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1:
    raise InputError(f"ranks: expected a 1-D array of scores, got shape {scores.shape}")
  return scipy.stats.rankdata(-scores)


def target_blind_scores(*, source_accuracy: npt.ArrayLike | None = None,
                        param_count: npt.ArrayLike | None = None) -> dict[str, np.ndarray]:
  """Target-blind baselines as scores, larger meaning predicted better, for `rank_correlations`.

  Both are taken as given: higher source accuracy and more parameters predict better transfer.
  Reports should list them next to S1..S6, LogME, LEEP, NCE and H-score, since such baselines
  often rank models about as well.

  Args:
    source_accuracy: (E,) accuracy of each model on its source task, or None.
    param_count: (E,) parameter count of each model, or None.

  Returns:
    {'source_accuracy': ..., 'param_count': ...} for the arguments given.
  """
  out = {}
  for name, values in (("source_accuracy", source_accuracy), ("param_count", param_count)):
    if values is not None:
      x = np.asarray(values, np.float64)
      if x.ndim != 1:
        raise InputError(f"target_blind_scores: expected {name} as a 1-D array, got shape {x.shape}")
      out[name] = x
  return out


def rank_correlations(scores: Mapping[str, npt.ArrayLike], target: npt.ArrayLike,
                      groups: Sequence[Hashable] | None = None) -> dict[str, RankSummary]:
  """Spearman and weighted Kendall tau of every scorer with accuracy, per group.

  All scorers (feature-map metrics, combinations, LogME, LEEP, NCE, H-score, target-blind
  baselines) are treated the same way, so the report can put them side by side. Orient every score
  so that larger means predicted better (e.g. use `normalize_metrics` output, or negate raw S2).

  Args:
    scores: {name: (E,) score per entry}.
    target: (E,) fine-tuned accuracy per entry.
    groups: (E,) group label per entry (e.g. target task, or (arch, task)); None for one group.

  Returns:
    {name: RankSummary}.

  Raises:
    InputError: shape mismatch or a group with fewer than 2 entries.
  """
  target = np.asarray(target, np.float64)
  if target.ndim != 1:
    raise InputError(f"rank_correlations: expected target as a 1-D array, got shape {target.shape}")
  labels, index = _split_groups(groups, len(target), "rank_correlations")
  out = {}
  for name, values in scores.items():
    values, _ = _check_vectors(values, target, what=f"rank_correlations[{name!r}]")
    out[name] = RankSummary(
        groups=labels,
        spearman=np.array([spearman(values[i], target[i]) for i in index]),
        weighted_tau=np.array([weighted_tau(values[i], target[i]) for i in index]))
  return out


def _check_vectors(*arrays, what: str) -> list[np.ndarray]:
  """Converts to float64 1-D arrays of one common length >= 2."""
  out = [np.asarray(a, np.float64) for a in arrays]
  shapes = {a.shape for a in out}
  if len(shapes) != 1 or out[0].ndim != 1:
    raise InputError(f"{what}: expected 1-D arrays of one length, got shapes "
                     f"{[a.shape for a in out]}")
  if out[0].shape[0] < 2:
    raise InputError(f"{what}: needs at least 2 entries to rank, got {out[0].shape[0]}")
  return out


def _split_groups(groups, n: int, what: str) -> tuple[tuple, list[np.ndarray]]:
  """Group labels in order of first appearance and the entry indices of each."""
  if groups is None:
    return ("all",), [np.arange(n)]
  groups = list(groups)
  if len(groups) != n:
    raise InputError(f"{what}: expected {n} group labels, one per entry, got {len(groups)}")
  members: dict = {}
  for i, g in enumerate(groups):
    members.setdefault(g, []).append(i)
  for g, idx in members.items():
    if len(idx) < 2:
      raise InputError(f"{what}: group {g!r} has {len(idx)} entry; rank correlation needs at least 2")
  return tuple(members), [np.array(idx) for idx in members.values()]
