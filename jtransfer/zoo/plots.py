"""The selection study's figures: rho per group and scorer (the paper's Fig. 2), and rho of
C_ij(alpha) against alpha for every pair (Fig. 3), from `jtransfer.zoo.analysis`'s summary."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jtransfer.methods import selection
from jtransfer.zoo.analysis import S_METRICS, group_label, oriented_scores


def plot_spearman(summary: dict, path: str) -> None:
  """Fig. 2 analogue: rho per group, one bar per scorer (feature-map metrics on top)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sc = summary["scorers"]
  top = S_METRICS + (selection.S6_APPENDIX,)
  panels = [[n for n in sc if n in top], [n for n in sc if n not in top]]
  groups = summary["groups"]
  fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(groups)), 8))
  for ax, names in zip(axes, panels):
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
      vals = [sc[name]["per_group"][g]["spearman"] for g in groups]
      ax.bar(np.arange(len(groups)) + i * width - 0.4 + width / 2,
             [np.nan if v is None else v for v in vals], width, label=name)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(np.arange(len(groups)), groups, fontsize=7, rotation=15, ha="right")
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("Spearman rho")
    ax.legend(fontsize=7, ncol=min(6, len(names)))
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_title("Rank correlation with fine-tuned accuracy (larger score = predicted better)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_alpha_curves(records: Sequence[dict], summary: dict, path: str, step: float) -> None:
  """Fig. 3 analogue: rho of C_ij(alpha) per group (thin) and its mean (black), every pair."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  records = sorted(records, key=lambda r: (r["family"], r["target"], r["model"]))
  acc = np.array([r["test_acc"] for r in records])
  groups = [group_label(r) for r in records]
  norm = {k: v for k, v in oriented_scores(records).items() if k in S_METRICS}
  sweeps = selection.sweep_pairs(norm, acc, groups, step=step)
  fig, axes = plt.subplots(3, 5, figsize=(18, 9), sharey=True)
  for ax, ((a, b), sw) in zip(axes.ravel(), sweeps.items()):
    for g, label in enumerate(sw.groups):
      ax.plot(sw.alphas, sw.spearman[:, g], lw=0.8, alpha=0.7, label=label)
    ax.plot(sw.alphas, sw.mean, color="k", lw=2, label="mean")
    ax.axvline(sw.best_alpha, color="r", lw=0.6, ls="--")
    ax.set_title(f"(1-a)*{a} + a*{b}: best a={sw.best_alpha:.3f}, {sw.best_mean:+.2f}",
                 fontsize=8)
    ax.set_ylim(-1.05, 1.05)
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=6)
  fig.supxlabel("alpha")
  fig.supylabel("Spearman rho")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
