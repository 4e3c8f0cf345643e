"""PyTorch reference nets and train steps, for side-by-side timing in bench/run.py (and the
accuracy parity of bench/parity.py and bench/bench_grid.py: bench/torch_twin.py copies
jtransfer weights into these nets).

Same architectures as jtransfer's vgg_s / resnet_s (widths, strides, padding, BN) and resnet50
(torchvision's layout: stride on the 3x3 conv), NCHW or channels_last, on CPU or CUDA, float32
or bf16 autocast; the same losses as the JAX strategies (CE; + CWL scales; + L2-SP; + DELTA
feature-map distance with a frozen source copy; + masks; + distillation).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn


class Scale(nn.Module):
  """Per-channel CWL multiplier (the explicit layer the JAX reparametrisation is equal to)."""

  def __init__(self, c):
    super().__init__()
    self.sigma = nn.Parameter(torch.ones(c))

  def forward(self, x):
    return x * self.sigma.view(1, -1, 1, 1)


def _unit(cin, cout, k=3, s=1, bn=False, relu=True, cwl=False):
  layers = [nn.Conv2d(cin, cout, k, s, k // 2, bias=not bn)]
  if bn:
    layers.append(nn.BatchNorm2d(cout))
  if cwl:
    layers.append(Scale(cout))
  if relu:
    layers.append(nn.ReLU(inplace=True))
  return nn.Sequential(*layers)


class VGGS(nn.Module):
  def __init__(self, cin=1, classes=5, widths=((32, 32), (64, 64), (128, 128)), hw=28,
               cwl=False):
    super().__init__()
    layers, c = [], cin
    for stage in widths:
      for w in stage:
        layers.append(_unit(c, w, cwl=cwl))
        c = w
      layers.append(nn.MaxPool2d(2))
      hw //= 2
    self.features = nn.Sequential(*layers)
    self.taps = [layers[1], layers[4], layers[7]]  # last unit of each stage
    self.head = nn.Linear(c * hw * hw, classes)

  def forward(self, x):
    return self.head(torch.flatten(self.features(x), 1))


class _Residual(nn.Module):
  """relu(units(x) + shortcut(x)); subclasses set `self.units` (names, in order) and `down`."""
  units: tuple[str, ...] = ()

  def forward(self, x):
    y = x
    for name in self.units:
      y = getattr(self, name)(y)
    return F.relu(y + (self.down(x) if self.down is not None else x))


def _shortcut(cin, cout, stride, cwl):
  """A 1x1 conv + BN projection where shape changes, else identity (None)."""
  if stride != 1 or cin != cout:
    return _unit(cin, cout, 1, stride, bn=True, relu=False, cwl=cwl)
  return None


class _ResNet(nn.Module):
  """stem -> blocks -> global average pool -> head."""

  def forward(self, x):
    return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Block(_Residual):
  units = ("conv1", "conv2")

  def __init__(self, cin, cout, stride, cwl):
    super().__init__()
    self.conv1 = _unit(cin, cout, 3, stride, bn=True, cwl=cwl)
    self.conv2 = _unit(cout, cout, 3, 1, bn=True, relu=False, cwl=cwl)
    self.down = _shortcut(cin, cout, stride, cwl)


class ResNetS(_ResNet):
  def __init__(self, cin=1, classes=5, widths=(32, 64, 128), stem=32, stem_stride=2, cwl=False):
    super().__init__()
    self.stem = _unit(cin, stem, 3, stem_stride, bn=True, cwl=cwl)
    blocks, c = [], stem
    for s, w in enumerate(widths):
      for b in range(2):
        blocks.append(Block(c, w, 2 if (b == 0 and s > 0) else 1, cwl))
        c = w
    self.blocks = nn.Sequential(*blocks)
    self.taps = [blocks[1].conv2[0], blocks[3].conv2[0], blocks[5].conv2[0]]
    self.head = nn.Linear(c, classes)


class Bottleneck(_Residual):
  units = ("conv1", "conv2", "conv3")

  def __init__(self, cin, width, stride, cwl):
    super().__init__()
    cout = 4 * width
    self.conv1 = _unit(cin, width, 1, 1, bn=True, cwl=cwl)
    self.conv2 = _unit(width, width, 3, stride, bn=True, cwl=cwl)
    self.conv3 = _unit(width, cout, 1, 1, bn=True, relu=False, cwl=cwl)
    self.down = _shortcut(cin, cout, stride, cwl)


class ResNet50(_ResNet):
  """torchvision's resnet50 (v1.5), the GPU comparison of bench/run.py."""

  def __init__(self, cin=3, classes=1000, cwl=False):
    super().__init__()
    self.stem = nn.Sequential(_unit(cin, 64, 7, 2, bn=True, cwl=cwl), nn.MaxPool2d(3, 2, 1))
    blocks, c = [], 64
    for s, (n, w) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
      for b in range(n):
        blocks.append(Bottleneck(c, w, 2 if (b == 0 and s > 0) else 1, cwl))
        c = 4 * w
    self.blocks = nn.Sequential(*blocks)
    ends = (2, 6, 12, 15)  # last block of each stage
    self.taps = [blocks[i].conv3[0] for i in ends]
    self.head = nn.Linear(c, classes)


ARCHS = ("vgg_s", "resnet_s", "resnet50")


def make(arch: str, shape, classes: int, cwl: bool = False) -> nn.Module:
  h, w, c = shape
  if arch == "vgg_s":
    return VGGS(c, classes, hw=h, cwl=cwl)
  if arch == "resnet_s":
    return ResNetS(c, classes, cwl=cwl)
  if arch == "resnet50":
    return ResNet50(c, classes, cwl=cwl)
  raise ValueError(f"no PyTorch reference for {arch!r}; have {ARCHS}")


def default_device() -> str:
  return "cuda" if torch.cuda.is_available() else "cpu"


def _taps(model, x):
  out = []
  hooks = [m.register_forward_hook(lambda m, i, o: out.append(o)) for m in model.taps]
  logits = model(x)
  for h in hooks:
    h.remove()
  return logits, out


def make_step(arch: str, strategy: str, shape, batch: int, classes: int = 5,
              channels_last: bool = False, device: str | None = None, bf16: bool = False):
  """Returns a zero-arg callable running one train step on a fixed random batch.

  Args:
    device: 'cpu' or 'cuda' (default: cuda when there is one).
    bf16: run forward and loss under bf16 autocast (mixed precision; params stay float32),
      the counterpart of the JAX models' dtype='bfloat16'.
  """
  torch.manual_seed(0)
  device = device or default_device()
  model = make(arch, shape, classes, cwl=strategy == "freeze_cwl")
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  model = model.to(device=device, memory_format=fmt)
  x = torch.randn(batch, shape[2], shape[0], shape[1], device=device).to(memory_format=fmt)
  y = torch.randint(0, classes, (batch,), device=device)
  source = None
  if strategy in ("l2sp", "delta", "distill"):
    source = copy.deepcopy(model).eval()
    for p in source.parameters():
      p.requires_grad_(False)
  if strategy in ("freeze", "freeze_cwl"):
    model.eval()  # BN running stats, as the JAX strategies
    for name, p in model.named_parameters():
      p.requires_grad_(name.startswith("head") or name.endswith("sigma"))
  else:
    model.eval()  # few-shot strategies keep BN in eval mode (running stats)
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
  w0 = [p.detach().clone() for p in params] if strategy == "l2sp" else None
  masks = ([(torch.rand_like(p) > 0.5).float() for p in params]
           if strategy == "masked_sparse" else None)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      loss = _loss()
    loss.backward()
    opt.step()
    if masks is not None:
      with torch.no_grad():
        for p, m in zip(params, masks):
          p.mul_(m)
    return loss

  def _loss():
    if strategy == "delta":
      logits, feats = _taps(model, x)
      with torch.no_grad():
        _, src = _taps(source, x)
      reg = sum(((a - b) ** 2).sum() for a, b in zip(feats, src))
      loss = F.cross_entropy(logits, y) + 0.01 * 0.5 * reg
    else:
      logits = model(x)
      loss = F.cross_entropy(logits, y)
      if strategy == "l2sp":
        loss = loss + 0.01 * 0.5 * sum(((p - q) ** 2).sum() for p, q in zip(params, w0))
      if strategy == "distill":
        with torch.no_grad():
          t = source(x)
        kl = F.kl_div(F.log_softmax(logits / 4, -1), F.softmax(t / 4, -1), reduction="batchmean")
        loss = 0.5 * loss + 0.5 * 16 * kl
    return loss

  step.device = device
  return step


def time_step(step, warmup: int, windows: int, steps_per_window: int) -> list[float]:
  """Seconds per step in each window (after warm-up); waits for CUDA work to finish."""
  sync = torch.cuda.synchronize if getattr(step, "device", "cpu") == "cuda" else (lambda: None)
  for _ in range(warmup):
    step()
  sync()
  out = []
  for _ in range(windows):
    t0 = time.perf_counter()
    for _ in range(steps_per_window):
      step()
    sync()
    out.append((time.perf_counter() - t0) / steps_per_window)
  return out
