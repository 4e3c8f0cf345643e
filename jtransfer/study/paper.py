"""Paper-style tables of a study's paper grid (`Study.sections`): model and dataset header rows,
one row per arm, columns k, and per `Table.compare` pair a row of paired differences over the
same k-shot draws, each arm at its best LR (picked on the test set, as the papers; labelled
optimistic), then the same tables with the LR picked per draw on validation.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np


def _cell(v: Optional[dict], mean_key: str, std_key: str) -> str:
  return f"{v[mean_key]:.3f} ({v[std_key]:.3f})" if v else "-"


def paired_delta(rows: Sequence[dict], summary: dict, arch: str, target: str, a: str, b: str,
                 k: int) -> Optional[tuple[float, float, int, int]]:
  """Mean/std over draws of acc(a) - acc(b), each at its best LR; wins of a; draws."""
  va, vb = summary.get((arch, target, a, k)), summary.get((arch, target, b, k))
  if not va or not vb:
    return None
  acc = {}
  for r in rows:
    if r.get("status", "ok") == "ok" and r["arch"] == arch and r["target"] == target \
        and r["shots"] == k:
      if (r["arm"], r["lr"]) in ((a, va["best_lr"]), (b, vb["best_lr"])):
        acc[(r["arm"], r["repeat"])] = r["test_acc"]
  reps = sorted({rep for (_, rep) in acc if (a, rep) in acc and (b, rep) in acc})
  if not reps:
    return None
  d = np.array([acc[(a, rep)] - acc[(b, rep)] for rep in reps])
  return float(d.mean()), float(d.std()), int(np.sum(d > 0)), len(reps)


def table(rows: Sequence[dict], summary: dict, plan, title: str, members: Sequence[str],
          pair: Sequence[str], mean_key: str, std_key: str, labels: Mapping[str, str]
          ) -> list[str]:
  """One paper-style table (empty when neither arm of `pair` ran)."""
  c = plan.config.cells
  members = [s for s in members if s in c.arms]
  if not any(s in c.arms for s in pair):
    return []
  out = [f"### {title}", "", "| training data / class | " + " | ".join(map(str, c.shots)) +
         " |", "|---|" + "---|" * len(c.shots)]
  blank = " |" * len(c.shots)
  for arch in c.archs:
    out.append(f"| **{arch}** |{blank}")
    for target in c.targets:
      out.append(f"| *{target}* |{blank}")
      for s in members:
        cells = [_cell(summary.get((arch, target, s, k)), mean_key, std_key) for k in c.shots]
        out.append(f"| {labels.get(s, s)} | " + " | ".join(cells) + " |")
      if mean_key == "test_mean" and all(p in c.arms for p in pair):
        cells = []
        for k in c.shots:
          d = paired_delta(rows, summary, arch, target, pair[0], pair[1], k)
          cells.append("-" if d is None else f"{d[0]:+.3f} ({d[1]:.3f}) {d[2]}/{d[3]}")
        out.append(f"| Δ {labels[pair[0]]} − {labels[pair[1]]} (wins) | " + " | ".join(cells)
                   + " |")
  return out + [""]


def sections(plan, rows: Sequence[dict], summary: dict) -> list[str]:
  """The `Study.sections` hook: the study's `Table`s with a compare pair, test-selected then
  validation-selected, and the best LR per cell."""
  labels = plan.study.labels()
  lines = []
  for heading, m, s in (("Best over LR (picked on the test set, as the paper; optimistic)",
                         "test_mean", "test_std"),
                        ("Validation-selected LR (picked per draw on its validation set)",
                         "val_sel_mean", "val_sel_std")):
    lines += [f"## {heading}", ""]
    for t in plan.study.tables:
      if t.compare:
        lines += table(rows, summary, plan, t.title, t.rows, t.compare, m, s, labels)
  lines += ["Δ rows: paired difference over the same k-shot draws, each strategy at its best "
            "LR; 'wins' = draws where CWL is better. Cells: test accuracy, mean (std).", "",
            "Best LR per cell: " + "; ".join(
                f"{a}/{t}/{s}/k={k}: {v['best_lr']:g}" for (a, t, s, k), v in sorted(
                    summary.items(), key=lambda kv: tuple(map(str, kv[0])))), ""]
  return lines
