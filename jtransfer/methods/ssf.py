"""SSF, Scaling and Shifting your Features (Lian et al., NeurIPS 2022, arXiv 2210.08823).

Where it inserts: after each selected conv / Dense op, y -> gamma * y + beta per output channel;
where the op is a conv unit with a normalisation after its conv (`<unit>/bn` or `<unit>/norm`),
after that normalisation (as `methods/cwl.py` places its scales). Lian et al. insert SSF after
every operation of a ViT (linear layers, attention, norms); on these CNNs the ops are the conv
units, and on a transformer every Dense kernel: the ops are chosen by a path rule (default
every rank-2 or rank-4 kernel but the head's), never by module class.

What trains: gamma (init 1), beta (init 0) and the new head (Adam, the freeze LR grid); the
backbone is frozen, BN in eval mode with running statistics. No knobs.

Folding (re-parameterisation, the paper's sec. 3.3): gamma * (norm(x)) + beta is the norm with
scale * gamma and bias * gamma + beta; gamma * (x W + b) + beta is the op with W * gamma (last
axis) and b * gamma + beta. Exact for any input, so `fold_ssf` gives a model of the source's
tree shape and speed. Training runs the unfolded form (`apply_model_ssf`: a Flax method
interceptor scaling and shifting the output of the module at each target path), which spares the
kernel's weight gradient when the kernels are frozen (as `cwl.apply_model_cwl`).

Params layout: {'ssf': {op_path: {'scale': (C,), 'shift': (C,)}}, **target params}, op_path being
the kernel's module (`stage1/block0/conv1/conv`, `block3/mlp/fc1`).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import added_setup, peft_paths, transfer

SSF_KEY = "ssf"
DEFAULT_RULES = (r".*/kernel",)
_NORMS = ("bn", "norm")


def _norm_of(flat: Mapping[str, Any], op: str) -> Optional[str]:
  """The module path of the normalisation right after conv op `<unit>/conv`, if any."""
  if not op.endswith("/conv"):
    return None
  unit = op[:-len("/conv")]
  for norm in _NORMS:
    if f"{unit}/{norm}/scale" in flat:
      return f"{unit}/{norm}"
  return None


def targets(params: Mapping[str, Any], ssf: Mapping[str, Any]) -> dict[str, str]:
  """{op_path: module path whose output SSF transforms} (the norm after a conv, else the op).

  Raises:
    InputError: an op names no kernel, or an op without a norm after it has no bias to fold
      the shift into.
  """
  flat = surgery.flatten(params)
  out = {}
  for op in ssf:
    if f"{op}/kernel" not in flat:
      raise InputError(f"SSF entry {op!r} names no kernel of the model")
    norm = _norm_of(flat, op)
    if norm is None and f"{op}/bias" not in flat:
      raise InputError(f"SSF: op {op!r} has neither a norm after it nor a bias to fold the "
                       "shift into; exclude it with the SSF rules")
    out[op] = norm or op
  return out


def init_ssf(params: Mapping[str, Any], rules: Sequence[str] = DEFAULT_RULES) -> dict:
  """{op: {'scale': ones(C), 'shift': zeros(C)}} for every kernel the rules select."""
  flat = surgery.flatten(params)
  ops = [k[:-len("/kernel")] for k in peft_paths.select_kernels(params, rules, "SSF")]
  ssf = {op: {"scale": np.ones(np.shape(flat[f"{op}/kernel"])[-1], np.float32),
              "shift": np.zeros(np.shape(flat[f"{op}/kernel"])[-1], np.float32)} for op in ops}
  targets(params, ssf)
  return ssf


def fold_ssf(params: Mapping[str, Any], ssf: Mapping[str, Any]) -> dict:
  """The params with SSF folded in: the source's tree shape (pure, jit-able)."""
  where = targets(params, ssf)
  by_module = {m: ssf[op] for op, m in where.items()}

  def fold(path: str, leaf):
    module, _, name = path.rpartition("/")
    if module not in by_module:
      return leaf
    entry = by_module[module]
    g = jnp.asarray(entry["scale"], leaf.dtype)
    if name in ("kernel", "scale"):
      return leaf * g  # broadcasts over the last (output channel) axis
    if name == "bias":
      return leaf * g + jnp.asarray(entry["shift"], leaf.dtype)
    return leaf

  return surgery.map_with_path(fold, params)


def effective_params(params: Mapping[str, Any]) -> dict:
  """`fold_ssf` of a tree holding its SSF params under 'ssf' (identity without)."""
  if SSF_KEY not in params:
    return dict(params)
  return fold_ssf({k: v for k, v in params.items() if k != SSF_KEY}, params[SSF_KEY])


def _ssf_outputs(by_module: Mapping[str, Any]):
  """A Flax method interceptor: gamma * out + beta on the output of each target module path."""
  return peft_paths.on_module_outputs(
      by_module, lambda entry, module, x, out: (out * jnp.asarray(entry["scale"], out.dtype)
                                                + jnp.asarray(entry["shift"], out.dtype)))


def apply_model_ssf(model, params: Mapping[str, Any], batch_stats, x, **kwargs):
  """`models.apply_model` with SSF as explicit layers (the unfolded form); equal to
  `apply_model(model, effective_params(params), ...)` up to float rounding."""
  if SSF_KEY not in params:
    return models.apply_model(model, params, batch_stats, x, **kwargs)
  ssf, rest = params[SSF_KEY], {k: v for k, v in params.items() if k != SSF_KEY}
  by_module = {m: ssf[op] for op, m in targets(rest, ssf).items()}
  with nn.intercept_methods(_ssf_outputs(by_module)):
    return models.apply_model(model, rest, batch_stats, x, **kwargs)


def trained_count(params: Mapping[str, Any], rules: Sequence[str] = DEFAULT_RULES) -> int:
  """The formula: 2 x the output channels of every selected op (head excluded)."""
  flat = surgery.flatten(params)
  return int(sum(2 * np.shape(flat[k])[-1]
                 for k in peft_paths.select_kernels(params, rules, "SSF")))


def build_ssf(source: transfer.Source, num_classes: int, total_steps: int,
              rules: Sequence[str] = DEFAULT_RULES) -> transfer.Setup:
  """The SSF Setup: per-channel scale and shift of every op + the head trained (Adam)."""
  return added_setup.added_params_setup(source, num_classes, SSF_KEY,
                                        lambda params, seed: init_ssf(params, rules),
                                        apply_model_ssf)


transfer.register(transfer.Strategy(
    "ssf", transfer.FREEZE_LRS, build_ssf,
    description="SSF: per-channel scale and shift after every conv/linear op (after its BN) + "
                "new head trained, folded after training, BN running stats, Adam"))
