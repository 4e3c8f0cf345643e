"""torchvision key maps of the inverted-residual family (jtransfer.models.mobilenet).

torchvision numbers its modules by position: `features.0` is the stem, then one `features.i`
per block (MobileNetV2 / V3) or per stage of blocks (EfficientNet: `features.s.b`), then the
last 1x1 conv; inside a block the sequential's indices skip the absent expand conv and SE.
MobileNetV2's project conv and BN are two entries of `conv` (`conv.N`, `conv.N+1`); V3 and
EfficientNet wrap them in one Conv2dNormActivation (`block.N.0`, `block.N.1`).
"""
from __future__ import annotations

from jtransfer.models import mobilenet


def _se(pre: str, block: str) -> list:
  from jtransfer.weights.torchvision_entries import _conv_unit
  return (_conv_unit(f"{pre}.fc1", None, (block, "se", "fc1")) +
          _conv_unit(f"{pre}.fc2", None, (block, "se", "fc2")))


def _block(pre: str, block: str, spec: tuple, v2: bool) -> list:
  """One block's entries; `pre` is its torchvision prefix up to the sequential's index."""
  from jtransfer.weights.torchvision_entries import _conv_unit
  entries, j = [], 0
  if spec[mobilenet.EXPAND]:
    entries += _conv_unit(f"{pre}.{j}.0", f"{pre}.{j}.1", (block, "expand"))
    j += 1
  entries += _conv_unit(f"{pre}.{j}.0", f"{pre}.{j}.1", (block, "dw"))
  j += 1
  if spec[mobilenet.SE]:
    entries += _se(f"{pre}.{j}", block)
    j += 1
  if v2:  # a bare Conv2d and BatchNorm2d
    return entries + _conv_unit(f"{pre}.{j}", f"{pre}.{j + 1}", (block, "project"))
  return entries + _conv_unit(f"{pre}.{j}.0", f"{pre}.{j}.1", (block, "project"))


def _stages(blocks) -> list[list[int]]:
  """Block indices (1-based) per torchvision stage: a non-residual block opens a stage."""
  stages: list[list[int]] = []
  for i, b in enumerate(blocks, start=1):
    if not b[mobilenet.RESIDUAL] or not stages:
      stages.append([])
    stages[-1].append(i)
  return stages


def _ends(model, last_index: int, classifier: list) -> list:
  from jtransfer.weights.torchvision_entries import _conv_unit, _dense
  entries = []
  if model.top_width:
    entries += _conv_unit(f"features.{last_index}.0", f"features.{last_index}.1", ("top",))
  for index, name in classifier:
    entries += _dense(f"classifier.{index}", name)
  return entries


def mobilenet_v2_map(model) -> list:
  """torchvision MobileNetV2 keys: features.0 stem, features.i.conv.* blocks, classifier.1."""
  from jtransfer.weights.torchvision_entries import _conv_unit
  entries = _conv_unit("features.0.0", "features.0.1", ("stem",))
  for i, spec in enumerate(model.blocks, start=1):
    entries += _block(f"features.{i}.conv", f"block{i}", spec, v2=True)
  return entries + _ends(model, len(model.blocks) + 1, [(1, "head")])


def mobilenet_v3_map(model) -> list:
  """torchvision MobileNetV3 keys: features.i.block.* blocks, classifier.0 (fc1), .3 (head)."""
  from jtransfer.weights.torchvision_entries import _conv_unit
  entries = _conv_unit("features.0.0", "features.0.1", ("stem",))
  for i, spec in enumerate(model.blocks, start=1):
    entries += _block(f"features.{i}.block", f"block{i}", spec, v2=False)
  head = [(0, "fc1"), (3, "head")] if model.hidden_width else [(1, "head")]
  return entries + _ends(model, len(model.blocks) + 1, head)


def efficientnet_map(model) -> list:
  """torchvision EfficientNet (B0) keys: features.s.b.block.* per stage s, classifier.1."""
  from jtransfer.weights.torchvision_entries import _conv_unit
  entries = _conv_unit("features.0.0", "features.0.1", ("stem",))
  stages = _stages(model.blocks)
  for s, indices in enumerate(stages, start=1):
    for b, i in enumerate(indices):
      entries += _block(f"features.{s}.{b}.block", f"block{i}", model.blocks[i - 1], v2=False)
  return entries + _ends(model, len(stages) + 1, [(1, "head")])
