"""Train steps of the methods that are not few-shot strategies, for bench/run.py."""
from __future__ import annotations

import jax

from jtransfer import models
from jtransfer.methods import distill as distill_lib
from jtransfer.methods import sparsity, transfer
from jtransfer.train import adam, init_state, make_optimizer, make_train_step


def masked_sparse(source: transfer.Source, classes: int, data):
  """Finetune with 50% magnitude masks re-applied after every update (Sparse-TargetNet)."""
  setup = transfer.get_strategy("finetune").build(source, classes, 100)
  params, stats = setup.init(0, data["image"], data["label"])
  masks = sparsity.magnitude_masks(params, 0.5, scope="layer")
  optimizer = sparsity.with_masks(setup.optimizer, masks)
  state = init_state(sparsity.apply_masks(params, masks), stats, optimizer, 0, lr=1e-3)
  return make_train_step(setup.loss_fn, optimizer), state, data


def distill(source: transfer.Source, classes: int, data):
  """A half-width student trained with T=4, lambda=0.5 against the full-size teacher, live."""
  teacher_setup = transfer.get_strategy("finetune").build(source, classes, 100)
  t_params, t_stats = teacher_setup.init(0, data["image"], data["label"])
  teacher = distill_lib.teacher_fn(teacher_setup.forward, t_params, t_stats)
  student = distill_lib.student_model(source.arch, classes,
                                      distill_lib.compact_config(source.arch))
  v = models.init_model(student, jax.random.PRNGKey(0), source.input_shape)
  optimizer = make_optimizer(v["params"], [(".*", "all")], {"all": adam(1.0)}, injected_lr=True)
  loss_fn = distill_lib.distill_loss_fn(student, source.mean, source.std, teacher,
                                        temperature=4.0, lam=0.5)
  state = init_state(v["params"], v.get("batch_stats", {}), optimizer, 0, lr=1e-3)
  return make_train_step(loss_fn, optimizer), state, data
