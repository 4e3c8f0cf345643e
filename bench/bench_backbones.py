"""Latency of the newer backbones, JAX against torchvision's own model on this CPU, and of a
pruned depthwise net against its MACs.

  JAX_PLATFORMS=cpu python -m bench.bench_backbones [--archs ...] [--size 224] [--batches 1,64]

1. For each arch (default: the nine of issue 19), the jitted eval forward (running BN stats)
   and torchvision's model in eval mode under `torch.inference_mode()` (random weights,
   `torch.set_num_threads(--threads)`), at `--size` px (Inception-V3 at 299), at each batch
   size: median wall time of `--repeats` calls after one warm-up, JAX and PyTorch timed
   round-robin so load changes hit both; GFLOPs per image from XLA's cost analysis.
2. MobileNetV2 at width 0.5 for 32 px inputs (stem stride 1), its channels pruned by |sigma|
   (random sigmas, tau bisected to keep ~50% of the conv feature maps; `prune.prune_by_sigma`)
   with `multiple` 1 and 8: params, MFLOPs per image and batch-64 latency, against the unpruned
   net.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import round_robin_medians
from jtransfer import models, surgery
from jtransfer.methods import cwl, prune
from jtransfer.train.evaluate import xla_flops

NEW_ARCHS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small", "efficientnet_b0",
             "densenet121", "inception_v3", "convnext_tiny", "resnext50_32x4d", "wide_resnet50_2")


def jax_forward(arch: str, size: int, batch: int):
  """(call, params count, flops per image) of the jitted eval forward at random weights."""
  model = models.get_model(arch, 1000)
  shape = (size, size, 3)
  v = models.init_model(model, jax.random.PRNGKey(0), shape)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *shape)), jnp.float32)
  f = jax.jit(lambda p, s, x: models.apply_model(model, p, s, x)[0])
  lowered = f.lower(v["params"], v.get("batch_stats", {}), x)
  compiled = lowered.compile()
  call = lambda: compiled(v["params"], v.get("batch_stats", {}), x).block_until_ready()
  return call, surgery.count(v["params"]), xla_flops(lowered) / batch


def torch_forward(arch: str, size: int, batch: int, device: str = "cpu"):
  import torch

  from bench import tv_cpu
  kwargs = dict(aux_logits=False, init_weights=False) if arch == "inception_v3" else {}
  net = getattr(tv_cpu.torchvision_models(), arch)(weights=None, **kwargs).eval().to(device)
  x = torch.randn(batch, 3, size, size, device=device)
  sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

  def call():
    with torch.inference_mode():
      net(x)
    sync()  # CUDA runs asynchronously: wait, as JAX's block_until_ready does
  return call


def _ms(seconds: float) -> str:
  ms = 1000 * seconds
  return f"{ms:.0f}" if ms >= 10 else f"{ms:.2f}"


def latency_table(archs, size: int, batches, repeats: int, torch_device: str = "cpu") -> None:
  print("| arch | px | params | GFLOPs/img | " + " | ".join(
      f"b{b} JAX ms | b{b} PyTorch ms | b{b} JAX/PyTorch" for b in batches) + " |")
  print("|---|---|---|---|" + "---|---|---|" * len(batches))
  for arch in archs:
    px = 299 if arch == "inception_v3" and size == 224 else size
    cells, params, gflops = [], 0, float("nan")
    for b in batches:
      jcall, params, flops = jax_forward(arch, px, b)
      gflops = flops / 1e9
      t = round_robin_medians({"jax": jcall, "torch": torch_forward(arch, px, b, torch_device)},
                              repeats)
      cells += [_ms(t["jax"]), _ms(t["torch"]),
                f"{t['jax'] / t['torch']:.2f}"]
    print(f"| {arch} | {px} | {params / 1e6:.2f}M | {gflops:.2f} | " + " | ".join(cells) + " |",
          flush=True)


def pruned_table(repeats: int, batch: int = 64) -> None:
  from jtransfer.models import mobilenet
  shape = (32, 32, 3)
  model = models.get_model("mobilenet_v2", 10, blocks=mobilenet.v2_blocks(0.5), stem_width=16,
                           stem_stride=1)
  config = models.model_config(model)
  v = jax.tree.map(np.asarray, models.init_model(model, jax.random.PRNGKey(0), shape))
  rng = np.random.default_rng(0)
  scales = {u: rng.uniform(0, 1, s.shape).astype(np.float32)
            for u, s in cwl.init_scales(v["params"]).items()}
  rows = [("unpruned", model, v["params"], v["batch_stats"], "-")]
  for multiple in (1, 8):
    lo, hi = 0.0, 1.0
    for _ in range(12):  # tau keeping ~50% of the conv feature maps
      tau = (lo + hi) / 2
      r = prune.prune_by_sigma(v["params"], v["batch_stats"], config, scales, tau,
                               multiple=multiple)
      kept, total = r.feature_maps_kept
      lo, hi = (tau, hi) if kept / total > 0.5 else (lo, tau)
    rows.append((f"pruned, multiple {multiple}", models.from_config("mobilenet_v2", r.config),
                 r.params, r.batch_stats, f"{kept}/{total}"))
  x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
  calls, info = {}, {}
  for name, m, p, s, maps in rows:
    f = jax.jit(lambda p, s, x, m=m: models.apply_model(m, p, s, x)[0])
    lowered = f.lower(p, s, x)
    compiled = lowered.compile()
    calls[name] = (lambda c=compiled, p=p, s=s: c(p, s, x).block_until_ready())
    info[name] = (surgery.count(p), xla_flops(lowered) / batch / 1e6, maps)
  t = round_robin_medians(calls, repeats)
  base = t["unpruned"]
  print(f"\nMobileNetV2 x0.5 at 32 px, batch {batch}, pruned by |sigma| (random sigmas):")
  print("| net | feature maps kept | params | MFLOPs/img | latency ms | x unpruned |")
  print("|---|---|---|---|---|---|")
  for name in calls:
    n, mflops, maps = info[name]
    print(f"| {name} | {maps} | {n:,} | {mflops:.2f} | {_ms(t[name])} | "
          f"{t[name] / base:.2f} |")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default=",".join(NEW_ARCHS))
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batches", default="1,64")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--skip-latency", action="store_true")
  p.add_argument("--pruned-batch", type=int, default=64)
  p.add_argument("--torch-device", default="cpu",
                 help="where PyTorch runs: 'cpu', or 'cuda' beside JAX on a GPU (cuDNN autotuned, "
                      "as XLA autotunes its convolutions)")
  args = p.parse_args(argv)
  import torch
  torch.set_num_threads(args.threads)
  if args.torch_device.startswith("cuda"):
    torch.backends.cudnn.benchmark = True
  print(f"JAX on {jax.devices()[0].device_kind} ({jax.default_backend()}, jax {jax.__version__}); "
        f"torch {torch.__version__} on {args.torch_device} with {args.threads} threads")
  if not args.skip_latency:
    latency_table([a for a in args.archs.split(",") if a], args.size,
                  [int(b) for b in args.batches.split(",")], args.repeats, args.torch_device)
  pruned_table(max(args.repeats, 10), args.pruned_batch)


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  main()
