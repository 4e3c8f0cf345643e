"""Forward+backward step time of the embedded ViT (`vit_s28`), JAX against timm, on this CPU.

  JAX_PLATFORMS=cpu python -m bench.bench_vit [--batch 128] [--repeats 5] [--threads 2]

The same graph on both sides: timm's `VisionTransformer(img_size=28, patch_size=4, in_chans=1,
embed_dim=96, depth=4, num_heads=3, num_classes=10)` with random weights, imported into
jtransfer's `vit_s28` (so both compute the same function). One step = the cross-entropy loss
and its gradient with respect to every parameter (no optimiser update): `jax.jit(jax.grad)`
against `loss.backward()` (gradients set to None before each call). Median wall time of
`--repeats` calls after one warm-up, timed round-robin (`bench.common.round_robin_medians`).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.common import command, emit, round_robin_medians
from jtransfer import models, weights


def main(argv=None) -> int:
  """Times both steps and prints a markdown table (also to --out)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)

  import torch

  from bench import tv_cpu
  tv_cpu.torchvision_models()  # timm imports torchvision
  from timm.models.vision_transformer import VisionTransformer
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  tm = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4,
                         num_heads=3, num_classes=10).train()
  sd = {k: v.detach().numpy() for k, v in tm.state_dict().items()}
  variables = weights.import_torchvision("vit_s28", sd)
  model = models.get_model("vit_s28", 10)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.batch, 28, 28, 1)).astype(np.float32)
  y = rng.integers(0, 10, args.batch)

  def loss(params, x, y):
    logits = models.apply_model(model, params, None, x, train=True)[0]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  grad = jax.jit(jax.grad(loss))
  params, xj, yj = variables["params"], jnp.asarray(x), jnp.asarray(y)
  xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y)

  def jax_step():
    jax.block_until_ready(grad(params, xj, yj))

  def torch_step():
    tm.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(tm(xt), yt).backward()

  times = round_robin_medians({"jax": jax_step, "timm": torch_step}, args.repeats)
  text = "\n".join([
      f"# vit_s28 forward+backward, batch {args.batch}", "",
      f"`{command('bench_vit', argv)}`", "",
      "| | median step (ms) | images/s |", "|---|---:|---:|",
      *(f"| {k} | {1000 * t:.1f} | {args.batch / t:.0f} |" for k, t in times.items()),
      "", f"JAX / timm: {times['jax'] / times['timm']:.2f}x the time", ""])
  emit(text, args.out)
  return 0


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  raise SystemExit(main())
