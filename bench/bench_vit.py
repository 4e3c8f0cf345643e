"""Forward+backward step time of the embedded ViT (`vit_s28`), JAX against timm, on this CPU;
with --b16, ViT-B/16's train step at 224 px in float32 and bfloat16 (issue 30 item 6).

  JAX_PLATFORMS=cpu python -m bench.bench_vit [--batch 128] [--repeats 5] [--threads N]
  JAX_PLATFORMS=cpu python -m bench.bench_vit --b16 [--b16-batch 32] [--b16-repeats 0]

The same graph on both sides: timm's `VisionTransformer(img_size=28, patch_size=4, in_chans=1,
embed_dim=96, depth=4, num_heads=3, num_classes=10)` with random weights, imported into
jtransfer's `vit_s28` (so both compute the same function). One step = the cross-entropy loss
and its gradient with respect to every parameter (no optimiser update): `jax.jit(jax.grad)`
against `loss.backward()` (gradients set to None before each call). Median wall time of
`--repeats` calls after one warm-up, timed round-robin (`bench.common.round_robin_medians`).

--b16 instead measures `vit_b16` (random weights, 224x224x3, 1000 classes) under jtransfer's
finetune train step (`make_train_step`: forward, backward, Adam update, state donated), once
with float32 compute and once with bfloat16 compute (`dtype='bfloat16'`: params and optimiser
state stay float32, `models.common.compute_dtype`). Memory is XLA's compiled memory analysis
of the step (`bench.bench_peft.memory_bytes`), read from an ahead-of-time compile of abstract
inputs, so it needs no step to run; --b16-repeats N > 0 also times N steps of each dtype in
--b16-timed (float32 by default), and of timm's same model in that dtype (forward, backward,
Adam; bfloat16 as CPU autocast), median, round-robin.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bench.bench_peft import MIB, memory_bytes, peak_bytes
from bench.common import command, emit, round_robin_medians
from jtransfer import models, weights
from jtransfer.methods import transfer
from jtransfer.train import init_state, make_train_step

B16_SHAPE = (224, 224, 3)
B16_DTYPES = ("float32", "bfloat16")


def b16_step(dtype: str, batch: int, concrete: bool, arch: str = "vit_b16",
             shape: Sequence[int] = B16_SHAPE, overrides: Optional[dict] = None):
  """(compiled finetune step of `arch` (ViT-B/16; `overrides` its config) at `dtype` compute,
  its state, its batch); state and batch are abstract shapes unless `concrete` (to time it)."""
  model = models.get_model(arch, 1000, dtype=None if dtype == "float32" else dtype,
                           **(overrides or {}))
  shape = tuple(shape)
  variables = models.init_model(model, jax.random.PRNGKey(0), shape)
  src = transfer.Source(arch, models.model_config(model), jax.tree.map(np.asarray, variables),
                        shape, (0.5,) * shape[-1], (0.5,) * shape[-1])
  setup = transfer.get_strategy("finetune").build(src, 1000, 100)
  params, stats = setup.init(0, None, None)
  rng = np.random.default_rng(0)
  data = {"image": rng.integers(0, 256, (batch, *shape), dtype=np.uint8),
          "label": rng.integers(0, 1000, batch).astype(np.int32)}
  make = lambda: init_state(params, stats, setup.optimizer, 0, 1e-4)
  state = make() if concrete else jax.eval_shape(make)
  if not concrete:
    data = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), data)
  compiled = make_train_step(setup.loss_fn, setup.optimizer).lower(state, data).compile()
  return compiled, state, data


def timm_vit(threads: int):
  """timm's `vision_transformer` module, torch at `threads` threads and seed 0 (torchvision,
  which timm imports, has its CPU op schemas declared first: `bench.tv_cpu`)."""
  import torch

  from bench import tv_cpu
  tv_cpu.torchvision_models()
  from timm.models import vision_transformer
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  return vision_transformer


# timm's ViT-B/16 (`vit_base_patch16_224`'s graph): the model the JAX rows compute.
B16_TIMM = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)


def timm_calls(batch: int, shape: Sequence[int] = B16_SHAPE, timm_args: Optional[dict] = None,
               threads: int = 2) -> tuple:
  """(timm's model, {label: call}) of timm's ViT train step on the same inputs: forward,
  cross-entropy, backward and torch's Adam (foreach) step, in float32 and under CPU bfloat16
  autocast (torch's mixed precision: matmuls in bfloat16, params, gradients and Adam state
  float32, as the JAX bfloat16 row). `timm_args`: VisionTransformer's arguments (ViT-B/16's
  by default)."""
  import torch
  tm = timm_vit(threads).VisionTransformer(in_chans=shape[-1], num_classes=1000,
                                          **(timm_args or B16_TIMM)).train()
  opt = torch.optim.Adam(tm.parameters(), lr=1e-4)
  x, y = torch.randn(batch, shape[-1], *shape[:2]), torch.randint(0, 1000, (batch,))

  def step(bf16: bool) -> None:
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      loss = torch.nn.functional.cross_entropy(tm(x), y)
    loss.backward()
    opt.step()

  return tm, {"timm float32": lambda: step(False),
              "timm bfloat16 (autocast)": lambda: step(True)}


TIMM_DTYPE = {"timm float32": "float32", "timm bfloat16 (autocast)": "bfloat16"}


def b16_measure(batch: int, repeats: int, timm_args: Optional[dict] = None,
                threads: int = 2, timed: Sequence[str] = B16_DTYPES, **step_args) -> dict:
  """{dtype: (memory_bytes of its compiled step, median step seconds or None)} for float32
  and bfloat16 compute; the `timed` dtypes' steps are timed round-robin when repeats > 0, and
  then timm's same step in those dtypes too (`timm_calls`; rows with memory None).
  `step_args` go to `b16_step` (a small arch for a test, with `timm_args` the same graph's
  timm arguments)."""
  memory, calls = {}, {}
  for dtype in B16_DTYPES:
    run = repeats > 0 and dtype in timed
    compiled, state, data = b16_step(dtype, batch, run, **step_args)
    memory[dtype] = memory_bytes(compiled)
    if run:
      holder = {"state": state}

      def call(compiled=compiled, holder=holder, data=data):
        holder["state"], metrics = compiled(holder["state"], data)
        jax.block_until_ready(metrics["loss"])

      calls[dtype] = call
  if repeats > 0:
    reference = timm_calls(batch, step_args.get("shape", B16_SHAPE), timm_args, threads)[1]
    calls.update({k: f for k, f in reference.items() if TIMM_DTYPE[k] in timed})
  times = round_robin_medians(calls, repeats) if repeats > 0 else {}
  return {**{dtype: (m, times.get(dtype)) for dtype, m in memory.items()},
          **{k: (None, t) for k, t in times.items() if k not in memory}}


def b16_report(batch: int, repeats: int, argv: Optional[Sequence[str]], **step_args) -> str:
  """The ViT-B/16 table of `b16_measure`: step time and XLA's memory of each dtype's step,
  timm's step times, and JAX / timm per dtype."""
  rows = b16_measure(batch, repeats, **step_args)
  mib = lambda n: "-" if n is None else f"{n / MIB:,.0f}"
  name = step_args.get("arch", "vit_b16")
  lines = [f"# {name} finetune train step, {tuple(step_args.get('shape', B16_SHAPE))} inputs, "
           f"batch {batch}", "",
           f"`{command('bench_vit', argv)}`", "",
           "| compute dtype | median step (ms) | images/s | argument MiB | temp MiB | "
           "peak MiB |", "|---|---:|---:|---:|---:|---:|"]
  for dtype, (m, t) in rows.items():
    m = m or {}
    lines.append(f"| {dtype} | {'-' if t is None else f'{1000 * t:.0f}'} | "
                 f"{'-' if t is None else f'{batch / t:.1f}'} | {mib(m.get('argument'))} | "
                 f"{mib(m.get('temp'))} | {mib(peak_bytes(m) if m else None)} |")
  pairs = [("float32", "timm float32"), ("bfloat16", "timm bfloat16 (autocast)")]
  ratios = [f"{d}: JAX / timm {rows[d][1] / rows[t][1]:.2f}x the time" for d, t in pairs
            if t in rows and rows[d][1] and rows[t][1]]
  return "\n".join(lines + ([""] + ["; ".join(ratios)] if ratios else []) + [""])


def main(argv=None) -> int:
  """Times both steps (or, with --b16, measures ViT-B/16's) and prints a markdown table (also
  to --out)."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  p.add_argument("--b16", action="store_true", help="ViT-B/16 at 224 px instead (see above)")
  p.add_argument("--b16-batch", type=int, default=32)
  p.add_argument("--b16-repeats", type=int, default=0, help="0: memory only")
  p.add_argument("--b16-timed", default="float32",
                 help="the dtypes whose steps --b16-repeats times (comma-separated; float32, "
                      "bfloat16): a CPU without bfloat16 matmuls (no AVX512-BF16/AMX) emulates "
                      "them, and one timm autocast step ran over 4 minutes on this machine")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.b16:
    timed = tuple(d for d in args.b16_timed.split(",") if d)
    if not set(timed) <= set(B16_DTYPES):
      print(f"error: --b16-timed {args.b16_timed!r}: expected some of {', '.join(B16_DTYPES)}",
            file=sys.stderr)
      return 2
    emit(b16_report(args.b16_batch, args.b16_repeats, argv, threads=args.threads,
                    timed=timed), args.out)
    return 0

  import torch
  tm = timm_vit(args.threads).VisionTransformer(img_size=28, patch_size=4, in_chans=1,
                                                embed_dim=96, depth=4, num_heads=3,
                                                num_classes=10).train()
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
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  raise SystemExit(main())
