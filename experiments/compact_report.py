"""compact_transfer's report and plot (its `Study.report` and `Study.plots` hooks).

From the records alone (results.json, either record version), so a published folder
regenerates: per target a table of every variant at its chosen point (accuracy, gap to the
teacher, agreement, params, FLOPs, latency, chosen point, steps), the distilled-vs-labels-only
comparisons, the paper's claims as paired per-draw differences, and failures.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np

from jtransfer.methods import transfer
from jtransfer.methods.compact import DESCRIPTIONS, PRUNED, WITHOUT_TEACHER
from jtransfer.protocol import claims
from jtransfer.study import grid as grid_lib
from jtransfer.study import records as rec
from jtransfer.study.tables import mean_std

CELL_FIELDS = ("arch", "target", "shots")
# Latency labels: a draw's models timed together (records made before the study runner), a
# draw rerun after a resume, and a model timed round-robin with its draw's teacher.
TOGETHER, RESUMED, WITH_TEACHER = "interleaved", "interleaved, resumed draw", "with teacher"
ALONE = "alone"
WIDTH_KEYS = ("conv_widths", "stage_widths", "stem_width", "inner_widths", "dense_widths",
              "blocks", "top_width")


def paper_claims(margin: float) -> tuple[claims.Claim, ...]:
  """The compact-transfer paper's claims (abstract and introduction; its results are not in the
  text we have) as paired comparisons over draws."""
  src = "abstract, introduction"
  return (
      claims.Claim("Compact", "the jointly learned compact net beats the same net trained on "
                   "labels alone", "distill", "scratch", source=src),
      claims.Claim("Compact", "joint learning beats labels alone for the compact net "
                   "fine-tuned from a compact source", "distill_ft", "finetune",
                   source=src + "; the pretrained compact net is this repo's variant"),
      claims.Claim("Compact", "the jointly learned compact net approaches the large target "
                   "net (efficiency without reducing performance)", "distill", "teacher",
                   at_least=True, margin=margin, source=src),
      claims.Claim("Compact", "the jointly learned compact net from a compact source approaches "
                   "the large target net", "distill_ft", "teacher", at_least=True,
                   margin=margin, source=src + "; this repo's variant"),
  )


def teacher_lrs(k) -> tuple[float, ...]:
  """The teacher's LR grid ('paper': its strategy's grid of the CWL paper)."""
  if k.teacher_lr == "paper":
    return tuple(sorted(transfer.lr_grid(transfer.get_strategy(k.strategy), "paper")))
  return tuple(k.teacher_lr)


def chosen_points(plan, records: list) -> dict:
  """(target, variant) -> its tuned point ('choice', 'score', 'grid', 'edges', ...), or its one
  fixed point without tuning draws; cells whose tuning is unfinished are left out."""
  out = {}
  for (_, target, _, arm), t in grid_lib.choices(records, plan).items():
    out[(target, arm)] = t
  if not plan.config.protocol.tune_draws:
    for a in plan.arms:
      point = {n: float(v[0]) for n, v in a.grid.items()}
      for target in plan.config.cells.targets:
        out[(target, a.name)] = dict(choice=point, score=None, grid=a.grid, edges=[],
                                     hp=rec.hp_text(point))
  return out


def median_latency(rows: list) -> Optional[dict]:
  """{batch: median over the rows' latencies (ms)}: one draw that a burst of load hit does not
  set the figure."""
  timed = [r["latency_ms"] for r in rows if r.get("latency_ms")]
  if not timed:
    return None
  return {b: float(np.median([t[b] for t in timed if b in t])) for b in timed[0]}


def summarize(rows: list) -> dict:
  """(target, variant) -> accuracy mean/std over evaluation draws (failed runs counted apart),
  agreement, steps, params and FLOPs of the first finished draw, the median latency."""
  groups: dict = {}
  for r in sorted(rows, key=lambda r: r["repeat"]):
    groups.setdefault((r["target"], r["arm"]), []).append(r)
  out: dict = {}
  for key, rs in groups.items():
    ok = [r for r in rs if r["status"] == "ok"]
    if not ok:
      out[key] = dict(n=0, failed=len(rs))
      continue
    m, s = mean_std(r["test_acc"] for r in ok)
    agree = [r["agreement"] for r in ok if "agreement" in r]
    out[key] = dict(acc_mean=m, acc_std=s, n=len(ok), failed=len(rs) - len(ok),
                    params=ok[0]["params"], flops=ok[0]["flops"],
                    latency_ms=median_latency(ok),
                    agreement=float(np.mean(agree)) if agree else None,
                    steps=float(np.mean([r["steps"] for r in ok])),
                    capped=sum(r["stopped"] == "cap" for r in ok))
  return out


def _values(values) -> str:
  return ", ".join(f"{v:g}" for v in values)


def protocol_text(config) -> str:
  """How runs were budgeted and how their hyper-parameters were chosen."""
  k, p = config.extra, config.protocol
  if p.patience:
    runs = (f"every run (teacher and students) trains until its validation accuracy has not "
            f"improved for {p.patience} steps (checked every {p.eval_every}), at most "
            f"{k.teacher_steps} steps (teacher) or {k.student_steps} (students), and keeps "
            "its best validation state")
  else:
    runs = (f"every run trains exactly {k.teacher_steps} steps (teacher) or "
            f"{k.student_steps} (students) and keeps its last state")
  knobs = "".join(f", {n} {{{_values(v)}}}"
                  for n, v in transfer.get_strategy(k.strategy).knobs.items())
  grids = (f"teacher LR {{{_values(teacher_lrs(k))}}}{knobs}; students' LR "
           f"{{{_values(k.student_lr)}}} from random init, {{{_values(k.ft_lr)}}} from "
           f"pretrained weights; T {{{_values(k.temperature)}}}, λ {{{_values(k.lam)}}} "
           "jointly with the LR for the distilled students")
  if p.tune_draws:
    tune = (f"hyper-parameters are chosen per target by mean validation accuracy over "
            f"{p.tune_draws} tuning draw(s) that are not evaluation draws and are never "
            f"evaluated on test ({grids}; a choice on a grid edge extends that axis by up to "
            f"{p.tune_extend} values, λ on its odds scale λ/(1-λ)); the students on a "
            "tuning draw learn from the teacher trained on it at the teacher's chosen point")
  else:
    tune = f"hyper-parameters are fixed, not tuned ({grids})"
  return (f"Protocol: {runs}; {tune}. Validation: {p.val_per_class}/class, disjoint from "
          "the k-shot set and from test; test: "
          f"{'all' if not p.test_per_class else f'<= {p.test_per_class}/class'} of the "
          "target's test split, which reaches no selection.")


def _chosen(t: Optional[dict]) -> str:
  if not t:
    return "-"
  knobs = "".join(f", {'λ' if n == 'lam' else n} {v:g}"
                  for n, v in sorted(t["choice"].items()) if n != "lr")
  return f"lr {t['choice']['lr']:g}{knobs}"


def _timing(rows: list) -> str:
  """The latency clause: how the shown models were timed."""
  labels = {r.get("latency_timing") for r in rows}
  text = ", the draw's models timed together round-robin" if labels & {TOGETHER, RESUMED} else ""
  if RESUMED in labels:
    text += ", except the models a draw reran after a resume, timed only among themselves"
  if WITH_TEACHER in labels:
    text += ", each student timed round-robin with its draw's teacher"
    if any(r["arm"] != "teacher" and r.get("latency_timing") == ALONE for r in rows):
      text += " (alone where a resume reran it without its teacher in memory)"
  return text


def _widths(config: dict) -> str:
  return ", ".join(f"{n} {json.dumps(config[n])}" for n in WIDTH_KEYS
                   if config.get(n) is not None)


def _comparison(summary: dict, target: str) -> list[str]:
  """Sentences: distilled vs the same student without the teacher, and vs the teacher."""
  out = []
  ok = lambda v: (summary.get((target, v)) or {}).get("n")
  t = summary.get((target, "teacher")) if ok("teacher") else None
  for with_t, without in WITHOUT_TEACHER:
    if not (ok(with_t) and ok(without)):
      continue
    a, b = summary[(target, with_t)], summary[(target, without)]
    line = f"- {with_t} vs {without}: {100 * (a['acc_mean'] - b['acc_mean']):+.1f} points"
    if t:
      gap = t["acc_mean"] - b["acc_mean"]
      line += (f"; {with_t} is {100 * (a['acc_mean'] - t['acc_mean']):+.1f} points from the "
               f"teacher at {a['flops'] / t['flops']:.2f}x its FLOPs")
      if gap > 1e-9:  # a share of the gap means something only when there is one
        line += (f" and closes {100 * (a['acc_mean'] - b['acc_mean']) / gap:.0f}% of the "
                 f"{without}-teacher gap")
      else:
        line += f"; {without} already matches the teacher"
    out.append(line)
  return out


def _table(target: str, variants, summary: dict, tuned: dict, batches) -> tuple[list, list]:
  """One target's table lines, and its variants' choices still on a grid edge."""
  head = ["variant", "accuracy", "Δ teacher", "agreement", "params", "MFLOPs"] + \
      [f"ms b={b}" for b in batches] + ["chosen on validation", "val (tuning)", "steps"]
  lines = [f"## {target}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  teacher, edges = summary.get((target, "teacher")), []
  for v in variants:
    r, t = summary.get((target, v)), tuned.get((target, v))
    if t and t["edges"]:
      edges.append(f"{target}/{v}: " + ", ".join("λ" + e[3:] if e.startswith("lam:") else e
                                                  for e in t["edges"]))
    if r is None:
      continue
    val = f"{100 * t['score']:.1f}" if t and t["score"] is not None else "-"
    if not r["n"]:
      lines.append(f"| {v} | failed ({r['failed']}) | | | | | " + " | " * len(batches)
                   + f"{_chosen(t)} | {val} | |")
      continue
    gap = (f"{100 * (r['acc_mean'] - teacher['acc_mean']):+.1f}"
           if teacher and teacher.get("n") and v != "teacher" else "-")
    agree = f"{r['agreement']:.3f}" if r["agreement"] is not None else "-"
    failed = f" ({r['failed']} failed)" if r["failed"] else ""
    lines.append(f"| {v} | {100 * r['acc_mean']:.1f} ({100 * r['acc_std']:.1f}){failed} | "
                 f"{gap} | {agree} | {r['params']:,} | {r['flops'] / 1e6:.2f} | " +
                 " | ".join(f"{(r['latency_ms'] or {}).get(b, float('nan')):.2f}"
                            for b in batches)
                 + f" | {_chosen(t)} | {val} | {r['steps']:.0f} ({r['capped']}/{r['n']} "
                 "capped) |")
  return lines + [""] + _comparison(summary, target) + [""], edges


def make_report(plan, records: list, folder: str = "") -> tuple[str, dict]:
  """report.md text and summary.json content, from the records (results.json) alone."""
  config = plan.config
  k, p, variants = config.extra, config.protocol, list(config.cells.arms)
  records = rec.read(records, CELL_FIELDS)
  rows = [rec.flat(r) for r in records]
  tuned = chosen_points(plan, records)
  # Keys compare knob values at 6 digits (records.canon): a run trains at its key's value.
  ev = [r for r in rows if r["role"] == "eval" and (r["target"], r["arm"]) in tuned and
        rec.canon_point({"lr": r["lr"], **r["knobs"]}) ==
        rec.canon_point(tuned[(r["target"], r["arm"])]["choice"])]
  summary = summarize(ev)
  shown = [r for r in ev if r["status"] == "ok"]  # whose latencies the table's medians take
  batches = [str(b) for b in k.latency_batches]
  widths = next((_widths(r["config"]) for r in ev
                 if r["arm"] not in PRUNED | {"teacher"} and "config" in r), "-")
  teacher_widths = next((_widths(r["config"]) for r in ev
                         if r["arm"] == "teacher" and "config" in r), "-")
  student = f"{k.student_arch} " if k.student_arch else ""
  lines = [plan.study.title, "",
           f"{config.cells.archs[0]}: teacher = source `{config.source.spec}` fine-tuned with "
           f"`{k.strategy}` ({teacher_widths}); compact student {student}{widths}. Adam, "
           f"batch {p.batch_size}, students' BN (if any) in train mode. Joint loss (1 - λ) "
           f"CE(y, p_s) + λ T² KL(p_t^T ‖ p_s^T), augmentation `{p.augment}`. "
           f"{config.cells.shots[0]} training images per class, {p.repeats} evaluation draws "
           "per target (a fresh draw each, the same for every variant).", "",
           protocol_text(config), "",
           "Accuracy: mean (std) over evaluation draws, %, at the variant's chosen "
           "hyper-parameters. Agreement: fraction of test images on which the model predicts "
           "the teacher's class. FLOPs: XLA cost analysis of the jitted eval forward, per "
           f"image. Latency: median of {k.latency_runs} calls of the jitted forward after "
           "warm-up" + _timing(shown) + ", median over the evaluation draws (pruned widths "
           f"keep {k.prune_keep:g} of each unit's channels, residual={k.prune_residual}). "
           "Steps: mean steps trained, and how many runs stopped at the cap rather than by "
           "patience.", ""]
  lines += [f"- {v}: {DESCRIPTIONS[v]}" for v in variants] + [""]
  edges = []
  for target in config.cells.targets:
    table, more = _table(target, variants, summary, tuned, batches)
    lines += table
    edges += more
  if edges:
    lines += ["Chosen value still on a grid edge after extension (the optimum may lie beyond): "
              + "; ".join(edges) + ".", ""]
  results = [claims.evaluate(c, ev, CELL_FIELDS, arm_field="arm",
                             draw_fields=("target", "shots", "repeat"))
             for c in paper_claims(k.approach_margin) if {c.a, c.b} <= set(variants)]
  results = [r for r in results if r["cells"]]
  if results:
    lines += claims.section(results, {})
  failed = [r for r in rows if r.get("status") != "ok"]
  if failed:
    lines += [f"{len(failed)} run(s) failed (non-finite loss); see results.json.", ""]
  out = dict(variants={"|".join(key): v for key, v in summary.items()},
             tuning={"|".join(key): v for key, v in tuned.items()}, claims=results)
  return "\n".join(lines), out


def plot(summary: dict, plan, folder: str) -> None:
  """accuracy_vs_flops.png: accuracy against FLOPs per variant, one panel per target."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  summary = summary.get("variants", summary)
  targets = plan.config.cells.targets
  fig, axes = plt.subplots(1, len(targets), figsize=(5 * len(targets), 3.8), squeeze=False)
  for ax, target in zip(axes[0], targets):
    rows = [(v, summary.get(f"{target}|{v}")) for v in plan.config.cells.arms]
    rows = [(v, r) for v, r in rows if r is not None and r.get("n")]
    top = max((r["flops"] for _, r in rows), default=1.0) / 1e6
    same = [[w for w, q in rows if q["flops"] == r["flops"]] for _, r in rows]
    for (v, r), group in zip(rows, same):
      # Students share one width config, hence one FLOP count: spread those a little.
      x = r["flops"] / 1e6 + 0.012 * top * (group.index(v) - (len(group) - 1) / 2)
      ax.errorbar([x], [100 * r["acc_mean"]], yerr=[100 * r["acc_std"]],
                  marker="o", capsize=3, label=v, linestyle="none")
    ax.set_xlim(left=0)
    ax.set_xlabel("MFLOPs per image (XLA; points spread sideways for legibility)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(target, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(folder, "accuracy_vs_flops.png"), dpi=110)
  plt.close(fig)
