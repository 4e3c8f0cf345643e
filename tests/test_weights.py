"""torchvision weight import: activation equivalence against a torch.nn.functional reference.

The reference networks below are written from torchvision's architecture definitions with
`torch.nn.functional` only (torchvision is not installed), and their state dicts use
torchvision's key names and shapes, filled with random values (random BN running stats too).
Each is saved to disk, read back with `load_state_dict`, imported, and the logits and tapped
feature maps of both frameworks are compared.
"""
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError

torch = pytest.importorskip("torch")
F = torch.nn.functional

# ------------------------------------------------------------------ torchvision layouts (shapes)
RESNETS = {"resnet18": ((2, 2, 2, 2), "basic"), "resnet50": ((3, 4, 6, 3), "bottleneck"),
           "resnet101": ((3, 4, 23, 3), "bottleneck")}
VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
             "M"]
# torchvision's documented parameter counts (1000 classes).
TORCHVISION_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "resnet101": 44_549_160,
                      "vgg16": 138_357_544, "alexnet": 61_100_840}


def _conv(shapes, name, out, inp, k, bias=False):
  shapes[f"{name}.weight"] = (out, inp, k, k)
  if bias:
    shapes[f"{name}.bias"] = (out,)


def _bn(shapes, name, c):
  for s in ("weight", "bias", "running_mean", "running_var"):
    shapes[f"{name}.{s}"] = (c,)
  shapes[f"{name}.num_batches_tracked"] = ()


def resnet_shapes(arch, num_classes=1000):
  """torchvision.models.resnet's state-dict shapes (its _make_layer logic)."""
  layers, block = RESNETS[arch]
  exp = 1 if block == "basic" else 4
  shapes = {}
  _conv(shapes, "conv1", 64, 3, 7)
  _bn(shapes, "bn1", 64)
  inplanes = 64
  for li, (n, planes) in enumerate(zip(layers, (64, 128, 256, 512)), start=1):
    for b in range(n):
      stride = 2 if (b == 0 and li > 1) else 1
      p = f"layer{li}.{b}"
      if block == "basic":
        convs = [(planes, inplanes, 3), (planes, planes, 3)]
      else:
        convs = [(planes, inplanes, 1), (planes, planes, 3), (planes * 4, planes, 1)]
      for i, (o, c, k) in enumerate(convs, start=1):
        _conv(shapes, f"{p}.conv{i}", o, c, k)
        _bn(shapes, f"{p}.bn{i}", o)
      if stride != 1 or inplanes != planes * exp:
        _conv(shapes, f"{p}.downsample.0", planes * exp, inplanes, 1)
        _bn(shapes, f"{p}.downsample.1", planes * exp)
      inplanes = planes * exp
  shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 512 * exp), (num_classes,)
  return shapes


def vgg16_shapes(hidden=4096, num_classes=1000):
  shapes, index, c = {}, 0, 3
  for v in VGG16_CFG:
    if v == "M":
      index += 1
    else:
      _conv(shapes, f"features.{index}", v, c, 3, bias=True)
      c, index = v, index + 2
  for i, (o, n) in zip((0, 3, 6), ((hidden, 512 * 49), (hidden, hidden), (num_classes, hidden))):
    shapes[f"classifier.{i}.weight"], shapes[f"classifier.{i}.bias"] = (o, n), (o,)
  return shapes


def alexnet_shapes(hidden=4096, num_classes=1000):
  shapes = {}
  for index, (o, c, k) in zip((0, 3, 6, 8, 10), ((64, 3, 11), (192, 64, 5), (384, 192, 3),
                                                 (256, 384, 3), (256, 256, 3))):
    _conv(shapes, f"features.{index}", o, c, k, bias=True)
  for i, (o, n) in zip((1, 4, 6), ((hidden, 256 * 36), (hidden, hidden), (num_classes, hidden))):
    shapes[f"classifier.{i}.weight"], shapes[f"classifier.{i}.bias"] = (o, n), (o,)
  return shapes


def random_state_dict(shapes, seed=0):
  """Random torch tensors: He-scaled weights, random BN affine and running statistics."""
  g = torch.Generator().manual_seed(seed)
  sd = {}
  for k, shape in shapes.items():
    if k.endswith("num_batches_tracked"):
      sd[k] = torch.tensor(7, dtype=torch.long)
    elif k.endswith("running_var"):
      sd[k] = torch.rand(shape, generator=g) * 1.5 + 0.5
    elif k.endswith(("running_mean", ".bias")):
      sd[k] = torch.randn(shape, generator=g) * 0.1
    elif len(shape) == 1:  # BN weight
      sd[k] = torch.rand(shape, generator=g) + 0.5
    else:
      fan_in = int(np.prod(shape[1:]))
      sd[k] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
  return sd


# ------------------------------------------------------------------ torch.nn.functional references
def _bn_eval(x, sd, p):
  return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"],
                      sd[f"{p}.bias"], training=False, eps=1e-5)


def torch_resnet(sd, x, arch):
  layers, block = RESNETS[arch]
  taps = {}
  x = F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)
  taps["stem"] = x
  x = F.max_pool2d(F.relu(_bn_eval(x, sd, "bn1")), 3, 2, 1)
  for li, n in enumerate(layers, start=1):
    for b in range(n):
      p, stride = f"layer{li}.{b}", (2 if (b == 0 and li > 1) else 1)
      if block == "basic":
        out = F.relu(_bn_eval(F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1),
                              sd, f"{p}.bn1"))
        out = _bn_eval(F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1), sd, f"{p}.bn2")
      else:
        out = F.relu(_bn_eval(F.conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
        out = F.relu(_bn_eval(F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1),
                              sd, f"{p}.bn2"))
        out = _bn_eval(F.conv2d(out, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
      identity = x
      if f"{p}.downsample.0.weight" in sd:
        identity = _bn_eval(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride), sd,
                            f"{p}.downsample.1")
      x = F.relu(out + identity)
      taps[f"stage{li}/block{b}"] = x
  taps["last_conv"] = x
  x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
  taps["features"] = x
  return F.linear(x, sd["fc.weight"], sd["fc.bias"]), taps


def torch_vgg16(sd, x):
  taps, index, stage, conv = {}, 0, 1, 1
  for v in VGG16_CFG:
    if v == "M":
      x, index, stage, conv = F.max_pool2d(x, 2, 2), index + 1, stage + 1, 1
      continue
    x = F.conv2d(x, sd[f"features.{index}.weight"], sd[f"features.{index}.bias"], padding=1)
    taps[f"conv{stage}_{conv}"] = x
    x, index, conv = F.relu(x), index + 2, conv + 1
  taps["last_conv"] = x
  x = torch.flatten(F.adaptive_avg_pool2d(x, 7), 1)
  x = F.relu(F.linear(x, sd["classifier.0.weight"], sd["classifier.0.bias"]))
  taps["fc6_act"] = x
  x = F.relu(F.linear(x, sd["classifier.3.weight"], sd["classifier.3.bias"]))
  taps["features"] = x
  return F.linear(x, sd["classifier.6.weight"], sd["classifier.6.bias"]), taps


def torch_alexnet(sd, x):
  taps = {}
  conv = lambda x, i, s, p: F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"],
                                     stride=s, padding=p)
  x = conv(x, 0, 4, 2)
  taps["conv1"] = x
  x = F.max_pool2d(F.relu(x), 3, 2)
  x = F.max_pool2d(F.relu(conv(x, 3, 1, 2)), 3, 2)
  x = F.relu(conv(F.relu(conv(F.relu(conv(x, 6, 1, 1)), 8, 1, 1)), 10, 1, 1))
  x = F.max_pool2d(x, 3, 2)
  taps["last_conv"] = x
  x = torch.flatten(F.adaptive_avg_pool2d(x, 6), 1)
  x = F.relu(F.linear(x, sd["classifier.1.weight"], sd["classifier.1.bias"]))
  taps["fc6_act"] = x
  x = F.relu(F.linear(x, sd["classifier.4.weight"], sd["classifier.4.bias"]))
  return F.linear(x, sd["classifier.6.weight"], sd["classifier.6.bias"]), taps


# ------------------------------------------------------------------ comparison
def _close(ours, ref, what):
  ref = ref.detach().numpy()
  if ref.ndim == 4:
    ref = ref.transpose(0, 2, 3, 1)  # NCHW -> NHWC
  ours = np.asarray(ours)
  assert ours.shape == ref.shape, what
  scale = float(np.abs(ref).max())
  assert scale > 1e-3, f"{what}: degenerate reference"
  np.testing.assert_allclose(ours, ref, atol=1e-4 * scale, rtol=0, err_msg=what)


def _compare(tmp_path, arch, shapes, torch_fn, size, taps, config=None, num_classes=1000):
  sd = random_state_dict(shapes)
  path = tmp_path / f"{arch}.pth"
  torch.save(sd, path)
  variables = weights.import_torchvision(arch, weights.load_state_dict(path), config=config)
  model = models.get_model(arch, num_classes, **(config or {}))
  x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    ref_logits, ref_taps = torch_fn(sd, x)
  forward = jax.jit(lambda p, s, x: models.apply_model(model, p, s, x, taps=taps))
  logits, _, got = forward(variables["params"], variables.get("batch_stats"),
                           x.numpy().transpose(0, 2, 3, 1))
  _close(logits, ref_logits, f"{arch} logits")
  for t in taps:
    _close(got[t], ref_taps[t], f"{arch} tap {t}")
  assert surgery.count(variables["params"]) == weights.torch_param_count(
      {k: v.numpy() for k, v in sd.items()})


@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("resnet50", 64)])
def test_resnet_matches_torch(tmp_path, arch, size):
  _compare(tmp_path, arch, resnet_shapes(arch), lambda sd, x: torch_resnet(sd, x, arch), size,
           ("stem", "stage1/block0", "stage2/block0", "stage3/block1", "last_conv", "features"))


@pytest.mark.slow
def test_resnet101_matches_torch_224(tmp_path):
  _compare(tmp_path, "resnet101", resnet_shapes("resnet101"),
           lambda sd, x: torch_resnet(sd, x, "resnet101"), 224,
           ("stage3/block22", "last_conv"))


def test_vgg16_matches_torch_64px(tmp_path):
  # 64 px leaves a 2x2 last map: adaptive pooling to 7x7 with unequal cells, then fc6's
  # (C, H, W) -> (H, W, C) row permutation. Hidden widths shrunk to keep it fast.
  _compare(tmp_path, "vgg16", vgg16_shapes(hidden=64), torch_vgg16, 64,
           ("conv1_1", "conv5_3", "last_conv", "fc6_act", "features"),
           config={"dense_widths": (64, 64)})


def test_alexnet_matches_torch_128px(tmp_path):
  _compare(tmp_path, "alexnet", alexnet_shapes(hidden=64), torch_alexnet, 128,
           ("conv1", "last_conv", "fc6_act"), config={"dense_widths": (64, 64)})


@pytest.mark.slow
@pytest.mark.parametrize("arch,size", [("vgg16", 224), ("alexnet", 224)])
def test_full_size_vgg16_alexnet_match_torch(tmp_path, arch, size):
  shapes, fn = ((vgg16_shapes(), torch_vgg16) if arch == "vgg16"
                else (alexnet_shapes(), torch_alexnet))
  _compare(tmp_path, arch, shapes, fn, size, ("last_conv", "fc6_act"))


@pytest.mark.parametrize("arch", sorted(TORCHVISION_PARAMS))
def test_param_counts_match_torchvision(arch):
  shapes = (resnet_shapes(arch) if arch.startswith("resnet") else
            vgg16_shapes() if arch == "vgg16" else alexnet_shapes())
  torch_count = weights.torch_param_count({k: np.empty(s, np.float32) for k, s in shapes.items()})
  assert torch_count == TORCHVISION_PARAMS[arch]
  model = models.get_model(arch, 1000)
  abstract = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0),
                                                      (224, 224, 3)))
  assert surgery.count(abstract["params"]) == torch_count
  # The map uses every torchvision key (num_batches_tracked aside) exactly once.
  keys = [e.key for e in weights.name_map(arch, model)]
  assert len(keys) == len(set(keys))
  assert set(keys) == {k for k in shapes if not k.endswith("num_batches_tracked")}


def test_fc6_permutation_by_hand():
  # One output unit reading channel c=1 at (h, w) = (0, 1) of a (C, H, W) = (2, 2, 3) map:
  # torch index c*6 + h*3 + w = 7; ours (NHWC flatten) h*6 + w*2 + c = 3.
  from jtransfer.weights.torchvision import Entry, to_jtransfer
  w = np.zeros((1, 12), np.float32)
  w[0, 7] = 1.0
  kernel = to_jtransfer(Entry("k", "params", ("fc6", "kernel"), "dense_chw", (2, 2, 3)), w)
  assert kernel.shape == (12, 1) and kernel[3, 0] == 1.0 and kernel.sum() == 1.0


# ------------------------------------------------------------------ file formats
@pytest.fixture(scope="module")
def resnet18_sd():
  return random_state_dict(resnet_shapes("resnet18"), seed=3)


def test_formats_and_wrappers_load_the_same(tmp_path, resnet18_sd):
  from safetensors.torch import save_file
  ref = {k: v.numpy() for k, v in resnet18_sd.items()}
  torch.save(resnet18_sd, tmp_path / "a.pth")
  save_file(resnet18_sd, str(tmp_path / "a.safetensors"))
  np.savez(tmp_path / "a.npz", **ref)
  # A training checkpoint in timm's style: wrapped, DataParallel prefixes, extra plain fields.
  torch.save({"state_dict": {f"module.{k}": v for k, v in resnet18_sd.items()}, "epoch": 3,
              "arch": "resnet18"}, tmp_path / "wrapped.pt")
  torch.save({"model": resnet18_sd}, tmp_path / "model.bin")
  for name in ("a.pth", "a.safetensors", "a.npz", "wrapped.pt", "model.bin"):
    got = weights.load_state_dict(tmp_path / name)
    assert sorted(got) == sorted(ref), name
    for k in ref:
      np.testing.assert_array_equal(got[k], ref[k], err_msg=f"{name} {k}")
    assert got["conv1.weight"].dtype == np.float32
  imported = weights.import_torchvision("resnet18", got)
  np.testing.assert_array_equal(imported["params"]["stage2/block0"]["downsample"]["conv"]["kernel"],
                                ref["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(imported["batch_stats"]["stem"]["bn"]["var"],
                                ref["bn1.running_var"])


def test_half_precision_tensors_become_float32(tmp_path):
  from safetensors.torch import save_file
  t = torch.tensor([1.5, -2.25, 3.0])
  save_file({"w": t.to(torch.bfloat16)}, str(tmp_path / "b.safetensors"))
  torch.save({"w": t.to(torch.float16)}, tmp_path / "h.pth")
  for name in ("b.safetensors", "h.pth"):
    got = weights.load_state_dict(tmp_path / name)["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, t.numpy())


# ------------------------------------------------------------------ head handling
def test_head_kept_dropped_or_refused(resnet18_sd):
  sd = {k: v.numpy() for k, v in resnet18_sd.items()}
  kept = weights.import_torchvision("resnet18", sd)
  assert kept["params"]["head"]["kernel"].shape == (512, 1000)
  with pytest.raises(InputError, match=r"'fc.weight' has 1000 classes but num_classes is 10"):
    weights.import_torchvision("resnet18", sd, num_classes=10)
  dropped = weights.import_torchvision("resnet18", sd, num_classes=10, keep_head=False)
  assert "head" not in dropped["params"]
  # A fresh 10-class model takes everything but its head from the checkpoint.
  model = models.get_model("resnet18", 10)
  fresh = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0), (32, 32, 3)))
  merged = surgery.merge_params(fresh["params"], dropped["params"], dont_load=("head/.*",))
  assert merged["head"]["kernel"].shape == (512, 10)
  headless = {k: v for k, v in sd.items() if not k.startswith("fc.")}
  with pytest.raises(InputError, match="no classification layer 'fc.weight'"):
    weights.import_torchvision("resnet18", headless)
  assert "head" not in weights.import_torchvision("resnet18", headless, keep_head=False)["params"]


# ------------------------------------------------------------------ errors
def test_mismatches_are_all_listed(resnet18_sd):
  sd = {k: v.numpy() for k, v in resnet18_sd.items()}
  sd["layer1.0.conv1.weight"] = np.zeros((64, 64, 5, 5), np.float32)
  sd["layer3.1.bn2.running_var"] = np.zeros((7,), np.float32)
  del sd["layer4.1.bn1.bias"]
  sd["extra.weight"] = np.zeros((2, 3), np.float32)
  sd["layer9.0.bn1.num_batches_tracked"] = np.zeros((), np.int64)
  with pytest.raises(InputError) as e:
    weights.import_torchvision("resnet18", sd, what="my.pth")
  msg = str(e.value)
  assert "my.pth does not fit torchvision resnet18" in msg
  assert ("shape: layer1.0.conv1.weight my.pth (64, 64, 5, 5) vs model (64, 64, 3, 3) "
          "(for stage1/block0/conv1/conv/kernel)") in msg
  assert "shape: layer3.1.bn2.running_var my.pth (7,) vs model (256,)" in msg
  assert "missing in my.pth: layer4.1.bn1.bias (512,) (for stage4/block1/conv1/bn/bias)" in msg
  assert "not used by resnet18: extra.weight (2, 3)" in msg
  assert "not used by resnet18: layer9.0.bn1.num_batches_tracked" in msg
  assert msg.count("\n") == 5


def test_wrong_architecture_is_refused(resnet18_sd):
  sd = {k: v.numpy() for k, v in resnet18_sd.items()}
  with pytest.raises(InputError, match="does not fit torchvision resnet50") as e:
    weights.import_torchvision("resnet50", sd)
  # Hundreds of keys differ: the first ten are listed (mismatches first), then a count.
  msg = str(e.value)
  assert "(165 missing, 0 unused, 24 mismatched keys; was it saved from another" in msg
  lines = msg.splitlines()
  assert len(lines) == 12 and lines[-1] == "  ... and 179 more"
  assert all(line.startswith("  shape: ") for line in lines[1:11])
  with pytest.raises(InputError, match="no torchvision weight map for arch 'vgg_s'"):
    weights.import_torchvision("vgg_s", sd)


def _check_refused(path, pattern):
  with pytest.raises(InputError, match=pattern) as e:
    weights.load_state_dict(path)
  assert str(path) in str(e.value)


def test_files_that_are_not_checkpoints(tmp_path, resnet18_sd):
  (tmp_path / "random.pth").write_bytes(np.random.default_rng(0).bytes(4096))
  (tmp_path / "notes.pth").write_text("these are not weights\n" * 10)
  (tmp_path / "empty.safetensors").write_bytes(b"")
  _check_refused(tmp_path / "random.pth", "not a checkpoint")
  _check_refused(tmp_path / "notes.pth", "not a checkpoint")
  _check_refused(tmp_path / "empty.safetensors", "not a checkpoint")
  _check_refused(tmp_path / "missing.pth", "does not exist")
  torch.save(resnet18_sd, tmp_path / "full.pth")
  data = (tmp_path / "full.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
  _check_refused(tmp_path / "cut.pth", "corrupt|truncated")
  from safetensors.torch import save_file
  save_file({"w": torch.ones(1000)}, str(tmp_path / "full.safetensors"))
  data = (tmp_path / "full.safetensors").read_bytes()
  (tmp_path / "cut.safetensors").write_bytes(data[:len(data) - 100])
  _check_refused(tmp_path / "cut.safetensors", "corrupt or truncated safetensors")
  np.savez(tmp_path / "full.npz", w=np.ones(1000))
  data = (tmp_path / "full.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(data[:len(data) // 2])
  _check_refused(tmp_path / "cut.npz", "corrupt or truncated")
  torch.save([torch.ones(2)], tmp_path / "list.pth")
  _check_refused(tmp_path / "list.pth", "holds a list, not a state dict")
  torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "nosd.pth")
  _check_refused(tmp_path / "nosd.pth", "not a flat state dict")
  with zipfile.ZipFile(tmp_path / "other.pth", "w") as z:
    z.writestr("readme.txt", "hello")
  _check_refused(tmp_path / "other.pth", "neither a torch.save file nor an npz")


class _Payload:
  """Unpickling this runs a shell command."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused_without_running_code(tmp_path):
  marker = tmp_path / "MARKER"
  torch.save(_Payload(marker), tmp_path / "evil_torch.pth")
  torch.save({"state_dict": {"w": _Payload(marker)}}, tmp_path / "evil_nested.pth")
  with open(tmp_path / "evil_pickle.pth", "wb") as f:
    pickle.dump({"conv1.weight": _Payload(marker)}, f, protocol=2)
  with open(tmp_path / "evil_pickle.npz", "wb") as f:
    pickle.dump(_Payload(marker), f, protocol=2)
  np.savez(tmp_path / "objects.npz", w=np.array([_Payload(marker)], dtype=object))
  for name in ("evil_torch.pth", "evil_nested.pth", "evil_pickle.pth"):
    _check_refused(tmp_path / name, "refused for safety")
  _check_refused(tmp_path / "evil_pickle.npz", "refused for safety")
  _check_refused(tmp_path / "objects.npz", "refused for safety")
  assert not marker.exists()
  # Control: the payload is live, so the loader above really did not unpickle it.
  control = tmp_path / "CONTROL"
  pickle.loads(pickle.dumps(_Payload(control), protocol=2))
  assert control.exists() and not marker.exists()
