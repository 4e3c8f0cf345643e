"""Fig. 1 and sec. III of the CWL paper: filter Gram matrices and Kronecker rank per layer.

  python -m experiments.cwl_kronecker --arch vgg_s --out results/cwl_kronecker

For a trained source model (default: the embedded vgg_s source, pretrained on first use),
writes

  * filter_gram.png: one heatmap per conv layer of the filter matrix V V^T (`--kind cosine`
    for unit-norm filters, `covariance` for np.cov), as Fig. 1 (the paper shows the first four
    layers of a CNN on MNIST: the first layer's filters are the least orthogonal);
  * kron_error.png and one record per conv layer (results.json, `jtransfer.study.records`:
    arm 'kronecker', cell {'layer'}): the relative error ||V - V_k||_F / ||V||_F of the best
    sum of k Kronecker products (`kronecker.kron_rank_report`: V (O, H*W*I) split as
    (O, H*W) x (1, I) factors, i.e. spatial map per filter x input-channel weights; with
    `--factors svd`, (O, 1) x (1, H*W*I): the plain rank-k SVD of V), and the mean |cosine|
    between distinct filters (`filter_redundancy`);
  * report.md with the table (regenerated from results.json by `experiments.publish`).

Claim to check: redundancy is highest in the first conv layer (few input channels).
Seconds on 2 CPU cores once the source is cached. Not a grid of draws: the study runner's
`Study.run` hook computes it (one source, no training).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from jtransfer import models, sources, study, surgery
from jtransfer.data import parse_spec
from jtransfer.errors import InputError
from jtransfer.methods import kronecker
from jtransfer.study import draws, records

KINDS = kronecker.GRAM_KINDS


def _ranks(text: str) -> tuple[int, ...]:
  try:
    ranks = tuple(int(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise InputError(f"--ranks {text!r}: expected a comma list of integers") from None
  if ranks and min(ranks) < 1:
    raise InputError(f"--ranks {text!r}: ranks must be >= 1")
  return ranks


@dataclasses.dataclass(frozen=True)
class Knobs:
  """The study's flags."""
  arch: str = study.flag("--arch", "vgg_s", "the source's architecture", choices=models.names())
  kind: str = study.flag("--kind", "gram", "filter matrix of the heatmaps", choices=KINDS)
  layers: int = study.flag("--layers", 0, "heatmaps of the first N conv layers only (0 = all)",
                           check=study.config.at_least(0, "--layers"))
  factors: str = study.flag("--factors", "spatial", "Kronecker factor shapes: 'spatial' (O, "
                            "H*W) x (1, I), or 'svd' (O, 1) x (1, H*W*I), i.e. the plain "
                            "low-rank SVD of V", choices=("spatial", "svd"))
  ranks: tuple[int, ...] = study.flag("--ranks", (), "comma list of k (default 1, 2, 4, ..., "
                                      "max)", cli="", parse=_ranks)
  seed: int = study.flag("--seed", 0, "seeds the source's pretraining")


def conv_kernels(params) -> dict[str, np.ndarray]:
  """{unit: HWIO kernel} of every conv unit, in the model's order."""
  flat = surgery.flatten(params)
  return {u: np.asarray(flat[f"{u}/conv/kernel"]) for u in surgery.conv_units(params)}


def plot_errors(report: dict, path: str) -> None:
  """Relative error against Kronecker rank, one line per layer (kron_error.png)."""
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


def run(study_, config, results) -> list[dict]:
  """The `Study.run` hook: one record per conv layer of the source, and the two plots."""
  k, o = config.extra, config.output
  source = sources.source_for(k.arch, config.source.spec, epochs=config.source.epochs,
                               seed=k.seed, progress=not o.quiet)
  kernels = conv_kernels(source.variables["params"])
  shapes = None
  if k.factors == "svd":
    shapes = {n: ((v.shape[-1], 1), (1, int(np.prod(v.shape[:-1])))) for n, v in kernels.items()}
  report = kronecker.kron_rank_report(kernels, list(k.ranks) or None, shapes)
  for name, v in kernels.items():
    report[name]["redundancy"] = kronecker.filter_redundancy(v)
  shown = dict(list(kernels.items())[:k.layers]) if k.layers else kernels
  kronecker.plot_filter_gram(shown, os.path.join(results.path, "filter_gram.png"), k.kind)
  plot_errors(report, os.path.join(results.path, "kron_error.png"))
  if results.records:  # a resumed folder: its records are these (seconds to recompute)
    return records.read(results.records, ("layer",))
  out = [records.make("kronecker", {"layer": name}, draws.Draw("eval", 0), {}, r,
                      extra={"index": i}) for i, (name, r) in enumerate(report.items())]
  results.add_many(out)
  return out


def make_report(plan, recs: list[dict], folder: str = "") -> tuple[str, dict]:
  """report.md (the table) and summary.json ({layer: redundancy}) from the records."""
  config, k = plan.config, plan.config.extra
  rows = sorted(records.read(recs, ("layer",)), key=lambda r: r["extra"]["index"])
  all_ranks = sorted({n for r in rows for n in r["outcome"]["ranks"]})
  lines = ["# Filter redundancy and Kronecker rank per conv layer", "",
           f"{k.arch} from `{config.source.spec}`. Redundancy: mean |cosine| between distinct "
           "filters (0 = orthogonal). Error: relative Frobenius error of the best rank-k "
           "Kronecker approximation of the filter matrix V (O, H*W*I), factors "
           + ("(O, H*W) x (1, I)." if k.factors == "spatial" else
              "(O, 1) x (1, H*W*I) (plain SVD of V)."), "",
           "| layer | kernel | redundancy | " + " | ".join(f"k={n}" for n in all_ranks) + " |",
           "|---|---|---|" + "---|" * len(all_ranks)]
  for r in rows:
    o = r["outcome"]
    errs = dict(zip(o["ranks"], o["relative_error"]))
    lines.append(f"| {r['cell']['layer']} | {'x'.join(map(str, o['kernel_shape']))} | "
                 f"{o['redundancy']:.3f} | " + " | ".join(
                     f"{errs[n]:.3f}" if n in errs else "-" for n in all_ranks) + " |")
  return "\n".join(lines + [""]), {r["cell"]["layer"]: r["outcome"]["redundancy"] for r in rows}


def check(config) -> None:
  """--source names a checkpoint or a valid dataset spec (before --out is opened)."""
  if not config.source.spec.startswith("ckpt:"):
    parse_spec(config.source.spec, flag="--source")


STUDY = study.Study(
    module="experiments.cwl_kronecker", title="# Filter redundancy and Kronecker rank",
    any_strategy=False, cell_fields=("layer",), extra=Knobs, groups=("source", "output"),
    hidden=frozenset({"shard"}), run=run, report=make_report, check=check,
    defaults={"out": "results/cwl_kronecker"}, doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the analysis (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
