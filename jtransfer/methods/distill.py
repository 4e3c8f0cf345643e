"""Compact transfer by joint learning (compact-cnn-transfer; docs/decisions.md, "Compact").

Stage 1 fine-tunes a large target CNN from the source (any transfer strategy). Stage 2 trains a
compact CNN, built from a narrower widths config, on the ground-truth labels jointly with the
large CNN's softened output probabilities. The paper's text stops before its loss; the loss
implemented here is Hinton et al.'s knowledge distillation, per image and averaged over the
batch:

  L = (1 - lambda) * CE(y, p_s) + lambda * T^2 * KL(p_t^T || p_s^T),
  p^T = softmax(logits / T),  p_s = p_s^1,

with T the temperature and lambda in [0, 1] the weight of the teacher term. The T^2 factor keeps
the gradient of the soft term, T * (p_s^T - p_t^T) per logit, on the scale of the hard term's
as T grows. lambda = 0 is plain cross-entropy (whatever T).

The teacher is closed over by the loss (`teacher_fn`), run in eval mode (BN running
statistics) under `stop_gradient`; the train step differentiates only the student's params,
so no teacher gradient exists. Without augmentation the teacher's logits are the same every
epoch: compute them once (`cached_teacher_logits`) and pass them in the batch as
'teacher_logits'. With augmentation (any `jtransfer.data.augment` recipe, e.g. 'pad2+flip':
zero padding, random crop, horizontal flip; applied on device inside the loss) the teacher sees
the very batch the student sees.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import models
from jtransfer.data import augment
from jtransfer.data.loader import Batches
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.train import evaluate

TEACHER_KEY = "teacher_logits"  # batch entry holding cached teacher logits

# Compact widths for the small archs: half the channels of the defaults (about 1/4 the FLOPs).
COMPACT_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet_s": {"stage_widths": [16, 32, 64], "stem_width": 16},
    "vgg_s": {"conv_widths": [[16, 16], [32, 32], [64, 64]], "dense_widths": [128, 128]},
    # Inverted-residual students for 28-64 px (28 px: 14, 7, 4 px maps), 40-100k params
    # (resnet_s: 0.7M); blocks are (kernel, stride, expand, out, se, residual, act), see
    # jtransfer.models.mobilenet.
    "mobilenet_v2": {"stem_width": 16, "top_width": 256, "dropout": 0.0, "blocks": [
        [3, 1, 0, 16, 0, 1, "relu6"], [3, 2, 64, 24, 0, 0, "relu6"],
        [3, 1, 96, 24, 0, 1, "relu6"], [3, 2, 96, 32, 0, 0, "relu6"],
        [3, 1, 128, 32, 0, 1, "relu6"]]},
    "mobilenet_v3_small": {"stem_width": 16, "top_width": 192, "hidden_width": 256,
                           "dropout": 0.0, "blocks": [
        [3, 2, 0, 16, 8, 0, "relu"], [3, 1, 64, 24, 0, 0, "relu"],
        [5, 2, 96, 32, 24, 0, "hardswish"], [5, 1, 128, 32, 32, 1, "hardswish"]]},
    "efficientnet_b0": {"stem_width": 16, "top_width": 256, "dropout": 0.0, "blocks": [
        [3, 1, 0, 16, 4, 1, "silu"], [3, 2, 64, 24, 4, 0, "silu"],
        [5, 1, 96, 24, 6, 1, "silu"], [3, 2, 96, 32, 6, 0, "silu"],
        [3, 1, 128, 32, 8, 1, "silu"]]},
}


# ----------------------------------------------------------------------------- the loss
def check_hparams(temperature: float, lam: float) -> None:
  """Raises InputError unless T > 0 and 0 <= lambda <= 1 (both finite)."""
  if not (np.isfinite(temperature) and temperature > 0):
    raise InputError(f"distillation temperature must be a finite number > 0, got {temperature}")
  if not (np.isfinite(lam) and 0.0 <= lam <= 1.0):
    raise InputError(f"distillation lambda must be in [0, 1], got {lam}")


def soft_kl(student_logits: jax.Array, teacher_logits: jax.Array,
            temperature: float) -> jax.Array:
  """Batch mean of KL(softmax(t / T) || softmax(s / T))."""
  t = teacher_logits.astype(jnp.float32) / temperature
  s = student_logits.astype(jnp.float32) / temperature
  log_pt, log_ps = jax.nn.log_softmax(t), jax.nn.log_softmax(s)
  return jnp.mean(jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1))


def distill_loss(student_logits: jax.Array, teacher_logits: Optional[jax.Array],
                 labels: jax.Array, temperature: float, lam: float
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(1 - lambda) CE(y, p_s) + lambda T^2 KL(p_t^T || p_s^T), batch means.

  Args:
    student_logits: (N, K).
    teacher_logits: (N, K), or None when lam == 0 (no teacher term).
    labels: (N,) integer classes.
    temperature: T > 0.
    lam: lambda in [0, 1].

  Returns:
    (loss, {'ce': CE, 'kd': T^2 KL}) with the unweighted terms for metrics.
  """
  check_hparams(temperature, lam)
  ce = evaluate.cross_entropy(student_logits, labels)
  if lam == 0:
    # Exactly plain CE: no teacher term in the graph at all.
    return ce, {"ce": ce}
  if teacher_logits is None:
    raise InputError("distill_loss: lambda > 0 needs teacher logits")
  if teacher_logits.shape != student_logits.shape:
    raise InputError(f"teacher logits {teacher_logits.shape} and student logits "
                     f"{student_logits.shape} differ in shape")
  kd = temperature ** 2 * soft_kl(student_logits, jax.lax.stop_gradient(teacher_logits),
                                  temperature)
  return (1.0 - lam) * ce + lam * kd, {"ce": ce, "kd": kd}


# ----------------------------------------------------------------------------- teacher
def teacher_fn(forward: Callable | nn.Module, params, batch_stats, mean=None,
               std=None) -> Callable:
  """(uint8 images) -> teacher logits under stop_gradient, variables closed over.

  Args:
    forward: (params, batch_stats, uint8 images) -> logits in eval mode, e.g. a strategy's
      `Setup.forward` (which knows e.g. CWL scales) or `transfer.eval_forward(model, mean,
      std)`; or the teacher's model itself, then run in eval mode on images normalised with
      `mean`, `std`.
    params, batch_stats: the fine-tuned teacher's variables. They are put on the device once
      and closed over: constants of whatever function calls the result, never arguments of a
      differentiated function.
    mean, std: input normalisation, only with a model as `forward`.
  """
  if isinstance(forward, nn.Module):
    if mean is None or std is None:
      raise InputError("teacher_fn with a model needs the teacher's input mean and std")
    model = forward

    def forward(p, s, images):
      return models.apply_model(model, p, s, normalize(images, mean, std))[0]

  params, batch_stats = jax.device_put(params), jax.device_put(batch_stats or {})

  def teacher(images):
    return jax.lax.stop_gradient(forward(params, batch_stats, images))

  return teacher


def cached_teacher_logits(teacher: Callable, images: np.ndarray,
                          batch_size: int = 500) -> np.ndarray:
  """The teacher's logits on a training set, once (for training without augmentation)."""
  forward = jax.jit(lambda params, stats, x: teacher(x))
  return evaluate.predict_logits(forward, None, None, images, batch_size)


def cached_batches(images: np.ndarray, labels: np.ndarray, logits: np.ndarray,
                   batch_size: int, seed: int) -> Callable[[int], dict]:
  """`at(step)` like `Batches(images, labels, batch_size, seed).at` (same order), plus the
  cached 'teacher_logits' of the batch's images."""
  if not len(images) == len(labels) == len(logits):
    raise InputError(f"cached_batches: {len(images)} images, {len(labels)} labels and "
                     f"{len(logits)} teacher logits differ in number")
  index = Batches(np.arange(len(labels)), labels, batch_size, seed)

  def at(step: int) -> dict:
    idx = index.at(step)["image"]
    return {"image": images[idx], "label": labels[idx], TEACHER_KEY: logits[idx]}

  return at


# ----------------------------------------------------------------------------- student
def compact_config(arch: str, overrides: Optional[Mapping[str, Any]] = None) -> dict:
  """The compact widths config of `arch` (COMPACT_CONFIGS), updated by `overrides`."""
  if overrides is None and arch not in COMPACT_CONFIGS:
    raise InputError(f"no default compact config for arch {arch!r}; pass widths for it "
                     f"(defaults exist for {', '.join(COMPACT_CONFIGS)})")
  return {**COMPACT_CONFIGS.get(arch, {}), **dict(overrides or {})}


def student_model(arch: str, num_classes: int, config: Mapping[str, Any]) -> nn.Module:
  """The compact target model: `config` widths, a `num_classes` head on the conv features.

  Hidden dense layers are dropped, as `transfer.target_model` does for the teacher, so a
  student fine-tuned from a compact source and one trained from scratch are the same net.
  """
  config = {k: v for k, v in config.items() if k != "num_classes"}
  model = models.get_model(arch, num_classes, **config)
  if getattr(model, "dense_widths", None):
    model = models.get_model(arch, num_classes, **{**config, "dense_widths": []})
  return model


def distill_loss_fn(student: nn.Module, mean, std, teacher: Optional[Callable] = None, *,
                    temperature: float = 4.0, lam: float = 0.5,
                    recipe: augment.Recipe | str = "none", bn_train: bool = False) -> Callable:
  """loss_fn for the generic train step: the student's distillation loss (`distill_loss`).

  Args:
    student: the compact model; `params` of the returned loss_fn are its params only.
    mean, std: the student's input normalisation.
    teacher: `teacher_fn(...)` of the fine-tuned large model (closed over, never
      differentiated), or None when batches carry cached 'teacher_logits' or lam == 0.
    temperature, lam: T and lambda of the loss.
    recipe: training augmentation (`jtransfer.data.augment`, a Recipe or its text, e.g.
      'pad2+flip'), applied once to the batch that both teacher and student then see; with
      lam > 0 it needs `teacher` (cached logits would not match the augmented images).
    bn_train: BN with batch statistics (and running-stat updates) in the student, as a
      student trained from scratch needs; False keeps BN in eval mode.
  """
  check_hparams(temperature, lam)
  recipe = augment.parse(recipe) if isinstance(recipe, str) else recipe
  if recipe.active and lam > 0 and teacher is None:
    raise InputError(f"distillation with augmentation {recipe} needs a teacher function: "
                     f"cached '{TEACHER_KEY}' would not match the augmented images")

  def loss_fn(params, batch_stats, batch, rng):
    images = batch["image"]
    teacher_logits = None
    if lam > 0:
      if recipe.active or TEACHER_KEY not in batch:
        if teacher is None:
          raise InputError("distillation with lambda > 0 needs a teacher function, or cached "
                           f"'{TEACHER_KEY}' in the batch")
        teacher_logits = teacher(images)
      else:
        teacher_logits = batch[TEACHER_KEY]
    logits, new_stats, _ = models.apply_model(student, params, batch_stats,
                                              normalize(images, mean, std), train=bn_train,
                                              rng=rng)
    loss, terms = distill_loss(logits, teacher_logits, batch["label"], temperature, lam)
    return loss, (terms, new_stats if bn_train else batch_stats)

  # The augmentation wraps the whole loss, so the teacher's images are the student's.
  return augment.wrap_loss(loss_fn, recipe)
