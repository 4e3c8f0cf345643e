"""Scoring sources on a target before training, and pruning a trained CWL model: the Python
API's (`jtransfer.api`) `score_sources` and `prune_cwl`.

`score_sources` runs each source once in eval mode on the target images and scores its outputs
with the selection literature's scores (`methods.transferability`, `transrate`, `sfda`), as
the selection study does: LogME, H-score, TransRate and SFDA on the features that enter the
source's head, LEEP on its softmax, NCE on its argmax. `source_scores` is the selection study's
fuller form (the zoo's `experiments.model_selection`): S1..S6 of the base-model selection paper
on a chosen last conv map too, the features a fine-tuned target's head reads, the LogME variant
chosen, from forwards compiled once per model (`jtransfer.zoo.training.Compiled`);
`score_outputs` scores outputs computed elsewhere. `prune_cwl` removes the
channels whose CWL scale |sigma| is below tau (`methods.prune.prune_by_sigma`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models
from jtransfer.data import validate_images
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.inputs import as_images
from jtransfer.methods import prune, selection, sfda, transfer, transferability, transrate
from jtransfer.train import predict_logits
from jtransfer.zoo.training import Compiled, prenormalize

LABEL_SCORES = ("LogME", "LEEP", "NCE", "H-score", "TransRate", "SFDA")
SELECTION_FEATURES = ("target", "source")
# The selection study's score settings (each an open reading of the paper), as its records
# store them.
SCORE_SETTINGS = dict(map_tap="conv", selection_features="target", logme_variant="published")
# Above this many map elements S1..S6 accumulate in chunks (bounded memory); below, one chunk
# (one compilation per map shape and image count).
_ONE_CHUNK_ELEMENTS = 1 << 24


def _softmax(z: np.ndarray) -> np.ndarray:
  z = np.asarray(z, np.float64)
  p = np.exp(z - z.max(axis=1, keepdims=True))
  return p / p.sum(axis=1, keepdims=True)


# metric name -> (what it reads: 'features' or 'logits', function of (that, labels))
METRICS: dict[str, tuple[str, Callable]] = {
    "logme": ("features", lambda f, y: transferability.logme(f, y, variant="published")),
    "h_score": ("features", transferability.h_score),
    "transrate": ("features", transrate.transrate),
    "sfda": ("features", sfda.sfda),
    "leep": ("logits", lambda z, y: transferability.leep(_softmax(z), y)),
    "nce": ("logits", lambda z, y: transferability.nce(np.argmax(z, axis=1), y)),
}


def source_outputs(source: transfer.Source, images: np.ndarray, batch_size: int = 256
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(features entering the source's head (N, D), source-head logits (N, K_src)), eval mode,
  from one forward per batch."""
  model = source.model
  num_source_classes = int(source.config["num_classes"])

  @jax.jit
  def both(params, stats, x):
    logits, _, taps = models.apply_model(model, params, stats,
                                         normalize(x, source.mean, source.std),
                                         taps=("features",))
    f = taps["features"].reshape(x.shape[0], -1)
    return jnp.concatenate([f.astype(jnp.float32), logits.astype(jnp.float32)], axis=1)

  v = source.variables
  out = predict_logits(both, v["params"], v.get("batch_stats", {}), images, batch_size)
  return out[:, :-num_source_classes], out[:, -num_source_classes:]


def score_sources(sources: Mapping[str, transfer.Source] | Sequence[transfer.Source], images,
                  labels, metrics: Sequence[str] = ("logme", "transrate", "leep"),
                  batch_size: int = 256) -> dict[str, dict[str, float]]:
  """Transferability scores of each source for (images, labels); larger is better for each.

  Args:
    sources: name -> Source, or a list (named '0', '1', ...).
    images: (N, H, W, C) uint8 or float in [0, 1], at every source's input shape.
    labels: (N,) integer target labels.
    metrics: names from `METRICS` (logme, h_score, transrate, sfda, leep, nce).

  Returns:
    {source name: {metric: score}}.
  """
  if not isinstance(sources, Mapping):
    sources = {str(i): s for i, s in enumerate(sources)}
  unknown = [m for m in metrics if m not in METRICS]
  if unknown:
    raise InputError(f"unknown metric(s) {unknown}; expected some of {', '.join(METRICS)}")
  images, labels = as_images(images), np.asarray(labels)
  validate_images(images, labels, int(labels.max()) + 1 if labels.size else 1, "score_sources")
  out = {}
  for name, source in sources.items():
    transfer.validate_source_input(source, images.shape[1:], f"source {name!r}")
    feats, logits = source_outputs(source, images, batch_size)
    reads = {"features": feats, "logits": logits}
    out[name] = {m: float(METRICS[m][1](reads[METRICS[m][0]], labels)) for m in metrics}
  return out


# ----------------------------------------------------------------------------- selection study
def model_outputs(model, params, stats, x: np.ndarray, taps: Sequence[str], compiled: Compiled,
                  batch_size: int = 250) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(logits, {tap: array}) of `model` in eval mode over pre-normalised images, in batches.

  Taps are model taps or `selection.LAST_CONV_OUTPUT`. The last batch is padded to
  `batch_size` so one shape compiles once.
  """
  forward = compiled.forward(model, tuple(taps))
  bs = min(batch_size, len(x))
  logits, got = [], {t: [] for t in taps}
  for start in range(0, len(x), bs):
    chunk = x[start:start + bs]
    n = len(chunk)
    if n < bs:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
    out, t = forward(params, stats, chunk)
    logits.append(np.asarray(out)[:n])
    for name in taps:
      got[name].append(np.asarray(t[name])[:n])
  return np.concatenate(logits), {k: np.concatenate(v) for k, v in got.items()}


def score_outputs(labels: np.ndarray, last_conv: np.ndarray, features: np.ndarray | None = None,
                  source_logits: np.ndarray | None = None, *,
                  logme_variant: str = SCORE_SETTINGS["logme_variant"]) -> dict[str, float]:
  """Every transferability score of one (model, target) from the model's outputs.

  Args:
    labels: (N,) target labels.
    last_conv: (N, H, W, C) last conv map after ReLU: S1..S6.
    features: (N, D) selection features: LogME, H-score, TransRate, SFDA (skipped when None).
    source_logits: (N, K_src) source-head logits: LEEP on their softmax, NCE on their argmax
      (skipped when None).
    logme_variant: `selection.logme`'s variant; 'published' (default) as the LogME authors'
      code, whose numbers the literature reports.

  Returns:
    {'S1'..'S6', 'LogME', 'H-score', 'TransRate', 'SFDA', 'LEEP', 'NCE'} raw values (S2, S4,
    S5, S6 smaller is better; the others larger).
  """
  chunk = None if np.size(last_conv) <= _ONE_CHUNK_ELEMENTS else 256
  out = selection.feature_map_metrics(last_conv, labels, chunk_size=chunk)
  if features is not None:
    out["LogME"] = transferability.logme(features, labels, variant=logme_variant)
    out["H-score"] = transferability.h_score(features, labels)
    out["TransRate"] = transrate.transrate(features, labels)
    out["SFDA"] = sfda.sfda(features, labels)
  if source_logits is not None:
    out["LEEP"] = transferability.leep(_softmax(source_logits), labels)
    out["NCE"] = transferability.nce(np.argmax(source_logits, axis=1), labels)
  return out


def source_scores(source: transfer.Source, images: np.ndarray, labels: np.ndarray,
                  compiled: Compiled, *, map_tap: str = SCORE_SETTINGS["map_tap"],
                  selection_features: str = SCORE_SETTINGS["selection_features"],
                  logme_variant: str = SCORE_SETTINGS["logme_variant"]
                  ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Scores of a base model on labelled target images, from eval-mode forwards.

  Args:
    source: the base model.
    images: (N, H, W, C) uint8 labelled target images.
    labels: (N,) their labels.
    compiled: shared compilations.
    map_tap: the map S1..S6 read (`selection.MAP_TAPS`): 'conv' (default), the last conv layer's
      output after ReLU, as the paper says; 'pooled', the 'last_conv' tap (after the last max
      pool in VGG / AlexNet; the same map for ResNets).
    selection_features: what LogME and H-score read: 'target' (default), the head input of the
      fine-tuned target (`transfer.target_model`, which drops the source's fc6/fc7), i.e. the
      features fine-tuning builds on; 'source', the source's own penultimate layer (fc7 for
      vgg_s; the same as 'target' for ResNets).
    logme_variant: see `score_outputs`.

  Returns:
    (scores as `score_outputs`, the outputs they came from: {map tap name, 'features',
    'logits'}, the map under the name of the tap read, `selection.LAST_CONV_OUTPUT` or
    'last_conv').

  Raises:
    InputError: an unknown map tap or selection_features value.
  """
  tap = selection.map_tap_name(map_tap)
  if selection_features not in SELECTION_FEATURES:
    raise InputError(f"selection features {selection_features!r}: expected one of "
                     f"{', '.join(SELECTION_FEATURES)}")
  x = prenormalize(images, source.mean, source.std)
  v = source.variables
  logits, taps = model_outputs(source.model, v["params"], v.get("batch_stats", {}), x,
                               (tap, "features"), compiled)
  if selection_features == "target" and source.config.get("dense_widths"):
    # The target drops the source's hidden dense layers: its head reads another vector.
    model = transfer.target_model(source, len(np.unique(labels)))
    params, stats = transfer.init_target(source, model, 0)
    _, target_taps = model_outputs(model, params, stats, x, ("features",), compiled)
    taps["features"] = target_taps["features"]
  outputs = dict(taps, logits=logits)
  scores = score_outputs(labels, taps[tap], taps["features"], logits, logme_variant=logme_variant)
  return scores, outputs


def prune_cwl(result_or_variables: Any, tau: float, *, config: Mapping | None = None,
              residual: str = "group", multiple: int = 1) -> prune.PruneResult:
  """Removes the channels whose CWL scale |sigma| < tau (`prune.prune_by_sigma`); on a ViT or
  Swin, the attention heads and MLP hidden units (`methods.prune_heads`).

  Args:
    result_or_variables: a `jtransfer.api.FitResult` of a CWL strategy ('freeze_cwl',
      'finetune_cwl', ...), or {'params' (with its 'cwl' scales), 'batch_stats'}.
    tau: the threshold (0 removes nothing).
    config: the model config (`models.model_config`); taken from the result when given one.
    residual, multiple: as `prune.prune_by_sigma`.

  Returns:
    A `prune.PruneResult`: the smaller model's params, batch_stats and config (build it with
    `models.from_config(arch, config)`), channels and parameters kept.
  """
  if hasattr(result_or_variables, "variables") and hasattr(result_or_variables, "model"):
    variables = result_or_variables.variables
    config = config if config is not None else models.model_config(result_or_variables.model)
  else:
    variables = result_or_variables
  if config is None:
    raise InputError("prune_cwl: give the model config with variables (config=...)")
  params = variables["params"]
  if "cwl" not in params:
    raise InputError("prune_cwl: the params hold no CWL scales ('cwl'); train a CWL strategy "
                     "such as freeze_cwl")
  return prune.prune_by_sigma(params, variables.get("batch_stats") or {}, config, None,
                              float(tau), residual, multiple)
