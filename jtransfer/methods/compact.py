"""Compact transfer's variants and the pieces they are built from (docs/decisions.md, "Compact").

The compact-transfer table compares a large target CNN (the teacher, fine-tuned from the
source) with compact nets trained on the same k-shot draw: a compact student from random init
or from a compact source of its own size, on the labels alone or jointly with the teacher's
soft targets (`jtransfer.methods.distill`), and the teacher itself made compact by channel
pruning (`prune_teacher`, through `jtransfer.methods.prune.prune_channels`).

This module holds what the variants are (`VARIANTS` and the sets saying what each needs), how
the teacher is pruned, which widths the student has, and where a compact source is cached.
The runs themselves (training, measuring) are `jtransfer.methods.compact_runs`.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from jtransfer import surgery
from jtransfer.errors import InputError
from jtransfer.methods import cwl, distill, prune, transfer

VARIANTS = ("teacher", "scratch", "finetune", "distill", "distill_ft", "pruned",
            "pruned_distill")
DESCRIPTIONS = {
    "teacher": "large CNN fine-tuned from the source (stage 1)",
    "scratch": "compact CNN, random init, labels only",
    "finetune": "compact CNN fine-tuned from a compact source, labels only",
    "distill": "compact CNN, random init, joint loss with the teacher (stage 2)",
    "distill_ft": "compact CNN from the compact source, joint loss with the teacher",
    "pruned": "teacher channel-pruned, fine-tuned on labels only",
    "pruned_distill": "teacher channel-pruned, fine-tuned with the joint loss",
}
NEEDS_TEACHER = frozenset({"teacher", "distill", "distill_ft", "pruned", "pruned_distill"})
NEEDS_COMPACT_SOURCE = frozenset({"finetune", "distill_ft"})
PRUNED = frozenset({"pruned", "pruned_distill"})
KD = frozenset({"distill", "distill_ft", "pruned_distill"})  # trained with the joint loss
FROM_SCRATCH = frozenset({"scratch", "distill"})  # random init (the rest start pretrained)
# Labels-only twin of each variant trained with the teacher: the pairs the report compares.
WITHOUT_TEACHER = (("distill", "scratch"), ("distill_ft", "finetune"),
                   ("pruned_distill", "pruned"))


# ----------------------------------------------------------------------------- pruning
def channel_scores(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Per conv unit: |BN scale| (BN nets: the channel's gain) or the filter's L1 norm."""
  flat = surgery.flatten(params)
  scores = {}
  for unit in surgery.conv_units(params):
    if f"{unit}/bn/scale" in flat:
      scores[unit] = np.abs(np.asarray(flat[f"{unit}/bn/scale"], np.float64))
    else:
      scores[unit] = np.abs(np.asarray(flat[f"{unit}/conv/kernel"], np.float64)).sum((0, 1, 2))
  return scores


def top_fraction(scores: Mapping[str, np.ndarray], keep_frac: float) -> dict[str, np.ndarray]:
  """{unit: bool mask} keeping the ceil(keep_frac * C) highest scores of each unit (at least
  one; ties go to the lower channel index, so the choice is deterministic)."""
  if not 0 < keep_frac <= 1:
    raise InputError(f"the kept fraction of channels must be in (0, 1], got {keep_frac}")
  keep = {}
  for unit, s in scores.items():
    s = np.asarray(s)
    n = max(1, int(np.ceil(keep_frac * s.size)))
    mask = np.zeros(s.size, bool)
    mask[np.argsort(-s, kind="stable")[:n]] = True
    keep[unit] = mask
  return keep


def prune_teacher(params, stats, config: Mapping[str, Any], keep_frac: float,
                  residual: str = "group") -> tuple[dict, dict, dict]:
  """Keeps the top `keep_frac` channels of each conv unit and removes the rest.

  Channels are scored by |CWL sigma| when the params hold scales (a CWL strategy's teacher;
  the scales are folded into the kernels first), else by `channel_scores`.

  Returns:
    (params, batch_stats, config) of the pruned model (`models.from_config(arch, config)`).
  """
  params = jax.tree.map(np.asarray, params)
  if cwl.CWL_KEY in params:
    scales, rest = cwl.split_cwl(params)
    params = jax.tree.map(np.asarray, cwl.apply_cwl(rest, scales))
    scores = {u: np.abs(np.asarray(s, np.float64)) for u, s in scales.items()}
  else:
    scores = channel_scores(params)
  return prune.prune_channels(params, jax.tree.map(np.asarray, stats or {}), config,
                              top_fraction(scores, keep_frac), residual=residual)


# ----------------------------------------------------------------------------- student
def student_config(arch: str, overrides: Optional[Mapping[str, Any]] = None,
                   source: Optional[transfer.Source] = None) -> dict:
  """The student's widths: a compact source's own config when there is one (its head left
  out), else `distill.compact_config(arch, overrides)`."""
  if source is not None:
    return {k: v for k, v in source.config.items() if k != "num_classes"}
  return distill.compact_config(arch, overrides)


# ----------------------------------------------------------------------------- compact source
def compact_cache_dir(cache_root: str, arch: str, spec: str, config: Optional[Mapping],
                      epochs: float, seed: int) -> str:
  """Where the compact `arch` pretrained on `spec` is cached: a hash of everything that makes
  it (the same key the experiment always used, so old caches stay valid)."""
  blob = json.dumps(dict(arch=arch, spec=spec, config=config, epochs=epochs, seed=seed),
                    sort_keys=True)
  key = hashlib.sha1(blob.encode()).hexdigest()[:10]
  return os.path.join(cache_root, "sources", f"{arch}-compact-{key}")


def compact_source(arch: str, spec: str, config: Optional[Mapping], *, epochs: float,
                   seed: int, cache_root: str, pretrain: Callable[..., transfer.Source],
                   progress: bool = True) -> transfer.Source:
  """The compact arch pretrained on `spec` (trained once, cached), or loaded from `ckpt:PATH`.

  Args:
    arch, config: the student's architecture and widths (None with a checkpoint).
    spec: a dataset spec, or `ckpt:PATH` of a saved compact source.
    epochs, seed: its pretraining schedule.
    cache_root: the cache folder (`.cache`); the source lands under `sources/`.
    pretrain: `(arch, spec, *, epochs, seed, progress, model_config) -> Source`, the
      pretraining routine (`jtransfer.sources.pretrain`), called only on a cache miss.
  """
  if spec.startswith("ckpt:"):
    source = transfer.load_source(spec[len("ckpt:"):])
    if source.arch != arch:
      raise InputError(f"--student-source {spec} holds a {source.arch} model, not the student "
                       f"arch {arch} (--student-arch, default --arch)")
    return source
  path = compact_cache_dir(cache_root, arch, spec, config, epochs, seed)
  if os.path.isdir(path):
    return transfer.load_source(path)
  print(f"[compact_transfer] no cached compact {arch} source {config}: training it once "
        f"({epochs} epochs), cache {path}", file=sys.stderr)
  source = pretrain(arch, spec, epochs=epochs, seed=seed, progress=progress,
                    model_config=dict(config) if config is not None else None)
  transfer.save_source(path, source)
  return source
