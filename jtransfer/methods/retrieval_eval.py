"""Average precision, mAP and the revisited Oxford/Paris protocol (Radenovic et al., CVPR 2018),
as the `revisitop` reference code computes them (its quirks included; see
`jtransfer.methods.retrieval`, which re-exports every name).

Our `ranks` are (num_queries, num_db), one row per query; scores are fractions in [0, 1].
"""
# No `from __future__ import annotations` here: a NamedTuple's field annotations must stay
# objects for the API reference (pdoc cannot resolve postponed ones on a NamedTuple's
# generated __new__, mitmproxy/pdoc issue 765).

from typing import NamedTuple, Sequence

import numpy as np

from jtransfer.errors import InputError


SETUPS = ("easy", "medium", "hard")


AP_KINDS = ("trapezoid", "plain")


# ----------------------------------------------------------------------------------------------
# Average precision.


def _positive_ranks(ranked: np.ndarray, positives: Sequence[int],
                    junk: Sequence[int]) -> np.ndarray:
  """0-based positions of the positives in `ranked` after junk images are taken out.

  Same as revisitop's loop: each positive's position drops by the number of junk images ranked
  strictly before it. An image listed both as positive and junk stays a positive but still
  shifts the positives after it, as in revisitop.
  """
  ranked = np.asarray(ranked, np.int64).ravel()
  pos_ids = np.asarray(positives, np.int64).ravel()
  junk_ids = np.asarray(junk, np.int64).ravel()
  if min(ranked.min(initial=0), pos_ids.min(initial=0), junk_ids.min(initial=0)) < 0:
    raise InputError("database indices in rankings, positives and junk must be non-negative")
  size = 1 + max([ranked.max(initial=-1), pos_ids.max(initial=-1), junk_ids.max(initial=-1)])
  # Boolean lookup tables are O(num_db) per query, cheaper than np.isin for 10k-query runs.
  is_pos, is_junk = np.zeros(size, bool), np.zeros(size, bool)
  is_pos[pos_ids], is_junk[junk_ids] = True, True
  pos = np.flatnonzero(is_pos[ranked])
  junk_at = np.flatnonzero(is_junk[ranked])
  return pos - np.searchsorted(junk_at, pos, side="left")


def _check_ranked(ranked: np.ndarray) -> np.ndarray:
  ranked = np.asarray(ranked)
  if ranked.ndim != 1:
    raise InputError(f"a ranked list must be 1-D (database indices, best first), got shape "
                     f"{ranked.shape}")
  return ranked


def average_precision_trapezoid(ranked: np.ndarray, positives: Sequence[int],
                                junk: Sequence[int] = ()) -> float:
  """AP of one query exactly as revisitop's `compute_ap` computes it (trapezoid rule).

  Junk images are first removed from `ranked`. With r_j the 0-based position (junk removed) of the
  j-th retrieved positive, j = 0, 1, ..., and P the number of listed positives:

    AP = (1 / P) * sum_j (p0_j + p1_j) / 2,
    p0_j = j / r_j (1 when r_j = 0),  p1_j = (j + 1) / (r_j + 1)

  i.e. for each positive, the area of the trapezoid between recall j/P and (j+1)/P under the
  precision just before that positive (j / r_j) and at it ((j+1) / (r_j+1)). Positives missing
  from `ranked` (e.g. a truncated list) add nothing but still count in P.

  Args:
    ranked: 1-D database indices, best first.
    positives: database indices that count as correct.
    junk: database indices to ignore.

  Returns:
    AP in [0, 1]; NaN when `positives` is empty.
  """
  ranked = _check_ranked(ranked)
  if len(positives) == 0:
    return float("nan")
  r = _positive_ranks(ranked, positives, junk).astype(np.float64)
  j = np.arange(r.size, dtype=np.float64)
  p0 = np.where(r == 0, 1.0, j / np.maximum(r, 1.0))
  p1 = (j + 1.0) / (r + 1.0)
  return float(np.sum((p0 + p1) / 2.0) / len(positives))


def average_precision_plain(ranked: np.ndarray, positives: Sequence[int],
                            junk: Sequence[int] = ()) -> float:
  """Plain (non-interpolated) AP: mean of the precision at each positive's rank.

  AP = (1 / P) * sum_j (j+1) / (r_j+1), same r_j and P as `average_precision_trapezoid` (junk
  removed first). This is the usual classification-style retrieval AP (it equals scikit-learn's
  `average_precision_score` on a full ranking without ties).

  Args:
    ranked: 1-D database indices, best first.
    positives: database indices that count as correct.
    junk: database indices to ignore.

  Returns:
    AP in [0, 1]; NaN when `positives` is empty.
  """
  ranked = _check_ranked(ranked)
  if len(positives) == 0:
    return float("nan")
  r = _positive_ranks(ranked, positives, junk).astype(np.float64)
  j = np.arange(r.size, dtype=np.float64)
  return float(np.sum((j + 1.0) / (r + 1.0)) / len(positives))


_AP_FNS = {"trapezoid": average_precision_trapezoid, "plain": average_precision_plain}


def _precision_at(ranked: np.ndarray, positives: Sequence[int], junk: Sequence[int],
                  kappas: Sequence[int]) -> np.ndarray:
  """revisitop's precision@k: k is capped at the rank of the last retrieved positive."""
  pos = _positive_ranks(ranked, positives, junk) + 1
  if pos.size == 0:  # revisitop would fail on max([]); nothing retrieved means precision 0
    return np.zeros(len(kappas))
  out = []
  for kappa in kappas:
    kq = min(int(pos.max()), int(kappa))
    out.append(np.sum(pos <= kq) / kq)
  return np.asarray(out, np.float64)


# ----------------------------------------------------------------------------------------------
# mAP and the revisited protocol.


class MapResult(NamedTuple):
  """mAP over queries.

  Attributes:
    map: mean AP over queries with at least one positive (NaN if there are none).
    aps: (num_queries,) AP per query, NaN for skipped queries.
    mpr: (len(kappas),) mean precision@k over the same queries.
    prs: (num_queries, len(kappas)) precision@k per query, NaN for skipped queries.
    num_skipped: queries left out because they have no positives.
  """
  map: float
  aps: np.ndarray
  mpr: np.ndarray
  prs: np.ndarray
  num_skipped: int


def compute_map(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = (),
                ap_kind: str = "trapezoid") -> MapResult:
  """mAP (and mean precision@k) over queries, as revisitop's `compute_map`.

  Queries whose 'ok' list is empty are skipped (AP NaN, excluded from the mean), as revisitop does.

  Args:
    ranks: (num_queries, num_ranked) database indices per query, best first.
    gnd: one dict per query with 'ok' (positives) and optionally 'junk' (ignored images);
      see `revisited_setup`.
    kappas: the k of precision@k to report (revisitop uses 1, 5, 10).
    ap_kind: 'trapezoid' (revisitop, the default) or 'plain' (non-interpolated).

  Returns:
    A `MapResult`.

  Raises:
    InputError: if `ranks` is not 2-D, its rows do not match `gnd`, or `ap_kind` is unknown.
  """
  ranks = np.asarray(ranks)
  if ranks.ndim != 2 or ranks.shape[0] != len(gnd):
    raise InputError(f"ranks must be (num_queries, num_ranked) with one row per gnd entry "
                     f"({len(gnd)}), got shape {ranks.shape}")
  if ap_kind not in _AP_FNS:
    raise InputError(f"ap_kind must be one of {AP_KINDS}, got {ap_kind!r}")
  ap_fn = _AP_FNS[ap_kind]
  nq = len(gnd)
  aps, prs = np.full(nq, np.nan), np.full((nq, len(kappas)), np.nan)
  for i, g in enumerate(gnd):
    ok, junk = list(g["ok"]), list(g.get("junk", ()))
    if not ok:
      continue
    aps[i] = ap_fn(ranks[i], ok, junk)
    prs[i] = _precision_at(ranks[i], ok, junk, kappas)
  kept = ~np.isnan(aps)
  mean_ap = float(np.mean(aps[kept])) if kept.any() else float("nan")
  mpr = prs[kept].mean(axis=0) if kept.any() else np.full(len(kappas), np.nan)
  return MapResult(mean_ap, aps, mpr, prs, int(nq - kept.sum()))


def revisited_setup(gnd: Sequence[dict], setup: str) -> list[dict]:
  """Turns revisited ground truth into per-query {'ok', 'junk'} for one protocol setup.

  easy:   ok = easy,         junk = junk + hard
  medium: ok = easy + hard,  junk = junk
  hard:   ok = hard,         junk = junk + easy

  Args:
    gnd: one dict per query with 'easy', 'hard' and 'junk' lists of database indices.
    setup: 'easy', 'medium' or 'hard'.

  Returns:
    A list of {'ok': list[int], 'junk': list[int]}, one per query.

  Raises:
    InputError: on an unknown setup name or a gnd entry missing one of the keys.
  """
  if setup not in SETUPS:
    raise InputError(f"unknown retrieval setup {setup!r}; expected one of {SETUPS}")
  out = []
  for i, g in enumerate(gnd):
    missing = {"easy", "hard", "junk"} - set(g)
    if missing:
      raise InputError(f"gnd entry {i} lacks key(s) {sorted(missing)}")
    easy, hard, junk = (list(map(int, g[k])) for k in ("easy", "hard", "junk"))
    ok, bad = {"easy": (easy, junk + hard), "medium": (easy + hard, junk),
               "hard": (hard, junk + easy)}[setup]
    out.append({"ok": ok, "junk": bad})
  return out


def evaluate_revisited(ranks: np.ndarray, gnd: Sequence[dict], kappas: Sequence[int] = (1, 5, 10),
                       setups: Sequence[str] = SETUPS,
                       ap_kind: str = "trapezoid") -> dict[str, MapResult]:
  """mAP under each revisited setup (Easy / Medium / Hard), as in Table III.

  Args:
    ranks: (num_queries, num_ranked) database indices per query, best first.
    gnd: per-query dicts with 'easy', 'hard', 'junk'.
    kappas: the k of precision@k.
    setups: which setups to evaluate.
    ap_kind: 'trapezoid' (revisitop) or 'plain'.

  Returns:
    {setup: MapResult}.
  """
  return {s: compute_map(ranks, revisited_setup(gnd, s), kappas, ap_kind) for s in setups}
