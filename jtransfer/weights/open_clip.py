"""open_clip key map of the CLIP image tower (open_clip.transformer.VisionTransformer) for a
jtransfer `ViT` built by `clip_vit_b16`.

Keys: `conv1` (no bias), `class_embedding` (dim,), `positional_embedding` (tokens, dim),
`ln_pre`, `transformer.resblocks.{i}.{ln_1, attn.in_proj_weight / in_proj_bias, attn.out_proj,
ls_1.gamma, ln_2, mlp.c_fc, mlp.c_proj, ls_2.gamma}`, `ln_post`, `proj` (dim, out_dim), used
as `pooled @ proj`, so it is already the Dense kernel's (in, out) layout. A whole CLIP
checkpoint holds these under `visual.` (see `PREFIX`): the text tower is then left out.
"""
from __future__ import annotations

from jtransfer.weights.timm_vit import linear, ln, patch_conv

PREFIX = "visual."


def clip_map(model) -> list:
  """open_clip image-tower keys (no classification head: import with keep_head=False)."""
  from jtransfer.weights.torchvision_entries import Entry
  entries = patch_conv("conv1", model.patch_bias) + [
      Entry("class_embedding", "params", ("cls_token",), "lead2"),
      Entry("positional_embedding", "params", ("pos_embed",), "lead1")]
  if model.pre_norm:
    entries += ln("ln_pre", ("ln_pre",))
  for i in range(model.depth):
    pre, block = f"transformer.resblocks.{i}", f"block{i}"
    entries += ln(f"{pre}.ln_1", (block, "norm1"))
    entries += [Entry(f"{pre}.attn.in_proj_weight", "params", (block, "attn", "qkv", "kernel"),
                      "dense"),
                Entry(f"{pre}.attn.in_proj_bias", "params", (block, "attn", "qkv", "bias"),
                      "vec")]
    entries += linear(f"{pre}.attn.out_proj", (block, "attn", "proj"))
    entries += ln(f"{pre}.ln_2", (block, "norm2"))
    entries += linear(f"{pre}.mlp.c_fc", (block, "mlp", "fc1"))
    entries += linear(f"{pre}.mlp.c_proj", (block, "mlp", "fc2"))
    if model.layer_scale is not None:
      entries += [Entry(f"{pre}.ls_1.gamma", "params", (block, "ls1"), "vec"),
                  Entry(f"{pre}.ls_2.gamma", "params", (block, "ls2"), "vec")]
  entries += ln("ln_post", ("norm",))
  if model.proj_dim is not None:
    entries.append(Entry("proj", "params", ("proj", "kernel"), "vec"))
  # the image tower has no classifier: the head entry lets keep_head=False name what it drops
  return entries + linear("head", ("head",))
