"""How well the scores rank the zoo: rank correlations of every scorer with the fine-tuned
accuracy per (family, target) group (the paper's Fig. 2), the C_ij(alpha) sweep (Fig. 3) with its
leave-one-group-out estimate, and the random-init references' summary.

Records are the selection study's: one per (model, target) with 'family', 'target', 'model',
'test_acc', S1..S6 and optionally the label-aware scores (`scoring.LABEL_SCORES`) and the
target-blind baselines (`BLIND`); a random-init reference carries 'reference': 'scratch'.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jtransfer.errors import InputError
from jtransfer.methods import selection
from jtransfer.scoring import LABEL_SCORES, SCORE_SETTINGS

S_METRICS = selection.METRIC_NAMES
BLIND = ("source_accuracy", "param_count")
PAPER_ALPHA = 0.574
# Records written before the score settings were stored were computed with these.
LEGACY_SETTINGS = dict(map_tap="pooled", selection_features="source", logme_variant="exact")


def group_label(record: dict) -> str:
  """The paper's group: one architecture (zoo family) on one target."""
  return f"{record['family']} @ {record['target']}"


def oriented_scores(records: Sequence[dict]) -> dict[str, np.ndarray]:
  """Scores with larger = predicted better: S1..S6 scaled to [-1, 1] over all records (S2, S4,
  S5, S6 negated, as the paper does before combining), then S6 under App. A.2's sign
  (`selection.S6_APPENDIX`: raw S6 larger = better, the scaled value not negated), then the
  others as they are."""
  stacked = selection.stack_metrics([{k: r[k] for k in S_METRICS} for r in records])
  out = dict(selection.normalize_metrics(stacked))
  out[selection.S6_APPENDIX] = -out["S6"]
  for name in LABEL_SCORES + BLIND:
    if all(name in r for r in records):
      out[name] = np.array([r[name] for r in records], np.float64)
  return out


def rank_summary(rank: selection.RankSummary) -> dict:
  """JSON form of one scorer's `RankSummary`: mean and variance of rho over the groups where it
  is defined, mean weighted tau, and rho / tau per group (None where undefined)."""
  rho, tau = rank.spearman, rank.weighted_tau
  ok = np.isfinite(rho)
  return dict(
      spearman_mean=float(np.mean(rho[ok])) if ok.any() else None,
      spearman_var=float(np.var(rho[ok])) if ok.any() else None,
      weighted_tau_mean=float(np.nanmean(tau)) if np.isfinite(tau).any() else None,
      groups_defined=int(ok.sum()),
      per_group={str(g): dict(spearman=_num(r), weighted_tau=_num(t))
                 for g, r, t in zip(rank.groups, rho, tau)})


def _num(x: float) -> float | None:
  # JSON has no NaN: an undefined correlation is None.
  return float(x) if np.isfinite(x) else None


def held_out_combination(norm: dict[str, np.ndarray], acc: np.ndarray, groups: Sequence[str],
                         step: float) -> dict | None:
  """Leave-one-group-out estimate of the best C_ij(alpha): (i, j, alpha) chosen on the other
  groups, rho measured on the held-out one. The in-sample best is optimistic, the more so with
  few models per group; this is the figure a new (architecture, target) could expect.

  Returns:
    {'per_group': {group: {'pair', 'alpha', 'spearman'}}, 'spearman_mean', 'spearman_var'}, or
    None with fewer than 2 groups.
  """
  labels = list(dict.fromkeys(groups))
  if len(labels) < 2:
    return None
  groups = np.asarray(groups, dtype=object)
  per_group = {}
  for g in labels:
    fit_on, test_on = groups != g, groups == g
    sweeps = selection.sweep_pairs({k: v[fit_on] for k, v in norm.items()}, acc[fit_on],
                                   list(groups[fit_on]), step=step)
    finite = {k: sw for k, sw in sweeps.items() if np.isfinite(sw.best_mean)}
    if not finite:
      continue
    (a, b), sw = max(finite.items(), key=lambda kv: kv[1].best_mean)
    rho = selection.spearman(selection.combine(norm[a][test_on], norm[b][test_on],
                                               sw.best_alpha), acc[test_on])
    per_group[g] = dict(pair=f"{a}+{b}", alpha=sw.best_alpha, spearman=_num(rho))
  rhos = np.array([v["spearman"] for v in per_group.values() if v["spearman"] is not None])
  return dict(per_group=per_group,
              spearman_mean=float(rhos.mean()) if rhos.size else None,
              spearman_var=float(rhos.var()) if rhos.size else None)


def analyze(records: Sequence[dict], *, step: float = 0.001) -> dict:
  """Rank correlations of every scorer with fine-tuned accuracy, and the C_ij(alpha) sweep.

  Args:
    records: one per (model, target) with 'family', 'target', 'test_acc', S1..S6 and
      optionally LogME, LEEP, NCE, H-score, source_accuracy, param_count.
    step: alpha increment of the sweep.

  Returns:
    JSON-ready dict: 'groups', 'scorers' ({name: summary per (family, target)}), 'pooled'
    ({name: summary per target, all families together}), 'pairs' ({'S5+S6': best alpha, mean,
    var, mean curve}), 'best_pair', 'held_out' (see `held_out_combination`).

  Raises:
    InputError: a (family, target) group with fewer than 2 models.
  """
  records = sorted(records, key=lambda r: (r["family"], r["target"], r["model"]))
  acc = np.array([r["test_acc"] for r in records], np.float64)
  groups = [group_label(r) for r in records]
  scores = oriented_scores(records)
  norm = {k: scores[k] for k in S_METRICS}
  sweeps = selection.sweep_pairs(norm, acc, groups, step=step)
  pairs = {}
  for (a, b), sw in sweeps.items():
    at_paper = int(np.argmin(np.abs(sw.alphas - PAPER_ALPHA)))
    pairs[f"{a}+{b}"] = dict(
        i=a, j=b, best_alpha=sw.best_alpha, best_mean=_num(sw.best_mean),
        best_var=_num(sw.best_var), mean_curve=[_num(v) for v in sw.mean],
        groups=[str(g) for g in sw.groups], per_group_at_best=[
            _num(v) for v in sw.spearman[int(np.argmin(np.abs(sw.alphas - sw.best_alpha)))]],
        mean_at_paper_alpha=_num(sw.mean[at_paper]), var_at_paper_alpha=_num(sw.var[at_paper]))
  finite = {k: v for k, v in pairs.items() if v["best_mean"] is not None}
  best = max(finite, key=lambda k: finite[k]["best_mean"]) if finite else None
  if best is not None:
    p = pairs[best]
    scores[f"C_{p['i'][1]}{p['j'][1]}({p['best_alpha']:.3f})"] = selection.combine(
        norm[p["i"]], norm[p["j"]], p["best_alpha"])
  scores[f"C_56({PAPER_ALPHA})"] = selection.combine(norm["S5"], norm["S6"], PAPER_ALPHA)
  per_group = selection.rank_correlations(scores, acc, groups)
  targets = [r["target"] for r in records]
  pooled = {}
  if len({r["family"] for r in records}) > 1:
    pooled = {k: rank_summary(v) for k, v in
              selection.rank_correlations(scores, acc, targets).items()}
  return dict(groups=list(dict.fromkeys(groups)), scorers={k: rank_summary(v)
                                                           for k, v in per_group.items()},
              pooled=pooled, pairs=pairs, best_pair=best, alphas_step=step,
              held_out=held_out_combination(norm, acc, groups, step),
              n_models=len({r["model"] for r in records}), n_records=len(records))

def ranked(records: Sequence[dict]) -> list[dict]:
  """The zoo's records: what the scorers rank (the `--scratch` references left out)."""
  return [r for r in records if not r.get("reference")]


def scratch_summary(records: Sequence[dict]) -> dict:
  """Per (family, target) group with a random-init reference: how far the fine-tuned zoo
  members land from it and from each other, next to the test set's own noise.

  Returns:
    {group: {'scratch', 'best', 'worst', 'mean', 'spread', 'above', 'members', 'test_se'}}
    in accuracy (0-1); test_se is the binomial standard error of one accuracy at the
    members' mean on the group's test set. Empty without references.
  """
  out, zoo = {}, ranked(records)
  for ref in (r for r in records if r.get("reference") == "scratch"):
    g = group_label(ref)
    accs = np.array([r["test_acc"] for r in zoo if group_label(r) == g])
    if not accs.size:
      continue
    p = float(accs.mean())
    out[g] = dict(scratch=ref["test_acc"], best=float(accs.max()), worst=float(accs.min()),
                  mean=p, spread=float(accs.max() - accs.min()),
                  above=int((accs > ref["test_acc"]).sum()), members=int(accs.size),
                  test_se=float(np.sqrt(p * (1 - p) / ref["n_test"])))
  return out

def score_settings(records: Sequence[dict]) -> dict:
  """The score settings (SCORE_SETTINGS keys) of `records`, which must all share them.

  Raises:
    InputError: records computed with different settings.
  """
  seen = {tuple(r.get(k, LEGACY_SETTINGS[k]) for k in SCORE_SETTINGS) for r in records}
  if len(seen) > 1:
    raise InputError(f"records were scored with different settings {sorted(seen)} "
                     f"({', '.join(SCORE_SETTINGS)}); rerun with --overwrite")
  return dict(zip(SCORE_SETTINGS, seen.pop())) if seen else dict(SCORE_SETTINGS)
