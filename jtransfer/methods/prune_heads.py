"""Structural pruning of a transformer (ViT, DINOv2, CLIP, Swin) by its CWL scales: whole
attention heads and MLP hidden units, leaving smaller qkv / proj / fc1 / fc2 matrices.

The scales are `cwl_linear`'s, one per output channel of each block's `attn/qkv` (3 x heads x
head width: q, k, v blocks, heads contiguous inside each), `attn/proj`, `mlp/fc1` and
`mlp/fc2`. What can go, and the rule (|sigma| < tau as the CWL paper's channel pruning):
  * an MLP hidden unit j of a block, when |sigma_fc1[j]| < tau: fc1's column j and bias j and
    fc2's row j are removed. With sigma = 0 the unit's pre-activation is 0 and GELU(0) =
    QuickGELU(0) = 0, so it contributes nothing to fc2: removing it is exact;
  * an attention head h, when every one of its VALUE channels has |sigma| < tau (score: the
    largest |sigma| over them). With those scales at 0 its values are 0, so whatever its
    attention pattern its output is 0 and proj reads nothing from it: removing its q, k and v
    columns, its proj rows (and Swin's relative position bias column) is exact. Its query and
    key scales do not decide: they only reshape its attention pattern, not the size of what
    it adds. The same "kept if any coupled channel is kept" rule as `prune`'s residual groups.
Channels of the residual stream (proj and fc2 outputs, the patch embedding, LayerNorms) are not
pruned: every block adds into them. Every block keeps at least one head and one hidden unit
(its largest score), and `multiple` rounds each kept hidden count up (restoring the largest
scores first) for SIMD-friendly widths. Kept heads keep the source's head width.

The pruned model is `models.from_config(arch, config)` with `block_heads` / `block_hidden`
set; it computes exactly what the unpruned model computes with the scales of the removed heads'
value channels and of the removed hidden units set to 0 (`masked_scales`; tested).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jtransfer import surgery
from jtransfer.errors import InputError
from jtransfer.methods import cwl_linear

_BLOCK = re.compile(r"((?:stage(\d+)/)?block(\d+))/attn/qkv/kernel")


def blocks(params: Mapping[str, Any]) -> list[tuple[str, int]]:
  """(block path, stage index from 0) of every block with an `attn/qkv`, in forward order."""
  found = []
  for path in surgery.paths(params):
    m = _BLOCK.fullmatch(path)
    if m:
      stage = int(m.group(2)) - 1 if m.group(2) else 0
      found.append((stage, int(m.group(3)), m.group(1)))
  return [(b, s) for s, _, b in sorted(found)]


def head_width(config: Mapping[str, Any], stage: int) -> int:
  """The width of one head of the source (ViT: dim // heads; Swin: the stage's width over its
  heads), which pruning keeps."""
  if "depths" in config:
    return int(config["dim"]) * 2 ** stage // int(config["heads"][stage])
  return int(config["dim"]) // int(config["heads"])


def _keep(scores: np.ndarray, tau: float, multiple: int = 1) -> np.ndarray:
  """The largest scores: all >= tau (at least one), the count rounded up to `multiple`."""
  want = max(1, int(np.sum(scores >= tau)))
  want = min(scores.size, -(-want // multiple) * multiple)
  out = np.zeros(scores.size, bool)
  out[np.argsort(-scores, kind="stable")[:want]] = True
  return out


def masks_by_sigma(params: Mapping[str, Any], config: Mapping[str, Any],
                   scales: Mapping[str, Any], tau: float, multiple: int = 1) -> dict:
  """{'<block>/attn': bool (heads,), '<block>/mlp': bool (hidden,)}: what the rule keeps.

  A block whose qkv (fc1) has no scale keeps every head (hidden unit).
  """
  flat = surgery.flatten(params)
  out = {}
  for block, stage in blocks(params):
    width = head_width(config, stage)
    qkv = flat[f"{block}/attn/qkv/kernel"].shape[-1]
    heads = qkv // (3 * width)
    sigma = scales.get(f"{block}/attn/qkv")
    score = (np.ones(heads) if sigma is None else
             np.abs(np.asarray(sigma, np.float64)).reshape(3, heads, width)[2].max(axis=1))
    out[f"{block}/attn"] = _keep(score, tau)
    hidden = flat[f"{block}/mlp/fc1/kernel"].shape[-1]
    sigma = scales.get(f"{block}/mlp/fc1")
    score = np.ones(hidden) if sigma is None else np.abs(np.asarray(sigma, np.float64))
    out[f"{block}/mlp"] = _keep(score, tau, multiple)
  return out


def masked_scales(scales: Mapping[str, Any], masks: Mapping[str, np.ndarray],
                  config: Mapping[str, Any], params: Mapping[str, Any]) -> dict:
  """The scales with the removed heads' value channels and removed hidden units set to 0: the
  unpruned model that the pruned one equals."""
  out = {k: np.array(v, np.float32) for k, v in scales.items()}
  for block, stage in blocks(params):
    width = head_width(config, stage)
    key = f"{block}/attn/qkv"
    if key in out:
      heads = out[key].size // (3 * width)
      v = out[key].reshape(3, heads, width)
      v[2, ~masks[f"{block}/attn"]] = 0.0
      out[key] = v.reshape(-1)
    if f"{block}/mlp/fc1" in out:
      out[f"{block}/mlp/fc1"][~masks[f"{block}/mlp"]] = 0.0
  return out


def slice_params(params: Mapping[str, Any], config: Mapping[str, Any],
                 masks: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """(params, config) of the smaller model: the masks' heads and hidden units removed.

  Raises:
    InputError: a mask whose size is not its block's head or hidden count.
  """
  flat = {p: np.asarray(v) for p, v in surgery.flatten(params).items()}
  heads_out, hidden_out = [], []
  for block, stage in blocks(params):
    width = head_width(config, stage)
    keep_h, keep_u = masks[f"{block}/attn"], masks[f"{block}/mlp"]
    d = flat[f"{block}/attn/qkv/kernel"].shape[0]
    heads = flat[f"{block}/attn/qkv/kernel"].shape[-1] // (3 * width)
    hidden = flat[f"{block}/mlp/fc1/kernel"].shape[-1]
    if keep_h.shape != (heads,) or keep_u.shape != (hidden,):
      raise InputError(f"pruning masks of {block} have {keep_h.size} heads and {keep_u.size} "
                       f"hidden units; the block has {heads} and {hidden}")
    a, m = f"{block}/attn", f"{block}/mlp"
    flat[f"{a}/qkv/kernel"] = flat[f"{a}/qkv/kernel"].reshape(d, 3, heads, width)[
        :, :, keep_h].reshape(d, -1)
    if f"{a}/qkv/bias" in flat:
      flat[f"{a}/qkv/bias"] = flat[f"{a}/qkv/bias"].reshape(3, heads, width)[
          :, keep_h].reshape(-1)
    flat[f"{a}/proj/kernel"] = flat[f"{a}/proj/kernel"].reshape(heads, width, -1)[
        keep_h].reshape(-1, flat[f"{a}/proj/kernel"].shape[-1])
    if f"{a}/rel_pos_bias" in flat:  # Swin: one bias column per head
      flat[f"{a}/rel_pos_bias"] = flat[f"{a}/rel_pos_bias"][:, keep_h]
    flat[f"{m}/fc1/kernel"] = flat[f"{m}/fc1/kernel"][:, keep_u]
    flat[f"{m}/fc1/bias"] = flat[f"{m}/fc1/bias"][keep_u]
    flat[f"{m}/fc2/kernel"] = flat[f"{m}/fc2/kernel"][keep_u]
    heads_out.append(int(keep_h.sum()))
    hidden_out.append(int(keep_u.sum()))
  new_config = dict(config, block_heads=heads_out, block_hidden=hidden_out)
  return surgery.map_with_path(lambda p, _: flat[p], params), new_config


def prune_by_sigma(params: Mapping[str, Any], config: Mapping[str, Any],
                   scales: Mapping[str, Any], tau: float, multiple: int = 1
                   ) -> tuple[dict, dict, dict, dict]:
  """Folds the scales into the linear maps, then removes heads and hidden units by |sigma|.

  Args:
    params: the model params, without a 'cwl' entry.
    config: the model config (`models.model_config`) of a ViT or Swin.
    scales: `cwl_linear` scales {'<block>/attn/qkv': (3 h w,), '<block>/mlp/fc1': (H,), ...}.
    tau: threshold on |sigma| (0 removes nothing).
    multiple: round each block's kept hidden count up to a multiple of this.

  Returns:
    (params, config, kept, masks): the pruned model (`models.from_config(arch, config)`),
    {'<block>/attn' or '<block>/mlp': (kept, total)} and the masks.

  Raises:
    InputError: a bad tau or multiple, or scales that fit no linear map of the model.
  """
  if not np.isfinite(tau) or tau < 0:
    raise InputError(f"tau must be a finite number >= 0, got {tau}")
  if int(multiple) != multiple or multiple < 1:
    raise InputError(f"multiple must be a whole number >= 1, got {multiple}")
  if not blocks(params):
    raise InputError("head pruning needs transformer blocks with an attn/qkv layer; the params "
                     "have none")
  folded = cwl_linear.apply_scales(params, scales)
  masks = masks_by_sigma(params, config, scales, tau, int(multiple))
  new_params, new_config = slice_params(folded, config, masks)
  kept = {k: (int(v.sum()), int(v.size)) for k, v in masks.items()}
  return new_params, new_config, kept, masks
