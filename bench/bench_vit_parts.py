"""Where the embedded ViT's step goes: each op of a vit_s28 block, forward and backward, in JAX
and in torch at the shapes the block sees (issue 30 item 6, issue 32: bench/VIT.md's JAX step is
slower than timm's; this finds the op).

  JAX_PLATFORMS=cpu python -m bench.bench_vit_parts [--model vit_s28|vit_b16] [--batch N]
      [--repeats 9] [--threads N (default: the cores)]

Ops (vit_s28: 128 images -> 50 tokens of width 96, 3 heads of 32, MLP 384), each timed as the
gradient of the sum of its output with respect to its inputs and parameters (`jax.jit(jax.grad)`
against `out.sum().backward()`), round-robin medians of wall and system CPU time
(`timed_round_robin`). --model vit_b16: ViT-B/16's block at 224 px (batch 32, 197 tokens of
768, 12 heads, MLP 3072) instead:
  * qkv, proj, fc1, fc2: the block's Dense layers on the flattened (tokens, width) matrix;
  * attention: softmax(q k^T / sqrt(d)) v over (batch, tokens, heads, head_dim), JAX's
    `jax.nn.dot_product_attention` against torch's `scaled_dot_product_attention` (timm's);
  * attention_einsum: the same product written as two einsums and a softmax in JAX, to tell
    the primitive from the arithmetic;
  * gelu (exact, erf) on the MLP's hidden activations; layernorm on the block's input;
  * block: a whole pre-norm block (`models.vit.Block` as vit_s28 builds it,
    torch timm's `Block`), so the sum of the parts can be read against the whole.
The sum of the parts x depth is not the step (the patch embedding, the head and the loss are
left out, and XLA fuses across ops in the whole block); the ratios per op say where JAX loses.
"""
from __future__ import annotations

import argparse
import os
import resource
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import command, emit, round_robin_medians

# (width, heads, MLP hidden, tokens, default batch) of each model's blocks (models/vit.py)
SHAPES = {"vit_s28": (96, 3, 384, 50, 128), "vit_b16": (768, 12, 3072, 197, 32)}


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim)) v over (batch, tokens, heads, head_dim), as two einsums
  and a softmax: the 'attention_einsum' op."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _jax_ops(model: str, batch: int, rng: np.random.Generator) -> dict:
  """{op: zero-argument call} of each op's jitted gradient in JAX."""
  from jtransfer.models import attention, vit
  dim, heads, hidden, tokens, _ = SHAPES[model]
  rows, hd = batch * tokens, dim // heads
  f32 = lambda *s: jnp.asarray(rng.normal(size=s).astype(np.float32))
  x, h = f32(rows, dim), f32(rows, hidden)
  q, k, v = (f32(batch, tokens, heads, hd) for _ in range(3))

  def dense(n_in, n_out):
    w, b, a = f32(n_in, n_out), f32(n_out), f32(rows, n_in)
    g = jax.jit(jax.grad(lambda a, w, b: jnp.sum(a @ w + b), argnums=(0, 1, 2)))
    return lambda: jax.block_until_ready(g(a, w, b))

  def grad(fn, *args):
    g = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), argnums=tuple(range(len(args)))))
    return lambda: jax.block_until_ready(g(*args))

  def module(m, inputs):
    params = m.init(jax.random.PRNGKey(0), inputs)
    g = jax.jit(jax.grad(lambda p, a: jnp.sum(m.apply(p, a)), argnums=(0, 1)))
    return lambda: jax.block_until_ready(g(params, inputs))

  return {"qkv": dense(dim, 3 * dim), "proj": dense(dim, dim), "fc1": dense(dim, hidden),
          "fc2": dense(hidden, dim),
          "attention": grad(lambda q, k, v: jax.nn.dot_product_attention(
              q, k, v, scale=hd ** -0.5), q, k, v),
          "attention_einsum": grad(einsum_attention, q, k, v),
          "gelu": grad(lambda h: jax.nn.gelu(h, approximate=False), h),
          "layernorm": module(attention.LayerNorm(1e-6), x),
          "block": module(vit.Block(heads, hidden), x.reshape(batch, tokens, dim))}


def _torch_ops(model: str, batch: int, rng: np.random.Generator, threads: int) -> dict:
  """{op: zero-argument call} of each op's forward and backward in torch (timm's modules)."""
  import torch

  from bench.bench_vit import timm_vit
  Block = timm_vit(threads).Block
  dim, heads, hidden, tokens, _ = SHAPES[model]
  rows, hd = batch * tokens, dim // heads
  t = lambda *s: torch.from_numpy(rng.normal(size=s).astype(np.float32)).requires_grad_()

  def backward(make):
    def call():
      make().sum().backward()
    return call

  def dense(n_in, n_out):
    lin, a = torch.nn.Linear(n_in, n_out), t(rows, n_in)
    return backward(lambda: lin(a))

  x, h = t(rows, dim), t(rows, hidden)
  # torch's sdpa takes (batch, heads, tokens, head_dim): timm's layout after its permute
  q, k, v = (t(batch, heads, tokens, hd) for _ in range(3))
  ln, gelu = torch.nn.LayerNorm(dim, eps=1e-6), torch.nn.GELU()
  block, xb = Block(dim, heads, mlp_ratio=hidden / dim, qkv_bias=True), t(batch, tokens, dim)
  return {"qkv": dense(dim, 3 * dim), "proj": dense(dim, dim), "fc1": dense(dim, hidden),
          "fc2": dense(hidden, dim),
          "attention": backward(lambda: torch.nn.functional.scaled_dot_product_attention(
              q, k, v)),
          "gelu": backward(lambda: gelu(h)), "layernorm": backward(lambda: ln(x)),
          "block": backward(lambda: block(xb))}


def timed_round_robin(calls: dict, repeats: int, warmup: int = 2) -> dict:
  """{key: (median wall seconds, median system CPU seconds)} of each call, timed by
  `bench.common.round_robin_medians`; the system time (this process's, all threads) is the
  kernel's share: page faults of freshly mapped buffers show there."""
  system = {k: [] for k in calls}

  def with_system(key):
    def call():
      s0 = resource.getrusage(resource.RUSAGE_SELF).ru_stime
      calls[key]()
      system[key].append(resource.getrusage(resource.RUSAGE_SELF).ru_stime - s0)
    return call

  wall = round_robin_medians({k: with_system(k) for k in calls}, repeats, warmup)
  # the warm-up calls come first: the last `repeats` are the timed ones
  return {k: (wall[k], float(np.median(system[k][-repeats:]))) for k in calls}


def measure(model: str, batch: int, repeats: int, threads: int) -> dict[str, tuple]:
  """{op: ((JAX wall, JAX system) seconds, torch's or None)}, all timed in one round-robin."""
  rng = np.random.default_rng(0)
  jax_ops, torch_ops = _jax_ops(model, batch, rng), _torch_ops(model, batch, rng, threads)
  calls = {**{("jax", k): f for k, f in jax_ops.items()},
           **{("torch", k): f for k, f in torch_ops.items()}}
  times = timed_round_robin(calls, repeats)
  return {k: (times[("jax", k)], times.get(("torch", k))) for k in jax_ops}


def report(model: str, batch: int, repeats: int, threads: int,
           argv: Optional[Sequence[str]]) -> str:
  rows = measure(model, batch, repeats, threads)
  ms = lambda s: "-" if s is None else f"{1000 * s:.2f}"
  lines = [f"# {model} block ops, forward+backward, batch {batch} "
           f"({batch * SHAPES[model][3]} tokens)", "", f"`{command('bench_vit_parts', argv)}`",
           "", "| op | JAX ms | torch ms | JAX / torch | JAX system ms | torch system ms |",
           "|---|---:|---:|---:|---:|---:|"]
  for op, ((j, js), t) in rows.items():
    ratio = "-" if t is None else f"{j / t[0]:.2f}"
    lines.append(f"| {op} | {ms(j)} | {ms(t and t[0])} | {ratio} | {ms(js)} | "
                 f"{ms(t and t[1])} |")
  return "\n".join(lines + [""])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", choices=sorted(SHAPES), default="vit_s28")
  p.add_argument("--batch", type=int, default=None, help="default: the model's (SHAPES)")
  p.add_argument("--repeats", type=int, default=9)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  batch = args.batch or SHAPES[args.model][4]
  emit(report(args.model, batch, args.repeats, args.threads, argv), args.out)
  return 0


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  raise SystemExit(main())
