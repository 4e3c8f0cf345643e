"""Swin Transformer (v1), torchvision's `swin_t` graph (torchvision/models/swin_transformer.py).

Windowed multi-head attention with a learned relative position bias, windows shifted by half
a window in every second block (a cyclic roll plus the attention mask that keeps the rolled
regions apart, -100 on the logits as torchvision), and patch merging (2x2 neighbours
concatenated, LayerNorm, bias-free Linear to twice the width) between stages.

Parameter paths:
  * `patch_embed/kernel`, `patch_embed/bias` (the 4x4/4 conv), `patch_norm` (its LayerNorm);
  * `stage{s}/block{b}/norm1`, `.../attn/qkv/kernel` (dim, 3 dim), `.../attn/proj/kernel`,
    `.../attn/rel_pos_bias` ((2w-1)^2, heads: torchvision's `relative_position_bias_table`),
    `.../norm2`, `.../mlp/fc1/kernel`, `.../mlp/fc2/kernel` (and biases);
  * `stage{s}/merge/norm`, `stage{s}/merge/reduction/kernel` (s >= 2: the merging before stage
    s, as ConvNeXt's `stage{s}/downsample`);
  * `norm` (final LayerNorm), `head`.

Taps: `patch_embed` (the patch conv's (N, H/4, W/4, C) map, before `patch_norm`),
`stage{s}/block{b}` (each block's output map), `norm` (the final normed map; also `last_conv`,
the map the selection metrics S1..S6 read, named as the CNNs' map before pooling), `mean` and
`features` (its spatial mean: what the head reads).

Inputs must make every stage's map a multiple of the window (for swin_t: 224, 448, ...):
torchvision would zero-pad the windows and attend to the padding; this refuses instead.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtransfer.errors import InputError
from jtransfer.models import attention
from jtransfer.models.common import head, tap, to_compute


def relative_position_index(window: int) -> np.ndarray:
  """(w^2, w^2) index into the ((2w-1)^2, heads) bias table, torchvision's
  `define_relative_position_index`: (dy + w - 1) * (2w - 1) + (dx + w - 1)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, w^2, w^2)
  return rel[0] * (2 * window - 1) + rel[1]


def shift_mask(height: int, width: int, window: int, shift: tuple[int, int]) -> np.ndarray:
  """(windows, w^2, w^2) additive mask of the shifted windows: -100 between tokens that the
  cyclic roll brought together from different regions, 0 elsewhere (torchvision's slices;
  a side with a zero shift is one region)."""
  def slices(s):
    return (slice(0, -window), slice(-window, -s), slice(-s, None)) if s else (slice(0, None),)
  regions = np.zeros((height, width), np.float32)
  count = 0
  for hs in slices(shift[0]):
    for ws in slices(shift[1]):
      regions[hs, ws] = count
      count += 1
  regions = regions.reshape(height // window, window, width // window, window)
  regions = regions.transpose(0, 2, 1, 3).reshape(-1, window * window)
  diff = regions[:, None, :] - regions[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def _windows(x: jax.Array, window: int) -> jax.Array:
  n, h, w, c = x.shape
  x = x.reshape(n, h // window, window, w // window, window, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def _unwindows(x: jax.Array, n: int, h: int, w: int, window: int) -> jax.Array:
  x = x.reshape(n, h // window, w // window, window, window, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h, w, -1)


class WindowAttention(nn.Module):
  """Shifted-window attention on an (N, H, W, C) map, with the relative position bias; its
  params (`qkv`, `proj`, `rel_pos_bias`) sit under the block's `attn`."""
  heads: int
  window: int
  shift: int
  dtype: Optional[str] = None
  head_dim: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    head_dim = attention.head_width(c, self.heads, self.head_dim, "swin")
    inner = self.heads * head_dim
    # torchvision: no shift along a side the window covers
    shift = (self.shift if self.window < h else 0, self.shift if self.window < w else 0)
    table = self.param("rel_pos_bias", attention.dense_init,
                       ((2 * self.window - 1) ** 2, self.heads))
    index = relative_position_index(self.window)
    bias = table[index.reshape(-1)].reshape(*index.shape, self.heads).transpose(2, 0, 1)[None]
    if any(shift):
      x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
      # windows are batch-major: the (windows, ...) mask tiles once per image
      bias = jnp.tile(bias + jnp.asarray(shift_mask(h, w, self.window, shift))[:, None],
                      (n, 1, 1, 1))
    tokens = _windows(x, self.window)
    qkv = attention.dense(self, 3 * inner, "qkv")(tokens)
    qkv = qkv.reshape(-1, tokens.shape[1], 3, self.heads, head_dim)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       bias=bias.astype(tokens.dtype), scale=head_dim ** -0.5)
    y = attention.dense(self, c, "proj")(out.reshape(*tokens.shape[:-1], inner))
    y = _unwindows(y, n, h, w, self.window)
    return jnp.roll(y, shift, axis=(1, 2)) if any(shift) else y


class SwinBlock(nn.Module):
  """x + attn(norm1 x) over (shifted) windows, then x + mlp(norm2 x)."""
  heads: int
  window: int
  shift: int
  mlp_hidden: int
  drop_path: float = 0.0
  dtype: Optional[str] = None
  head_dim: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = attention.layer_norm(self, 1e-5, "norm1")(x)
    y = WindowAttention(self.heads, self.window, self.shift, self.dtype, self.head_dim,
                        name="attn")(y)
    x = x + attention.drop_path(self, y, self.drop_path, train)
    y = attention.layer_norm(self, 1e-5, "norm2")(x)
    y = attention.Mlp(self.mlp_hidden, dtype=self.dtype, name="mlp")(y)
    x = x + attention.drop_path(self, y, self.drop_path, train)
    tap(self, "out", x)
    return x


class PatchMerging(nn.Module):
  """2x2 neighbours concatenated (torchvision's x0, x1, x2, x3 order), LayerNorm, Linear."""
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2],
                         x[:, 1::2, 1::2]], axis=-1)
    x = attention.layer_norm(self, 1e-5, "norm")(x)
    return attention.dense(self, 2 * c, "reduction", use_bias=False)(x)


class Swin(nn.Module):
  """Swin Transformer v1.

  Attributes:
    num_classes: units of the `head` layer.
    patch_size: the patchify conv's side (4).
    dim: stage 1 width (doubled by each merging).
    depths: blocks per stage.
    heads: attention heads per stage.
    window: window side (7).
    mlp_ratio: MLP hidden width / dim.
    drop_path_rate: torchvision's stochastic_depth_prob (0.2 for swin_t's training), linear
      over blocks; default 0, active only with train=True.
    block_heads, block_hidden: per-block head counts and MLP widths of a pruned model, over
      all blocks in order (`methods/prune_heads.py`); None: the stage's `heads` and width *
      mlp_ratio. With `block_heads` each head keeps its stage's width / heads.
  """
  num_classes: int
  patch_size: int = 4
  dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  heads: tuple[int, ...] = (3, 6, 12, 24)
  window: int = 7
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  dtype: Optional[str] = None
  block_heads: Optional[tuple[int, ...]] = None
  block_hidden: Optional[tuple[int, ...]] = None

  def unit_names(self) -> list[str]:
    """The blocks, in order (their outputs are taps)."""
    return [f"stage{s + 1}/block{b}" for s, d in enumerate(self.depths) for b in range(d)]

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    grid = self.patch_size * 2 ** (len(self.depths) - 1) * self.window
    if x.shape[1] % grid or x.shape[2] % grid:
      raise InputError(f"swin: input {x.shape[1]}x{x.shape[2]} is not a multiple of "
                       f"{grid} (patch x 2^(stages-1) x window), so its windows do not tile "
                       "every stage")
    x = attention.PatchEmbed(self.dim, self.patch_size, dtype=self.dtype, name="patch_embed")(
        to_compute(self, x))
    x = attention.layer_norm(self, 1e-5, "patch_norm")(x)
    total, index = sum(self.depths), 0
    widths = [self.dim * 2 ** s for s in range(len(self.depths))]
    stage_heads = [h for d, h in zip(self.depths, self.heads) for _ in range(d)]
    heads = (stage_heads if self.block_heads is None else
             attention.per_block(self.block_heads, total, 1, "swin block_heads"))
    stage_hidden = [int(round(w * self.mlp_ratio)) for w, d in zip(widths, self.depths)
                    for _ in range(d)]
    hidden = (stage_hidden if self.block_hidden is None else
              attention.per_block(self.block_hidden, total, 1, "swin block_hidden"))
    for s, depth in enumerate(self.depths):
      if s > 0:
        x = PatchMerging(self.dtype, name=f"stage{s + 1}/merge")(x)
      head_dim = None if self.block_heads is None else widths[s] // self.heads[s]
      for b in range(depth):
        rate = self.drop_path_rate * index / max(total - 1, 1)
        x = SwinBlock(heads[index], self.window, 0 if b % 2 == 0 else self.window // 2,
                      hidden[index], rate, self.dtype, head_dim,
                      name=f"stage{s + 1}/block{b}")(x, train)
        index += 1
    x = attention.layer_norm(self, 1e-5, "norm", tapped=True)(x)
    tap(self, "last_conv", x)
    x = jnp.mean(x, axis=(1, 2))
    tap(self, "mean", x)
    tap(self, "features", x)
    return head(self, x)


def swin_t(num_classes: int = 1000, **overrides) -> Swin:
  """torchvision `swin_t` (28,288,354 params with 1000 classes)."""
  config = dict(patch_size=4, dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7)
  config.update(overrides)
  return Swin(num_classes=num_classes, **config)
