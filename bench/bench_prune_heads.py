"""Forward time of a transformer before and after head / MLP-unit pruning by |sigma|.

`python -m bench.bench_prune_heads` builds the model with random weights, sets the CWL scales
of the value channels of `--drop-heads` heads per block and of a random `1 - --keep-hidden`
share of every block's MLP hidden units to 0, prunes with `prune.prune_by_sigma` (tau 0.5) and
times the jitted eval forward of the unpruned model (scales folded) and of the pruned one on
the same inputs (median and min of `--runs` calls after one warm-up), with their largest
relative logit difference (0 up to float order: the removed parts contributed exactly 0).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jtransfer import models, surgery
from jtransfer.methods import cwl_linear, prune, prune_heads


def _random_params(model, shape, seed=0):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, *shape))))
  rng = np.random.default_rng(seed)
  return surgery.map_with_path(
      lambda p, a: (rng.normal(size=a.shape) / np.sqrt(max(int(np.prod(a.shape[:-1])), 1))
                    ).astype(np.float32), shapes["params"])


def _scales(params, config, drop_heads: int, keep_hidden: float, seed=0) -> dict:
  rng = np.random.default_rng(seed)
  scales = {k: np.ones(np.shape(v), np.float32)
            for k, v in cwl_linear.init_scales(params).items()}
  for block, stage in prune_heads.blocks(params):
    width = prune_heads.head_width(config, stage)
    qkv = scales[f"{block}/attn/qkv"].reshape(3, -1, width)
    qkv[2, :drop_heads] = 0.0
    scales[f"{block}/attn/qkv"] = qkv.reshape(-1)
    fc1 = scales[f"{block}/mlp/fc1"]
    fc1[rng.permutation(fc1.size)[:int(round(fc1.size * (1 - keep_hidden)))]] = 0.0
  return scales


def _time(model, params, x, runs: int) -> tuple[np.ndarray, float, float]:
  f = jax.jit(lambda p, v: models.apply_model(model, p, None, v)[0])
  y = np.asarray(f(params, x).block_until_ready())
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    f(params, x).block_until_ready()
    times.append(time.perf_counter() - t)
  return y, 1000 * float(np.median(times)), 1000 * float(np.min(times))


def main(argv=None) -> int:
  """Prints a Markdown table: params and forward ms of the unpruned and the pruned model."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--arch", default="vit_ti16")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--runs", type=int, default=15)
  p.add_argument("--drop-heads", type=int, default=1)
  p.add_argument("--keep-hidden", type=float, default=0.5)
  args = p.parse_args(argv)
  shape = (args.size, args.size, 3)
  model = models.get_model(args.arch, 10)
  config = models.model_config(model)
  params = _random_params(model, shape)
  scales = _scales(params, config, args.drop_heads, args.keep_hidden)
  result = prune.prune_by_sigma(params, {}, config, scales, 0.5)
  small = models.from_config(args.arch, result.config)
  x = np.random.default_rng(1).normal(size=(args.batch, *shape)).astype(np.float32)
  full, full_med, full_min = _time(model, cwl_linear.apply_scales(params, scales), x, args.runs)
  cut, cut_med, cut_min = _time(small, result.params, x, args.runs)
  print(f"{args.arch} at {args.size} px, batch {args.batch}, {args.runs} runs\n")
  print("| model | params | median ms | min ms |\n|---|---|---|---|")
  print(f"| unpruned | {result.params_total:,} | {full_med:.1f} | {full_min:.1f} |")
  print(f"| pruned | {result.params_kept:,} | {cut_med:.1f} | {cut_min:.1f} |")
  print(f"\nspeed-up (median) {full_med / cut_med:.2f}x; max relative logit difference "
        f"{np.abs(cut - full).max() / np.abs(full).max():.2e}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
