"""torchvision Inception-V3 keys -> jtransfer `Inception3` paths (registered in torchvision.MAPS).

torchvision names every BasicConv2d `<name>.conv` / `<name>.bn`; jtransfer's module tree uses
the same names, so `Mixed_5b.branch5x5_1.conv.weight` -> `Mixed_5b/branch5x5_1/conv/kernel`.
`fc` -> `head`. `AuxLogits.*` (torchvision's default `aux_logits=True`, and IMAGENET1K_V1) map to
the `AuxLogits` head of a model built with `aux_logits=True`; for the default aux-free model,
`drop_aux` removes them first (the aux head only feeds torchvision's train-mode auxiliary loss).
"""
from __future__ import annotations

from typing import Any, Mapping

AUX_PREFIX = "AuxLogits."


def drop_aux(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The state dict without its `AuxLogits.*` keys, for a model with `aux_logits=False`."""
  return {k: v for k, v in state_dict.items() if not k.startswith(AUX_PREFIX)}


def inception_map(model) -> list:
  """torchvision Inception3 keys for a jtransfer `Inception3` (any widths, no truncation)."""
  # Imported here: torchvision.py imports this module to register the map.
  from jtransfer.models import inception
  from jtransfer.weights.torchvision_entries import _conv_unit, _dense
  if model.truncate_after is not None:
    from jtransfer.errors import InputError
    raise InputError("torchvision inception_v3 weights need the whole network; import them "
                     "untruncated, then truncate (truncate_after) with surgery.restrict_to")
  entries = []
  for name in inception.STEM_UNITS:
    entries += _conv_unit(f"{name}.conv", f"{name}.bn", (name,))
  for block, kind, _ in inception.block_layout(model):
    for unit in inception.UNITS[kind]:
      entries += _conv_unit(f"{block}.{unit}.conv", f"{block}.{unit}.bn", (block, unit))
  if model.aux_logits and any(kind == "C" for _, kind, _ in inception.block_layout(model)):
    for unit in inception.AUX_UNITS:
      entries += _conv_unit(f"AuxLogits.{unit}.conv", f"AuxLogits.{unit}.bn",
                            ("AuxLogits", unit))
    entries += [e.__class__(e.key, e.collection, ("AuxLogits", *e.path), e.kind)
                for e in _dense("AuxLogits.fc", "fc")]
  return entries + _dense("fc", "head")
