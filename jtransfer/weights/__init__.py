"""Checkpoint import: torchvision / timm state dicts into jtransfer variables.

  sd = weights.load_state_dict("resnet50.pth")          # .pth/.pt, .safetensors, .npz
  variables = weights.import_torchvision("resnet50", sd)  # {'params', 'batch_stats'}

`jtransfer.sources.convert` turns a checkpoint into a `Source` (`experiments.convert_weights`
saves it for the experiments).
"""
from jtransfer.weights.io import load_state_dict
from jtransfer.weights.torchvision import (ARCHS, Entry, head_key, import_torchvision, name_map,
                                           torch_param_count)

__all__ = ["ARCHS", "Entry", "head_key", "import_torchvision", "load_state_dict", "name_map",
           "torch_param_count"]
