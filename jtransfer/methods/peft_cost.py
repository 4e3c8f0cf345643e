"""What a transfer run costs: trained parameters, and inference FLOPs added after merging.

`peft_cost(setup, params, input_shape)` works for every strategy from its Setup alone:

  * trained parameters: the entries of the leaves the optimiser trains (`optimizer.trainable`),
    the new head included;
  * extra inference FLOPs: the reparametrisations that fold exactly into the source's weights
    (CWL, FiLM, LoRA, SSF: `FOLDS`) are folded first. When nothing else is left beside the target
    model's own params, the deployed model IS the target model (the source architecture with
    its new head): 0 extra FLOPs by construction (freeze, finetune, bitfit, norm tuning, partial
    tuning, CWL, FiLM, LoRA, SSF). Otherwise (Conv-Adapter, the transformer adapters, VPT)
    the extra FLOPs are XLA's cost analysis of the strategy's eval forward minus that of the
    plain target model, at batch 1. VPT folds into nothing: its P prompt tokens run through
    every block at inference, so it adds FLOPs, shallow and deep alike (`vpt.extra_flops`
    gives their matrix-product part by hand; tests/test_vpt.py compares the two).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jtransfer import models, surgery
from jtransfer.methods import cwl, film, lora, ssf, transfer

# Top-level key -> fold into the model's own params (each the identity when its key is absent).
FOLDS = {cwl.CWL_KEY: cwl.effective_params, film.FILM_KEY: film.effective_params,
         lora.LORA_KEY: lora.effective_params, ssf.SSF_KEY: ssf.effective_params}


@dataclasses.dataclass(frozen=True)
class PeftCost:
  """Attributes:
    trained_params: scalar entries the optimiser updates (head included).
    extra_flops: inference FLOPs per image beyond the target model, after merging.
  """
  trained_params: int
  extra_flops: int


def trained_params(setup: transfer.Setup, params: Mapping[str, Any]) -> int:
  """Entries of the leaves `setup.optimizer` trains."""
  trained, _ = surgery.split(params, setup.optimizer.trainable)
  return surgery.count(trained)


def deploy(params: Mapping[str, Any]) -> dict:
  """The params with every foldable reparametrisation (`FOLDS`) folded in."""
  out = dict(params)
  for key, fold in FOLDS.items():
    if key in out:
      out = fold(out)
  return out


def xla_flops(fn, *args) -> float:
  """XLA's FLOP count of the jitted `fn` at `args` (its compiled cost analysis)."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  cost = jitted.lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returns one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def peft_cost(setup: transfer.Setup, params: Mapping[str, Any], batch_stats: Any,
              input_shape: Sequence[int]) -> PeftCost:
  """(trained parameters, extra inference FLOPs per image after merging) of a strategy.

  Args:
    setup: the strategy's Setup.
    params, batch_stats: the run's variables (e.g. `setup.init(0, ...)`; trained ones give the
      same counts).
    input_shape: (H, W, C) of the model's input.
  """
  model_keys = set(models.abstract_variables(setup.model, tuple(input_shape))["params"])
  deployed = deploy(params)
  extras = set(deployed) - model_keys
  if not extras:
    return PeftCost(trained_params(setup, params), 0)
  images = np.zeros((1, *input_shape), np.uint8)
  plain = transfer.eval_forward(setup.model, (0.0,), (1.0,))
  base = {k: v for k, v in deployed.items() if k in model_keys}
  extra = xla_flops(setup.forward, deployed, batch_stats, images) - xla_flops(
      plain, base, batch_stats, images)
  return PeftCost(trained_params(setup, params), int(round(extra)))
