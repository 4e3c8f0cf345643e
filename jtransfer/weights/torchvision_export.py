"""torchvision models as state-dict files, on any torch wheel (the CPU one included).

torchvision's PyPI wheel is built against CUDA torch: beside the CPU wheel its C extension does
not load and `import torchvision` fails with "operator torchvision::nms does not exist". The
model classes are pure Python and never call those detection ops, so declaring each missing op
(a schema without a kernel) lets the package import; calling such an op would still fail, which
no classification model does. `bench/tv_cpu.py` does the same for the equivalence tests.

  python -m experiments.export_torchvision resnet50 resnet50.pth --weights IMAGENET1K_V2
  python -m experiments.convert_weights --arch resnet50 --weights resnet50.pth --out sources/r50
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from typing import Optional

from jtransfer.errors import InputError


def _forget_torchvision() -> None:
  for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
    del sys.modules[name]  # a failed import leaves a half-initialised package behind


@functools.cache
def _declarations():
  """The torch library owning the placeholder op schemas; cached so it stays alive (torch
  removes a library's definitions when the object is collected)."""
  import torch
  return torch.library.Library("torchvision", "DEF")


def torchvision_models():
  """`torchvision.models`, importable beside the CPU torch wheel.

  Raises:
    InputError: torch or torchvision is not installed, or torchvision does not import for
      another reason than missing detection ops.
  """
  try:
    import torch  # noqa: F401  (torchvision needs it first)
  except ImportError:
    raise InputError("exporting torchvision weights needs PyTorch and torchvision "
                     "(pip install torch torchvision)") from None
  declared = set()
  for _ in range(64):
    try:
      return importlib.import_module("torchvision.models")
    except ImportError as e:
      raise InputError(f"torchvision is not installed ({e}); pip install torchvision") from None
    except RuntimeError as e:
      missing = re.search(r"operator torchvision::(\w+) does not exist", str(e))
      if missing is None or missing.group(1) in declared:
        raise InputError(f"torchvision does not import beside this torch ({e})") from None
      _declarations().define(f"{missing.group(1)}(Tensor x) -> Tensor")
      declared.add(missing.group(1))
      _forget_torchvision()
  raise InputError("torchvision does not import beside this torch: too many missing ops")


def export(arch: str, path: str, weights: Optional[str] = None, seed: int = 0) -> int:
  """Saves torchvision's `arch` as a state dict that `experiments.convert_weights` reads.

  Args:
    arch: a torchvision builder name (resnet50, mobilenet_v2, ...).
    path: output file; `.safetensors` saves with safetensors, anything else with torch.save.
    weights: a torchvision weights name (IMAGENET1K_V2, DEFAULT, ...), downloaded by
      torchvision into its cache; None for random weights (seeded).
    seed: torch's seed for random weights.

  Returns:
    The number of tensors saved.

  Raises:
    InputError: an unknown arch or weights name, or a download that failed.
  """
  tv = torchvision_models()
  import torch
  if arch not in tv.list_models():
    raise InputError(f"torchvision has no model {arch!r}; e.g. resnet50, mobilenet_v2, vgg16 "
                     "(torchvision.models.list_models() lists them)")
  torch.manual_seed(seed)
  try:
    model = tv.get_model(arch, weights=weights)
  except (ValueError, KeyError) as e:
    raise InputError(f"torchvision {arch}: weights {weights!r} are unknown ({e})") from None
  except OSError as e:  # URLError is an OSError: no network, no cache
    raise InputError(f"torchvision {arch}: weights {weights!r} could not be downloaded ({e}); "
                     "run this where the internet is reachable and copy the file") from None
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if path.endswith(".safetensors"):
    from safetensors.torch import save_file
    save_file(state, path)
  else:
    torch.save(state, path)
  return len(state)
