"""torchvision's model code on the CPU torch wheel (no download, random weights).

torchvision's wheel on PyPI is built against CUDA torch: its C extension (`torchvision::nms`,
`roi_align`, ...) does not load beside the CPU wheel, and `import torchvision` fails where its
Python code registers fake kernels for those ops. The model classes are pure Python and never
call the ops, so declaring each missing op (a placeholder schema, no kernel) lets the package
import; calling one of those ops would still fail, which no model code here does.
"""
from __future__ import annotations

import importlib
import re
import sys

_LIBRARY = None  # the torch.library.Library owning the declarations (kept alive)


def _forget_torchvision() -> None:
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]  # a failed import leaves a half-initialised package behind


def torchvision_models():
  """`torchvision.models`, importable on the CPU torch wheel.

  Raises:
    ImportError: torch or torchvision is not installed, or torchvision still does not import.
  """
  global _LIBRARY
  import torch
  declared = set()
  for _ in range(64):
    try:
      return importlib.import_module("torchvision.models")
    except RuntimeError as e:
      missing = re.search(r"operator torchvision::(\w+) does not exist", str(e))
      if missing is None or missing.group(1) in declared:
        raise ImportError(f"torchvision does not import on this torch: {e}") from None
      if _LIBRARY is None:
        _LIBRARY = torch.library.Library("torchvision", "DEF")
      _LIBRARY.define(f"{missing.group(1)}(Tensor x) -> Tensor")
      declared.add(missing.group(1))
      _forget_torchvision()
  raise ImportError("torchvision does not import on this torch: too many missing ops")
