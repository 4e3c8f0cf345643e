"""Convert a torchvision / timm checkpoint into a jtransfer source model.

  python -m experiments.convert_weights --arch resnet50 --weights resnet50.pth \
      --out sources/resnet50-imagenet [--input-shape 224,224,3] [--mean ... --std ...]
  python -m experiments.fewshot --arch resnet50 --source ckpt:sources/resnet50-imagenet \
      --target folder:/data/my_images --shots 1,5,10

Reads `.pth`/`.pt` (torch.load with weights_only=True: no arbitrary objects are unpickled),
`.safetensors` or `.npz`, maps every key to a jtransfer parameter path (see
`jtransfer.weights.torchvision`), and saves a `Source` (params, BN statistics, model config,
input shape, normalisation) with `transfer.save_source`. Every key of the checkpoint must be
used: otherwise the error lists the missing, unused and shape-mismatched keys. The default
normalisation is ImageNet's (mean 0.485,0.456,0.406, std 0.229,0.224,0.225, in [0, 1] units),
which torchvision's and most timm ResNet weights expect. The classification layer is kept
(its class count must match `--num-classes` when given) unless `--drop-head`, which gives
the source a freshly initialised head instead; few-shot strategies replace the head anyway.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

from jtransfer import models, surgery, weights
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.study import edge
from jtransfer.study.config import flag
from jtransfer.study.flags import command_config
from jtransfer.study.tables import float_list

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def parse_shape(text: str) -> tuple[int, int, int]:
  """'H,W,C' -> (H, W, C); InputError unless three positive integers with C in {1, 3}."""
  try:
    shape = tuple(int(v) for v in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1 or shape[2] not in (1, 3):
    raise InputError(f"--input-shape {text!r}: expected H,W,C with C 1 or 3, e.g. 224,224,3")
  return shape


def _check_input_shape(model, arch: str, shape: tuple[int, int, int]) -> None:
  """InputError when `shape` shrinks some feature map of `arch` to nothing."""
  try:
    taps = models.available_taps(model, shape)
    too_small = any(0 in s[1:] for s in taps.values())
  except InputError:
    raise
  except Exception:  # a negative spatial size inside a conv
    too_small = True
  if too_small:
    raise InputError(f"--input-shape {','.join(map(str, shape))} is too small for {arch} (a "
                     "feature map becomes empty); use at least 64 px (ImageNet weights were "
                     "trained at 224)")


def _fresh_head(model, input_shape: tuple[int, int, int], seed: int) -> dict:
  """The model's initial `head` params, as `init_model` would give them.

  Only the head leaves the jitted init, so XLA drops every other initialiser and the forward
  pass: 1.5 s instead of 8.5 s for ResNet-50, the same values.
  """
  x = jax.numpy.zeros((1, *input_shape))
  init = jax.jit(lambda rng: model.init(rng, x, train=False)["params"]["head"])
  return jax.tree.map(np.asarray, init(jax.random.PRNGKey(seed)))


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def convert(arch: str, weights_path: str, *, input_shape=(224, 224, 3),
            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
            num_classes: Optional[int] = None, drop_head: bool = False,
            config: Optional[dict] = None, seed: int = 0) -> transfer.Source:
  """Reads a torchvision/timm checkpoint and returns it as a jtransfer `Source`.

  Args:
    arch: one of `weights.ARCHS`.
    weights_path: a .pth/.pt, .safetensors or .npz file.
    input_shape: (H, W, C) the source will take (targets are loaded at this size).
    mean, std: per-channel normalisation in [0, 1] units, one value per channel.
    num_classes: head size; default the checkpoint's.
    drop_head: replace the checkpoint's head by a freshly initialised one (seeded).
    config: model config overrides (widths) for non-standard checkpoints.
    seed: initialisation of a dropped head.

  Raises:
    InputError: bad file, a checkpoint that does not fit `arch`, or bad shape/mean/std.
  """
  input_shape = tuple(input_shape)
  if len(mean) != input_shape[2] or len(std) != input_shape[2]:
    raise InputError(f"--mean/--std need {input_shape[2]} value(s), one per input channel; got "
                     f"{len(mean)} and {len(std)}")
  if min(std) <= 0:
    raise InputError(f"--std values must be > 0, got {list(std)}")
  state_dict = weights.torchvision.select_prefix(arch, weights.load_state_dict(weights_path))
  if arch == "inception_v3" and not dict(config or {}).get("aux_logits"):
    # torchvision's Inception-V3 checkpoints carry the auxiliary classifier (AuxLogits.*),
    # which transfer never runs: drop it unless the config keeps the aux head.
    from jtransfer.weights.torchvision_inception import drop_aux
    before = len(state_dict)
    state_dict = drop_aux(state_dict)
    if len(state_dict) < before:
      print(f"inception_v3: dropped the {before - len(state_dict)} AuxLogits.* keys (the "
            "auxiliary classifier; --config '{\"aux_logits\": true}' keeps it)")
  imported = weights.import_torchvision(arch, state_dict, num_classes, keep_head=not drop_head,
                                        config=config, what=f"checkpoint {weights_path}")
  head_key = weights.head_key(arch, config) + ".weight"
  ckpt_classes = int(state_dict[head_key].shape[0]) if head_key in state_dict else None
  model = models.get_model(arch, num_classes or ckpt_classes or 1000, **dict(config or {}))
  first_conv = weights.name_map(arch, model)[0]
  channels = state_dict[first_conv.key].shape[1]
  if channels != input_shape[2]:
    raise InputError(f"checkpoint {weights_path} takes {channels}-channel inputs "
                     f"({first_conv.key}) but --input-shape has {input_shape[2]} channel(s)")
  _check_input_shape(model, arch, input_shape)
  params = dict(imported["params"])
  if drop_head:
    params["head"] = _fresh_head(model, input_shape, seed)
  variables = {"params": params}
  if "batch_stats" in imported:
    variables["batch_stats"] = imported["batch_stats"]
  variables = jax.tree.map(np.asarray, variables)
  meta = dict(weights=os.path.abspath(weights_path), weights_sha256=_sha256(weights_path),
              checkpoint_classes=ckpt_classes, head="random init" if drop_head else "imported",
              converted_by="experiments.convert_weights")
  return transfer.Source(arch, models.model_config(model), variables, input_shape,
                         tuple(float(m) for m in mean), tuple(float(s) for s in std), meta)


def _json_object(text):
  """--config: JSON text -> a dict."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise InputError(f"--config {text!r} is not valid JSON ({e})") from None
  if not isinstance(value, dict):
    raise InputError(f"--config {text!r}: expected a JSON object")
  return value


def _floats(name: str):
  """A flag parser: a comma list of floats -> a tuple (`float_list`, naming the flag)."""
  return lambda text: tuple(float_list(text, name))


def _num_classes(text) -> int:
  """--num-classes: an int >= 1."""
  try:
    n = int(text)
  except ValueError:
    raise InputError(f"--num-classes must be an integer >= 1, got {text!r}") from None
  if n < 1:
    raise InputError(f"--num-classes must be >= 1, got {n}")
  return n


@dataclasses.dataclass(frozen=True)
class ConvertFlags:
  """convert_weights' flags, typed (`jtransfer.study.config.flag` fields)."""
  arch: Optional[str] = flag("--arch", None, "torchvision architecture", choices=weights.ARCHS,
                             required=True)
  weights: Optional[str] = flag("--weights", None, ".pth/.pt, .safetensors or .npz file",
                                required=True)
  out: Optional[str] = flag("--out", None, "directory for the source model (refused if it "
                            "holds anything)", required=True)
  overwrite: bool = flag("--overwrite", False, "move an existing --out aside (to "
                         "OUT.replaced-<UTC time>) first", action="store_true")
  input_shape: tuple = flag("--input-shape", (224, 224, 3), "H,W,C the source will take",
                            cli="224,224,3", parse=parse_shape)
  mean: tuple = flag("--mean", IMAGENET_MEAN, "per-channel mean in [0, 1] units (default "
                     "ImageNet)", cli=",".join(map(str, IMAGENET_MEAN)), parse=_floats("--mean"))
  std: tuple = flag("--std", IMAGENET_STD, "per-channel std in [0, 1] units (default "
                    "ImageNet)", cli=",".join(map(str, IMAGENET_STD)), parse=_floats("--std"))
  num_classes: Optional[int] = flag("--num-classes", None, "head size (default: the "
                                    "checkpoint's)", parse=_num_classes)
  drop_head: bool = flag("--drop-head", False, "do not import the classification layer; "
                         "initialise a new one", action="store_true")
  config: Optional[dict] = flag("--config", None, "JSON model config overrides for "
                                "non-standard widths, e.g. '{\"dense_widths\": [1024, 1024]}'",
                                parse=_json_object)
  seed: int = flag("--seed", 0, "seeds a new head")


def parse_flags(argv: Sequence[str] | None = None) -> ConvertFlags:
  """The typed flags of `main` (argparse exits 2 on a malformed flag; a bad value raises
  `InputError`)."""
  return command_config(ConvertFlags, argv, __doc__)


def main(argv: Sequence[str] | None = None) -> int:
  """Converts --weights and saves the source in --out; the exit code (2 after a bad-input
  sentence, 130 after Ctrl-C with one line)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return _main(argv)
  except KeyboardInterrupt:
    print(edge.model_interrupted_line(parse_flags, argv), file=sys.stderr, flush=True)
    return edge.INTERRUPTED


def _main(argv: list) -> int:
  t0 = time.time()
  try:
    f = parse_flags(argv)
    if os.path.abspath(f.out) == os.path.abspath(os.path.dirname(f.weights) or "."):
      raise InputError(f"--out {f.out} is the folder holding --weights: choose another --out")
    edge.open_model_dir(f.out, f.overwrite, quiet=False, check_only=True)
    source = convert(f.arch, f.weights, input_shape=f.input_shape, mean=f.mean, std=f.std,
                     num_classes=f.num_classes, drop_head=f.drop_head, config=f.config,
                     seed=f.seed)
    edge.open_model_dir(f.out, f.overwrite, quiet=False)
    transfer.save_source(f.out, source)
    transfer.load_source(f.out)  # fails loudly now rather than in the first experiment
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  n = surgery.count(source.variables["params"])
  print(f"saved {f.arch} ({n:,} params, head {source.meta['head']}, input "
        f"{','.join(map(str, source.input_shape))}) to {f.out} in {time.time() - t0:.1f} s; "
        f"use: --arch {f.arch} --source ckpt:{f.out}")
  return 0


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
