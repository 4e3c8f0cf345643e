"""Convolution Weighting Layers (CWL) as a reparametrisation of the model's own params.

Paper (cwl-weighting-convolution, sec. IV, eq. 6): after each convolution (after its batch
norm when there is one) a CWL multiplies feature map k by a learned sigma_k, initialised at 1.
Here the layer is not a module: `apply_cwl(params, scales)` returns the effective params

  * unit without BN (VGG): conv kernel[..., k] and bias[k] times sigma_k, so the unit's
    pre-activation is sigma_k * (conv(x)_k + b_k), eq. 6 exactly;
  * unit with BN (ResNet): BN scale[k] and bias[k] times sigma_k, so the BN output is
    sigma_k * BN(conv(x))_k in both train and eval mode (the layer sits after BN);
  * unit with a LayerNorm `norm` after its conv (ConvNeXt): likewise its scale and bias.

Both are exact for any input, so the model code is untouched and the same model runs with or
without CWL. The scales live in the params tree under the top-level key 'cwl', one vector per
conv unit path ({'cwl': {'stage1/block0/conv1': sigma, ...}, 'stem': ..., 'head': ...}), so the
generic train step, the optimizer rules ('cwl/.*') and the few-shot grid handle them like any
other params.

Strategies registered here (Algorithm 1 of the paper; Adam; BN as the base 'freeze' /
'finetune' strategies: freeze_cwl keeps the running statistics, finetune_cwl and
finetune_lowconv run the mode asked for, `jtransfer.methods.bn_rule`):
  * freeze_cwl: conv/BN params frozen, scales and the new head trained (freeze LR grid);
  * finetune_cwl: every param trained, scales included (finetune LR grid);
  * finetune_lowconv: Algorithm 1 step 1 as the text words it: conv/BN params train at
    `LOWCONV_LR_MULT` x the run's lr instead of being frozen; scales and head at the lr
    (freeze LR grid, since the head and scales drive it as in freeze_cwl).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import bn_rule, cwl_linear, transfer
from jtransfer.models import attention
from jtransfer.train import optim

CWL_KEY = "cwl"
LOWCONV_LR_MULT = 0.1  # Algorithm 1 step 1: "decreasing the learning rate for convolution layers"
_TARGETS = ("conv/kernel", "conv/bias", "bn/scale", "bn/bias", "norm/scale", "norm/bias")
_NORMS = ("bn/", "norm/")  # a unit's own normalisation after its conv: the CWL folds into it


def init_scales(params: Mapping[str, Any]) -> dict[str, jax.Array]:
  """One vector of ones per conv unit (`surgery.conv_units`), sized by its output channels.

  Args:
    params: a model's 'params' tree (arrays or `jax.ShapeDtypeStruct`s); a 'cwl' entry, if
      present, is ignored.

  Returns:
    {unit_path: ones(C, float32)}.

  Raises:
    InputError: if the tree has no conv unit.
  """
  params = {k: v for k, v in params.items() if k != CWL_KEY}
  flat = surgery.flatten(params)
  units = surgery.conv_units(params)
  if not units:
    raise InputError("init_scales: params hold no conv unit (no '<unit>/conv/kernel' of rank 4)")
  return {u: jnp.ones((flat[f"{u}/conv/kernel"].shape[-1],), jnp.float32) for u in units}


def _split_target(path: str) -> tuple[str, str]:
  """('<unit>', 'conv/kernel') for a CWL-affected leaf path, else ('', '')."""
  for tail in _TARGETS:
    if path.endswith("/" + tail):
      return path[:-len(tail) - 1], tail
  return "", ""


def check_scales(params: Mapping[str, Any], scales: Mapping[str, Any]) -> None:
  """Raises InputError unless every scale names a conv unit and has its channel count."""
  params = {k: v for k, v in params.items() if k != CWL_KEY}
  flat = surgery.flatten(params)
  units = set(surgery.conv_units(params))
  for unit, sigma in scales.items():
    if unit not in units:
      raise InputError(f"CWL scale {unit!r} names no conv unit of the model; units: "
                       f"{', '.join(sorted(units))}")
    want = flat[f"{unit}/conv/kernel"].shape[-1]
    if tuple(np.shape(sigma)) != (want,):
      raise InputError(f"CWL scale {unit!r} has shape {tuple(np.shape(sigma))}; the unit has "
                       f"{want} output channels")


def apply_cwl(params: Mapping[str, Any], scales: Mapping[str, Any]) -> dict:
  """Effective params with the per-channel scales folded in (pure, jit-able).

  Args:
    params: the model's 'params' tree (without the 'cwl' key).
    scales: {unit_path: sigma (C,)}; units missing from it are left as they are.

  Returns:
    A params tree of the same structure: for a unit with BN its bn scale and bias are
    multiplied by sigma, otherwise its conv kernel (last axis) and bias.

  Raises:
    InputError: a scale names no conv unit or has the wrong length (checked at trace time).
  """
  check_scales(params, scales)
  flat = surgery.flatten(params)
  has_bn = {u: _has_norm(flat, u) for u in scales}

  def fold(path: str, leaf):
    unit, tail = _split_target(path)
    if unit not in scales:
      return leaf
    # BN units: scale the BN affine (the CWL sits after BN); others: the conv kernel and bias.
    if has_bn[unit] == tail.startswith(_NORMS):
      return leaf * jnp.asarray(scales[unit], leaf.dtype)  # broadcasts over the last axis
    return leaf

  return surgery.map_with_path(fold, params)


def _has_norm(flat: Mapping[str, Any], unit: str) -> bool:
  return f"{unit}/bn/scale" in flat or f"{unit}/norm/scale" in flat


def split_cwl(params: Mapping[str, Any]) -> tuple[dict, dict]:
  """(scales, model params) from a tree holding the scales under 'cwl'."""
  if CWL_KEY not in params:
    raise InputError(f"params have no {CWL_KEY!r} entry; build them with with_scales()")
  return dict(params[CWL_KEY]), {k: v for k, v in params.items() if k != CWL_KEY}


def effective_params(params: Mapping[str, Any]) -> dict:
  """`apply_cwl` of a tree holding its scales under 'cwl' (identity if there is none); a
  transformer's scales (on its Dense layers, `cwl_linear`) fold by `cwl_linear.apply_scales`."""
  if CWL_KEY not in params:
    return dict(params)
  scales, rest = split_cwl(params)
  linear = set(cwl_linear.linear_units(rest))
  if scales and set(scales) <= linear:
    return cwl_linear.apply_scales(rest, scales)
  return apply_cwl(rest, scales)


def with_scales(params: Mapping[str, Any], scales: Mapping[str, Any] | None = None) -> dict:
  """{'cwl': scales (default: ones), **params}."""
  if CWL_KEY in params:
    raise InputError(f"params already hold a {CWL_KEY!r} entry")
  scales = init_scales(params) if scales is None else dict(scales)
  check_scales(params, scales)
  return {CWL_KEY: scales, **params}


def _scale_conv_outputs(scales: Mapping[str, Any]):
  """A Flax method interceptor multiplying the output of `<unit>/conv` by scales[unit]."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, nn.Conv):
      return out
    unit = "/".join(module.path[:-1])
    if module.path[-1] != "conv" or unit not in scales:
      return out
    return out * jnp.asarray(scales[unit], out.dtype)
  return interceptor


def apply_model_cwl(model, params: Mapping[str, Any], batch_stats, x: jax.Array, **kwargs):
  """`models.apply_model` with the CWL scales of params['cwl'] applied as layers.

  Same outputs as `apply_model(model, effective_params(params), ...)` (float rounding
  aside), but cheaper to differentiate when the conv kernels are frozen: for a unit without
  BN, scaling the kernel makes d/dsigma go through the conv's weight gradient (a second
  backward convolution per layer), while scaling the conv output, as eq. 6 writes the
  layer, needs only sum_{n,h,w}(y * dy). BN units fold sigma into the BN affine (a per-
  channel product either way). The raw-conv tap `<unit>` sees the scaled output, as with
  `effective_params`.

  Args:
    model: a Flax module from `jtransfer.models`.
    params: a params tree holding its scales under 'cwl' (identity if there is none).
    batch_stats: the 'batch_stats' tree (or None).
    x: normalised inputs (N, H, W, C).
    **kwargs: train, taps, rng, as `apply_model`.

  Returns:
    (logits, new_batch_stats, taps), as `apply_model`.
  """
  if CWL_KEY not in params:
    return models.apply_model(model, params, batch_stats, x, **kwargs)
  scales, rest = split_cwl(params)
  check_scales(rest, scales)
  flat = surgery.flatten(rest)
  bn_units = {u: s for u, s in scales.items() if _has_norm(flat, u)}
  conv_units = {u: s for u, s in scales.items() if u not in bn_units}
  folded = apply_cwl(rest, bn_units)
  with nn.intercept_methods(_scale_conv_outputs(conv_units)):
    return models.apply_model(model, folded, batch_stats, x, **kwargs)


# ----------------------------------------------------------------------------- strategies
def cwl_loss_fn(model, mean, std, bn_train: bool = False) -> Callable:
  """CE loss_fn reading scales from params['cwl'] (BN in eval mode unless `bn_train`)."""
  return transfer.ce_loss_fn(model, mean, std, apply=apply_model_cwl, bn_train=bn_train)


def cwl_forward(model, mean, std) -> Callable:
  """Jitted eval forward (uint8 images -> logits) reading scales from params['cwl']."""
  return transfer.eval_forward(model, mean, std, apply=apply_model_cwl)


def cwl_setup(source: transfer.Source, num_classes: int, mode: str,
              lr_mult: float = LOWCONV_LR_MULT, bn_train: bool = False) -> transfer.Setup:
  """A Setup for a CWL strategy.

  Args:
    source: the pretrained source.
    num_classes: target classes (new head).
    mode: 'freeze' (conv/BN frozen), 'finetune' (all trained) or 'lowconv' (conv/BN at
      `lr_mult` x lr).
    lr_mult: the conv/BN learning-rate multiplier of 'lowconv'.
    bn_train: BN in train mode ('finetune', 'lowconv'; `jtransfer.methods.bn_rule`).

  Returns:
    The Setup; its params are {'cwl': ones per conv unit, **target params}; for a transformer
    ones per output channel of its qkv / proj / fc1 / fc2 Dense layers (`cwl_linear`).
  """
  model = transfer.target_model(source, num_classes)
  linear = attention.is_config(source.config)

  def init(seed, images=None, labels=None):
    params, stats = transfer.init_target(source, model, seed)
    if linear:
      return {CWL_KEY: cwl_linear.init_scales(params), **params}, stats
    return with_scales(params), stats

  params, _ = init(0)
  if mode == "freeze":
    rules = [(f"{CWL_KEY}/.*", "train"), ("head/.*", "train"), (".*", optim.FROZEN)]
    groups = {"train": optim.adam(1.0)}
  elif mode == "finetune":
    rules, groups = [(".*", "train")], {"train": optim.adam(1.0)}
  elif mode == "lowconv":
    if not lr_mult > 0:
      raise InputError(f"lowconv lr_mult must be > 0, got {lr_mult}")
    rules = [(f"{CWL_KEY}/.*", "train"), ("head/.*", "train"), (".*", "backbone")]
    groups = {"train": optim.adam(1.0), "backbone": optim.adam(1.0, lr_mult=lr_mult)}
  else:
    raise InputError(f"CWL mode {mode!r}: expected 'freeze', 'finetune' or 'lowconv'")
  optimizer = optim.make_optimizer(params, rules, groups, injected_lr=True)
  if linear:
    apply = cwl_linear.apply_fn(CWL_KEY)
    return transfer.Setup(model, init, optimizer,
                          transfer.ce_loss_fn(model, source.mean, source.std, apply=apply,
                                              bn_train=bn_train),
                          transfer.eval_forward(model, source.mean, source.std, apply=apply))
  return transfer.Setup(model, init, optimizer,
                        cwl_loss_fn(model, source.mean, source.std, bn_train),
                        cwl_forward(model, source.mean, source.std))


transfer.register(transfer.Strategy(
    "freeze_cwl", transfer.FREEZE_LRS, lambda s, k, n: cwl_setup(s, k, "freeze"),
    description="conv/BN frozen (running stats), CWL scales + new head trained, Adam"))
transfer.register(transfer.Strategy(
    "finetune_cwl", transfer.FINETUNE_LRS,
    lambda s, k, n, bn_train=False: cwl_setup(s, k, "finetune", bn_train=bn_train),
    description="all layers + CWL scales trained, new head, Adam", bn_modes=bn_rule.BOTH))
transfer.register(transfer.Strategy(
    "finetune_lowconv", transfer.FREEZE_LRS,
    lambda s, k, n, bn_train=False: cwl_setup(s, k, "lowconv", bn_train=bn_train),
    description=f"Algorithm 1: CWL scales + head at lr, conv/BN at {LOWCONV_LR_MULT} x lr, Adam",
    bn_modes=bn_rule.BOTH))
