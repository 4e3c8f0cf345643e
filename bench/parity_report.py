"""bench/parity.py's report: the same-net check, the parity table, the rounding control with
each cell's verdict, and the resnet_s stem study, from the run records alone."""
from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np

from bench.common import command
from bench.parity_runs import ParityConfig, Records, controlled

MARGIN_FLOOR = 0.005  # the equivalence margin's floor, accuracy (0.5 pt)


def _pct(v: float) -> str:
  return f"{100 * v:.1f}"


def _cell(records: Records, arch, stem, spec, name, n) -> list:
  return [records.get(("run", arch, stem, spec, name, i)) for i in range(n)]


EQUAL, DIFFERENT = "equal within rounding", "different"


def within(pr, margin: float) -> Optional[bool]:
  """Whether a paired interval lies within +-margin (ends included); None without an interval
  (fewer than 2 draws)."""
  if pr.n < 2 or math.isnan(pr.lo):
    return None
  eps = 1e-12  # accuracies are k/n: a bound equal to the margin is inside
  return -margin - eps <= pr.lo and pr.hi <= margin + eps


def control_row(arch: str, spec: str, name: str, runs: list, revs: Optional[list],
                floor: float = MARGIN_FLOOR) -> tuple:
  """One row of the rounding-control table and the cell's verdict.

  Args:
    runs: the cell's parity records (`jax`, `torch` accuracies), draw by draw.
    revs: the same draws' rounding-control records (`torch_rev`; None where a draw has none),
      or None for a cell without a control.
    floor: the smallest equivalence margin (accuracy, 0.005 = 0.5 pt).

  Returns:
    (markdown row, verdict: EQUAL, DIFFERENT or None without an interval).
  """
  from jtransfer.protocol import stats
  pr = stats.paired([r["jax"] for r in runs], [r["torch"] for r in runs])
  holds = (pr.lo <= 0 <= pr.hi) if not math.isnan(pr.lo) else pr.mean == 0
  pairs = [(r, v) for r, v in zip(runs, revs or []) if v is not None]
  margin, rev_txt, wtl, moved, maxd = floor, "-", "-", "-", "-"
  if pairs:
    rev = stats.paired([v["torch_rev"] for _, v in pairs], [r["torch"] for r, _ in pairs])
    d = [v["torch_rev"] - r["torch"] for r, v in pairs]
    margin = max(floor, max(abs(x) for x in d))
    rev_txt = stats.format_paired(rev, digits=2)
    wtl = f"{rev.wins}/{rev.ties}/{rev.losses}"
    on_jax = sum(1 for r, v in pairs if v["torch_rev"] != r["torch"] and v["torch_rev"] == r["jax"])
    moved = f"{on_jax}/{sum(1 for x in d if x != 0)}"
    maxd = f"{100 * max(abs(x) for x in d):.2f}"
  ok = within(pr, margin)
  verdict = None if ok is None else (EQUAL if ok else DIFFERENT)
  shown = "-" if verdict is None else (f"**{verdict}**" if verdict == DIFFERENT else verdict)
  row = (f"| {arch} | {spec} | {name} | {stats.format_paired(pr, digits=2)} | {rev_txt} | {wtl} "
         f"| {moved} | {maxd} | +-{100 * margin:.2f} | {'yes' if holds else 'NO'} | {shown} |")
  return row, verdict


def control_section(config: ParityConfig, records: Records) -> list:
  """The rounding-control table (PyTorch-reversed - PyTorch beside jtransfer - PyTorch) and
  each parity cell's equivalence verdict."""
  n = config.protocol.repeats
  pct = f"{100 * MARGIN_FLOOR:.1f}"
  lines = ["## Rounding control and parity verdict", ""]
  if config.rounding_control:
    lines += ["PyTorch against itself: each Finetune draw's PyTorch run trained again with each "
              "batch's rows reversed -- the same batches, head init and steps, the same mean "
              "loss summed in another order (BN uses running statistics, so each row's forward "
              "is unchanged). rev = PyTorch-reversed - PyTorch per draw, in points: mean [95% "
              "CI] wins/n (`jtransfer.protocol.stats.paired`), beside jtransfer - PyTorch from "
              "the table above; rev w/t/l = wins/ties/losses; onto jtransfer = of the draws whose "
              "reversed run's accuracy differs from PyTorch's, those where it equals "
              "jtransfer's; max |rev| = the largest per-draw |rev|, points. Freeze "
              "cells have no control (their runs classify every test image the same).", ""]
  else:
    lines += ["No rounding control in this run (`--no-rounding-control`): every margin is the "
              "floor.", ""]
  lines += [f"Verdict rule: a cell's parity is **{EQUAL}** when its jtransfer - PyTorch 95% "
            f"interval lies within +-m, m = max({pct} pt, the largest |PyTorch-reversed - "
            f"PyTorch| of the cell's draws) ({pct} pt where a cell has no control); "
            f"**{DIFFERENT}** otherwise; no verdict with fewer than 2 draws. \"CI holds 0\" "
            "is the table above's column, kept for reference: it asks for a difference of "
            "exactly 0, which rounding alone can miss.", "",
            "| arch | target | strategy | jtransfer - PyTorch [95% CI] wins/n | PyTorch-reversed "
            "- PyTorch [95% CI] wins/n | rev w/t/l | onto jtransfer | max abs rev | "
            "margin m, pt | CI holds 0 | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  verdicts, complete, spread = [], True, 0
  for arch in config.archs:
    for spec in config.targets:
      for name in config.strategies:
        cell = _cell(records, arch, 2, spec, name, n)
        idx = [i for i, r in enumerate(cell) if r]
        if not idx:
          complete = False
          continue
        revs = None
        if controlled(config, name):
          revs = [records.get(("rev", arch, 2, spec, name, i)) for i in idx]
          complete &= all(v is not None for v in revs)
        complete &= len(idx) == n
        row, verdict = control_row(arch, spec, name, [cell[i] for i in idx], revs)
        lines.append(row)
        verdicts.append(verdict)
        js = [cell[i]["jax"] - cell[i]["torch"] for i in idx]
        spread += len(set(js)) > 1  # an interval wider than a point
  so_far = "" if complete else " so far"
  n_eq = sum(v == EQUAL for v in verdicts)
  lines += ["", f"Parity{so_far}: **{n_eq} of {len(verdicts)} cells {EQUAL}**"
            + (f"; {DIFFERENT}: {sum(v == DIFFERENT for v in verdicts)}" if
               any(v == DIFFERENT for v in verdicts) else "")
            + (f"; no verdict: {sum(v is None for v in verdicts)}" if None in verdicts else "")
            + "."]
  if spread:
    lines += ["", f"{spread} cell(s) of the table above have an interval wider than a point "
              "(the others' draws all differ by the same amount, mostly 0): were they independent "
              f"and every true difference 0, at least one of {spread} 95% intervals would miss "
              f"0 with probability 1 - 0.95^{spread} = {1 - 0.95 ** spread:.2f}."]
  lines.append("")
  return lines


def report(config: ParityConfig, argv, records: Records, sources: dict, missing: int) -> str:
  """bench/PARITY.md from the run records; `missing` runs not done yet make it incomplete."""
  from jtransfer.protocol import stats
  p = config.protocol
  n = p.repeats
  lines = ["# PyTorch accuracy parity", "", "```", command("parity", argv), "```", ""]
  if missing:
    lines += [f"**Incomplete: {missing} run(s) not done yet (time cap); run the same command "
              "again to continue (finished runs are read from "
              f"`{os.path.relpath(config.records)}`).**", ""]
  lines += [f"Source `{config.source}` ({config.source_epochs:g} epochs, seed {p.seed}); "
            f"k={config.shots}; {n} draws per cell (experiments.fewshot's seeds); "
            f"{p.steps} Adam steps per run, lr freeze {config.lr_freeze:g}, finetune "
            f"{config.lr_finetune:g}; batch min({p.batch_size}, k-shot set) with the same "
            f"batch sequence (`Batches.at`) in both; BN running statistics in both strategies; test "
            f"<= {p.test_per_class}/class. jtransfer: the strategies' Setups, the generic "
            "jitted step and `fit` (Freeze on cached features, as experiments.fewshot); "
            "PyTorch: bench/torch_ref.py's nets with the source weights and the new head's "
            "init copied from jtransfer, `torch.optim.Adam` (defaults). Per-run records: "
            f"`{os.path.relpath(config.records)}`.", "",
            "Sources: " + "; ".join(f"{k} test accuracy {_pct(v)}%"
                                    for k, v in sources.items()), "",
            "## Same net before training", "",
            "Largest |logit| difference on the target's test set, source weights and the new "
            "head copied into the torch net (eval mode, first draw's head):", "",
            "| arch | target | max abs diff | max abs logit | relative |", "|---|---|---|---|---|"]
  for arch in config.archs:
    for spec in config.targets:
      c = records.get(("check", arch, 2, spec))
      if c:
        lines.append(f"| {arch} | {spec} | {c['diff']:.2e} | {c['scale']:.2f} | "
                     f"{c['diff'] / c['scale']:.1e} |")
  lines += ["", "## Parity: jtransfer minus PyTorch", "",
            "Test accuracy in %; diff = jtransfer - PyTorch per draw, in points: mean [95% CI] "
            "wins/n (`jtransfer.protocol.stats.paired`); w/t/l = wins/ties/losses; agree = "
            "share of test images both runs of a draw classify the same (mean, min); max |diff| "
            "= the largest per-draw accuracy difference, points; s = seconds in runs.", "",
            "| arch | target | strategy | jtransfer | PyTorch | diff [95% CI] wins/n | w/t/l | p "
            "| CI holds 0 | agree % (min) | max abs diff | s jax / torch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  all_zero, complete = True, True
  for arch in config.archs:
    for spec in config.targets:
      for name in config.strategies:
        rs = [r for r in _cell(records, arch, 2, spec, name, n) if r]
        if len(rs) < n:
          complete = False
        if not rs:
          continue
        j, t, agree = ([r[k] for r in rs] for k in ("jax", "torch", "agree"))
        pr = stats.paired(j, t)
        holds = (pr.lo <= 0 <= pr.hi) if not math.isnan(pr.lo) else pr.mean == 0
        all_zero &= holds
        maxd = max(abs(a - b) for a, b in zip(j, t))
        p = "-" if math.isnan(pr.p) else f"{pr.p:.2f}"
        lines.append(
            f"| {arch} | {spec} | {name} | {_pct(np.mean(j))} | {_pct(np.mean(t))} | "
            f"{stats.format_paired(pr, digits=2)} | {pr.wins}/{pr.ties}/{pr.losses} | {p} | "
            f"{'yes' if holds else 'NO'} | {_pct(np.mean(agree))} ({_pct(min(agree))}) | "
            f"{100 * maxd:.2f} | {sum(r['jax_s'] for r in rs):.0f} / "
            f"{sum(r['torch_s'] for r in rs):.0f} |")
  lines += ["", f"CI includes 0 in every cell{'' if complete else ' so far'}: "
            f"**{'yes' if all_zero else 'no'}**.", "",
            "Where float rounding is expected to show: Freeze trains a linear head on features "
            "that agree to ~1e-6, a convex problem, so both runs should classify every test "
            "image the same. Finetune moves every weight for the whole run; the convolutions "
            "round differently in XLA and in oneDNN, and Adam divides each gradient by its own "
            "running RMS, so rounding-level differences in the gradients of weights whose "
            "gradient is near zero become full-size steps. Its runs should therefore disagree "
            "on a few test images near a decision boundary, in either direction.", ""]
  lines += control_section(config, records)
  if config.stem:
    lines += ["## resnet_s stem: stride 1 against stride 2", "",
              f"jtransfer only; the first {config.stem_draws} draws of the table above, with the "
              "same head inits, steps and LRs; each stem has "
              "its own source, pretrained the same way (same data, epochs, seed); the stride-2 "
              "runs are the parity table's. diff = stride 1 - stride 2 per draw, test accuracy "
              "in points.", "",
              "| target | strategy | stride 2 | stride 1 | diff [95% CI] wins/n | p |",
              "|---|---|---|---|---|---|"]
    for spec in config.targets:
      for name in config.strategies:
        pairs = [(a, b) for a, b in zip(_cell(records, "resnet_s", 2, spec, name, n),
                                        _cell(records, "resnet_s", 1, spec, name,
                                              config.stem_draws))
                 if a and b]
        if not pairs:
          continue
        two, one = [a["jax"] for a, _ in pairs], [b["jax"] for _, b in pairs]
        pr = stats.paired(one, two)
        p = "-" if math.isnan(pr.p) else f"{pr.p:.3f}"
        lines.append(f"| {spec} | {name} | {_pct(np.mean(two))} | {_pct(np.mean(one))} | "
                     f"{stats.format_paired(pr)} | {p} |")
    t2, t1 = records.get(("timing", 2)), records.get(("timing", 1))
    if t2 and t1:
      lines += ["", "jtransfer time on this machine (median; the machine is shared, so "
                "ratios are the figure to read):", "",
                "| what | stride 2 (ms) | stride 1 (ms) | stride 1 / stride 2 |",
                "|---|---|---|---|"]
      # the records' JSON has sorted keys: steps by batch size, then the forward
      for what in sorted(t2["times"], key=lambda w: (w.startswith("eval"),
                                                     int("".join(filter(str.isdigit, w))))):
        a, b = t2["times"][what], t1["times"][what]
        lines.append(f"| {what} | {1000 * a:.1f} | {1000 * b:.1f} | {b / a:.2f}x |")
      lines.append(f"| source pretraining (2 epochs), s | {t2['pretrain_s']:.0f} | "
                   f"{t1['pretrain_s']:.0f} | {t1['pretrain_s'] / t2['pretrain_s']:.2f}x |")
    lines.append("")
  return "\n".join(lines)

