"""A jtransfer net's PyTorch twin: bench/torch_ref.py's net with jtransfer's weights copied in,
its logits, and the plain PyTorch training loop the parity benches compare against.

Shared by bench/parity.py (fixed-step runs) and bench/grid_torch.py (the protocol grid's
PyTorch arm).
"""
from __future__ import annotations

import copy
import math

import numpy as np


def tensor(images: np.ndarray, mean, std):
  """uint8 NHWC images -> normalised float32 NCHW torch tensor, in numpy as a PyTorch user
  writes it (bench/grid_torch.py's loop). It differs from jtransfer's `normalize` by float
  rounding (XLA orders the operations its own way), so the parity runs use `same_input`
  instead: there both nets must see the very same inputs."""
  import torch
  x = (np.asarray(images).astype(np.float32) / np.float32(255.0)
       - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nchw(x: np.ndarray):
  """A float NHWC array (numpy or JAX) as a float32 NCHW torch tensor (a copy)."""
  import torch
  return torch.from_numpy(np.array(np.transpose(np.asarray(x), (0, 3, 1, 2)), np.float32))


def same_input(images: np.ndarray, mean, std):
  """uint8 NHWC images as jtransfer's models see them (`normalize`), as an NCHW torch tensor."""
  from jtransfer.data.preprocess import normalize
  return to_nchw(normalize(images, mean, std))


def torch_net(arch: str, config: dict, num_classes: int, shape, params, batch_stats):
  """bench/torch_ref.py's net for a jtransfer target model, with its weights copied in."""
  import torch
  from bench import torch_ref
  from jtransfer import surgery
  h, w, c = shape
  if arch == "vgg_s":
    widths = tuple(tuple(s) for s in config["conv_widths"])
    net = torch_ref.VGGS(c, num_classes, widths=widths, hw=h)
    units = {f"conv{s + 1}_{i + 1}": net.features[s * (len(stage) + 1) + i]
             for s, stage in enumerate(widths) for i in range(len(stage))}
  elif arch == "resnet_s":
    if tuple(config["stage_sizes"]) != (2, 2, 2) or config["block"] != "basic" or \
        config["stem_kernel"] != 3 or config["stem_pool"]:
      raise ValueError(f"no torch_ref net for resnet_s config {config}")
    net = torch_ref.ResNetS(c, num_classes, widths=tuple(config["stage_widths"]),
                            stem=config["stem_width"], stem_stride=config["stem_stride"])
    units = {"stem": net.stem}
    for i, block in enumerate(net.blocks):
      name = f"stage{i // 2 + 1}/block{i % 2}"
      units.update({f"{name}/conv1": block.conv1, f"{name}/conv2": block.conv2})
      if block.down is not None:
        units[f"{name}/downsample"] = block.down
  else:
    raise ValueError(f"no torch_ref net for {arch!r}")
  flat = surgery.flatten(params)
  stats = surgery.flatten(batch_stats) if batch_stats else {}
  state = {}
  for name, unit in units.items():
    conv = unit[0]
    state[conv.weight] = np.transpose(flat.pop(f"{name}/conv/kernel"), (3, 2, 0, 1))
    if conv.bias is not None:
      state[conv.bias] = flat.pop(f"{name}/conv/bias")
    if isinstance(unit[1], torch.nn.BatchNorm2d):
      bn = unit[1]
      state[bn.weight] = flat.pop(f"{name}/bn/scale")
      state[bn.bias] = flat.pop(f"{name}/bn/bias")
      state[bn.running_mean] = stats.pop(f"{name}/bn/mean")
      state[bn.running_var] = stats.pop(f"{name}/bn/var")
  kernel = np.asarray(flat.pop("head/kernel"))
  if arch == "vgg_s":  # jtransfer flattens (H, W, C), torch (C, H, W)
    hw, ch = int(round(math.sqrt(kernel.shape[0] // widths[-1][-1]))), widths[-1][-1]
    kernel = kernel.reshape(hw, hw, ch, -1).transpose(2, 0, 1, 3).reshape(ch * hw * hw, -1)
  state[net.head.weight] = kernel.T
  state[net.head.bias] = flat.pop("head/bias")
  if flat or stats:
    raise ValueError("jtransfer params without a torch counterpart: "
                     f"{sorted(flat) + sorted(stats)}")
  with torch.no_grad():
    for tensor, value in state.items():
      # A copy: jax-backed arrays are read-only, which torch.from_numpy warns about.
      value = torch.from_numpy(np.array(value, np.float32, order="C"))
      if tensor.shape != value.shape:
        raise ValueError(f"shape {tuple(value.shape)} does not fit {tuple(tensor.shape)}")
      tensor.copy_(value)
  return net.eval()


def torch_logits(net, images: np.ndarray, mean, std, batch: int = 500) -> np.ndarray:
  """`net`'s logits of uint8 NHWC `images`, normalised with (mean, std), `batch` at a time."""
  import torch
  out = []
  with torch.no_grad():
    for i in range(0, len(images), batch):
      out.append(net(same_input(images[i:i + batch], mean, std)).numpy())
  return np.concatenate(out)


def with_cwl(net):
  """A copy of a bench/torch_ref.py net with a CWL scale layer (sigma = 1) in every conv unit,
  after its BN when it has one (as `torch_ref.make(..., cwl=True)` places them); conv and BN
  parameters keep their state-dict names."""
  import torch.nn as nn
  from bench import torch_ref
  net = copy.deepcopy(net)

  def visit(module):
    for name, child in module.named_children():
      if isinstance(child, nn.Sequential) and len(child) and isinstance(child[0], nn.Conv2d):
        layers = list(child)
        at = 2 if len(layers) > 1 and isinstance(layers[1], nn.BatchNorm2d) else 1
        layers.insert(at, torch_ref.Scale(layers[0].out_channels))
        setattr(module, name, nn.Sequential(*layers))
      else:
        visit(child)

  visit(net)
  return net


def reversed_rows(batch: dict) -> dict:
  """The same batch with its rows in reverse order: the same mean loss, summed in another
  order (BN uses running statistics, so every row's forward is unchanged)."""
  return {k: np.ascontiguousarray(v[::-1]) for k, v in batch.items()}


def torch_run(net, strategy: str, batches, steps: int, lr: float, mean, std,
              reverse_rows: bool = False):
  """Trains `net` in place: Adam on the head (freeze) or all params (finetune), BN eval mode;
  `reverse_rows`: each batch's rows in reverse order (the rounding control)."""
  import torch
  import torch.nn.functional as F
  net.eval()  # BN running statistics in both strategies, as jtransfer's
  for name, p in net.named_parameters():
    p.requires_grad_(strategy == "finetune" or name.startswith("head."))
  opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr,
                         betas=(0.9, 0.999), eps=1e-8)
  for step in range(steps):
    b = batches.at(step)
    if reverse_rows:
      b = reversed_rows(b)
    x = same_input(b["image"], mean, std)
    y = torch.from_numpy(b["label"].astype(np.int64))
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    if not torch.isfinite(loss):
      raise FloatingPointError(f"torch run: non-finite loss at step {step}")
    loss.backward()
    opt.step()
  return net

