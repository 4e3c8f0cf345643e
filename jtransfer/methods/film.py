"""FiLM-style per-channel scale and shift after every conv unit, as in FiT (Shysheya et al.,
ICLR 2023): the backbone frozen, gamma (init 1) and beta (init 0) per output channel of every
conv unit trained with the new head.

Like CWL (`methods/cwl.py`, which is FiLM without the shift) the layer is a reparametrisation
folded into the unit's own params, exact for any input: after BN, gamma * BN(x) + beta is BN
with scale * gamma and bias * gamma + beta; without BN, gamma * (conv(x) + b) + beta is the conv
with kernel * gamma and bias b * gamma + beta. The FiLM params live under the top-level key
'film' ({'film': {'scale': {unit: gamma}, 'shift': {unit: beta}}, ...}), so the generic train
step and the optimizer rules handle them like any other leaf.

On a transformer (ViT, DeiT, DINOv2, CLIP, Swin) the units are the Dense layers CWL scales
there (`methods/cwl_linear.py`: every block's attn/qkv, attn/proj, mlp/fc1, mlp/fc2): gamma and
beta per output channel k, y_k = gamma_k (x W + b)_k + beta_k, which is the layer with
kernel[:, k] * gamma_k and bias b_k * gamma_k + beta_k, so it folds exactly as on the convs and
the model code is untouched. The patch conv, the head and CLIP's bias-free `proj` get none
(as CWL). Placing it on the linear maps rather than on the LayerNorms' affine is a choice: it
makes FiLM and CWL on a transformer differ by the shift alone, as they do on the convs.
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import added_setup, cwl, cwl_linear, transfer

FILM_KEY = "film"


def init_film(params: Mapping[str, Any]) -> dict:
  """{'scale': ones, 'shift': zeros} per unit, sized by its output channels: per conv unit,
  or, for a transformer's params (they hold attn/mlp Dense layers), per linear map of every
  block (`cwl_linear.linear_units`)."""
  rest = {k: v for k, v in params.items() if k != FILM_KEY}
  scales = (cwl_linear.init_scales(rest) if cwl_linear.linear_units(rest)
            else cwl.init_scales(rest))
  return {"scale": scales, "shift": {u: jnp.zeros_like(s) for u, s in scales.items()}}


def _linear(flat: Mapping[str, Any], units) -> set:
  """The units of `units` that are Dense layers (a rank-2 `<unit>/kernel`), not conv units."""
  return {u for u in units if f"{u}/kernel" in flat and len(jnp.shape(flat[f"{u}/kernel"])) == 2}


def _apply_linear(params: Mapping[str, Any], scale: Mapping[str, Any],
                  shift: Mapping[str, Any]) -> dict:
  """Dense layers: kernel[:, k] * gamma_k, bias b_k * gamma_k + beta_k (exact)."""
  scaled = cwl_linear.apply_scales(params, scale)
  flat = surgery.flatten(scaled)
  for unit in shift:
    if f"{unit}/bias" not in flat:
      raise InputError(f"FiLM: Dense layer {unit!r} has no bias to carry the shift")
  return surgery.map_with_path(
      lambda path, v: v + jnp.asarray(shift[path[:-len("/bias")]], v.dtype)
      if path.endswith("/bias") and path[:-len("/bias")] in shift else v, scaled)


def apply_film(params: Mapping[str, Any], film: Mapping[str, Any]) -> dict:
  """Effective params with FiLM folded in (pure, jit-able).

  Raises:
    InputError: a unit without BN has no conv bias (a Dense layer no bias) to carry the shift.
  """
  linear = _linear(surgery.flatten(params), film["scale"])
  if linear:
    pick = lambda part, keep: {u: v for u, v in film[part].items() if (u in linear) == keep}
    params = _apply_linear(params, pick("scale", True), pick("shift", True))
    film = {"scale": pick("scale", False), "shift": pick("shift", False)}
    if not film["scale"]:
      return params
  scaled = cwl.apply_cwl(params, film["scale"])
  flat = surgery.flatten(scaled)
  targets = {}
  for unit in film["shift"]:
    for tail in ("bn/bias", "conv/bias"):
      if f"{unit}/{tail}" in flat:
        targets[f"{unit}/{tail}"] = unit
        break
    else:
      raise InputError(f"FiLM: conv unit {unit!r} has neither a BN nor a conv bias to shift")
  return surgery.map_with_path(
      lambda path, v: v + jnp.asarray(film["shift"][targets[path]], v.dtype)
      if path in targets else v, scaled)


def effective_params(params: Mapping[str, Any]) -> dict:
  """`apply_film` of a tree holding its FiLM params under 'film' (identity without)."""
  if FILM_KEY not in params:
    return dict(params)
  return apply_film({k: v for k, v in params.items() if k != FILM_KEY}, params[FILM_KEY])


def _film_conv_outputs(film: Mapping[str, Any]):
  """A Flax method interceptor: gamma * out + beta on the output of `<unit>/conv`."""
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    unit = "/".join(module.path[:-1])
    if context.method_name != "__call__" or not isinstance(module, nn.Conv) or \
        module.path[-1] != "conv" or unit not in film["scale"]:
      return out
    return out * jnp.asarray(film["scale"][unit], out.dtype) + jnp.asarray(
        film["shift"][unit], out.dtype)
  return interceptor


def apply_model_film(model, params: Mapping[str, Any], batch_stats, x, **kwargs):
  """`models.apply_model` with the FiLM of params['film'] applied, equal to
  `apply_model(model, effective_params(params), ...)`: BN units fold it into their affine;
  units without BN scale and shift the conv output as a layer, which spares the conv's weight
  gradient when the kernels are frozen (as `cwl.apply_model_cwl`); a transformer's Dense
  layers fold it into kernel and bias (as `cwl_linear.apply_fn`)."""
  if FILM_KEY not in params:
    return models.apply_model(model, params, batch_stats, x, **kwargs)
  film, rest = params[FILM_KEY], {k: v for k, v in params.items() if k != FILM_KEY}
  flat = surgery.flatten(rest)
  bn = {u for u in film["scale"] if f"{u}/bn/scale" in flat} | _linear(flat, film["scale"])
  pick = lambda units: {part: {u: v for u, v in film[part].items() if u in units}
                        for part in ("scale", "shift")}
  folded = apply_film(rest, pick(bn))
  with nn.intercept_methods(_film_conv_outputs(pick(set(film["scale"]) - bn))):
    return models.apply_model(model, folded, batch_stats, x, **kwargs)


def build_freeze_film(source: transfer.Source, num_classes: int,
                      total_steps: int) -> transfer.Setup:
  """freeze_film's Setup: FiLM (per conv unit, or per linear map of a transformer's blocks)
  and the new head trained with Adam, the rest frozen."""
  return added_setup.added_params_setup(source, num_classes, FILM_KEY,
                                        lambda params, seed: init_film(params),
                                        apply_model_film)


transfer.register(transfer.Strategy(
    "freeze_film", transfer.FREEZE_LRS, build_freeze_film,
    description="conv/BN frozen (running stats), per-channel scale and shift after every conv "
                "unit (a transformer: every qkv/proj/fc1/fc2) + new head trained (FiLM, as "
                "FiT), Adam"))
