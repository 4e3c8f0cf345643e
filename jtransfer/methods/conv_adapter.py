"""Conv-Adapter (Chen et al. 2022, arXiv 2208.07463) for residual CNN blocks, parallel to each block.

Where it inserts: for every module whose path matches `BLOCK_RULE` (ResNet's `stageS/blockB`),
block(x) -> block(x) + adapter(x), the adapter a bottleneck on the block's input (the paper's
"residual parallel" placement):

  depthwise kxk conv (stride = the block's, pad k // 2) -> 1x1 conv C_in -> C_out / reduction
  (+ bias) -> ReLU -> 1x1 conv -> C_out (+ bias).

The up projection and its bias are zero-initialised, so the model equals the source at init.
Chen et al.'s per-channel output scale alpha is left out: after a zero-initialised linear up
projection it is redundant (it folds into the up kernel). The blocks are found by module path
through a Flax method interceptor, as `ssf` finds its ops; the adapter is computed from
`params['adapter'][block]` by plain functions (the depthwise conv by `models.common.
depthwise_conv`, fast on CPU).

What trains: the adapters and the new head (Adam, the freeze LR grid); the backbone is frozen,
BN in eval mode with running statistics. Knob `reduction` (grid 2, 4, 8; default 4). The adapter
is nonlinear, so it does not merge: its inference FLOPs are `extra_flops` (tested against XLA's
cost analysis).

Transformers: the Houlsby (sequential) and AdaptFormer (parallel) adapters are in
`methods/adapters.py`, hooked on the `blockN/mlp` modules; `init_adapters` here refuses blocks
whose input is not an (N, H, W, C) map.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.methods import added_setup, peft_paths, transfer
from jtransfer.models.common import depthwise_conv

ADAPTER_KEY = "adapter"
BLOCK_RULE = r"(.*/)?stage\d+/block\d+"
KERNEL = 3
REDUCTIONS = (2.0, 4.0, 8.0)
DEFAULT_REDUCTION = 4.0


def block_shapes(model: nn.Module, input_shape: Sequence[int],
                 rule: str = BLOCK_RULE) -> dict[str, tuple[tuple, tuple]]:
  """{block path: (input shape, output shape)} at batch 1, for every module matching `rule`.

  Raises:
    InputError: no module matches.
  """
  try:
    return peft_paths.module_io_shapes(model, input_shape, rule, "Conv-Adapter")
  except InputError:
    raise InputError(f"Conv-Adapter: no module path matches the block rule {rule!r} (it needs "
                     "residual blocks such as ResNet's stageS/blockB)") from None


def _dims(shapes: tuple[tuple, tuple], reduction: float, block: str) -> tuple[int, int, int, int]:
  """(C_in, hidden, C_out, stride) of the adapter of a block."""
  if len(shapes[0]) != 4 or len(shapes[1]) != 4:
    raise InputError(f"Conv-Adapter: block {block!r} maps {shapes[0]} -> {shapes[1]}; it needs "
                     "(N, H, W, C) feature maps")
  (_, h, _, cin), out = shapes[0], shapes[1]
  stride = max(1, round(h / out[1]))
  if math.ceil(h / stride) != out[1]:
    raise InputError(f"Conv-Adapter: block {block!r} maps {h} rows to {out[1]}, not a stride")
  return cin, max(1, int(out[3] // reduction)), out[3], stride


def init_adapters(model: nn.Module, input_shape: Sequence[int], reduction: float, seed: int,
                  rule: str = BLOCK_RULE) -> dict:
  """{block: {'dw', 'down', 'down_bias', 'up', 'up_bias'}}: the up projection zero.

  Raises:
    InputError: reduction < 1, no block matched, or a block not on (N, H, W, C) maps.
  """
  if not reduction >= 1:
    raise InputError(f"Conv-Adapter reduction must be >= 1, got {reduction}")
  rng = np.random.default_rng(seed)
  out = {}
  for block, shapes in block_shapes(model, input_shape, rule).items():
    cin, hidden, cout, _ = _dims(shapes, reduction, block)
    normal = lambda shape, fan_in: (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
    out[block] = {"dw": normal((KERNEL, KERNEL, 1, cin), KERNEL * KERNEL),
                  "down": normal((cin, hidden), cin),
                  "down_bias": np.zeros(hidden, np.float32),
                  "up": np.zeros((hidden, cout), np.float32),
                  "up_bias": np.zeros(cout, np.float32)}
  return out


def adapter(entry: Mapping[str, Any], x: jax.Array, stride: int) -> jax.Array:
  """The adapter's output for the block input `x` (N, H, W, C_in)."""
  pad = KERNEL // 2
  y = depthwise_conv(x, entry["dw"].astype(x.dtype), stride, ((pad, pad), (pad, pad)))
  y = jax.nn.relu(y @ entry["down"].astype(x.dtype) + entry["down_bias"].astype(x.dtype))
  return y @ entry["up"].astype(x.dtype) + entry["up_bias"].astype(x.dtype)


def _add_adapters(adapters: Mapping[str, Any]):
  """A Flax method interceptor adding adapter(x) to the output of each adapted block."""
  def transform(entry, module, x, out):
    stride = max(1, round(x.shape[1] / out.shape[1]))
    return out + adapter(entry, x, stride).astype(out.dtype)
  return peft_paths.on_module_outputs(adapters, transform)


def apply_model_adapter(model, params: Mapping[str, Any], batch_stats, x, **kwargs):
  """`models.apply_model` with the adapters of params['adapter'] added to their blocks."""
  if ADAPTER_KEY not in params:
    return models.apply_model(model, params, batch_stats, x, **kwargs)
  rest = {k: v for k, v in params.items() if k != ADAPTER_KEY}
  with nn.intercept_methods(_add_adapters(params[ADAPTER_KEY])):
    return models.apply_model(model, rest, batch_stats, x, **kwargs)


def trained_count(model: nn.Module, input_shape: Sequence[int], reduction: float,
                  rule: str = BLOCK_RULE) -> int:
  """The formula: per block k*k*C_in + C_in*h + h + h*C_out + C_out, h = C_out // reduction."""
  total = 0
  for block, shapes in block_shapes(model, input_shape, rule).items():
    cin, h, cout, _ = _dims(shapes, reduction, block)
    total += KERNEL * KERNEL * cin + cin * h + h + h * cout + cout
  return total


def extra_flops(model: nn.Module, input_shape: Sequence[int], reduction: float,
                rule: str = BLOCK_RULE) -> int:
  """Inference FLOPs per image the adapters add, 2 per multiply-add (biases, ReLU and the sum
  with the block output counted once per element)."""
  total = 0
  for block, shapes in block_shapes(model, input_shape, rule).items():
    cin, h, cout, _ = _dims(shapes, reduction, block)
    pixels = shapes[1][1] * shapes[1][2]
    macs = KERNEL * KERNEL * cin + cin * h + h * cout
    total += pixels * (2 * macs + 2 * h + 2 * cout)
  return total


def build_conv_adapter(source: transfer.Source, num_classes: int, total_steps: int,
                       reduction: float = DEFAULT_REDUCTION,
                       rule: str = BLOCK_RULE) -> transfer.Setup:
  """The Conv-Adapter Setup: adapters + head trained (Adam), the backbone frozen."""
  model = transfer.target_model(source, num_classes)
  shape = tuple(source.input_shape)
  return added_setup.added_params_setup(
      source, num_classes, ADAPTER_KEY,
      lambda params, seed: init_adapters(model, shape, reduction, seed, rule),
      apply_model_adapter)


transfer.register(transfer.Strategy(
    "conv_adapter", transfer.FREEZE_LRS, build_conv_adapter,
    description="Conv-Adapter: a depthwise/1x1 bottleneck parallel to every residual block "
                "(zero-initialised up projection) + new head trained, BN running stats, Adam",
    knobs={"reduction": REDUCTIONS}, knob_defaults={"reduction": DEFAULT_REDUCTION},
    knob_bounds={"reduction": (1.0, 64.0)}))
