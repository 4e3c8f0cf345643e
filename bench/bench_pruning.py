"""Does pruning pay? Forward latency of channel- and neuron-pruned models vs the unpruned ones.

  python -m bench.bench_pruning [--keep 0.75,0.7,0.5] [--shape 28,28,1] [--runs 30]

Channel pruning goes through the library's own structural pruning (`prune.prune_channels`,
what `prune_by_sigma` calls after thresholding |sigma|): each conv unit keeps the first
ceil(keep x C) of its C output channels (residual-coupled ResNet channels as one group), so
the result is a real smaller model built from its widths config by the same model code.
Keeping a fraction f of every layer's channels leaves about f^2 of the conv MACs: f = 0.7 is
the "50% fewer MACs" point. Rows "x8" round every kept count up to a multiple of 8
(`prune_by_sigma(..., multiple=8)`): odd widths (23, 45, 90 channels) run slower than the
rounded-up wider ones, so rounding is what makes a pruned model pay. Neuron pruning (Sparse-TargetNet's second stage) slices vgg_s's
fc6/fc7 the same way (`dense_widths`). MACs are XLA's FLOP count of the forward / 2; latency is
the median wall time of the jitted eval forward after warm-up, at batch 1 and 128.
Writes a markdown table to stdout and to --out (default bench/PRUNING.md).
"""
from __future__ import annotations

import argparse
import math
import platform

import jax
import numpy as np

from bench.common import command, emit
from jtransfer import models, surgery
from jtransfer.methods import prune
from jtransfer.train.evaluate import median_latency_ms, xla_flops


def _forward(model):
  @jax.jit
  def forward(params, stats, x):
    return models.apply_model(model, params, stats, x)[0]
  return forward


def latency_ms(model, params, stats, x, runs: int) -> float:
  """Median wall time of the jitted forward, after 3 warm-up calls."""
  return median_latency_ms(_forward(model), *jax.device_put((params, stats, x)), runs=runs,
                           warmup=3)


def macs(model, params, stats, x) -> float:
  return xla_flops(_forward(model).lower(params, stats, x)) / 2


def channel_pruned(arch: str, model, variables, keep_frac: float, multiple: int):
  """(model, params, stats) pruned by `prune_by_sigma` with synthetic CWL scales.

  Every unit's first ceil(f C) channels get |sigma| near 1 (decreasing), the rest near 0.01,
  and tau = 0.5, so each unit keeps those channels, then rounds up to `multiple`.
  """
  params, stats = variables["params"], variables.get("batch_stats", {})
  flat = surgery.flatten(params)
  scales = {}
  for unit in surgery.conv_units(params):
    c = flat[f"{unit}/conv/kernel"].shape[-1]
    sigma = np.full(c, 0.01, np.float32) - np.arange(c) * 1e-5
    kept = max(1, math.ceil(keep_frac * c))
    sigma[:kept] = 1.0 - np.arange(kept) * 1e-4
    scales[unit] = sigma
  res = prune.prune_by_sigma(params, stats, models.model_config(model), scales, tau=0.5,
                             multiple=multiple)
  return models.from_config(arch, res.config), res.params, res.batch_stats


def neuron_pruned(model, variables, keep_frac: float):
  """vgg_s with fc6/fc7 cut to ceil(f x width) neurons (the sliced model's shapes)."""
  config = models.model_config(model)
  config["dense_widths"] = tuple(max(1, math.ceil(keep_frac * w)) for w in config["dense_widths"])
  small = models.from_config("vgg_s", config)
  v = models.init_model(small, jax.random.PRNGKey(1), variables["shape"])
  return small, v["params"], v.get("batch_stats", {})


def run(keeps, shape, runs, batches, archs, passes: int = 2) -> list[dict]:
  rows = []
  for arch in archs:
    model = models.get_model(arch, num_classes=10)
    v = dict(models.init_model(model, jax.random.PRNGKey(0), shape))
    variants = [("unpruned", 1.0, model, v["params"], v.get("batch_stats", {}))]
    for multiple in (1, 8):
      for f in keeps:
        variants.append((f"channels, x{multiple}", f, *channel_pruned(arch, model, v, f,
                                                                       multiple)))
    if arch == "vgg_s":
      v["shape"] = shape
      for f in keeps:
        variants.append(("fc neurons", f, *neuron_pruned(model, v, f)))
    base = {}
    timed = {}
    for _ in range(passes):  # the first model timed in a process runs slow (thread pool and
      for i, (kind, f, m, p, s) in enumerate(variants):  # allocator warm-up): keep the best
        for b in batches:
          ms = latency_ms(m, p, s, np.zeros((b, *shape), np.float32), runs)
          timed[(i, b)] = min(ms, timed.get((i, b), np.inf))
    for i, (kind, f, m, p, s) in enumerate(variants):
      row = {"arch": arch, "pruning": kind, "keep": f}
      x128 = np.zeros((128, *shape), np.float32)
      row["macs"] = macs(m, p, s, x128) / 128
      for b in batches:
        row[f"ms_b{b}"] = timed[(i, b)]
      if kind == "unpruned":
        base = row
      row["mac_ratio"] = row["macs"] / base["macs"]
      for b in batches:
        row[f"speedup_b{b}"] = base[f"ms_b{b}"] / row[f"ms_b{b}"]
      rows.append(row)
  return rows


def table(rows, batches) -> str:
  head = ["arch", "pruning", "keep / layer", "MMACs/img", "MACs kept"]
  for b in batches:
    head += [f"ms b={b}", f"speed-up b={b}"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["arch"], r["pruning"], f"{r['keep']:.2f}", f"{r['macs'] / 1e6:.2f}",
             f"{100 * r['mac_ratio']:.0f}%"]
    for b in batches:
      cells += [f"{r[f'ms_b{b}']:.3f}", f"{r[f'speedup_b{b}']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--keep", default="0.7,0.6,0.5")
  p.add_argument("--shape", default="28,28,1")
  p.add_argument("--runs", type=int, default=30)
  p.add_argument("--passes", type=int, default=2, help="time every model this many times, "
                 "interleaved; the best median counts")
  p.add_argument("--batches", default="1,128")
  p.add_argument("--archs", default="vgg_s,resnet_s")
  p.add_argument("--out", default="bench/PRUNING.md")
  args = p.parse_args(argv)
  keeps = [float(k) for k in args.keep.split(",")]
  shape = tuple(int(s) for s in args.shape.split(","))
  batches = [int(b) for b in args.batches.split(",")]
  rows = run(keeps, shape, args.runs, batches, args.archs.split(","), args.passes)
  text = (f"# Pruned-model forward latency\n\nCommand: `{command('bench_pruning', argv)}`; "
          f"{platform.processor() or platform.machine()}, "
          f"{jax.device_count()} {jax.default_backend()} device(s), jax {jax.__version__}; input "
          f"{shape}; best of {args.passes} interleaved medians of {args.runs} runs.\n\n"
          + table(rows, batches) + "\n")
  emit(text, args.out)
  return 0


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  raise SystemExit(main())
