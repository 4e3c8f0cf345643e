"""torchvision key maps for DenseNet and ConvNeXt (see `torchvision.py` for the conventions).

Extra layouts used here: 'dense_1x1' (a Linear (out, in) into a 1x1 conv kernel
(1, 1, in, out): ConvNeXt's pointwise layers are conv units) and 'channel' (ConvNeXt's
layer_scale, (C, 1, 1) -> (C,)).
"""
from __future__ import annotations

from jtransfer.weights.torchvision_entries import Entry, _conv_unit, _dense


def _bn(key: str, path: tuple[str, ...]) -> list[Entry]:
  """A BatchNorm that is not inside a conv unit (DenseNet's pre-norms)."""
  return [Entry(f"{key}.weight", "params", (*path, "scale"), "vec"),
          Entry(f"{key}.bias", "params", (*path, "bias"), "vec"),
          Entry(f"{key}.running_mean", "batch_stats", (*path, "mean"), "vec"),
          Entry(f"{key}.running_var", "batch_stats", (*path, "var"), "vec")]


def _ln(key: str, path: tuple[str, ...]) -> list[Entry]:
  return [Entry(f"{key}.weight", "params", (*path, "scale"), "vec"),
          Entry(f"{key}.bias", "params", (*path, "bias"), "vec")]


def _conv_no_bias(key: str, unit: tuple[str, ...]) -> list[Entry]:
  return [Entry(f"{key}.weight", "params", (*unit, "conv", "kernel"), "conv")]


def densenet_map(model) -> list[Entry]:
  """torchvision DenseNet keys (`features.denseblock{b}.denselayer{l}...`) for a `DenseNet`."""
  entries = _conv_unit("features.conv0", "features.norm0", ("stem",))
  n_blocks = len(model.block_config)
  for b, n in enumerate(model.block_config, start=1):
    for i in range(1, n + 1):
      pre, layer = f"features.denseblock{b}.denselayer{i}", f"denseblock{b}/layer{i}"
      entries += _bn(f"{pre}.norm1", (layer, "norm1"))
      entries += _conv_unit(f"{pre}.conv1", f"{pre}.norm2", (layer, "conv1"))
      entries += _conv_no_bias(f"{pre}.conv2", (layer, "conv2"))
    if b < n_blocks:
      pre, name = f"features.transition{b}", f"transition{b}"
      entries += _bn(f"{pre}.norm", (name, "norm"))
      entries += _conv_no_bias(f"{pre}.conv", (name, "conv"))
  return entries + _bn("features.norm5", ("norm5",)) + _dense("classifier", "head")


def convnext_map(model) -> list[Entry]:
  """torchvision ConvNeXt keys (`features.{i}`, `classifier.{0,2}`) for a `ConvNeXt`."""
  entries = _conv_unit("features.0.0", None, ("stem",)) + _ln("features.0.1", ("stem", "norm"))
  for s, size in enumerate(model.stage_sizes, start=1):
    if s > 1:
      pre = f"features.{2 * s - 2}"
      entries += _ln(f"{pre}.0", (f"stage{s}/downsample_norm",))
      entries += _conv_unit(f"{pre}.1", None, (f"stage{s}/downsample",))
    for b in range(size):
      pre, block = f"features.{2 * s - 1}.{b}", f"stage{s}/block{b}"
      entries += _conv_unit(f"{pre}.block.0", None, (block, "dwconv"))
      entries += _ln(f"{pre}.block.2", (block, "dwconv", "norm"))
      for index, unit in ((3, "pwconv1"), (5, "pwconv2")):
        entries += [Entry(f"{pre}.block.{index}.weight", "params", (block, unit, "conv", "kernel"),
                          "dense_1x1"),
                    Entry(f"{pre}.block.{index}.bias", "params", (block, unit, "conv", "bias"),
                          "vec")]
      entries.append(Entry(f"{pre}.layer_scale", "params", (block, "layer_scale"), "channel"))
  return entries + _ln("classifier.0", ("head_norm",)) + _dense("classifier.2", "head")
