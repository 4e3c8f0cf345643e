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

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer.errors import InputError
from jtransfer.methods import selection
# Evaluation and ground-truth files live in their own modules; every name stays importable here.
from jtransfer.methods.retrieval_eval import (  # noqa: F401
    _AP_FNS, AP_KINDS, average_precision_plain, average_precision_trapezoid, _check_ranked,
    compute_map, evaluate_revisited, MapResult, _positive_ranks, _precision_at, revisited_setup,
    SETUPS)
from jtransfer.methods.retrieval_gnd import (  # noqa: F401
    _BUILTINS, _canonical_gnd, _GND_KEYS, gnd_pickle_to_json, _GndUnpickler, _index_list,
    _latin1_encode, load_gnd, load_gnd_json, load_gnd_pickle, _names, _numpy_globals,
    _read_bytes, save_gnd_json, _to_plain)

# Which map MAC pools (see `mac_from_model`): 'conv', the last conv layer's output (default), or
# 'pooled', the model's 'last_conv' tap (after VGG's / AlexNet's last max pool).
MAC_TAPS = selection.MAP_TAPS
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
