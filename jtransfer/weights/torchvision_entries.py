"""The vocabulary of the torchvision name maps: an `Entry` (one state-dict key, where it goes,
how its array is laid out) and the entries of a conv unit and of a Linear layer.

Every per-architecture map (`torchvision`, `torchvision_mobile`, `torchvision_dense`,
`torchvision_inception`) is built from these; `torchvision` applies the maps.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Entry:
  """One torchvision key and where it goes.

  Attributes:
    key: the torchvision state-dict key.
    collection: 'params' or 'batch_stats'.
    path: the jtransfer path as dict keys (module names may contain '/').
    kind: 'conv' (OIHW -> HWIO), 'dense' ((out, in) -> (in, out)), 'dense_chw' (a Dense layer
      after a (C, H, W) flatten, rows permuted to (H, W, C)), 'vec' (copied), 'dense_1x1'
      (a Linear into a 1x1 conv kernel), 'channel' ((C, 1, 1) -> (C,)), 'lead1' / 'lead2'
      (one / two leading unit axes added) or 'derived' (a buffer the model recomputes: the
      key is accepted and not imported; no collection or path).
    chw: (C, H, W) of the flattened map, for 'dense_chw'.
  """
  key: str
  collection: str
  path: tuple[str, ...]
  kind: str
  chw: Optional[tuple[int, int, int]] = None

  @property
  def path_str(self) -> str:
    return "/".join(self.path)


def _conv_unit(conv: str, bn: Optional[str], unit: tuple[str, ...]) -> list[Entry]:
  """A ConvUnit: conv (+ bias without BN) and its BN's params and running stats."""
  if bn is None:
    return [Entry(f"{conv}.weight", "params", (*unit, "conv", "kernel"), "conv"),
            Entry(f"{conv}.bias", "params", (*unit, "conv", "bias"), "vec")]
  return [Entry(f"{conv}.weight", "params", (*unit, "conv", "kernel"), "conv"),
          Entry(f"{bn}.weight", "params", (*unit, "bn", "scale"), "vec"),
          Entry(f"{bn}.bias", "params", (*unit, "bn", "bias"), "vec"),
          Entry(f"{bn}.running_mean", "batch_stats", (*unit, "bn", "mean"), "vec"),
          Entry(f"{bn}.running_var", "batch_stats", (*unit, "bn", "var"), "vec")]


def _dense(key: str, name: str, kind: str = "dense", chw=None) -> list[Entry]:
  return [Entry(f"{key}.weight", "params", (name, "kernel"), kind, chw),
          Entry(f"{key}.bias", "params", (name, "bias"), "vec")]
