"""Step cost and memory of every parameter-efficient strategy against finetune, per family.

  JAX_PLATFORMS=cpu python -m bench.bench_peft [--archs resnet_s,vgg_s,vit_s28] [--batch 128]
      [--repeats 10] [--warmup 2] [--strategies S1,S2] [--no-lora-branch] [--out bench/PEFT.md]

For each family (resnet_s, vgg_s and the embedded ViT vit_s28; random weights, 28x28x1 inputs,
10 classes) every strategy that applies to it (`experiments.peft_table.ARMS[arch]`, finetune
included) builds its real train step (its Setup's loss_fn and optimizer, `make_train_step`,
knobs at their defaults). Each step is compiled once ahead of time; the same executable gives

  * the step time: all steps of all families timed round-robin in one run
    (`bench.common.round_robin_medians`), so that load changes on a shared machine hit all
    alike; the report gives each median and its ratio to its family's finetune;
  * the step's memory: XLA's compiled memory analysis (`Compiled.memory_analysis()`): argument
    bytes (the train state: params, optimiser state, BN stats, rng; and the batch), output bytes
    (the new state and the metrics), the alias bytes among them (outputs written into the
    donated state's buffers) and temp bytes (everything else the step allocates: the
    activations kept for the backward pass, the gradients, scratch). Peak = argument + output -
    alias + temp: what the executable holds at once, on the device the bench runs on. It counts
    neither the host copies of the source nor the compiled code nor the allocator's slack;
  * `peft_cost`'s trained parameters and extra inference FLOPs per image after merging.

With lora, a row 'lora (branch step)' trains the same LoRA params through parallel branches
(two convs on a conv kernel, x A B on a dense one) instead of the merged kernels (the design
choice `methods/lora.py` explains).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from bench.common import command, emit, round_robin_medians
from experiments.peft_table import ARMS
from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.methods import lora, peft_cost, transfer
from jtransfer.train import init_state, make_train_step

ARCHS = ("resnet_s", "vgg_s", "vit_s28")
SHAPE = (28, 28, 1)
CLASSES = 10
BASELINE = "finetune"
LORA_BRANCH = "lora (branch step)"
MIB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """What one bench run measures.

  Attributes:
    archs: the families, in report order.
    batch: images per step.
    repeats: timed steps per strategy (the median is reported); 0 skips timing (memory and
      counts only).
    warmup: untimed round-robin rounds before the timed ones.
    strategies: the strategies to run on every arch, or None for each arch's arms
      (`experiments.peft_table.ARMS`); finetune is always added (the ratios' reference).
    lora_branch: add LoRA's branch-form step beside its merged one.
    model_overrides: per-arch model config overrides (e.g. narrow widths for a quick test).
  """
  archs: tuple[str, ...] = ARCHS
  batch: int = 128
  repeats: int = 10
  warmup: int = 2
  strategies: Optional[tuple[str, ...]] = None
  lora_branch: bool = True
  model_overrides: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  def arms(self, arch: str) -> tuple[str, ...]:
    """The strategies run on `arch`, finetune first, LoRA's branch row after LoRA's."""
    names = [BASELINE] + [s for s in (self.strategies or ARMS[arch]) if s != BASELINE]
    if self.lora_branch and "lora" in names:
      names.insert(names.index("lora") + 1, LORA_BRANCH)
    return tuple(names)


@dataclasses.dataclass
class Row:
  """One (arch, strategy) measurement.

  Attributes:
    arch, strategy: what ran (strategy may be `LORA_BRANCH`).
    trained_params, extra_flops: `peft_cost`'s counts.
    memory: the compiled step's `memory_analysis()` byte counts ('argument', 'output',
      'alias', 'temp'); empty when the backend reports none.
    step_s: median step time in seconds (None when not timed).
  """
  arch: str
  strategy: str
  trained_params: int
  extra_flops: int
  memory: dict[str, int]
  step_s: Optional[float] = None

  @property
  def peak_bytes(self) -> Optional[int]:
    """The step's peak (`peak_bytes`)."""
    return peak_bytes(self.memory)


def peak_bytes(memory: Mapping[str, int]) -> Optional[int]:
  """argument + output - alias + temp of `memory_bytes`: what the step's executable holds at
  once (None when the backend reports no analysis)."""
  if not memory:
    return None
  return memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]


def check(config: BenchConfig) -> None:
  """InputError for an unknown arch, a strategy that does not apply, or bad sizes."""
  unknown = [a for a in config.archs if a not in ARMS]
  if unknown or not config.archs:
    raise InputError(f"--archs takes one or more of {','.join(ARMS)}, not "
                     f"'{','.join(unknown)}'")
  for arch in config.archs:
    wrong = [s for s in config.strategies or () if s != BASELINE and s not in ARMS[arch]]
    if wrong:
      raise InputError(f"--strategies {','.join(wrong)} do not apply to {arch}; its arms are "
                       f"{','.join(ARMS[arch])}")
  if config.batch < 1 or config.repeats < 0 or config.warmup < 0:
    raise InputError("--batch must be at least 1 and --repeats, --warmup at least 0")


def source(arch: str, overrides: Mapping[str, Any] = (), seed: int = 0) -> transfer.Source:
  """A randomly initialised source of `arch` at 28x28x1 (the step's cost does not depend on
  the weights' values)."""
  model = models.get_model(arch, CLASSES, **dict(overrides))
  variables = models.init_model(model, jax.random.PRNGKey(seed), SHAPE)
  return transfer.Source(arch, models.model_config(model), jax.tree.map(np.asarray, variables),
                         SHAPE, (0.3,), (0.3,))


def memory_bytes(compiled) -> dict[str, int]:
  """The byte counts of `compiled.memory_analysis()` (empty when the backend gives none)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  return {"argument": int(stats.argument_size_in_bytes),
          "output": int(stats.output_size_in_bytes),
          "alias": int(stats.alias_size_in_bytes), "temp": int(stats.temp_size_in_bytes)}


def _prepare(arch: str, name: str, src: transfer.Source, batch: dict):
  """(Row without a time, the step's call) of one strategy on one source."""
  setup = transfer.get_strategy("lora" if name == LORA_BRANCH else name).build(src, CLASSES, 100)
  params, stats = setup.init(0, batch["image"], batch["label"])
  cost = peft_cost.peft_cost(setup, params, stats, SHAPE)
  loss_fn = (transfer.ce_loss_fn(setup.model, src.mean, src.std,
                                 apply=lora.apply_model_lora_branch)
             if name == LORA_BRANCH else setup.loss_fn)
  holder = {"state": init_state(params, stats, setup.optimizer, 0, 1e-3)}
  # One ahead-of-time compile serves the memory analysis and the timed calls alike.
  compiled = make_train_step(loss_fn, setup.optimizer).lower(holder["state"], batch).compile()

  def call():
    holder["state"], metrics = compiled(holder["state"], batch)
    jax.block_until_ready(metrics["loss"])

  return Row(arch, name, cost.trained_params, cost.extra_flops, memory_bytes(compiled)), call


def measure(config: BenchConfig, progress: Callable[[str], None] = lambda s: None) -> list[Row]:
  """Builds, compiles and (with repeats > 0) times every (arch, strategy) of `config`."""
  check(config)
  rng = np.random.default_rng(0)
  batch = jax.device_put({
      "image": rng.integers(0, 256, (config.batch, *SHAPE), dtype=np.uint8),
      "label": rng.integers(0, CLASSES, config.batch).astype(np.int32)})
  rows, calls = [], {}
  for arch in config.archs:
    src = source(arch, config.model_overrides.get(arch, {}))
    for name in config.arms(arch):
      progress(f"{arch} {name}")
      row, calls[(arch, name)] = _prepare(arch, name, src, batch)
      rows.append(row)
  if config.repeats:
    times = round_robin_medians(calls, config.repeats, warmup=config.warmup)
    for row in rows:
      row.step_s = times[(row.arch, row.strategy)]
  return rows


def _mib(n: Optional[int]) -> str:
  return "-" if n is None else f"{n / MIB:.1f}"


def _ratio(a: Optional[float], b: Optional[float]) -> str:
  return f"{a / b:.2f}" if a is not None and b else "-"


def report(config: BenchConfig, rows: Sequence[Row], cmd: str, note: str = "") -> str:
  """The markdown report: one table per family, ratios to that family's finetune."""
  device = jax.devices()[0]
  lines = [
      "# Step cost and memory of the parameter-efficient strategies, per family", "",
      f"`{cmd}`", "",
      f"On {device.platform.upper()} ({jax.device_count()} device(s)); random weights, "
      f"{SHAPE} inputs, {CLASSES} classes, batch {config.batch}, each strategy's knobs at their "
      f"defaults. Step: median of {config.repeats} train steps (forward, backward, optimiser "
      "update) per strategy, all families timed round-robin in one run; '/ finetune' is the "
      "ratio to the same family's finetune step in that run. Trained parameters and extra "
      "inference FLOPs per image after merging: `peft_cost`. Memory: XLA's compiled memory "
      "analysis of the step; temp = the buffers the step allocates beyond its inputs and "
      "outputs (activations kept for the backward pass, gradients, scratch); peak = argument "
      "(state + batch) + output (new state + metrics) - alias (outputs written into the "
      "donated state) + temp. It counts neither the compiled code nor host copies nor the "
      "allocator's slack.", ""]
  if note:
    lines += [note, ""]
  for arch in config.archs:
    mine = [r for r in rows if r.arch == arch]
    base = next(r for r in mine if r.strategy == BASELINE)
    total = base.trained_params
    lines += [f"## {arch} (finetune trains {total:,} params)", "",
              "| strategy | step ms | / finetune | trained params | extra FLOPs after merging "
              "| temp MiB | peak MiB | peak / finetune |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in mine:
      ms = "-" if r.step_s is None else f"{1000 * r.step_s:.1f}"
      lines.append(f"| {r.strategy} | {ms} | {_ratio(r.step_s, base.step_s)} | "
                   f"{r.trained_params:,} | {r.extra_flops:,} | {_mib(r.memory.get('temp'))} | "
                   f"{_mib(r.peak_bytes)} | {_ratio(r.peak_bytes, base.peak_bytes)} |")
    lines.append("")
  return "\n".join(lines)


def load_note(start: float, end: float) -> str:
  """The report's line on the machine's load (1-minute load average, at start and end)."""
  cores = os.cpu_count() or 1
  mark = "*(loaded)* " if max(start, end) > 0.5 * cores else ""
  return (f"{mark}Load average {start:.1f} at the start and {end:.1f} at the end on {cores} "
          "cores: " + ("other jobs shared the machine, so the absolute times are inflated; "
                       "compare the ratios." if mark else "an idle machine."))


def _split(text: Optional[str]) -> Optional[tuple[str, ...]]:
  return None if text is None else tuple(s for s in text.split(",") if s)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Measures every family's strategies and writes the markdown report."""
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--archs", default=",".join(ARCHS))
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--strategies", default=None,
                  help="comma-separated; default each arch's arms (experiments.peft_table)")
  ap.add_argument("--no-lora-branch", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  config = BenchConfig(archs=_split(args.archs), batch=args.batch, repeats=args.repeats,
                       warmup=args.warmup, strategies=_split(args.strategies),
                       lora_branch=not args.no_lora_branch)
  load = os.getloadavg()[0]
  try:
    rows = measure(config, progress=lambda s: print(f"compiling {s}", flush=True))
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  emit(report(config, rows, command("bench_peft", argv), load_note(load, os.getloadavg()[0]))
       + "\n", args.out)
  return 0


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  raise SystemExit(main())
