"""Partial finetuning by depth: the last k blocks, one block chosen by validation (surgical),
and every block with a learning rate decaying with depth (layer-wise LR decay).

Depth is assigned from parameter paths (`peft_paths.blocks`): ResNets' blocks are the stem and
each `stageS/blockB`; VGG's are its conv units (`conv2_1`, ...), VGG having no residual
grouping; a transformer's are its embeddings (cls_token, pos_embed, patch_embed: one group) and
each `blockN`, its final norm training with the head (`peft_paths.depth_groups`). Blocks are
ordered as the forward runs them; the new head always trains at the run's LR. BN in the mode
asked for (as `finetune`, `jtransfer.methods.bn_rule`), Adam.

Strategies:
  * last_k (Yosinski et al. 2014, arXiv 1411.1792: which layers transfer; the "partial-k" baseline
    of He et al.'s MAE, arXiv 2111.06377, sec. 4.3): the last `k` blocks and the head train, the
    rest is frozen. Knob `k` (grid 1, 2, 3, extended within 1..6; default 1). The finetune LR
    grid, since whole blocks of source weights train (so for all three strategies).
  * surgical (Lee et al. 2023, "Surgical fine-tuning improves adaptation to distribution
    shifts", arXiv 2210.11466): one block and the head train. Knob `block`: the block's depth
    index from the input (0 = stem / first embedding), so the protocol's tuner chooses it on
    validation as Lee et al. do (grid 0, 2, 4, extended within 0..5; default 0, their choice
    for input-level shifts).
  * finetune_lrd (layer-wise LR decay, Clark et al. 2020 ELECTRA arXiv 2003.10555; BEiT, Bao et
    al. 2021 arXiv 2106.08254): every param trains; with D blocks, block i (0-based) trains at
    lr * lr_decay^(D - i), the head at lr (BEiT's layer ids: embedding 0, blocks 1..L, head
    L + 1). Knob `lr_decay` (grid 0.5, 0.65, 0.8; default 0.65, BEiT's fine-tuning value),
    one optimiser group per depth (`optim.adam(lr_mult=...)`, regex rules per block).
"""
from __future__ import annotations

from typing import Any, Mapping

from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.methods import bn_rule, peft_paths, transfer
from jtransfer.train import optim

K_GRID, K_DEFAULT = (1.0, 2.0, 3.0), 1.0
BLOCK_GRID, BLOCK_DEFAULT, BLOCK_BOUNDS = (0.0, 2.0, 4.0), 0.0, (0.0, 5.0)
LRD_GRID, LRD_DEFAULT = (0.5, 0.65, 0.8), 0.65


def model_blocks(source: transfer.Source, num_classes: int
                 ) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
  """The target model's depth groups in forward order and its tail
  (`peft_paths.depth_groups`); the head is in neither."""
  model = transfer.target_model(source, num_classes)
  shape = tuple(source.input_shape)
  return peft_paths.depth_groups(models.abstract_variables(model, shape)["params"],
                                 peft_paths.forward_order(model, shape))


def _always(tail: tuple[str, ...]) -> list[tuple[str, str]]:
  """Rules training the head and the tail (a ViT's final norm) at the run's lr."""
  return [(peft_paths.HEAD_RULE, "train")] + ([(peft_paths.group_rule(tail), "train")]
                                              if tail else [])


def _whole(value: float, name: str, low: int, high: int) -> int:
  if int(value) != value or not low <= value <= high:
    raise InputError(f"{name} must be a whole number in [{low}, {high}] (the model has "
                     f"{high + 1 if name == 'block' else high} blocks), got {value}")
  return int(value)


def build_last_k(source, num_classes, total_steps, k: float = K_DEFAULT,
                 bn_train: bool = False) -> transfer.Setup:
  """The last `k` blocks, the tail and the head train; the earlier blocks are frozen (in
  train mode their BN running statistics still move, as under PyTorch's model.train())."""
  groups, tail = model_blocks(source, num_classes)
  k = _whole(k, "k", 1, len(groups))
  rules = _always(tail) + [(peft_paths.group_rule(g), "train") for g in groups[len(groups) - k:]]
  return transfer.rule_setup(source, num_classes, rules + [(".*", optim.FROZEN)],
                             {"train": optim.adam(1.0)}, bn_train=bn_train)


def build_surgical(source, num_classes, total_steps,
                   block: float = BLOCK_DEFAULT, bn_train: bool = False) -> transfer.Setup:
  """Block number `block` (0 = nearest the input), the tail and the head train."""
  groups, tail = model_blocks(source, num_classes)
  i = _whole(block, "block", 0, len(groups) - 1)
  return transfer.rule_setup(source, num_classes,
                             _always(tail) + [(peft_paths.group_rule(groups[i]), "train"),
                                              (".*", optim.FROZEN)],
                             {"train": optim.adam(1.0)}, bn_train=bn_train)


def depth_multipliers(n_groups: int, lr_decay: float) -> list[float]:
  """lr_decay ** (D - i) for group i of D (the head and tail, depth D, keep 1)."""
  return [lr_decay ** (n_groups - i) for i in range(n_groups)]


def build_finetune_lrd(source, num_classes, total_steps,
                       lr_decay: float = LRD_DEFAULT, bn_train: bool = False) -> transfer.Setup:
  """Every param trains, group i at lr * lr_decay^(D - i), the head and tail at lr."""
  if not 0 < lr_decay <= 1:
    raise InputError(f"lr_decay must be in (0, 1], got {lr_decay}")
  groups, tail = model_blocks(source, num_classes)
  mults = depth_multipliers(len(groups), lr_decay)
  rules = [(r, "head") for r, _ in _always(tail)] + [
      (peft_paths.group_rule(g), f"depth{i}") for i, g in enumerate(groups)]
  opt_groups: Mapping[str, Any] = {"head": optim.adam(1.0), **{
      f"depth{i}": optim.adam(1.0, lr_mult=m) for i, m in enumerate(mults)}}
  return transfer.rule_setup(source, num_classes, rules, dict(opt_groups), bn_train=bn_train)


transfer.register(transfer.Strategy(
    "last_k", transfer.FINETUNE_LRS, build_last_k,
    description="last k blocks + new head trained, earlier blocks frozen, Adam",
    knobs={"k": K_GRID}, knob_defaults={"k": K_DEFAULT}, knob_bounds={"k": (1.0, 6.0)},
    bn_modes=bn_rule.BOTH))
transfer.register(transfer.Strategy(
    "surgical", transfer.FINETUNE_LRS, build_surgical,
    description="surgical finetuning: one block (chosen on validation) + new head trained, "
                "Adam",
    knobs={"block": BLOCK_GRID}, knob_defaults={"block": BLOCK_DEFAULT},
    knob_bounds={"block": BLOCK_BOUNDS}, bn_modes=bn_rule.BOTH))
transfer.register(transfer.Strategy(
    "finetune_lrd", transfer.FINETUNE_LRS, build_finetune_lrd,
    description="all layers trained, LR decaying by lr_decay per block from the head down, "
                "new head, Adam",
    knobs={"lr_decay": LRD_GRID}, knob_defaults={"lr_decay": LRD_DEFAULT},
    knob_bounds={"lr_decay": (0.05, 1.0)}, bn_modes=bn_rule.BOTH))
