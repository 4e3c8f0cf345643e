"""Scoring sources on a target before training, and pruning a trained CWL model: the Python
API's (`jtransfer.api`) `score_sources` and `prune_cwl`.

`score_sources` runs each source once in eval mode on the target images and scores its outputs
with the selection literature's scores (`methods.transferability`, `transrate`, `sfda`), as
`experiments.model_selection` does: LogME, H-score, TransRate and SFDA on the features that
enter the source's head, LEEP on its softmax, NCE on its argmax. `prune_cwl` removes the
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
from jtransfer.methods import prune, sfda, transfer, transferability, transrate
from jtransfer.train import predict_logits


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
