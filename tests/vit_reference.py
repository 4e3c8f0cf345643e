"""Reference PyTorch transformers for the ViT / Swin equivalence tests: timm's, torchvision's
and open_clip's models built with random weights (no download); skips without the package."""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import pytest


def timm_vit():
  """`timm.models.vision_transformer`; skips without timm."""
  pytest.importorskip("torch")
  from tv_import import torchvision_models
  torchvision_models()  # timm imports torchvision when it is installed
  pytest.importorskip("timm")
  from timm.models import vision_transformer
  return vision_transformer


def open_clip_transformer():
  """`open_clip.transformer`, loaded without the package's `__init__` (which imports the
  tokenizer's ftfy/regex and the hub client, none of which the image tower needs)."""
  pytest.importorskip("torch")
  if "open_clip.transformer" in sys.modules:
    return sys.modules["open_clip.transformer"]
  spec = importlib.util.find_spec("open_clip")
  if spec is None or not spec.submodule_search_locations:
    pytest.skip("open_clip_torch is not installed")
  from tv_import import torchvision_models
  torchvision_models()  # open_clip.utils imports torchvision.ops
  package = types.ModuleType("open_clip")
  package.__path__ = list(spec.submodule_search_locations)
  sys.modules.setdefault("open_clip", package)
  for name in ("utils", "pos_embed", "transformer"):
    path = os.path.join(package.__path__[0], f"{name}.py")
    sub = importlib.util.spec_from_file_location(f"open_clip.{name}", path)
    module = importlib.util.module_from_spec(sub)
    sys.modules[f"open_clip.{name}"] = module
    sub.loader.exec_module(module)
  return sys.modules["open_clip.transformer"]


def torchvision_module(name: str):
  """`torchvision.models.<name>` (vision_transformer, swin_transformer)."""
  from tv_import import torchvision_models
  torchvision_models()
  return importlib.import_module(f"torchvision.models.{name}")


def randomize(model, seed: int = 0):
  """Every float parameter random (LayerNorm scales near 1, matrices ~ 1 / sqrt(fan in)), so
  that zero biases, unit scales and tiny LayerScale inits hide no mapping error; eval mode."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  norms = {id(m.weight) for m in model.modules()
           if isinstance(m, torch.nn.LayerNorm) and m.weight is not None}
  with torch.no_grad():
    for p in model.parameters():
      noise = torch.randn(p.shape, generator=gen)
      if id(p) in norms:
        p.copy_(1.0 + 0.1 * noise)
      elif p.ndim >= 2 and p.shape[0] > 1:  # weights; tokens and embeddings have a unit lead
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.copy_(0.2 * noise)
  return model.eval()


def state_dict(model) -> dict[str, np.ndarray]:
  """The model's state dict as numpy arrays."""
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def hooks(model, names: dict[str, str]) -> dict:
  """Records the outputs of `model`'s submodules: {tap name: torch module name}."""
  modules = dict(model.named_modules())
  got = {}
  for tap, module in names.items():
    modules[module].register_forward_hook(
        lambda m, i, o, tap=tap: got.__setitem__(tap, (o[0] if isinstance(o, tuple) else o)
                                                 .detach().numpy().copy()))
  return got
