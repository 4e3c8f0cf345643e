"""LoRA (Hu et al. 2021, arXiv 2106.09685) for Dense and conv kernels, merged after training.

Where it inserts: on every kernel selected by a path rule, W_eff = W + (alpha / r) * A @ B, with
W frozen. A Dense kernel (d_in, d_out) has A (d_in, r) and B (r, d_out). A conv kernel
(kH, kW, C_in/groups, C_out) is the matrix (kH*kW*C_in/groups, C_out) reshaped: A is
(kH*kW*C_in/groups, r), B is (r, C_out), and A @ B is reshaped back to the kernel.

Stored, trained and merged as the factor of the reshaped kernel. The two-conv form (a kxk conv
to r channels, then a 1x1 conv r -> C_out, as loralib's ConvLoRA and PEFT's Conv2d) is the same
function: a convolution is linear in its kernel, and the 1x1 conv B composed with the kxk conv A
is the kxk conv of kernel A @ B (same stride, padding, dilation). The factor form is a
reparametrisation of the params tree (as `methods/cwl.py`), one rule for Dense, conv, grouped
and depthwise kernels, with the merge exact by construction, and the train step runs the merged
kernels (`apply_model_lora`). The two-conv form is here too (`apply_model_lora_branch`: a Flax
method interceptor adds conv_B(conv_A(x)) to the output of each adapted module, found by its
kernel's path); it avoids forming the full kernel gradient, but its r-channel convolutions ran
slower on XLA:CPU: on resnet_s at batch 128 the merged-kernel step took 0.89x finetune's and
the two-conv step 1.14x, in one run (bench/PEFT.md). The tests check the two forms agree.

What trains: A, B and the new head (Adam, the freeze LR grid); the source weights and BN
affine stay frozen; BN in the mode asked for (the merged update changes the kernels, so LoRA
follows the fine-tuning rule of `jtransfer.methods.bn_rule`; running statistics without one). Initialisation as Hu et al. (and loralib): B = 0,
so the model equals the source at init; A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = rows of
A (loralib's kaiming_uniform(a=sqrt(5)) bound).

Knobs: `rank` r (grid 2, 4, 8; default 4) and `alpha` (default 4: Hu et al. set alpha to the
first r they try and do not tune it, so the scale alpha / r shrinks as r grows). Default rule:
CNNs adapt every conv kernel (`.*/conv/kernel`); transformers the attention kernels
(`.*/attn/(qkv|proj)/kernel`: Hu et al. adapt W_q and W_v; a fused qkv kernel is adapted whole).

Params layout: {'lora': {kernel_path: {'a', 'b', 'scale'}}, **target params}; 'scale' is the
scalar alpha / r, a frozen leaf so that `merge_lora(params, lora)` needs nothing else.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import added_setup, bn_rule, peft_paths, transfer

LORA_KEY = "lora"
CNN_RULES = (r".*/conv/kernel",)
TRANSFORMER_RULES = (r".*/attn/(qkv|proj)/kernel",)
RANKS = (2.0, 4.0, 8.0)
DEFAULT_RANK = 4
DEFAULT_ALPHA = 4.0


def default_rules(params: Mapping[str, Any]) -> tuple[str, ...]:
  """The default kernel rule of the model's family (transformer or CNN)."""
  return TRANSFORMER_RULES if peft_paths.is_transformer(params) else CNN_RULES


def _matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
  """(rows, columns) of a kernel seen as a matrix: all axes but the last, and the last."""
  return int(np.prod(shape[:-1])), int(shape[-1])


def init_lora(params: Mapping[str, Any], rank: int, alpha: float, seed: int,
              rules: Optional[Sequence[str]] = None) -> dict:
  """{kernel_path: {'a': uniform, 'b': zeros, 'scale': alpha / rank}} for the selected kernels.

  Args:
    params: the target params (no 'lora' entry).
    rank: r, >= 1.
    alpha: the LoRA alpha (> 0); the update is scaled by alpha / r.
    seed: seeds A.
    rules: kernel path regexes (default: `default_rules(params)`).

  Raises:
    InputError: bad rank or alpha, or rules selecting no kernel.
  """
  if int(rank) != rank or rank < 1:
    raise InputError(f"LoRA rank must be a whole number >= 1, got {rank}")
  if not alpha > 0:
    raise InputError(f"LoRA alpha must be > 0, got {alpha}")
  rank = int(rank)
  flat = surgery.flatten(params)
  kernels = peft_paths.select_kernels(params, rules or default_rules(params), "LoRA")
  rng = np.random.default_rng(seed)
  out = {}
  for path in kernels:
    rows, cols = _matrix_shape(np.shape(flat[path]))
    bound = 1.0 / np.sqrt(rows)
    out[path] = {"a": rng.uniform(-bound, bound, (rows, rank)).astype(np.float32),
                 "b": np.zeros((rank, cols), np.float32),
                 "scale": np.float32(alpha / rank)}
  return out


def lora_delta(entry: Mapping[str, Any], shape: Sequence[int]) -> jax.Array:
  """(alpha / r) * A @ B reshaped to the kernel's `shape`."""
  return (entry["scale"] * (entry["a"] @ entry["b"])).reshape(shape)


def merge_lora(params: Mapping[str, Any], lora: Mapping[str, Any]) -> dict:
  """The params with each LoRA update added to its kernel: the source's tree shape (pure,
  jit-able), so the deployed model has the source's architecture and speed.

  Raises:
    InputError: an entry names no kernel of `params` or has the wrong shapes.
  """
  flat = surgery.flatten(params)
  for path, entry in lora.items():
    if path not in flat:
      raise InputError(f"LoRA entry {path!r} names no parameter of the model")
    rows, cols = _matrix_shape(np.shape(flat[path]))
    if np.shape(entry["a"])[0] != rows or np.shape(entry["b"])[1] != cols:
      raise InputError(f"LoRA entry {path!r}: A {np.shape(entry['a'])} @ B "
                       f"{np.shape(entry['b'])} does not give a ({rows}, {cols}) kernel matrix")
  return surgery.map_with_path(
      lambda p, w: w + lora_delta(lora[p], w.shape).astype(w.dtype) if p in lora else w,
      params)


def effective_params(params: Mapping[str, Any]) -> dict:
  """`merge_lora` of a tree holding its LoRA entries under 'lora' (identity without)."""
  if LORA_KEY not in params:
    return dict(params)
  return merge_lora({k: v for k, v in params.items() if k != LORA_KEY}, params[LORA_KEY])


def apply_model_lora(model, params: Mapping[str, Any], batch_stats, x, **kwargs):
  """`models.apply_model` on the merged params: the training, evaluation and deployed forward."""
  return models.apply_model(model, effective_params(params), batch_stats, x, **kwargs)


def _branch(entry: Mapping[str, Any], module: nn.Module, x: jax.Array, kernel_shape) -> jax.Array:
  """The LoRA update's output for the op input `x`, computed without forming the kernel."""
  a, b = entry["a"].astype(x.dtype), entry["b"].astype(x.dtype)
  if len(kernel_shape) == 2:  # Dense: x A B
    return entry["scale"].astype(x.dtype) * ((x @ a) @ b)
  # The module's own geometry, in Flax's conventions (an int means the same on both axes).
  pair = lambda v: (int(v), int(v)) if isinstance(v, int) else tuple(int(u) for u in v)
  strides = pair(getattr(module, "strides", None) or 1)
  dilation = pair(getattr(module, "kernel_dilation", None) or 1)
  padding = getattr(module, "padding", "VALID")
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  elif not isinstance(padding, str):
    padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
  dn = ("NHWC", "HWIO", "NHWC")
  groups = x.shape[-1] // kernel_shape[2]
  if groups == 1:  # the kxk conv to r channels, then the 1x1 conv r -> C_out
    y = jax.lax.conv_general_dilated(x, a.reshape(*kernel_shape[:3], -1), strides, padding,
                                     rhs_dilation=dilation, dimension_numbers=dn)
    y = jax.lax.conv_general_dilated(y, b[None, None], (1, 1), "VALID", dimension_numbers=dn)
  else:  # grouped: the low-rank kernel through the same grouped conv
    y = jax.lax.conv_general_dilated(x, (a @ b).reshape(kernel_shape), strides, padding,
                                     rhs_dilation=dilation, feature_group_count=groups,
                                     dimension_numbers=dn)
  return entry["scale"].astype(x.dtype) * y


def _add_branches(lora: Mapping[str, Any], shapes: Mapping[str, tuple]):
  """A Flax method interceptor adding `_branch` to the output of each adapted kernel's module."""
  by_module = {k[:-len("/kernel")]: (entry, shapes[k]) for k, entry in lora.items()
               if k.endswith("/kernel") and k in shapes}
  return peft_paths.on_module_outputs(
      by_module, lambda entry, module, x, out: out + _branch(entry[0], module, x,
                                                             entry[1]).astype(out.dtype))


def apply_model_lora_branch(model, params: Mapping[str, Any], batch_stats, x, **kwargs):
  """`models.apply_model` with each LoRA update as a parallel branch: x A B for a Dense kernel,
  a kxk conv to r channels then a 1x1 conv for a conv kernel (the module's own stride and
  padding; a grouped conv runs the low-rank kernel through the same grouped conv). Equal to
  `apply_model_lora` up to float rounding; its gradient forms no full kernel gradient, which
  did not make it faster on XLA:CPU (see the module docstring)."""
  if LORA_KEY not in params:
    return models.apply_model(model, params, batch_stats, x, **kwargs)
  lora, rest = params[LORA_KEY], {k: v for k, v in params.items() if k != LORA_KEY}
  flat = surgery.flatten(rest)
  missing = [p for p in lora if p not in flat]
  if missing:
    raise InputError(f"LoRA entries {missing} name no parameter of the model")
  shapes = {p: tuple(np.shape(flat[p])) for p in lora}
  with nn.intercept_methods(_add_branches(lora, shapes)):
    return models.apply_model(model, rest, batch_stats, x, **kwargs)


def trained_count(params: Mapping[str, Any], rank: int,
                  rules: Optional[Sequence[str]] = None) -> int:
  """The formula: sum over adapted kernels of r * (rows + columns) of its matrix view."""
  flat = surgery.flatten(params)
  kernels = peft_paths.select_kernels(params, rules or default_rules(params), "LoRA")
  return int(sum(rank * sum(_matrix_shape(np.shape(flat[p]))) for p in kernels))


def build_lora(source: transfer.Source, num_classes: int, total_steps: int,
               rank: float = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
               rules: Optional[Sequence[str]] = None, bn_train: bool = False) -> transfer.Setup:
  """The LoRA Setup: A, B and the head trained (Adam), everything else frozen; BN in train
  mode with `bn_train` (LoRA changes the kernels, so it follows the fine-tuning rule)."""
  return added_setup.added_params_setup(
      source, num_classes, LORA_KEY,
      lambda params, seed: init_lora(params, rank, alpha, seed, rules), apply_model_lora,
      trained=f"{LORA_KEY}/.*/(a|b)", bn_train=bn_train)


transfer.register(transfer.Strategy(
    "lora", transfer.FREEZE_LRS, build_lora,
    description="LoRA (rank r, scale alpha/r, B=0) on every conv kernel (attention kernels on "
                "transformers) + new head trained, merged after training, Adam",
    knobs={"rank": RANKS}, knob_defaults={"rank": float(DEFAULT_RANK)},
    knob_bounds={"rank": (1.0, 64.0)}, bn_modes=bn_rule.BOTH))
