"""Image retrieval with MAC descriptors and the revisited Oxford/Paris evaluation protocol.

Paper (cwl-weighting-convolution, sec. V-B, Table III): MAC = global max-pool of the last conv map,
l2-normalised (`mac_from_model` reads the last conv layer's output by default, before any pooling
layer of the network; see its `tap`); database ranked by cosine similarity for each query; mAP under the revisited
ROxford5k / RParis6k protocol (Radenovic et al., CVPR 2018) with its Easy / Medium / Hard setups.

The evaluation follows the `revisitop` reference code (`python/evaluate.py`: `compute_ap`,
`compute_map`) exactly, including its quirks, so numbers are comparable with published tables:

* junk images are removed from each ranked list before AP is computed (every positive moves up by
  the number of junk images ranked strictly before it);
* AP is the trapezoid rule on the precision-recall curve (see `average_precision_trapezoid`) and
  its denominator is the number of listed positives, found in the ranking or not;
* a query with no positives in a setup is skipped: its AP is NaN and it is left out of the mean.

Layout: our `ranks` are (num_queries, num_db), one row per query, the transpose of revisitop's
(db_size, num_queries). Scores are fractions in [0, 1]; papers print them times 100.

The official ground truth (`gnd_roxford5k.pkl`, `gnd_rparis6k.pkl`) ships as a pickle. Reading a
pickle can run arbitrary code, so `load_gnd_pickle` refuses unless `allow_pickle=True`, and even
then admits only plain containers, numbers, strings and numpy arrays. Convert once with
`gnd_pickle_to_json` and read the JSON (`load_gnd_json`) from then on.
"""
# No `from __future__ import annotations` here: a NamedTuple's field annotations must stay
# objects for the API reference (pdoc cannot resolve postponed ones on a NamedTuple's
# generated __new__, mitmproxy/pdoc issue 765).

import functools
import io
import json
import os
import pickle
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer.errors import InputError
from jtransfer.methods import selection

SETUPS = ("easy", "medium", "hard")
# Which map MAC pools (see `mac_from_model`): 'conv', the last conv layer's output (default), or
# 'pooled', the model's 'last_conv' tap (after VGG's / AlexNet's last max pool).
MAC_TAPS = selection.MAP_TAPS
AP_KINDS = ("trapezoid", "plain")
_EPS = 1e-12

# ----------------------------------------------------------------------------------------------
# Descriptors and ranking.


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = _EPS) -> jax.Array:
  """Scales vectors to unit l2 norm along `axis`; all-zero vectors stay zero (no NaN).

  Args:
    x: array of vectors.
    axis: the axis holding the vector components.
    eps: norms below this are treated as `eps`, which keeps zero vectors at zero.

  Returns:
    An array of the same shape and dtype as `x`.
  """
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


@jax.jit
def _mac(feature_map: jax.Array) -> jax.Array:
  return l2_normalize(jnp.max(feature_map, axis=(1, 2)))


def mac_descriptor(feature_map: jax.Array) -> jax.Array:
  """MAC descriptor (Tolias et al. 2016): global spatial max-pool, then l2-normalisation.

  Args:
    feature_map: last-conv activations, shape (N, H, W, C) (NHWC, Flax layout).

  Returns:
    (N, C) descriptors with unit l2 norm; an image whose map is all zeros gets a zero vector.

  Raises:
    InputError: if `feature_map` is not 4-D.
  """
  if jnp.ndim(feature_map) != 4:
    raise InputError(f"mac_descriptor expects an (N, H, W, C) feature map, got shape "
                     f"{jnp.shape(feature_map)}")
  return _mac(jnp.asarray(feature_map))


def mac_from_model(model, params, batch_stats, x: jax.Array, *, tap: str = "conv") -> jax.Array:
  """MAC descriptors of normalised images under a model (eval mode); jit-able.

  MAC is the spatial max of the last conv layer's activations (Tolias et al. 2016, and the CWL
  paper's "last conv map"). With tap='conv' (default) that is the output of the model's last conv
  unit after ReLU (`selection.LAST_CONV_OUTPUT`). tap='pooled' reads the 'last_conv' tap, which
  for VGG and AlexNet comes after the last max pool: for vgg_s at 28x28, a 2x2 pool of the 7x7
  map keeps 3x3, so the last row and column never reach the descriptor. For ResNets the two are
  the same map.

  Args:
    model: a Flax module from `jtransfer.models` (its head is not used).
    params: its 'params' tree (for CWL: the effective params).
    batch_stats: its 'batch_stats' tree, or None / {}.
    x: (N, H, W, C) normalised images.
    tap: 'conv' or 'pooled' (`MAC_TAPS`).

  Returns:
    (N, C) l2-normalised descriptors.

  Raises:
    InputError: an unknown tap.
  """
  name = selection.map_tap_name(tap)
  _, taps = selection.apply_with_taps(model, params, batch_stats, x, (name,))
  return l2_normalize(jnp.max(taps[name], axis=(1, 2)))


@functools.partial(jax.jit, static_argnames=("top_k",))
def _rank_block(queries: jax.Array, db: jax.Array, top_k: int | None) -> jax.Array:
  # HIGHEST so that accelerators do not round the dot products to bf16 and reorder near-ties.
  sims = jnp.matmul(queries, db.T, precision=jax.lax.Precision.HIGHEST)
  if top_k is None:
    # Stable sort of -sims: ties keep the lower database index first, as lax.top_k does.
    return jnp.argsort(-sims, axis=1, stable=True).astype(jnp.int32)
  return jax.lax.top_k(sims, top_k)[1].astype(jnp.int32)


def rank_database(query_desc: jax.Array, db_desc: jax.Array, batch_size: int = 1024,
                  top_k: int | None = None) -> np.ndarray:
  """Ranks the database for every query by decreasing cosine similarity.

  Descriptors must already be l2-normalised, so the dot product is the cosine. Queries are
  processed `batch_size` at a time (the last batch is padded so only one shape is compiled), so
  the similarity matrix never exceeds batch_size x num_db: 10k x 10k needs about 40 MB of scores
  per 1024-query batch, plus the int32 result (400 MB at full length; use `top_k` to cut it).

  Args:
    query_desc: (num_queries, D) l2-normalised query descriptors.
    db_desc: (num_db, D) l2-normalised database descriptors.
    batch_size: queries per batch.
    top_k: keep only the first `top_k` ranks per query (None: the whole database). AP on a
      truncated list counts positives beyond it as never retrieved.

  Returns:
    int32 array (num_queries, num_db or top_k): row q lists database indices, most similar first;
    ties go to the lower database index.

  Raises:
    InputError: on non-2-D inputs, mismatched descriptor sizes, or a bad batch_size / top_k.
  """
  q, db = np.asarray(query_desc), np.asarray(db_desc)
  if q.ndim != 2 or db.ndim != 2 or q.shape[1] != db.shape[1]:
    raise InputError(f"rank_database expects (num_queries, D) and (num_db, D) descriptors, got "
                     f"{q.shape} and {db.shape}")
  if batch_size < 1:
    raise InputError(f"batch_size must be positive, got {batch_size}")
  if top_k is not None and not 1 <= top_k <= db.shape[0]:
    raise InputError(f"top_k must be in [1, {db.shape[0]}] (the database size), got {top_k}")
  width = db.shape[0] if top_k is None else top_k
  out = np.empty((q.shape[0], width), np.int32)
  bs = min(batch_size, max(q.shape[0], 1))
  db_dev = jnp.asarray(db)
  for start in range(0, q.shape[0], bs):
    block = q[start:start + bs]
    n = block.shape[0]
    if n < bs:  # pad the tail so the jitted function sees one shape only
      block = np.concatenate([block, np.zeros((bs - n, q.shape[1]), q.dtype)])
    out[start:start + n] = np.asarray(_rank_block(jnp.asarray(block), db_dev, top_k))[:n]
  return out


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


# ----------------------------------------------------------------------------------------------
# Ground-truth files.

_GND_KEYS = ("easy", "hard", "junk")


def _numpy_globals() -> dict[tuple[str, str], Any]:
  """The numpy reconstruct functions an ndarray pickle names, under old and new module paths."""
  try:  # numpy >= 2; the same functions also serve pickles that name numpy.core.*
    from numpy._core import multiarray, numeric
  except ImportError:  # numpy 1.x
    from numpy.core import multiarray, numeric
  found = {}
  for prefix in ("numpy._core", "numpy.core"):
    found[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
    found[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
    found[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
  found[("numpy", "ndarray")] = np.ndarray
  found[("numpy", "dtype")] = np.dtype
  return found


_BUILTINS = {name: getattr(__import__("builtins"), name) for name in (
    "list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
    "bytearray", "bool")}


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
  """Stand-in for `_codecs.encode`, which protocol 0-2 pickles use to rebuild bytes.

  Only the latin-1 codec pickle itself emits is accepted, so no other codec module is looked up;
  `errors` is accepted for signature compatibility and always treated as 'strict'.
  """
  if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
    raise pickle.UnpicklingError(f"_codecs.encode is only allowed with latin1, got {encoding!r}")
  return text.encode("latin1", errors="strict")


class _GndUnpickler(pickle.Unpickler):
  """Unpickler that resolves only an allow-list of globals; nothing is ever imported by name."""

  _allowed = {**{(m, n): f for n, f in _BUILTINS.items() for m in ("builtins", "__builtin__")},
              ("_codecs", "encode"): _latin1_encode,
              **_numpy_globals()}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def _to_plain(x: Any) -> Any:
  """numpy arrays/scalars -> lists/Python numbers, recursively (what JSON can hold)."""
  if isinstance(x, np.ndarray):
    return _to_plain(x.tolist())
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, dict):
    return {str(k): _to_plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_plain(v) for v in x]
  return x


def _index_list(value: Any, where: str) -> list[int]:
  values = np.asarray(_to_plain(value) if value is not None else [])
  if values.size and (values.ndim != 1 or not np.issubdtype(values.dtype, np.integer)):
    raise InputError(f"{where} must be a flat list of integer database indices")
  return [int(v) for v in values.ravel()]


def _names(values: Any) -> list[str]:
  # Python 2 pickles read with encoding='latin1' may hold bytes names.
  return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in _to_plain(values)]


def _canonical_gnd(data: Any, source: str) -> dict:
  """Validates a ground-truth dict and returns it with plain Python types only."""
  if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
    raise InputError(f"{source}: expected a dict with keys 'imlist', 'qimlist', 'gnd'")
  if not all(isinstance(data[k], (list, tuple, np.ndarray)) for k in ("imlist", "qimlist", "gnd")):
    raise InputError(f"{source}: 'imlist', 'qimlist' and 'gnd' must be lists")
  imlist, qimlist = _names(data["imlist"]), _names(data["qimlist"])
  if len(data["gnd"]) != len(qimlist):
    raise InputError(f"{source}: 'gnd' has {len(data['gnd'])} entries but 'qimlist' has "
                     f"{len(qimlist)}")
  gnd = []
  for i, g in enumerate(data["gnd"]):
    if not isinstance(g, dict) or not set(_GND_KEYS) <= set(g):
      raise InputError(f"{source}: gnd entry {i} must be a dict with 'easy', 'hard', 'junk'")
    entry = {k: _index_list(g[k], f"{source}: gnd[{i}][{k!r}]") for k in _GND_KEYS}
    bad = [v for k in _GND_KEYS for v in entry[k] if not 0 <= v < len(imlist)]
    if bad:
      raise InputError(f"{source}: gnd entry {i} has indices outside the {len(imlist)}-image "
                       f"database, e.g. {bad[0]}")
    bbx = g.get("bbx")
    entry["bbx"] = None if bbx is None else [float(v) for v in np.ravel(_to_plain(bbx))]
    gnd.append(entry)
  return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _read_bytes(path: str | os.PathLike) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise InputError(f"cannot read ground-truth file {os.fspath(path)!r}: {e.strerror}") from e


def load_gnd_pickle(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
  """Reads revisitop's `gnd_roxford5k.pkl` / `gnd_rparis6k.pkl`, only with explicit opt-in.

  Even with `allow_pickle=True` the unpickler admits only builtins containers, numbers and
  strings and numpy arrays (their reconstruct functions); any other global, e.g. `os.system`,
  makes it raise before anything is called.

  Args:
    path: the .pkl file.
    allow_pickle: must be True to read a pickle at all.

  Returns:
    {'imlist': [str], 'qimlist': [str], 'gnd': [{'bbx': [float] | None, 'easy': [int],
    'hard': [int], 'junk': [int]}]} with plain Python types.

  Raises:
    InputError: if pickles are not allowed, the file names a forbidden global, is not a valid
      pickle, or does not hold revisited ground truth.
  """
  if not allow_pickle:
    raise InputError(
        f"refusing to unpickle {os.fspath(path)!r}: reading a pickle can run arbitrary code; pass "
        f"allow_pickle=True if you trust the file, or convert it once with "
        f"gnd_pickle_to_json(pkl, json, allow_pickle=True) and read the JSON with load_gnd_json")
  raw = _read_bytes(path)
  try:
    data = _GndUnpickler(io.BytesIO(raw), encoding="latin1").load()
  except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
          IndexError, KeyError, OverflowError) as e:
    raise InputError(f"{os.fspath(path)!r} is not an acceptable ground-truth pickle: {e}") from e
  return _canonical_gnd(data, os.fspath(path))


def load_gnd_json(path: str | os.PathLike) -> dict:
  """Reads ground truth written by `gnd_pickle_to_json` (the safe default path).

  Args:
    path: the .json file.

  Returns:
    The same structure as `load_gnd_pickle`.

  Raises:
    InputError: if the file is missing, not JSON, or not revisited ground truth.
  """
  try:
    data = json.loads(_read_bytes(path).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{os.fspath(path)!r} is not valid JSON: {e}") from e
  return _canonical_gnd(data, os.fspath(path))


def save_gnd_json(gnd: dict, path: str | os.PathLike) -> None:
  """Writes ground truth (as returned by the loaders) to JSON after validating it.

  Args:
    gnd: {'imlist', 'qimlist', 'gnd'} ground truth.
    path: output .json file.
  """
  data = _canonical_gnd(_to_plain(gnd), "ground truth")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def gnd_pickle_to_json(pkl_path: str | os.PathLike, json_path: str | os.PathLike,
                       allow_pickle: bool = False) -> dict:
  """Converts a revisitop ground-truth pickle to JSON, behind the same opt-in as the loader.

  Args:
    pkl_path: the .pkl file.
    json_path: the .json file to write.
    allow_pickle: must be True (see `load_gnd_pickle`).

  Returns:
    The ground truth that was written.
  """
  gnd = load_gnd_pickle(pkl_path, allow_pickle=allow_pickle)
  save_gnd_json(gnd, json_path)
  return gnd


def load_gnd(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
  """Reads ground truth from .json (default) or .pkl/.pickle (needs `allow_pickle=True`).

  Args:
    path: the file.
    allow_pickle: passed to `load_gnd_pickle` for pickle files.

  Returns:
    The ground-truth dict (see `load_gnd_pickle`).
  """
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix in (".pkl", ".pickle"):
    return load_gnd_pickle(path, allow_pickle=allow_pickle)
  if suffix == ".json":
    return load_gnd_json(path)
  raise InputError(f"ground-truth file {os.fspath(path)!r} must end in .json, .pkl or .pickle")


# ----------------------------------------------------------------------------------------------
# Embedded (label-defined) retrieval tasks.


def labels_to_gnd(query_labels: np.ndarray, db_labels: np.ndarray,
                  query_db_index: np.ndarray | None = None) -> list[dict]:
  """Per-query ground truth from class labels: same-label database items are 'easy' positives.

  'hard' is empty. When the queries are themselves in the database, pass `query_db_index` so each
  query's own entry becomes 'junk' (skipped) rather than a free hit at rank 0.

  Args:
    query_labels: (num_queries,) integer labels.
    db_labels: (num_db,) integer labels.
    query_db_index: optional (num_queries,) database index of each query, -1 for none.

  Returns:
    A list of {'easy': [int], 'hard': [], 'junk': [int]} usable with `revisited_setup`
    (Easy and Medium then agree; Hard has no positives, so every query is skipped there).

  Raises:
    InputError: on non-1-D labels or a `query_db_index` of the wrong length.
  """
  ql, dl = np.asarray(query_labels), np.asarray(db_labels)
  if ql.ndim != 1 or dl.ndim != 1:
    raise InputError(f"labels must be 1-D, got shapes {ql.shape} and {dl.shape}")
  self_idx = np.full(ql.shape, -1) if query_db_index is None else np.asarray(query_db_index)
  if self_idx.shape != ql.shape:
    raise InputError(f"query_db_index must have one entry per query ({ql.shape[0]}), got shape "
                     f"{self_idx.shape}")
  by_label = {lab: np.flatnonzero(dl == lab) for lab in np.unique(ql)}
  gnd = []
  for lab, me in zip(ql, self_idx):
    easy = by_label[lab]
    junk = [int(me)] if me >= 0 else []
    gnd.append({"easy": easy[easy != me].tolist(), "hard": [], "junk": junk})
  return gnd


def _descriptors(features: jax.Array, what: str) -> jax.Array:
  """MAC for (N, H, W, C) maps, l2-normalisation for (N, D) vectors."""
  ndim = jnp.ndim(features)
  if ndim == 4:
    return mac_descriptor(features)
  if ndim == 2:
    return l2_normalize(jnp.asarray(features))
  raise InputError(f"{what} must be (N, H, W, C) feature maps or (N, D) vectors, got shape "
                   f"{jnp.shape(features)}")


def embedded_retrieval_task(query_features: jax.Array, query_labels: np.ndarray,
                            db_features: jax.Array, db_labels: np.ndarray,
                            query_db_index: np.ndarray | None = None, batch_size: int = 1024,
                            top_k: int | None = None) -> tuple[np.ndarray, list[dict]]:
  """Ranks and ground truth for a retrieval task defined by class labels (e.g. Fashion-MNIST).

  Feature maps get MAC; vectors are l2-normalised. Evaluate with e.g.
  `compute_map(ranks, revisited_setup(gnd, 'easy'), ap_kind='plain')`.

  Args:
    query_features: (Nq, H, W, C) maps or (Nq, D) vectors.
    query_labels: (Nq,) labels.
    db_features: (Ndb, H, W, C) maps or (Ndb, D) vectors.
    db_labels: (Ndb,) labels.
    query_db_index: optional database index of each query (made junk), see `labels_to_gnd`.
    batch_size: queries per ranking batch.
    top_k: truncate each ranking (None: full).

  Returns:
    (ranks, gnd): ranks (Nq, Ndb or top_k) int32 and per-query {'easy', 'hard', 'junk'} dicts.
  """
  ranks = rank_database(_descriptors(query_features, "query_features"),
                        _descriptors(db_features, "db_features"), batch_size, top_k)
  return ranks, labels_to_gnd(query_labels, db_labels, query_db_index)
