"""Vision transformers: timm's / torchvision's ViT, DeiT, DINOv2 and the CLIP image tower.

One graph covers them all (pre-norm blocks, a class token, learned position embeddings):
timm `VisionTransformer` (and DeiT, the same graph), torchvision `vit_b_16`, DINOv2 (timm's
`vit_*_patch14_dinov2`: LayerScale, optional register tokens) and open_clip's
`VisionTransformer` (no patch bias, `ln_pre`, QuickGELU for OpenAI weights, `ln_post` then a
bias-free projection). The families differ in config fields only; weight import maps each
layout's keys onto the names below (jtransfer/weights/timm_vit.py, torchvision_vit.py,
open_clip.py). Not covered: DeiT's distilled variants (a second `dist_token` and head), timm's
`global_pool='avg'` layout (its `fc_norm` after the pool) and SwiGLU MLPs (DINOv2 ViT-g).

Parameter paths:
  * `patch_embed/kernel` (p, p, C, dim), `patch_embed/bias`: the patchify conv;
  * `cls_token` (1, 1, dim), `reg_tokens` (1, R, dim), `pos_embed` (1, L, dim) where L is the
    checkpoint grid's tokens plus the class token unless `no_embed_class` (timm's layout);
  * `ln_pre` (CLIP only);
  * `block{i}/norm1`, `block{i}/attn/qkv/kernel` (dim, 3 dim), `block{i}/attn/qkv/bias`,
    `block{i}/attn/proj/kernel`, `block{i}/ls1` (LayerScale, DINOv2), `block{i}/norm2`,
    `block{i}/mlp/fc1/kernel`, `block{i}/mlp/fc2/kernel` (and their biases), `block{i}/ls2`;
  * `norm` (final LayerNorm; open_clip's `ln_post`), `proj/kernel` (CLIP, no bias), `head`.

Taps (`apply_model(..., taps=...)`): `patch_embed` (the patch conv's (N, h, w, dim) map, before
the position embedding), `block{i}` (each block's output tokens), `norm` (final normed tokens),
`cls` (the class token after `norm`), `mean` (mean of the normed patch tokens, prefix tokens
excluded), `last_conv` (the normed patch tokens as an (N, h, w, dim) grid: the map the
selection metrics S1..S6 read, named as the CNNs' map before pooling), and `features`: what the
head reads, `cls` (pool='token', the default and the checkpoints' own) or `mean`
(pool='mean'), followed by `proj` when the model has one.

Truncation (`truncate_after='block{i}'`, experiments.truncation): blocks after i are dropped
and the final `norm` is applied to block i's output, then pooled as `pool` says (CLS by
default) into `proj` (if any) and the head. Applying the final norm at an intermediate block is
what DINOv2's linear probes on intermediate layers do (`dinov2/eval/linear.py` reads
`get_intermediate_layers(..., return_class_token=True)`, whose tokens pass through the final
norm), and timm's `forward_intermediates` offers the same; it also keeps every truncated
model's head input on the scale the source's head was trained on. The truncated model keeps
the source's `norm` (and `proj`) parameters; the dropped blocks' are left out of it.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtransfer.errors import InputError
from jtransfer.models import attention
from jtransfer.models.common import check_truncation, head, tap, to_compute


class Block(nn.Module):
  """Pre-norm transformer block: x + ls1(attn(norm1 x)), then x + ls2(mlp(norm2 x))."""
  heads: int
  mlp_hidden: int
  ln_eps: float = 1e-6
  act: str = "gelu"
  layer_scale: Optional[float] = None
  drop_path: float = 0.0
  dtype: Optional[str] = None
  head_dim: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    y = attention.layer_norm(self, self.ln_eps, "norm1")(x)
    y = attention.Attention(self.heads, dtype=self.dtype, head_dim=self.head_dim,
                            name="attn")(y)
    x = x + attention.drop_path(self, attention.layer_scale(self, "ls1", self.layer_scale, y),
                                self.drop_path, train)
    y = attention.layer_norm(self, self.ln_eps, "norm2")(x)
    y = attention.Mlp(self.mlp_hidden, self.act, dtype=self.dtype, name="mlp")(y)
    x = x + attention.drop_path(self, attention.layer_scale(self, "ls2", self.layer_scale, y),
                                self.drop_path, train)
    tap(self, "out", x)
    return x


class ViT(nn.Module):
  """Vision transformer.

  Attributes:
    num_classes: units of the `head` layer.
    patch_size: square patch side.
    dim: token width.
    depth: blocks.
    heads: attention heads per block.
    mlp_ratio: MLP hidden width / dim.
    pos_grid: (h, w) patch grid the position embedding is stored for (the checkpoint's
      training size / patch); other input sizes resample it bicubically at each forward
      (`attention.resample_pos_embed`, timm's `dynamic_img_size`).
    num_registers: DINOv2 register tokens (after the class token, no position embedding when
      `no_embed_class`).
    no_embed_class: timm's flag: the position embedding covers patches only and the prefix
      tokens are concatenated after adding it (DINOv2 with registers); otherwise it covers
      [class, registers, patches].
    layer_scale: LayerScale initial value (DINOv2 1e-5), None for none.
    ln_eps: LayerNorm epsilon (timm / torchvision 1e-6, open_clip 1e-5).
    act: MLP activation, 'gelu' (exact) or 'quick_gelu' (OpenAI CLIP).
    patch_bias: the patch conv's bias (open_clip has none).
    pre_norm: CLIP's `ln_pre` after the position embedding.
    proj_dim: CLIP's bias-free projection of the pooled token (512 for ViT-B/16); None: none.
    pool: 'token' (class token) or 'mean' (mean of the patch tokens): what `features` is; a
      linear probe (strategy `freeze`) reads it.
    drop_path_rate: stochastic depth, linear over blocks as timm; only with train=True.
    block_heads, block_hidden: per-block head counts and MLP widths of a pruned model
      (`methods/prune_heads.py`); None: `heads` and dim * mlp_ratio in every block. With
      `block_heads` each head keeps the width dim // heads.
    truncate_after: a block name (`unit_names`): the network stops after it, the final norm
      and the pooling then read that block's tokens; None: every block.
  """
  num_classes: int
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0
  pos_grid: tuple[int, int] = (14, 14)
  num_registers: int = 0
  no_embed_class: bool = False
  layer_scale: Optional[float] = None
  ln_eps: float = 1e-6
  act: str = "gelu"
  patch_bias: bool = True
  pre_norm: bool = False
  proj_dim: Optional[int] = None
  pool: str = "token"
  drop_path_rate: float = 0.0
  dtype: Optional[str] = None
  block_heads: Optional[tuple[int, ...]] = None
  block_hidden: Optional[tuple[int, ...]] = None
  truncate_after: Optional[str] = None

  def unit_names(self) -> list[str]:
    """The blocks, in order (their outputs are taps and the truncation points)."""
    return [f"block{i}" for i in range(self.depth)]

  def _check(self, x: jax.Array) -> tuple[int, int]:
    if self.pool not in ("token", "mean"):
      raise InputError(f"ViT pool {self.pool!r}: expected 'token' or 'mean'")
    if self.act not in attention.TRANSFORMER_ACTIVATIONS:
      raise InputError(f"ViT act {self.act!r}: expected one of "
                       f"{', '.join(attention.TRANSFORMER_ACTIVATIONS)}")
    h, w = x.shape[1], x.shape[2]
    if h % self.patch_size or w % self.patch_size:
      raise InputError(f"ViT: input {h}x{w} is not a multiple of the patch size "
                       f"{self.patch_size}")
    return h // self.patch_size, w // self.patch_size

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    grid = self._check(x)
    check_truncation(self.truncate_after, self.unit_names())
    x = attention.PatchEmbed(self.dim, self.patch_size, self.patch_bias, self.dtype,
                             name="patch_embed")(to_compute(self, x))
    n = x.shape[0]
    x = x.reshape(n, grid[0] * grid[1], self.dim)
    num_prefix = 1 + self.num_registers
    prefix = [jnp.broadcast_to(self.param("cls_token", nn.initializers.normal(1e-6),
                                          (1, 1, self.dim)), (n, 1, self.dim))]
    if self.num_registers:
      prefix.append(jnp.broadcast_to(
          self.param("reg_tokens", nn.initializers.normal(1e-6),
                     (1, self.num_registers, self.dim)), (n, self.num_registers, self.dim)))
    pos_tokens = (0 if self.no_embed_class else num_prefix) + self.pos_grid[0] * self.pos_grid[1]
    pos = self.param("pos_embed", attention.dense_init, (1, pos_tokens, self.dim))
    pos = attention.resample_pos_embed(pos, self.pos_grid, grid,
                                       0 if self.no_embed_class else num_prefix)
    prefix = [t.astype(x.dtype) for t in prefix]
    if self.no_embed_class:
      x = jnp.concatenate(prefix + [x + pos.astype(x.dtype)], axis=1)
    else:
      x = jnp.concatenate(prefix + [x], axis=1) + pos.astype(x.dtype)
    if self.pre_norm:
      x = attention.layer_norm(self, self.ln_eps, "ln_pre")(x)
    heads = attention.per_block(self.block_heads, self.depth, self.heads, "ViT block_heads")
    hidden = attention.per_block(self.block_hidden, self.depth,
                                 int(round(self.dim * self.mlp_ratio)), "ViT block_hidden")
    head_dim = None if self.block_heads is None else self.dim // self.heads
    for i in range(self.depth):
      rate = self.drop_path_rate * i / max(self.depth - 1, 1)
      x = Block(heads[i], hidden[i], self.ln_eps, self.act, self.layer_scale, rate,
                dtype=self.dtype, head_dim=head_dim, name=f"block{i}")(x, train)
      if self.truncate_after == f"block{i}":
        break
    x = attention.layer_norm(self, self.ln_eps, "norm", tapped=True)(x)
    tap(self, "last_conv", x[:, num_prefix:].reshape(n, *grid, self.dim))
    cls, mean = x[:, 0], jnp.mean(x[:, num_prefix:], axis=1)
    tap(self, "cls", cls)
    tap(self, "mean", mean)
    x = cls if self.pool == "token" else mean
    if self.proj_dim is not None:
      x = attention.dense(self, self.proj_dim, "proj", use_bias=False)(x)
    tap(self, "features", x)
    return head(self, x)


def _vit(num_classes, overrides, **config) -> ViT:
  config.update(overrides)
  return ViT(num_classes=num_classes, **config)


def vit_ti16(num_classes: int = 1000, **overrides) -> ViT:
  """timm `vit_tiny_patch16_224` / DeiT-Ti (5,717,416 params with 1000 classes)."""
  return _vit(num_classes, overrides, patch_size=16, dim=192, depth=12, heads=3)


def vit_s16(num_classes: int = 1000, **overrides) -> ViT:
  """timm `vit_small_patch16_224` / DeiT-S (22,050,664 params with 1000 classes)."""
  return _vit(num_classes, overrides, patch_size=16, dim=384, depth=12, heads=6)


def vit_b16(num_classes: int = 1000, **overrides) -> ViT:
  """timm `vit_base_patch16_224` / DeiT-B and torchvision `vit_b_16` (86,567,656 params)."""
  return _vit(num_classes, overrides, patch_size=16, dim=768, depth=12, heads=12)


def dinov2_vits14(num_classes: int = 1000, **overrides) -> ViT:
  """DINOv2 ViT-S/14 in timm's layout (`vit_small_patch14_dinov2`, 518 px: a 37x37 grid);
  pass num_registers=4, no_embed_class=True for `vit_small_patch14_reg4_dinov2`."""
  return _vit(num_classes, overrides, patch_size=14, dim=384, depth=12, heads=6,
              pos_grid=(37, 37), layer_scale=1e-5)


def dinov2_vitb14(num_classes: int = 1000, **overrides) -> ViT:
  """DINOv2 ViT-B/14 in timm's layout (`vit_base_patch14_dinov2`)."""
  return _vit(num_classes, overrides, patch_size=14, dim=768, depth=12, heads=12,
              pos_grid=(37, 37), layer_scale=1e-5)


def clip_vit_b16(num_classes: int = 1000, **overrides) -> ViT:
  """open_clip `ViT-B-16` image tower (OpenAI weights: act='quick_gelu', as
  `ViT-B-16-quickgelu`): no patch bias, ln_pre, LayerNorm eps 1e-5, 512-d projection.
  CLIP weights expect OpenAI's normalisation (mean 0.4815,0.4578,0.4082, std
  0.2686,0.2613,0.2758): pass it to `experiments.convert_weights --mean/--std`."""
  return _vit(num_classes, overrides, patch_size=16, dim=768, depth=12, heads=12,
              ln_eps=1e-5, patch_bias=False, pre_norm=True, proj_dim=512)


def vit_s28(num_classes: int = 10, **overrides) -> ViT:
  """The small embedded ViT for 28x28x1 inputs (as vgg_s / resnet_s): patch 4 (a 7x7 grid),
  dim 96, depth 4, 3 heads."""
  return _vit(num_classes, overrides, patch_size=4, dim=96, depth=4, heads=3, pos_grid=(7, 7))
