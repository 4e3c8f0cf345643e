"""The Setup shared by every method that adds its own small tree of parameters beside the
frozen source (FiLM, SSF, LoRA, Conv-Adapter, Houlsby/AdaptFormer adapters).

Each of them stores its new leaves under one top-level key of the params tree, trains those
leaves and the new head with Adam (the LR injected, so one compiled step serves a grid), keeps
everything else frozen with BN in eval mode (LoRA, whose update changes the kernels, may ask
for train mode), and runs the model through its own `apply` (a reparametrisation or an
interceptor). Only the key, the initialiser, the trained-leaf rule
and the apply differ, so they are the arguments here.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from jtransfer.methods import transfer
from jtransfer.methods.peft_paths import HEAD_RULE
from jtransfer.train import optim


def added_params_setup(source: transfer.Source, num_classes: int, key: str,
                       make: Callable[[Any, int], Any], apply: Callable,
                       trained: Optional[str] = None, bn_train: bool = False) -> transfer.Setup:
  """A Setup whose params are the target's plus `{key: make(target params, seed)}`.

  Args:
    source: the pretrained source.
    num_classes: the target's class count (the new head's width).
    key: the top-level params key of the added tree.
    make: (target params with the new head, seed) -> the added tree; it reads the target
      params for shapes only.
    apply: `models.apply_model`'s signature, applying the added tree (e.g. `apply_model_lora`).
    trained: regex over paths of the added leaves that train; default every leaf under `key`.
    bn_train: BN in train mode (LoRA, whose merged update changes the kernels; the others keep
      every source kernel and so the source's statistics, `jtransfer.methods.bn_rule`).

  Returns:
    The Setup: the added leaves matching `trained` and the head trained with Adam at the
    injected LR, everything else frozen.
  """
  model = transfer.target_model(source, num_classes)

  def init(seed, images=None, labels=None):
    params, stats = transfer.init_target(source, model, seed)
    return {key: make(params, seed), **params}, stats

  params, _ = init(0)
  optimizer = optim.make_optimizer(
      params, [(trained or f"{key}/.*", "train"), (HEAD_RULE, "train"), (".*", optim.FROZEN)],
      {"train": optim.adam(1.0)}, injected_lr=True)
  return transfer.Setup(model, init, optimizer,
                        transfer.ce_loss_fn(model, source.mean, source.std, apply=apply,
                                            bn_train=bn_train),
                        transfer.eval_forward(model, source.mean, source.std, apply=apply))
