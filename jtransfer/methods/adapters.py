"""Bottleneck adapters for transformers, written against module paths: Houlsby (sequential) and
AdaptFormer (parallel), on each block's MLP.

Where they insert (the module at every path matching `MLP_RULE`, a block's `blockN/mlp`, whose
Dense kernels read `blockN/mlp/fc1/kernel`; found through a Flax method interceptor, never by
class):
  * houlsby (Houlsby et al. 2019, arXiv 1902.00751): sequential, after the MLP sub-layer and
    before its residual sum: mlp(x) -> y + up(gelu(down(y))), y = mlp(x). Houlsby et al. also
    put one after the attention sub-layer; this one-per-block form is Pfeiffer et al.'s
    (arXiv 2005.00247) placement, which they found as good at half the parameters.
  * adaptformer (Chen et al. 2022, arXiv 2205.13535): parallel to the MLP on its input:
    mlp(x) + s * up(relu(down(x))), s = `ADAPTFORMER_SCALE` (0.1, their setting).
down: D -> D / reduction (+ bias), up: D / reduction -> D (+ bias), up and its bias zero so the
model equals the source at init. What trains: the adapters and the new head (Adam, the freeze
LR grid); the backbone is frozen, norms in eval mode. Knob `reduction` (grid 4, 8, 16; default
8). Not mergeable (nonlinear): `peft_cost` measures their inference FLOPs.

Both need a transformer whose blocks hold an `mlp` module acting on (..., D) tokens; on a CNN
`init_adapters` raises InputError (use `conv_adapter` there).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.methods import added_setup, peft_paths, transfer

ADAPTER_KEY = "tadapter"
MLP_RULE = r"(.*/)?block\d+/mlp"
ADAPTFORMER_SCALE = 0.1
REDUCTIONS = (4.0, 8.0, 16.0)
DEFAULT_REDUCTION = 8.0
KINDS = ("houlsby", "adaptformer")


def init_adapters(model: nn.Module, input_shape: Sequence[int], reduction: float, seed: int,
                  rule: str = MLP_RULE) -> dict:
  """{mlp path: {'down', 'down_bias', 'up' (zeros), 'up_bias' (zeros)}}.

  Raises:
    InputError: reduction < 1, no module matches, or one whose input and output widths differ.
  """
  if not reduction >= 1:
    raise InputError(f"adapter reduction must be >= 1, got {reduction}")
  rng = np.random.default_rng(seed)
  out = {}
  for path, (shape_in, shape_out) in peft_paths.module_io_shapes(
      model, input_shape, rule, "adapters").items():
    d = shape_in[-1]
    if shape_out[-1] != d:
      raise InputError(f"adapters: module {path!r} maps width {d} to {shape_out[-1]}; a "
                       "transformer MLP keeps its width")
    h = max(1, int(d // reduction))
    out[path] = {"down": (rng.normal(size=(d, h)) / np.sqrt(d)).astype(np.float32),
                 "down_bias": np.zeros(h, np.float32), "up": np.zeros((h, d), np.float32),
                 "up_bias": np.zeros(d, np.float32)}
  return out


def _bottleneck(entry: Mapping[str, Any], x: jax.Array, act) -> jax.Array:
  dt = x.dtype
  y = act(x @ entry["down"].astype(dt) + entry["down_bias"].astype(dt))
  return y @ entry["up"].astype(dt) + entry["up_bias"].astype(dt)


def _insert(adapters: Mapping[str, Any], kind: str):
  """A Flax method interceptor applying the adapters of `kind` around their modules."""
  def transform(entry, module, x, out):
    if kind == "houlsby":
      return out + _bottleneck(entry, out, lambda v: nn.gelu(v, approximate=False))
    return out + ADAPTFORMER_SCALE * _bottleneck(entry, x, nn.relu)
  return peft_paths.on_module_outputs(adapters, transform)


def apply_model_adapters(model, params: Mapping[str, Any], batch_stats, x, *, kind: str,
                         **kwargs):
  """`models.apply_model` with the adapters of params['tadapter'] inserted as `kind`."""
  if kind not in KINDS:
    raise InputError(f"adapter kind {kind!r}: expected one of {', '.join(KINDS)}")
  if ADAPTER_KEY not in params:
    return models.apply_model(model, params, batch_stats, x, **kwargs)
  rest = {k: v for k, v in params.items() if k != ADAPTER_KEY}
  with nn.intercept_methods(_insert(params[ADAPTER_KEY], kind)):
    return models.apply_model(model, rest, batch_stats, x, **kwargs)


def trained_count(model: nn.Module, input_shape: Sequence[int], reduction: float,
                  rule: str = MLP_RULE) -> int:
  """The formula: per adapted MLP 2 * D * h + h + D, h = D // reduction."""
  total = 0
  for shape_in, _ in peft_paths.module_io_shapes(model, input_shape, rule, "adapters").values():
    d = shape_in[-1]
    h = max(1, int(d // reduction))
    total += 2 * d * h + h + d
  return total


def _builder(kind: str):
  def build(source: transfer.Source, num_classes: int, total_steps: int,
            reduction: float = DEFAULT_REDUCTION, rule: str = MLP_RULE) -> transfer.Setup:
    model = transfer.target_model(source, num_classes)
    shape = tuple(source.input_shape)
    return added_setup.added_params_setup(
        source, num_classes, ADAPTER_KEY,
        lambda params, seed: init_adapters(model, shape, reduction, seed, rule),
        lambda *a, **kw: apply_model_adapters(*a, kind=kind, **kw))
  build.__doc__ = f"The {kind} adapter Setup: adapters + head trained (Adam), backbone frozen."
  return build


transfer.register(transfer.Strategy(
    "houlsby", transfer.FREEZE_LRS, _builder("houlsby"),
    description="Houlsby adapter (sequential bottleneck after each block's MLP, zero up "
                "projection) + new head trained, Adam; transformers only (LayerNorms frozen, "
                "no BN)",
    knobs={"reduction": REDUCTIONS}, knob_defaults={"reduction": DEFAULT_REDUCTION},
    knob_bounds={"reduction": (1.0, 64.0)}))
transfer.register(transfer.Strategy(
    "adaptformer", transfer.FREEZE_LRS, _builder("adaptformer"),
    description="AdaptFormer (parallel bottleneck beside each block's MLP, scale 0.1, zero up "
                "projection) + new head trained, Adam; transformers only (LayerNorms frozen, "
                "no BN)",
    knobs={"reduction": REDUCTIONS}, knob_defaults={"reduction": DEFAULT_REDUCTION},
    knob_bounds={"reduction": (1.0, 64.0)}))
