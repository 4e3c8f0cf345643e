"""DELTA on transformers: which block outputs are tapped, and how a channel of one is ablated.

On a CNN DELTA regularises the raw output of a stage's last conv (`delta_loss.default_taps`);
a transformer has no conv units, so its feature maps are the block outputs, token x channel:
a ViT's `block{i}` tap is (N, T, D) over all T tokens (class token, registers and patches
alike), a Swin's `stage{s}/block{b}` tap the (N, H, W, C) map. `delta_loss.attention_distance`
averages over every axis between the batch and the channel, so the token axis takes the place
of H x W: 0.5 * sum_{b,c} C * w_c * ||FM_t[b,...,c] - FM_s[b,...,c]||^2 / T.

Taps, chosen as the authors chose theirs on ResNet (the end of each of the four stages):
  * Swin: the last block of each stage (`stage{s}/block{depth_s - 1}`; swin_t: stage1/block1,
    stage2/block1, stage3/block5, stage4/block1);
  * ViT (no stages): `VIT_TAPS` = 4 evenly spaced blocks ending at the last one, block
    round(k L / 4) - 1 for k = 1..4 (ViT-B/16, L = 12: blocks 2, 5, 8, 11); every block when
    L <= 4.

Attention: the CNN rule zeroes output channel c's kernel slice, which leaves that channel of
the map at its bias; a block output has no kernel of its own (it is the residual stream: the
block's input plus its two branches), so here channel c of the tapped block output is set to
0 at every token before the rest of the network reads it, and the CE increase of the L2-FE
probe is measured as for the CNNs (`delta_attention.ablation_fn`).
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax

from jtransfer import surgery
from jtransfer.models import attention

VIT_TAPS = 4  # as many taps as a ResNet has stages
_BLOCK = re.compile(r"((?:stage\d+/)?block\d+)/.*")


def is_token_model(config: Mapping[str, Any]) -> bool:
  """Whether DELTA taps block outputs (a ViT or Swin config) rather than conv units."""
  return attention.is_config(config)


def default_taps(config: Mapping[str, Any]) -> tuple[str, ...]:
  """The tapped blocks of a ViT or Swin config (module docstring)."""
  if "depths" in config:  # Swin: the last block of each stage
    return tuple(f"stage{s}/block{n - 1}" for s, n in enumerate(config["depths"], start=1))
  depth = int(config["depth"])
  if depth <= VIT_TAPS:
    return tuple(f"block{i}" for i in range(depth))
  return tuple(f"block{int(round(k * depth / VIT_TAPS)) - 1}" for k in range(1, VIT_TAPS + 1))


def block_names(params: Mapping[str, Any]) -> list[str]:
  """The blocks of a transformer's params tree (`block3`, `stage2/block1`), in tree order."""
  out: list[str] = []
  for path in surgery.paths(params):
    m = _BLOCK.fullmatch(path)
    if m and m.group(1) not in out:
      out.append(m.group(1))
  return out


def ablate_block_output(tap: str, mask: jax.Array):
  """A Flax method interceptor multiplying the output of the block at path `tap` by `mask`
  (C,): channel c set to 0 at every token where mask[c] is 0."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != "__call__" or "/".join(context.module.path) != tap:
      return out
    return out * mask.astype(out.dtype)
  return interceptor
