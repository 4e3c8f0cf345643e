"""Source models: pretrained from scratch, converted from a checkpoint, or cached for a study.

`pretrain` trains an architecture on a dataset spec (cosine lr; SGD with momentum for the CNNs,
AdamW for the transformers: `RECIPES`, `recipe_for`); `source_for`
returns a source for a flag value, loading `ckpt:PATH` or training the spec once and caching it
under `cache_root()/sources` (a pretraining that ends at chance is retried at half the lr); the
embedded benchmark's sources (Fashion-MNIST classes {0,2,3,4,6}) are trained on first use.
`convert` reads a torchvision / timm checkpoint (`jtransfer.weights`: every key mapped to a
jtransfer parameter path; an unused, missing or mis-shaped key is an error) and returns it with
the normalisation its weights expect (ImageNet's by default). The command lines around them are
`experiments.pretrain` and `experiments.convert_weights`.
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
import optax

from jtransfer import models, surgery, weights
from jtransfer.data import Batches, augment, channel_stats, load_spec, parse_spec
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.models import attention
from jtransfer.train import (MetricsWriter, RunCheckpointer, accuracy, fit, init_state,
                             make_optimizer, make_train_step, predict_logits, schedules, sgd)

DEFAULT_SOURCE = "fmnist:0,2,3,4,6"
DEFAULT_SHAPE = (28, 28, 1)
DEFAULT_CACHE = ".cache"  # relative: the working directory's


DEFAULT_LR = 0.05  # SGD's first try in `source_for`; halved after a pretraining at chance


@dataclasses.dataclass(frozen=True)
class Recipe:
  """A pretraining optimiser: its name, first learning rate and weight decay."""
  name: str
  lr: float
  weight_decay: float


# SGD with momentum is how the CNN sources are trained (the papers' recipe). A ViT trained so
# learns far less in the same epochs (vit_s28 on the embedded source, 2 epochs at lr 0.05:
# 57.9% test accuracy against resnet_s's 84.0%), and ViTs are trained with AdamW (DeiT: lr
# 5e-4 x batch/512, weight decay 0.05, no decay on biases, norms and embeddings), so the
# transformers get AdamW, decaying only the matrices' kernels.
RECIPES = {"sgd": Recipe("sgd", DEFAULT_LR, 5e-4), "adamw": Recipe("adamw", 1e-3, 0.05)}


def recipe_for(arch: str) -> str:
  """The pretraining optimiser of `arch`: 'adamw' for a transformer, else 'sgd'."""
  return "adamw" if attention.is_config(models.model_config(models.get_model(arch, 2))) \
      else "sgd"


def recipe(name: str) -> Recipe:
  """The recipe `name` of `RECIPES`.

  Raises:
    InputError: an unknown name (one sentence naming the known ones).
  """
  if name not in RECIPES:
    raise InputError(f"unknown pretraining optimizer {name!r}; expected one of "
                     f"{', '.join(RECIPES)}")
  return RECIPES[name]


def _optimizer(name: str, lr, weight_decay: float, params):
  """The optax transform of recipe `name` at schedule `lr` (AdamW decays kernels only)."""
  if recipe(name).name == "sgd":
    return sgd(lr, momentum=0.9, weight_decay=weight_decay)
  mask = surgery.map_with_path(lambda path, _: path.endswith("kernel"), params)
  return optax.adamw(lr, weight_decay=weight_decay, mask=mask)


def pretrain(arch: str, source_spec: str = DEFAULT_SOURCE, *, epochs: float = 2.0,
             batch_size: int = 128, lr: Optional[float] = None,
             weight_decay: Optional[float] = None, optimizer: str = "sgd",
             seed: int = 0, image_shape=DEFAULT_SHAPE, max_train: int | None = None,
             progress: bool = True, log_path: str | None = None, model_config: dict | None = None,
             checkpoint_dir: str | None = None, checkpoint_every: int = 100,
             augment_recipe: str = "none") -> transfer.Source:
  """Trains `arch` from scratch on `source_spec` (cosine lr, BN in train mode).

  Args:
    arch: registered architecture.
    source_spec: dataset spec (see jtransfer.data.spec).
    epochs, batch_size, lr, weight_decay, seed: the schedule (cosine decay, 10% warm-up
      capped at 100 steps); lr and weight_decay None: the optimizer's recipe (`RECIPES`).
    optimizer: 'sgd' (momentum 0.9, coupled L2) or 'adamw' (decoupled decay on kernels).
    image_shape: (H, W, C) the model is trained at.
    max_train: cap on training images (a seeded subset), for quick sources.
    progress: progress bar on stderr.
    log_path: JSON-lines metrics file.
    model_config: config overrides (widths...) for `models.get_model`.
    checkpoint_dir: save the train state there every `checkpoint_every` steps and resume from
      the latest complete checkpoint; a resumed run ends with the same params as an
      uninterrupted one.
    checkpoint_every: steps between checkpoints.
    augment_recipe: training augmentation (`jtransfer.data.augment`), drawn from each step's
      rng: the checkpointed state carries the rng, so a resumed run sees the same crops.
  """
  chosen = recipe(optimizer)  # refused before anything is loaded
  lr = chosen.lr if lr is None else lr
  weight_decay = chosen.weight_decay if weight_decay is None else weight_decay
  check_schedule(epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
                 max_train=max_train)
  augmentation = augment.parse(augment_recipe)
  data = load_spec(source_spec, tuple(image_shape), flag="--source")
  train = data.train
  if max_train is not None and len(train) > max_train:
    keep = np.random.default_rng(seed).permutation(len(train))[:max_train]
    train = train.take(np.sort(keep))
  mean, std = channel_stats(train.images)
  model = models.get_model(arch, data.train.num_classes, **(model_config or {}))
  variables = models.init_model(model, __import__("jax").random.PRNGKey(seed), image_shape)
  batches = Batches(train.images, train.labels, batch_size, seed)
  num_steps = max(1, int(round(epochs * batches.steps_per_epoch)))
  tx = make_optimizer(variables["params"], [(".*", "all")], {
      "all": _optimizer(optimizer, schedules.cosine(lr, num_steps,
                                                     warmup_steps=min(100, num_steps // 10)),
                        weight_decay, variables["params"])})
  state = init_state(variables["params"], variables.get("batch_stats", {}), tx, seed)
  step = make_train_step(augment.wrap_loss(transfer.ce_loss_fn(model, mean, std, bn_train=True),
                                           augmentation), tx)
  t0 = time.time()
  ckpt = RunCheckpointer(checkpoint_dir, checkpoint_every) if checkpoint_dir else None
  try:
    state = fit(state, step, batches.at, num_steps, metrics=MetricsWriter(log_path),
                progress=progress, desc=f"pretrain {arch}", checkpointer=ckpt)
  finally:
    if ckpt is not None:
      ckpt.close()
  forward = transfer.eval_forward(model, mean, std)
  test_acc = accuracy(predict_logits(forward, state.params, state.batch_stats,
                                     data.test.images), data.test.labels)
  meta = dict(source_spec=source_spec, class_names=list(data.class_names), epochs=epochs,
              optimizer=optimizer, weight_decay=weight_decay,
              steps=num_steps, seed=seed, source_test_acc=test_acc,
              train_seconds=round(time.time() - t0, 1))
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return transfer.Source(arch, models.model_config(model), variables, tuple(image_shape),
                         tuple(mean), tuple(std), meta)


def check_schedule(*, epochs: float, lr: float, batch_size: int, weight_decay: float,
                   max_train: int | None) -> None:
  """Refuses a schedule that cannot train (nothing is loaded or saved before this check).

  Raises:
    InputError: epochs or lr not positive (a model trained for no steps, or away from the
      data, would be saved as if pretrained), batch size below 1, negative weight decay, or a
      training cap below 1.
  """
  for name, value in (("--epochs", epochs), ("--lr", lr)):
    if not value > 0:  # also catches NaN
      raise InputError(f"{name} must be > 0, got {value:g}: a source trained with it learns "
                       "nothing, yet would be saved as pretrained")
  if batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {batch_size}")
  if not weight_decay >= 0:
    raise InputError(f"weight decay must be >= 0, got {weight_decay:g}")
  if max_train is not None and max_train < 1:
    raise InputError(f"--max-train must be >= 1 when given, got {max_train}")


def cache_root() -> str:
  """The cache folder (sources under `sources/`, the model zoo under `zoo/`): $JTRANSFER_CACHE,
  else `DEFAULT_CACHE`. Read when a path is made, not at import, so the variable a command runs
  under (or a test sets) is the one followed and no module state holds it."""
  return os.environ.get("JTRANSFER_CACHE", DEFAULT_CACHE)


def cache_dir(arch: str, source_spec: str, epochs: float, seed: int,
              root: Optional[str] = None, optimizer: str = "sgd") -> str:
  """The cache folder of a source trained by `source_for` under `root` (None: `cache_root()`):
  a hash of what determines it (the optimizer only when not SGD, so the CNN sources cached
  before it keep their folders)."""
  what = f"{arch}|{source_spec}|{epochs}|{seed}" + ("" if optimizer == "sgd" else f"|{optimizer}")
  key = hashlib.sha1(what.encode()).hexdigest()[:10]
  return os.path.join(root or cache_root(), "sources", f"{arch}-{key}")


CHANCE_MARGIN = 0.05  # a source within this of chance accuracy has not learned
RETRIES = 3            # pretraining attempts at half the lr each, after the first


def learned(source: transfer.Source) -> bool:
  """Whether a source's test accuracy is clearly above chance (1 / number of classes)."""
  k = len(source.meta.get("class_names") or []) or None
  acc = source.meta.get("source_test_acc")
  return acc is None or k is None or acc > 1.0 / k + CHANCE_MARGIN


def source_for(arch: str, source_spec: str, *, epochs: float = 2.0, seed: int = 0,
               progress: bool = True, root: Optional[str] = None) -> transfer.Source:
  """A source model: `ckpt:PATH` loads it, a dataset spec trains it once and caches it (under
  `root`; None: `cache_root()`).

  The optimizer is the architecture's recipe (`recipe_for`: AdamW for a transformer, else
  SGD). A pretraining that ends at chance accuracy (SGD at lr 0.05 can kill every ReLU of a net
  without BN: vgg_s on fmnist:1,5,7,8,9 did) is retried at half the lr, up to `RETRIES` times,
  deterministically (same seed), and the lr that worked goes into the source's meta; a source
  that never learns, or a cached one at chance, is refused.

  Raises:
    InputError: the source does not learn, or the cached one is at chance.
  """
  if source_spec.startswith("ckpt:"):
    source = transfer.load_source(source_spec[len("ckpt:"):])
    if source.arch != arch:
      raise InputError(f"--source {source_spec} holds a {source.arch} model, not --arch {arch}")
    return source
  parse_spec(source_spec, flag="--source")
  chosen = recipe(recipe_for(arch))
  path = cache_dir(arch, source_spec, epochs, seed, root, chosen.name)
  if os.path.isdir(path):
    source = transfer.load_source(path)
    if not learned(source):
      raise InputError(f"the cached {arch} source {path} is at chance accuracy "
                       f"({source.meta['source_test_acc']:.3f}): delete it to pretrain again")
    return source
  print(f"[pretrain] no cached {arch} source for {source_spec}: training it once "
        f"({epochs} epochs, {chosen.name}), cache {path}", file=sys.stderr)
  lr = chosen.lr
  for attempt in range(RETRIES + 1):
    source = pretrain(arch, source_spec, epochs=epochs, seed=seed, progress=progress, lr=lr,
                      optimizer=chosen.name)
    source.meta["lr"] = lr
    if learned(source):
      break
    print(f"[pretrain] {arch} on {source_spec} at lr {lr:g} ended at chance accuracy "
          f"({source.meta['source_test_acc']:.3f}); retrying at lr {lr / 2:g}", file=sys.stderr)
    lr /= 2
  else:
    raise InputError(f"pretraining {arch} on {source_spec} never learned (lr {chosen.lr:g} "
                     f"down to {2 * lr:g}): pretrain it with experiments.pretrain and pass "
                     "--source ckpt:DIR")
  transfer.save_source(path, source)
  print(f"[pretrain] {arch}: source test accuracy {source.meta['source_test_acc']:.4f} in "
        f"{source.meta['train_seconds']} s", file=sys.stderr)
  return source


def study_source(arch: str, config) -> transfer.Source:
  """The source of a few-shot study's cells (`jtransfer.study.fewshot.prepare`): --source
  and --source-epochs of the study's `Config`, seeded by --seed."""
  return source_for(arch, config.source.spec, epochs=config.source.epochs,
                    seed=config.protocol.seed, progress=not config.output.quiet)


def source_input_shape(config) -> tuple[int, ...]:
  """The input shape a study's --source takes, read without loading or training it."""
  spec = config.source.spec
  if not spec.startswith("ckpt:"):
    return tuple(DEFAULT_SHAPE)
  path = os.path.join(spec[len("ckpt:"):], "meta.json")
  try:
    with open(path) as f:
      return tuple(int(v) for v in json.load(f)["input_shape"])
  except (OSError, ValueError, KeyError, TypeError):
    raise InputError(f"--source {spec}: {path} is missing or has no input_shape; "
                     "expected a model saved by experiments.pretrain or convert_weights") from None


# ----------------------------------------------------------------------------- conversion
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_input_shape(model, arch: str, shape: tuple[int, int, int]) -> None:
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


def fresh_head(model, input_shape: tuple[int, int, int], seed: int) -> dict:
  """The model's initial `head` params, as `init_model` would give them.

  Only the head leaves the jitted init, so XLA drops every other initialiser and the forward
  pass: 1.5 s instead of 8.5 s for ResNet-50, the same values.
  """
  x = jax.numpy.zeros((1, *input_shape))
  init = jax.jit(lambda rng: model.init(rng, x, train=False)["params"]["head"])
  return jax.tree.map(np.asarray, init(jax.random.PRNGKey(seed)))


def sha256(path: str) -> str:
  """The SHA-256 hex digest of a file, read in 4 MiB blocks (a source's meta names its weights)."""
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
  check_input_shape(model, arch, input_shape)
  params = dict(imported["params"])
  if drop_head:
    params["head"] = fresh_head(model, input_shape, seed)
  variables = {"params": params}
  if "batch_stats" in imported:
    variables["batch_stats"] = imported["batch_stats"]
  variables = jax.tree.map(np.asarray, variables)
  meta = dict(weights=os.path.abspath(weights_path), weights_sha256=sha256(weights_path),
              checkpoint_classes=ckpt_classes, head="random init" if drop_head else "imported",
              converted_by="experiments.convert_weights")
  return transfer.Source(arch, models.model_config(model), variables, input_shape,
                         tuple(float(m) for m in mean), tuple(float(s) for s in std), meta)
