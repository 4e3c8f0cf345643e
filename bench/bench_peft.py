"""Train-step time of the parameter-efficient strategies against finetune, in one run.

  JAX_PLATFORMS=cpu python -m bench.bench_peft [--batch 128] [--repeats 10] [--out bench/PEFT.md]

Each strategy's real train step (its Setup's loss_fn and optimizer, `make_train_step`) on
resnet_s (random weights, 28x28x1 inputs, 10 classes) at `--batch`; steps timed round-robin
(`bench.common.round_robin_medians`) so that load changes on a shared machine hit all alike;
the report gives each median and its ratio to finetune's in the same run, with
`peft_cost`'s trained parameters and extra inference FLOPs after merging. With lora, a row
'lora (two-conv branch step)' trains the same LoRA params through two-conv branches instead of
the merged kernels (the design choice `methods/lora.py` explains).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import jax
import numpy as np

from bench.common import command, emit, round_robin_medians
from jtransfer import models, surgery
from jtransfer.methods import lora, peft_cost, transfer
from jtransfer.train import init_state, make_train_step

STRATEGIES = ("finetune", "freeze_cwl", "bitfit", "lora", "ssf", "norm_tune", "last_k",
              "surgical", "finetune_lrd", "conv_adapter")
SHAPE = (28, 28, 1)
LORA_BRANCH = "lora (two-conv branch step)"


def _source(seed: int = 0) -> transfer.Source:
  model = models.get_model("resnet_s", 10)
  variables = models.init_model(model, jax.random.PRNGKey(seed), SHAPE)
  return transfer.Source("resnet_s", models.model_config(model),
                         jax.tree.map(np.asarray, variables), SHAPE, (0.3,), (0.3,))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Times every strategy's train step and writes the markdown report."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--strategies", default=",".join(STRATEGIES))
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  source = _source()
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (args.batch, *SHAPE), dtype=np.uint8),
           "label": rng.integers(0, 10, args.batch).astype(np.int32)}
  calls, costs, states = {}, {}, {}
  names = args.strategies.split(",")
  if "lora" in names:  # LoRA's step through two-conv branches, against the merged kernels
    names.insert(names.index("lora") + 1, LORA_BRANCH)
  for name in names:
    setup = transfer.get_strategy("lora" if name == LORA_BRANCH else name).build(source, 10, 100)
    params, stats = setup.init(0, batch["image"], batch["label"])
    costs[name] = peft_cost.peft_cost(setup, params, stats, SHAPE)
    loss_fn = (transfer.ce_loss_fn(setup.model, source.mean, source.std,
                                   apply=lora.apply_model_lora_branch)
               if name == LORA_BRANCH else setup.loss_fn)
    step = make_train_step(loss_fn, setup.optimizer)
    states[name] = init_state(params, stats, setup.optimizer, 0, 1e-3)

    def call(name=name, step=step):
      states[name], metrics = step(states[name], batch)
      jax.block_until_ready(metrics["loss"])

    calls[name] = call
  times = round_robin_medians(calls, args.repeats, warmup=2)
  base = times.get("finetune")
  total = surgery.count(source.variables["params"])
  lines = [
      "# Train-step time of the parameter-efficient strategies (resnet_s)", "",
      f"`{command('bench_peft', argv)}` on {jax.devices()[0].platform.upper()} "
      f"({jax.device_count()} device(s)); resnet_s, random weights, {SHAPE} inputs, 10 classes, "
      f"batch {args.batch}; median of {args.repeats} steps per strategy, timed round-robin in "
      "one run (the machine is shared: compare the ratios, not the absolute times). Trained "
      f"parameters and extra inference FLOPs per image after merging from `peft_cost` "
      f"(source backbone: {total:,} params).", "",
      "| strategy | step ms | / finetune | trained params | extra FLOPs after merging |",
      "|---|---|---|---|---|"]
  for name, t in times.items():
    ratio = f"{t / base:.2f}" if base else "-"
    lines.append(f"| {name} | {1000 * t:.1f} | {ratio} | {costs[name].trained_params:,} | "
                 f"{costs[name].extra_flops:,} |")
  emit("\n".join(lines) + "\n", args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
