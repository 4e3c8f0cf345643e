"""torchvision key maps of the transformers: `vit_b_16` (jtransfer.models.vit) and `swin_t`
(jtransfer.models.swin).

torchvision's ViT: `conv_proj`, `class_token`, `encoder.pos_embedding`,
`encoder.layers.encoder_layer_{i}.{ln_1, self_attention.in_proj_weight / in_proj_bias (the fused
q, k, v, the same order as timm's qkv), self_attention.out_proj, ln_2, mlp.0, mlp.3}`,
`encoder.ln`, `heads.head`.

torchvision's Swin: `features.0.0` (patch conv), `features.0.2` (its LayerNorm), the blocks of
stage s at `features.{2s-1}.{b}.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table,
norm2, mlp.0, mlp.3}`, the patch merging before stage s at `features.{2s-2}.{norm, reduction}`,
then `norm`, `head`. The `relative_position_index` buffers are recomputed by the model
(`swin.relative_position_index`): their keys are accepted and not imported.
"""
from __future__ import annotations

from jtransfer.weights.timm_vit import linear, ln, patch_conv


def vit_map(model) -> list:
  """torchvision `VisionTransformer` keys for a jtransfer `ViT` (class token, no registers)."""
  from jtransfer.weights.torchvision_entries import Entry
  entries = patch_conv("conv_proj") + [
      Entry("class_token", "params", ("cls_token",), "vec"),
      Entry("encoder.pos_embedding", "params", ("pos_embed",), "vec")]
  for i in range(model.depth):
    pre, block = f"encoder.layers.encoder_layer_{i}", f"block{i}"
    entries += ln(f"{pre}.ln_1", (block, "norm1"))
    entries += [Entry(f"{pre}.self_attention.in_proj_weight", "params",
                      (block, "attn", "qkv", "kernel"), "dense"),
                Entry(f"{pre}.self_attention.in_proj_bias", "params",
                      (block, "attn", "qkv", "bias"), "vec")]
    entries += linear(f"{pre}.self_attention.out_proj", (block, "attn", "proj"))
    entries += ln(f"{pre}.ln_2", (block, "norm2"))
    entries += linear(f"{pre}.mlp.0", (block, "mlp", "fc1"))
    entries += linear(f"{pre}.mlp.3", (block, "mlp", "fc2"))
  return entries + ln("encoder.ln", ("norm",)) + linear("heads.head", ("head",))


def swin_map(model) -> list:
  """torchvision `SwinTransformer` (v1) keys for a jtransfer `Swin`."""
  from jtransfer.weights.torchvision_entries import Entry
  entries = patch_conv("features.0.0") + ln("features.0.2", ("patch_norm",))
  for s, depth in enumerate(model.depths, start=1):
    if s > 1:
      pre, merge = f"features.{2 * s - 2}", f"stage{s}/merge"
      entries += ln(f"{pre}.norm", (merge, "norm"))
      entries += linear(f"{pre}.reduction", (merge, "reduction"), bias=False)
    for b in range(depth):
      pre, block = f"features.{2 * s - 1}.{b}", f"stage{s}/block{b}"
      entries += ln(f"{pre}.norm1", (block, "norm1"))
      entries += linear(f"{pre}.attn.qkv", (block, "attn", "qkv"))
      entries += linear(f"{pre}.attn.proj", (block, "attn", "proj"))
      entries += [Entry(f"{pre}.attn.relative_position_bias_table", "params",
                        (block, "attn", "rel_pos_bias"), "vec"),
                  Entry(f"{pre}.attn.relative_position_index", "", (), "derived")]
      entries += ln(f"{pre}.norm2", (block, "norm2"))
      entries += linear(f"{pre}.mlp.0", (block, "mlp", "fc1"))
      entries += linear(f"{pre}.mlp.3", (block, "mlp", "fc2"))
  return entries + ln("norm", ("norm",)) + linear("head", ("head",))
