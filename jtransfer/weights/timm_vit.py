"""timm key maps of the ViT family (jtransfer.models.vit): ViT / DeiT and DINOv2.

timm's `VisionTransformer` state dict: `patch_embed.proj` (the patch conv), `cls_token`,
`reg_token` (DINOv2 registers), `pos_embed`, `blocks.{i}.{norm1, attn.qkv, attn.proj, ls1.gamma,
norm2, mlp.fc1, mlp.fc2, ls2.gamma}`, `norm`, `head`. The fused `qkv` is kept fused (its
(3 dim, dim) weight is the transposed `attn/qkv/kernel`); tokens and embeddings keep timm's
(1, tokens, dim) layout.
"""
from __future__ import annotations


def ln(key: str, path: tuple[str, ...]) -> list:
  """A LayerNorm's weight / bias -> `scale` / `bias`."""
  from jtransfer.weights.torchvision_entries import Entry
  return [Entry(f"{key}.weight", "params", (*path, "scale"), "vec"),
          Entry(f"{key}.bias", "params", (*path, "bias"), "vec")]


def linear(key: str, path: tuple[str, ...], bias: bool = True) -> list:
  """A Linear layer -> Dense `kernel` (transposed) and `bias`."""
  from jtransfer.weights.torchvision_entries import Entry
  entries = [Entry(f"{key}.weight", "params", (*path, "kernel"), "dense")]
  if bias:
    entries.append(Entry(f"{key}.bias", "params", (*path, "bias"), "vec"))
  return entries


def patch_conv(key: str, bias: bool = True) -> list:
  """The patchify conv -> `patch_embed/kernel` (OIHW -> HWIO), `patch_embed/bias`."""
  from jtransfer.weights.torchvision_entries import Entry
  entries = [Entry(f"{key}.weight", "params", ("patch_embed", "kernel"), "conv")]
  if bias:
    entries.append(Entry(f"{key}.bias", "params", ("patch_embed", "bias"), "vec"))
  return entries


def vit_map(model) -> list:
  """timm ViT / DeiT / DINOv2 keys for a jtransfer `ViT` (any depth and width)."""
  from jtransfer.weights.torchvision_entries import Entry
  entries = patch_conv("patch_embed.proj", model.patch_bias)
  entries.append(Entry("cls_token", "params", ("cls_token",), "vec"))
  if model.num_registers:
    entries.append(Entry("reg_token", "params", ("reg_tokens",), "vec"))
  entries.append(Entry("pos_embed", "params", ("pos_embed",), "vec"))
  for i in range(model.depth):
    pre, block = f"blocks.{i}", f"block{i}"
    entries += ln(f"{pre}.norm1", (block, "norm1"))
    entries += linear(f"{pre}.attn.qkv", (block, "attn", "qkv"))
    entries += linear(f"{pre}.attn.proj", (block, "attn", "proj"))
    entries += ln(f"{pre}.norm2", (block, "norm2"))
    entries += linear(f"{pre}.mlp.fc1", (block, "mlp", "fc1"))
    entries += linear(f"{pre}.mlp.fc2", (block, "mlp", "fc2"))
    if model.layer_scale is not None:
      entries += [Entry(f"{pre}.ls1.gamma", "params", (block, "ls1"), "vec"),
                  Entry(f"{pre}.ls2.gamma", "params", (block, "ls2"), "vec")]
  return entries + ln("norm", ("norm",)) + linear("head", ("head",))
