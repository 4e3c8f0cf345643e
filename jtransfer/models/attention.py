"""Transformer building blocks shared by the ViT and Swin families.

Naming is the contract parameter-path methods (LoRA / SSF reparametrisations, bitfit, weight
import) rely on:
  * `attn/qkv` is the fused query-key-value Dense layer (kernel (dim, 3 dim), the q, k, v
    blocks in that order, heads contiguous inside each, as timm's `qkv` and torch's
    `in_proj_weight` store them) and `attn/proj` the output projection;
  * `mlp/fc1` and `mlp/fc2` are the MLP's two Dense layers;
  * LayerNorms are named `norm1`, `norm2` (pre-norm), LayerScale vectors `ls1`, `ls2`.
Attention is `jax.nn.dot_product_attention` (its XLA implementation on the CPU).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtransfer.errors import InputError
from jtransfer.models.common import compute_dtype, tap

# timm / torchvision / open_clip initialise Linear layers with trunc_normal(std=0.02) and
# zero biases; the embeddings likewise (std 0.02, timm's `init_weights`).
dense_init = nn.initializers.truncated_normal(0.02)


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's QuickGELU, x * sigmoid(1.702 x) (open_clip.transformer.QuickGELU)."""
  return x * jax.nn.sigmoid(1.702 * x)


TRANSFORMER_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # torch.nn.GELU() is the exact erf form
    "quick_gelu": quick_gelu,
}


def layer_norm(module: nn.Module, eps: float, name: str, tapped: bool = False) -> "LayerNorm":
  """torch.nn.LayerNorm(eps) as the child `name` of `module` (params `name/scale`,
  `name/bias`); with `tapped`, its output is the tap `name`."""
  return LayerNorm(eps, tapped, module.dtype, name=name)


class LayerNorm(nn.Module):
  """torch.nn.LayerNorm over the last axis: two-pass variance in float32, params `scale` and
  `bias` (flax.linen.LayerNorm's names), optionally tapped. Its own module rather than
  nn.LayerNorm so that it can tap its output under its own name (`norm`): a parent cannot sow
  a value under a child's name."""
  eps: float = 1e-6
  tapped: bool = False
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones_init(), (dim,))
    bias = self.param("bias", nn.initializers.zeros_init(), (dim,))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(
        compute_dtype(self.dtype) or x.dtype)
    if self.tapped:
      tap(self, "out", y)
    return y


class PatchEmbed(nn.Module):
  """The patchify conv (kernel = stride = `patch`, no padding) as params `kernel`
  (p, p, C, dim) and `bias` directly under its name; its raw output map is its tap."""
  dim: int
  patch: int
  use_bias: bool = True
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, x.shape[-1], self.dim))
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.dim,))
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=compute_dtype(self.dtype))
    y = jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if bias is not None:
      y = y + bias
    tap(self, "out", y)
    return y


def dense(module: nn.Module, features: int, name: str, use_bias: bool = True):
  """A Dense layer (the child `name`) in the module's compute dtype with the transformer
  initialiser, applied to the tokens flattened to one (rows, channels) matrix.

  Why flatten: on XLA:CPU the kernel gradient of a Dense over (batch, tokens, dim) is a
  dot_general contracting two axes, which XLA runs slower than the same product on the
  flattened matrix (vit_s28's forward+backward at batch 128 took 12% less time flattened, in
  one round-robin run on the loaded machine); the values are the same product."""
  layer = nn.Dense(features, use_bias=use_bias, kernel_init=dense_init,
                   dtype=compute_dtype(module.dtype), name=name)

  def apply(x: jax.Array) -> jax.Array:
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], features)
  return apply


class Attention(nn.Module):
  """Multi-head self-attention over (..., tokens, dim): fused `qkv`, then `proj`.

  Attributes:
    heads: attention heads (dim must divide by them unless `head_dim` is given).
    qkv_bias: the `qkv` layer's bias (all families here have one).
    dtype: compute dtype name.
    head_dim: width of each head; None: dim // heads. A head-pruned model keeps the source's
      head width with fewer heads (`methods/prune_heads.py`): qkv (dim, 3 heads head_dim),
      proj (heads head_dim, dim).
  """
  heads: int
  qkv_bias: bool = True
  dtype: Optional[str] = None
  head_dim: Optional[int] = None

  @nn.compact
  def __call__(self, x: jax.Array, bias: Optional[jax.Array] = None) -> jax.Array:
    """`bias` is added to the attention logits, broadcast to (batch, heads, T, T) (Swin's
    relative position bias plus its shifted-window mask)."""
    dim = x.shape[-1]
    head_dim = head_width(dim, self.heads, self.head_dim, "attention")
    inner = self.heads * head_dim
    qkv = dense(self, 3 * inner, "qkv", self.qkv_bias)(x)
    lead = x.shape[:-2]
    qkv = qkv.reshape(-1, x.shape[-2], 3, self.heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, heads, head_dim)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=head_dim ** -0.5)
    out = out.reshape(*lead, x.shape[-2], inner)
    return dense(self, dim, "proj")(out)


def head_width(dim: int, heads: int, head_dim: Optional[int], what: str) -> int:
  """The width of one head: `head_dim` when given, else dim // heads (which must divide)."""
  if head_dim is not None:
    return int(head_dim)
  if dim % heads:
    raise InputError(f"{what}: dim {dim} is not a multiple of heads {heads}")
  return dim // heads


def per_block(values: Optional[Sequence[int]], count: int, default: int, what: str) -> list[int]:
  """A per-block width list (a pruned model's heads or MLP widths), or `default` everywhere.

  Raises:
    InputError: a list whose length is not the block count, or a width < 1.
  """
  if values is None:
    return [int(default)] * count
  values = [int(v) for v in values]
  if len(values) != count or min(values, default=1) < 1:
    raise InputError(f"{what} {values} must give one width >= 1 for each of the {count} "
                     "blocks")
  return values


class Mlp(nn.Module):
  """fc1 -> activation -> fc2 (dropout 0, as all the families here are trained for transfer)."""
  hidden: int
  act: str = "gelu"
  dtype: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = dense(self, self.hidden, "fc1")(x)
    y = TRANSFORMER_ACTIVATIONS[self.act](y)
    return dense(self, x.shape[-1], "fc2")(y)


def layer_scale(module: nn.Module, name: str, init: Optional[float], x: jax.Array) -> jax.Array:
  """LayerScale (CaiT; DINOv2): x * gamma, one learned scale per channel; identity if `init`
  is None."""
  if init is None:
    return x
  gamma = module.param(name, nn.initializers.constant(init), (x.shape[-1],))
  return x * gamma.astype(x.dtype)


def drop_path(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """Stochastic depth (per sample), active only with train=True and rate > 0."""
  if not train or rate <= 0:
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return x * keep.astype(x.dtype) / (1.0 - rate)


def resample_pos_embed(pos: jax.Array, old_grid: Sequence[int], new_grid: Sequence[int],
                       num_prefix: int) -> jax.Array:
  """Bicubic resampling of a (1, prefix + h*w, dim) position embedding to a new grid.

  The same function as timm's `timm.layers.pos_embed.resample_abs_pos_embed` (its defaults:
  bicubic, antialias=True, align_corners unset): the prefix (class, register) entries are kept
  as they are, the grid part is resized as an image. torch's antialiased bicubic is the
  Keys kernel with a = -0.5 and weights renormalised at the borders, which is what
  `jax.image.resize(..., 'bicubic', antialias=True)` computes (tested against timm).
  """
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  if old_grid == new_grid:
    return pos
  prefix, grid = pos[:, :num_prefix], pos[:, num_prefix:]
  dim = pos.shape[-1]
  grid = grid.reshape(1, *old_grid, dim).astype(jnp.float32)
  grid = jax.image.resize(grid, (1, *new_grid, dim), method="bicubic", antialias=True)
  grid = grid.reshape(1, new_grid[0] * new_grid[1], dim).astype(pos.dtype)
  return jnp.concatenate([prefix, grid], axis=1)


def is_config(config: Mapping[str, Any]) -> bool:
  """Whether a model config (`models.model_config`) is a transformer's (ViT or Swin)."""
  return "patch_size" in config and "heads" in config


def refuse_transformer(config: Mapping[str, Any], arch: Optional[str], method: str) -> None:
  """Raises InputError when `method` (built on conv units) is asked of a transformer."""
  if is_config(config):
    name = f"arch {arch!r}" if arch else "this model"
    raise InputError(f"{method} works on conv units and {name} is a transformer (ViT/Swin), "
                     "where it is not supported yet")
