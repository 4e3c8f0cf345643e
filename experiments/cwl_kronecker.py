"""Fig. 1 and sec. III of the CWL paper: filter Gram matrices and Kronecker rank per layer.

  python -m experiments.cwl_kronecker --arch vgg_s --out results/cwl_kronecker

For a trained source model (default: the embedded vgg_s source, pretrained on first use),
writes

  * filter_gram.png: one heatmap per conv layer of the filter matrix V V^T (`--kind cosine`
    for unit-norm filters, `covariance` for np.cov), as Fig. 1 (the paper shows the first four
    layers of a CNN on MNIST: the first layer's filters are the least orthogonal);
  * kron_error.png and results.json: per layer, the relative error ||V - V_k||_F / ||V||_F of
    the best sum of k Kronecker products (`kronecker.kron_rank_report`: V (O, H*W*I) split as
    (O, H*W) x (1, I) factors, i.e. spatial map per filter x input-channel weights; with
    `--factors svd`, (O, 1) x (1, H*W*I): the plain rank-k SVD of V), and the mean |cosine|
    between distinct filters (`filter_redundancy`);
  * report.md with the table.

Claim to check: redundancy is highest in the first conv layer (few input channels).
Seconds on 2 CPU cores once the source is cached.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np

from experiments import cli, pretrain
from experiments.report import ResultsDir
from jtransfer import models, surgery
from jtransfer.data import parse_spec
from jtransfer.errors import InputError
from jtransfer.methods import kronecker

KINDS = kronecker.GRAM_KINDS


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="vgg_s", choices=models.names())
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE, help="dataset spec or ckpt:PATH")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--kind", default="gram", choices=KINDS, help="filter matrix of the heatmaps")
  p.add_argument("--layers", type=int, default=0,
                 help="heatmaps of the first N conv layers only (0 = all)")
  p.add_argument("--factors", default="spatial", choices=("spatial", "svd"),
                 help="Kronecker factor shapes: 'spatial' (O, H*W) x (1, I), or 'svd' (O, 1) x "
                      "(1, H*W*I), i.e. the plain low-rank SVD of V")
  p.add_argument("--ranks", default="", help="comma list of k (default 1, 2, 4, ..., max)")
  p.add_argument("--seed", type=int, default=0)
  cli.add_results_flags(p, "results/cwl_kronecker")
  return p.parse_args(argv)


def conv_kernels(params) -> dict[str, np.ndarray]:
  """{unit: HWIO kernel} of every conv unit, in the model's order."""
  flat = surgery.flatten(params)
  return {u: np.asarray(flat[f"{u}/conv/kernel"]) for u in surgery.conv_units(params)}


def plot_errors(report: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in report.items():
    ax.plot(r["ranks"], r["relative_error"], marker="o", ms=3, label=name)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("Kronecker rank k")
  ax.set_ylabel("relative error ||V - V_k|| / ||V||")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


@cli.interruptible("experiments.cwl_kronecker", lambda argv: parse_args(argv))
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  made_by = cli.settings("experiments.cwl_kronecker", args)
  cli.apply_devices(args)
  t0 = time.time()
  try:
    if not args.source.startswith("ckpt:"):
      parse_spec(args.source, flag="--source")
    if args.layers < 0:
      raise InputError(f"--layers must be >= 0, got {args.layers}")
    try:
      ranks = [int(v) for v in args.ranks.split(",") if v.strip()] or None
    except ValueError:
      raise InputError(f"--ranks {args.ranks!r}: expected a comma list of integers") from None
    if ranks and min(ranks) < 1:
      raise InputError(f"--ranks {args.ranks!r}: ranks must be >= 1")
    results = cli.open_results(args, made_by, parse_args)
    source = pretrain.source_for(args.arch, args.source, epochs=args.source_epochs,
                                 seed=args.seed, progress=not args.quiet)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  kernels = conv_kernels(source.variables["params"])
  shapes = None
  if args.factors == "svd":
    shapes = {n: ((k.shape[-1], 1), (1, int(np.prod(k.shape[:-1])))) for n, k in kernels.items()}
  report = kronecker.kron_rank_report(kernels, ranks, shapes)
  for name, k in kernels.items():
    report[name]["redundancy"] = kronecker.filter_redundancy(k)
  shown = dict(list(kernels.items())[:args.layers]) if args.layers else kernels
  kronecker.plot_filter_gram(shown, os.path.join(results.path, "filter_gram.png"), args.kind)
  plot_errors(report, os.path.join(results.path, "kron_error.png"))
  results.write_json("results.json", dict(arch=args.arch, source=args.source, kind=args.kind,
                                          factors=args.factors, layers=report))
  all_ranks = sorted({k for r in report.values() for k in r["ranks"]})
  lines = ["# Filter redundancy and Kronecker rank per conv layer", "",
           f"{args.arch} from `{args.source}`. Redundancy: mean |cosine| between distinct "
           "filters (0 = orthogonal). Error: relative Frobenius error of the best rank-k "
           "Kronecker approximation of the filter matrix V (O, H*W*I), factors "
           + ("(O, H*W) x (1, I)." if args.factors == "spatial" else
              "(O, 1) x (1, H*W*I) (plain SVD of V)."), "",
           "| layer | kernel | redundancy | " + " | ".join(f"k={k}" for k in all_ranks) + " |",
           "|---|---|---|" + "---|" * len(all_ranks)]
  for name, r in report.items():
    errs = dict(zip(r["ranks"], r["relative_error"]))
    lines.append(f"| {name} | {'x'.join(map(str, r['kernel_shape']))} | "
                 f"{r['redundancy']:.3f} | " + " | ".join(
                     f"{errs[k]:.3f}" if k in errs else "-" for k in all_ranks) + " |")
  text = "\n".join(lines + [""])
  results.write_text("report.md", text)
  return cli.finish(results, text, t0)


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
