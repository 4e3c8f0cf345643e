"""ResNeXt-50 32x4d, Wide ResNet-50-2, DenseNet-121, ConvNeXt-Tiny: torchvision equivalence,
parameter counts, CWL, pruning, DELTA taps, truncation and a tiny few-shot run per family.

Equivalence: a torchvision model with random weights, random BN running statistics (and
random norm affines / layer scales, so every path is exercised), its state dict imported with
`weights.import_torchvision`; logits and DELTA taps compared with the torch model in eval mode.
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError
from jtransfer.methods import cwl, delta, prune
from tv_import import torchvision_models

torch = pytest.importorskip("torch")

ARCHS = ("resnext50_32x4d", "wide_resnet50_2", "densenet121", "convnext_tiny")
PARAMS = {"resnext50_32x4d": 25_028_904, "wide_resnet50_2": 68_883_240,
          "densenet121": 7_978_856, "convnext_tiny": 28_589_128}

# Width-reduced configs of each family for the method tests (a few thousand params).
TINY = {
    "resnext50_32x4d": dict(stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8,
                            groups=4, width_per_group=32),
    "wide_resnet50_2": dict(stage_sizes=(1, 2), stage_widths=(4, 8), stem_width=8),
    "densenet121": dict(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2),
    "convnext_tiny": dict(stage_sizes=(1, 2), stage_widths=(8, 16)),
}


# ----------------------------------------------------------------------------- torchvision
def _torch_model(arch, seed=0):
  """torchvision's model, random weights, random BN stats / norm affines / layer scales."""
  tvm = torchvision_models()
  torch.manual_seed(seed)
  net = getattr(tvm, arch)(weights=None).eval()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, m in net.named_modules():
      if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
      if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
      if hasattr(m, "layer_scale"):
        m.layer_scale.copy_(torch.rand(m.layer_scale.shape, generator=g) * 0.5 + 0.25)
  return net


def _torch_taps(arch, net, names):
  """{jtransfer tap: torch module} for DELTA taps (raw conv / Linear outputs)."""
  out = {}
  for name in names:
    if arch.startswith(("resnext", "wide")):
      s, b, conv = name.split("/")
      out[name] = getattr(net, f"layer{s[5:]}")[int(b[5:])].conv3
    elif arch == "densenet121":
      if name.startswith("transition"):
        out[name] = getattr(net.features, name.split("/")[0]).conv
      else:
        block, layer, _ = name.split("/")
        out[name] = getattr(getattr(net.features, block), f"denselayer{layer[5:]}").conv2
    else:
      s, b, _ = name.split("/")
      out[name] = net.features[2 * int(s[5:]) - 1][int(b[5:])].block[5]
  return out


def _compare(arch, size, seed=0):
  net = _torch_model(arch, seed)
  sd = {k: v.numpy() for k, v in net.state_dict().items()}
  variables = weights.import_torchvision(arch, sd)
  # Parameter count (1000 classes): torchvision's, the literal, and the imported tree's.
  assert sum(p.numel() for p in net.parameters()) == PARAMS[arch]
  assert surgery.count(variables["params"]) == PARAMS[arch]
  model = models.get_model(arch, 1000)
  taps = delta.default_taps(arch, models.model_config(model))
  hooks, got_torch = [], {}
  for name, module in _torch_taps(arch, net, taps).items():
    hooks.append(module.register_forward_hook(
        lambda m, i, o, name=name: got_torch.__setitem__(name, o.detach().numpy())))
  x = np.random.default_rng(seed).normal(size=(2, 3, size, size)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x)).numpy()
  for h in hooks:
    h.remove()
  # Jitted: one compile is several times faster than DenseNet's ~600 eager ops.
  forward = jax.jit(lambda p, s, x: models.apply_model(model, p, s, x, taps=taps)[::2])
  logits, got = forward(variables["params"], variables.get("batch_stats"),
                        jnp.asarray(x.transpose(0, 2, 3, 1)))
  scale = np.abs(want).max()
  assert np.abs(np.asarray(logits) - want).max() / scale < 1e-4
  for name in taps:
    # ConvNeXt's pwconv2 is a Linear on the channels-last permuted map: already NHWC.
    t = got_torch[name] if arch == "convnext_tiny" else got_torch[name].transpose(0, 2, 3, 1)
    err = np.abs(np.asarray(got[name]) - t).max() / np.abs(t).max()
    assert err < 1e-4, (name, err)


@pytest.mark.parametrize("arch", ARCHS)
def test_param_count_logits_and_taps_equal_torchvision_small(arch):
  _compare(arch, 32)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_taps_equal_torchvision_224(arch):
  _compare(arch, 224)
