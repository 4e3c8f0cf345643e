"""Visual Prompt Tuning, shallow and deep (Jia et al., ECCV 2022, arXiv 2203.12119).

Where prompts enter (as the authors' `PromptedTransformer`, github.com/KMnP/vpt,
src/models/vit_prompt/vit.py, read for this): P learned tokens are inserted into the token
sequence right after the prefix tokens (the class token, and DINOv2's registers when there are
some) and before the patch tokens, AFTER the position embedding (prompts get none) and, for
CLIP, after `ln_pre`: at the input of the first block. Shallow: those P tokens then flow
through every block like the others. Deep: before every later block i the P positions are
overwritten with that block's own prompts (the previous block's outputs at those positions are
discarded), so block i reads prompts[i]. Before the final norm the P prompt tokens are dropped:
the head reads the class token (or the mean of the patch tokens with pool='mean') exactly as
without prompts. The authors normalise every token and read x[:, 0]; a LayerNorm acts per
token, so dropping the prompts before it gives the same class token.

Choices where the paper is silent or this library differs:
  * registers: attention is permutation-equivariant once the position embedding is added, so
    the place of the prompts among the tokens does not change any output; they go after the
    registers so that the prefix stays contiguous;
  * initialisation: U(-v, v), v = sqrt(6 / (C p^2 + D)) (the authors' xavier-uniform bound with
    their 3 p^2 written for C input channels), numpy-seeded from the run's seed;
  * no prompt dropout and no prompt projection (the reference code's `PROJECT = -1`);
  * Adam at the freeze LR grid, as every parameter-efficient method here (the paper uses SGD
    with its own grid); the head trains with the prompts.

The prompts live under params['vpt']['prompts'], shape (L, P, D), L = 1 (shallow) or the
model's depth (deep); the model code is untouched: a Flax method interceptor rewrites the
input of each `block{i}` and of the final `norm` by module path (as `peft_paths`'s methods
find their modules). Trained parameters: L * P * D plus the head. Unlike the merged methods,
VPT adds inference FLOPs: every block runs on P more tokens (`extra_flops`; `peft_cost`
measures them with XLA's cost analysis).

Families: the ViT graph (`models.vit`: ViT/DeiT, DINOv2, CLIP). Not Swin: its blocks run on a
2-D map cut into windows and merged 2x2 between stages, so there is no token sequence to
prepend to; VPT's Swin variant adds prompts inside each window's attention (a different
graph, not built here), and `init_prompts` refuses it.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.methods import added_setup, transfer
from jtransfer.models import swin, vit

VPT_KEY = "vpt"
NUM_TOKENS = (1.0, 5.0, 10.0, 50.0)  # within the paper's grid {1, 5, 10, 50, 100, 200}
DEFAULT_TOKENS = 10.0
_BLOCK = re.compile(r"block(\d+)")


def _check_vit(model: nn.Module) -> None:
  """Raises InputError unless `model` is the ViT graph (a token sequence with a block loop)."""
  if isinstance(model, swin.Swin):
    raise InputError("VPT needs a token sequence and Swin runs its blocks on windows of a 2-D "
                     "map; use a ViT, DINOv2 or CLIP model")
  if not isinstance(model, vit.ViT):
    raise InputError(f"VPT works on vision transformers (vit, dinov2, clip) and "
                     f"{type(model).__name__} is not one")


def num_layers(model: nn.Module, deep: bool) -> int:
  """L: how many prompt sets the model gets (1 shallow, its depth deep)."""
  _check_vit(model)
  return int(model.depth) if deep else 1


def init_prompts(model: nn.Module, input_shape: Sequence[int], num_tokens: int, deep: bool,
                 seed: int) -> dict:
  """{'prompts': (L, P, D) float32} drawn from U(-v, v), v = sqrt(6 / (C p^2 + D)).

  Raises:
    InputError: a model that is not a ViT, or num_tokens not a whole number >= 1.
  """
  if int(num_tokens) != num_tokens or num_tokens < 1:
    raise InputError(f"VPT num_tokens must be a whole number >= 1, got {num_tokens}")
  layers = num_layers(model, deep)
  dim, patch = int(model.dim), int(model.patch_size)
  bound = np.sqrt(6.0 / (input_shape[-1] * patch * patch + dim))
  rng = np.random.default_rng(seed)
  return {"prompts": rng.uniform(-bound, bound, (layers, int(num_tokens), dim)).astype(
      np.float32)}


def _insert(model: nn.Module, prompts: jax.Array):
  """A Flax method interceptor putting the prompts into the token sequence (module docstring)."""
  prefix, count, deep = 1 + int(model.num_registers), prompts.shape[1], prompts.shape[0] > 1

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__" or len(context.module.path) != 1:
      return next_fun(*args, **kwargs)
    name, x = context.module.path[0], args[0]
    m = _BLOCK.fullmatch(name)
    if m:
      i = int(m.group(1))
      if i == 0 or deep:
        p = jnp.broadcast_to(prompts[i].astype(x.dtype), (x.shape[0], count, x.shape[-1]))
        rest = x[:, prefix:] if i == 0 else x[:, prefix + count:]
        x = jnp.concatenate([x[:, :prefix], p, rest], axis=1)
    elif name == "norm":  # drop the prompts before the final norm and the pooling
      x = jnp.concatenate([x[:, :prefix], x[:, prefix + count:]], axis=1)
    else:
      return next_fun(*args, **kwargs)
    return next_fun(x, *args[1:], **kwargs)

  return interceptor


def apply_model_vpt(model, params: Mapping[str, Any], batch_stats, x, **kwargs):
  """`models.apply_model` with params['vpt']['prompts'] inserted (plain without the key).

  Block taps (`block{i}`) then hold the P prompt tokens after the prefix; `norm`, `cls`,
  `mean` and `features` do not.

  Raises:
    InputError: a model that is not a ViT, or prompts whose layer count or width do not fit.
  """
  if VPT_KEY not in params:
    return models.apply_model(model, params, batch_stats, x, **kwargs)
  prompts = params[VPT_KEY]["prompts"]
  _check_vit(model)
  if prompts.ndim != 3 or prompts.shape[0] not in (1, model.depth) or \
      prompts.shape[2] != model.dim:
    raise InputError(f"VPT prompts of shape {tuple(prompts.shape)} fit no ViT of depth "
                     f"{model.depth} and width {model.dim}: expected (1 or {model.depth}, P, "
                     f"{model.dim})")
  rest = {k: v for k, v in params.items() if k != VPT_KEY}
  with nn.intercept_methods(_insert(model, prompts)):
    return models.apply_model(model, rest, batch_stats, x, **kwargs)


def trained_count(model: nn.Module, num_tokens: int, deep: bool) -> int:
  """The formula: L * P * D prompt entries (the head comes on top)."""
  return num_layers(model, deep) * int(num_tokens) * int(model.dim)


def extra_flops(model: nn.Module, input_shape: Sequence[int], num_tokens: int) -> int:
  """Extra multiply-add FLOPs per image (2 per MAC) of the matrix products, hand-derived.

  A block on T tokens of width D with MLP width H costs 2T(4D^2 + 2DH) in its four Dense
  layers and 4T^2 D in q k^T and attn v; shallow and deep both run every block on T + P
  tokens, so the extra is depth * (2P(4D^2 + 2DH) + 4D((T + P)^2 - T^2)), with T the prefix
  plus the patch tokens. LayerNorms, softmax and the activation add a few elementwise FLOPs
  per token on top (counted by XLA, not here: 27% more at D 32, 8.5% at D 128, falling as D
  grows); the final norm and the head see no prompt.
  """
  _check_vit(model)
  d, p = int(model.dim), int(num_tokens)
  hidden = int(round(d * model.mlp_ratio))
  patches = (input_shape[0] // model.patch_size) * (input_shape[1] // model.patch_size)
  t = 1 + int(model.num_registers) + patches
  per_block = 2 * p * (4 * d * d + 2 * d * hidden) + 4 * d * ((t + p) ** 2 - t ** 2)
  return int(model.depth) * per_block


def _builder(deep: bool):
  def build(source: transfer.Source, num_classes: int, total_steps: int,
            num_tokens: float = DEFAULT_TOKENS) -> transfer.Setup:
    model = transfer.target_model(source, num_classes)
    shape = tuple(source.input_shape)
    _check_vit(model)
    return added_setup.added_params_setup(
        source, num_classes, VPT_KEY,
        lambda params, seed: init_prompts(model, shape, num_tokens, deep, seed),
        apply_model_vpt)
  kind = "deep" if deep else "shallow"
  build.__doc__ = f"The VPT-{kind} Setup: prompts + head trained (Adam), backbone frozen."
  return build


def _strategy(deep: bool) -> transfer.Strategy:
  where = "replaced before every block" if deep else "at the first block"
  return transfer.Strategy(
      f"vpt_{'deep' if deep else 'shallow'}", transfer.FREEZE_LRS, _builder(deep),
      description=f"VPT-{'deep' if deep else 'shallow'}: P learned tokens after the class "
                  f"token {where}, dropped before the head; prompts + new head trained, "
                  "backbone frozen (LayerNorms frozen, no BN), Adam; ViT/DINOv2/CLIP only",
      knobs={"num_tokens": NUM_TOKENS}, knob_defaults={"num_tokens": DEFAULT_TOKENS},
      knob_bounds={"num_tokens": (1.0, 200.0)})


transfer.register(_strategy(False))
transfer.register(_strategy(True))
