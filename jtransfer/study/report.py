"""A study's report skeleton, from its records alone (so a published folder regenerates).

report.md: the title; the source and draws; the protocol paragraph (from the config and the
split the runs used; in a folder stating --bn, which arms trained BatchNorm in which mode); the tuned tables (`Table`s; mean (std) test accuracy over evaluation
draws at the point chosen on the tuning draws, the chosen LR and knobs, mean steps); the
claims (`jtransfer.protocol.claims`); the paper's test-selected best over LR and the
per-draw validation-selected LR (or the study's own `sections`); the LR grids; data notes;
failures. summary.json: 'best_over_lr', 'tuned', 'tuning', 'claims'.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from jtransfer.data import augment
from jtransfer.methods import bn_rule
from jtransfer.protocol import claims, convergence
from jtransfer.study import grid as grid_lib
from jtransfer.study import records as rec
from jtransfer.study.tables import best_over_lr, lr_grid_text, pct, split_text

GROUP = ("arch", "target", "arm", "shots")
# What a run costs (`jtransfer.methods.peft_cost`, in records since the PEFT study): trained
# parameters and inference FLOPs added after merging; a table shows them when its runs hold them.
COST = ("trained_params", "extra_flops")


def paper_grid_rows(rows: Sequence[dict], plan: grid_lib.Plan) -> list[dict]:
  """Evaluation rows on the LR grid at the paper's knob values (for 'best over LR')."""
  arms = {a.name: a for a in plan.arms}
  out = []
  for r in rows:
    a = arms.get(r["arm"])
    if a is not None and r["role"] == "eval" and r["lr"] in a.lrs and \
        rec.canon_point(r["knobs"]) == rec.canon_point(a.defaults):
      out.append(r)
  return out


def choice_of(tuned: dict, r: dict, cell_fields: Sequence[str]):
  """The tuned point an evaluation row's run was chosen at: its cell's (shared tuning) or
  its own draw's (nested tuning, keyed by the draw's index too), or None."""
  cell = (*(r[f] for f in cell_fields), r["arm"])
  return tuned.get(cell) or tuned.get((*cell, r["repeat"]))


def tuned_rows(rows: Sequence[dict], tuned: dict, cell_fields: Sequence[str]) -> list[dict]:
  """Evaluation rows at each cell's (or, nested, each draw's) tuned point."""
  out = []
  for r in rows:
    t = choice_of(tuned, r, cell_fields)
    if t and r["role"] == "eval" and \
        rec.canon_point({"lr": r["lr"], **r["knobs"]}) == rec.canon_point(t["choice"]):
      out.append(r)
  return out


def tuned_summary(rows: Sequence[dict], tuned: dict,
                  cell_fields: Sequence[str] = ("arch", "target", "shots")) -> dict:
  """(arch, target, arm, shots) -> {'mean', 'std', 'n', 'failed', 'lr', 'hp', 'edges',
  'steps'} at the tuned point, over evaluation draws (failed runs left out and counted)."""
  by: dict = {}
  for r in tuned_rows(rows, tuned, cell_fields):
    by.setdefault((r["arch"], r["target"], r["arm"], r["shots"]), []).append(r)
  summary = {}
  for cell, rs in by.items():
    ok = [r for r in rs if r["status"] == "ok"]
    ts = [choice_of(tuned, r, cell_fields) for r in rs]
    acc = np.array([r["test_acc"] for r in ok]) if ok else np.array([np.nan])
    # Nested tuning chooses per draw: the most frequent choice, with how many draws made it.
    hps = [rec.hp_text(t["choice"]) for t in ts]
    t = ts[max(range(len(ts)), key=lambda i: (hps.count(hps[i]), -i))]
    summary[cell] = dict(mean=float(acc.mean()), std=float(acc.std()), n=len(ok),
                         failed=len(rs) - len(ok), lr=t["choice"]["lr"], hp=t["hp"],
                         edges=list(dict.fromkeys(e for t_ in ts for e in t_["edges"])),
                         steps=float(np.mean([r["steps"] for r in ok])) if ok else None,
                         **{f: ok[0][f] for f in COST if ok and f in ok[0]})
    if any(len(k) > len(cell_fields) + 1 for k in tuned):  # nested: how many draws chose it
      summary[cell]["chosen"] = f"{hps.count(rec.hp_text(t['choice']))}/{len(hps)}"
  return summary


def protocol_text(config, rows: Sequence[dict] = (), budget: Optional[int] = None) -> str:
  """One paragraph saying how runs were budgeted and tuned, and the split `rows` used
  (`budget`: the study's equal tuning budget, `Study.tune_budget`)."""
  p = config.protocol
  if p.patience:
    run = (f"each run trains until its validation accuracy has not improved for "
           f"{p.patience} steps (checked every {p.eval_every}), at most {p.steps} "
           "steps, and keeps its best validation state")
  else:
    run = f"each run trains {p.steps} steps and keeps its last state"
  grid = (f"equal tuning budgets: every strategy's grid holds exactly {budget} points, its "
          "knob grid times an LR grid over its range, never extended" if budget else
          f"grid extended up to {p.tune_extend} values at an edge")
  ties = "ties go to the smaller LR (then knob values) for every arm alike"
  if p.tuning == "nested":
    pool = (f"{p.cv_folds}-fold cross-validation over its k-shot and validation images"
            if p.cv_folds else "its validation split (CV folds where a strategy's paper uses "
            "them)" if p.cv_folds is None else "its validation split")
    tune = (f"each evaluation draw is tuned on its own labelled pool ({pool}), never its test "
            f"images, so the paired differences carry the selection noise ({grid}; "
            f"{ties})")
  elif p.tune_draws:
    tune = (f"each strategy's LR is chosen per (arch, target, k) by mean validation accuracy "
            f"over {p.tune_draws} tuning draws that are not evaluation draws ({grid})")
    if p.disjoint_tuning:
      tune += ("; tuning draws use pool images no evaluation draw of the cell uses where the "
               "pool is large enough (the overlap below says where it was not)")
  else:
    tune = "the LR is chosen per draw on that draw's validation set"
  if p.cap_share is not None:
    tune += (f"; an arm whose evaluation runs stop at the step cap in more than "
             f"{p.cap_share:.0%} of runs is flagged not converged and its claims read not "
             "tested")
  recipe = str(augment.parse(p.augment))
  aug = f" Training images augmented on device: {recipe}." if recipe != "none" else ""
  if p.stored_size:
    aug += (f" Target images stored at {p.stored_size} px; the network sees "
            "Resize + CenterCrop views of them" + (" and crops of the stored pixels in "
                                                   "training." if recipe != "none" else "."))
  return (f"Protocol: {run}; {tune}.{aug} "
          f"{split_text(p.val_per_class, p.test_per_class, rows)}; the test split "
          "reaches no selection.")


def bn_text(plan: grid_lib.Plan) -> str:
  """The protocol paragraph's BatchNorm sentence: the --bn the folder states and the arms
  in each mode (`jtransfer.methods.bn_rule`); '' for a folder made before --bn (its report,
  made then, said nothing of it) or without strategy arms."""
  p = plan.config.protocol
  arms = [a for a in plan.arms if a.strategy is not None]
  if not (p.bn_stated and arms):
    return ""
  train = [a.name for a in arms if a.strategy.bn_mode(p.bn) == bn_rule.TRAIN]
  frozen = [a.name for a in arms if a.name not in train]
  parts = ([f"train mode (batch statistics while training, running averages updated and used "
            f"at evaluation, PyTorch's model.train()) for {', '.join(train)}"] if train else [])
  if frozen:
    kept = "the others keep" if train else "every arm keeps"
    parts.append(f"{kept} the source's running statistics ({', '.join(frozen)})")
  return (f" BatchNorm (--bn {p.bn}): {'; '.join(parts)}; archs without BatchNorm are the "
          "same network in either mode.")


def tuned_table(summary: dict, plan: grid_lib.Plan, rows: Sequence[str],
                labels: dict) -> list[str]:
  """The protocol's table: mean (std) test accuracy at the tuned LR, chosen LR, mean steps."""
  c = plan.config.cells
  shots = c.shots
  costed = any(COST[0] in v for v in summary.values())
  out = ["| arch | target | strategy | " + " | ".join(f"k={k}" for k in shots) +
         (" | trained params | extra FLOPs after merging" if costed else "") + " |",
         "|---|---|---|" + "---|" * (len(shots) + 2 * costed)]
  edges = []
  for arch in c.archs:
    for target in c.targets:
      for arm in rows:
        cells = []
        for k in shots:
          v = summary.get((arch, target, arm, k))
          if not v:
            cells.append("-")
            continue
          hp = f" {v['hp']}" if v["hp"] else ""
          if v.get("chosen"):  # nested tuning: the most frequent per-draw choice
            hp += f" ({v['chosen']} draws)"
          cells.append(f"{pct(v['mean'], v['std'])} lr {v['lr']:g}{hp}, "
                       f"{v['steps']:.0f} st" if v["n"] else "failed")
          if v["edges"]:
            edges.append(f"{arch}/{target}/{arm}/k={k}: {', '.join(v['edges'])}")
        if costed:  # per k the tuned knobs (a LoRA rank) may differ: each distinct value
          found = [summary.get((arch, target, arm, k), {}) for k in shots]
          cells += [" / ".join(f"{v:,}" for v in sorted({f[c] for f in found if c in f}))
                    or "-" for c in COST]
        out.append(f"| {arch} | {target} | {labels.get(arm, arm)} | " + " | ".join(cells)
                   + " |")
  out.append("")
  if edges:
    after = "(equal budgets: never extended)" if plan.study.tune_budget else "after extension"
    out += [f"Chosen LR still on a grid edge {after} (the optimum may lie beyond): "
            + "; ".join(edges) + ".", ""]
  return out


def best_tables(plan: grid_lib.Plan, summary: dict, labels: dict) -> list[str]:
  """The default paper-grid sections: best over LR (test-selected) and per-draw
  validation-selected LR, one row per (arch, target, arm)."""
  c, lines = plan.config.cells, []
  for title, m, sd in (("Best over LR (test-selected, as the paper; optimistic)", "test_mean",
                        "test_std"),
                       ("Validation-selected LR per draw", "val_sel_mean", "val_sel_std")):
    lines += [f"## {title}", "", "| arch | target | strategy | " +
              " | ".join(f"k={k}" for k in c.shots) + " |",
              "|---|---|---|" + "---|" * len(c.shots)]
    for arch in c.archs:
      for target in c.targets:
        for arm in c.arms:
          cells = []
          for k in c.shots:
            v = summary.get((arch, target, arm, k))
            cells.append(pct(v[m], v[sd]) if v else "-")
          lines.append(f"| {arch} | {target} | {labels.get(arm, arm)} | " + " | ".join(cells)
                       + " |")
    lines.append("")
  return lines


def notes_section(rows: Sequence[dict]) -> list[str]:
  """'## Data notes and warnings': each distinct sentence the records carry (conversions,
  automatic splits, skipped files, dead features), in first-seen order; [] when none."""
  seen = list(dict.fromkeys(n for r in rows for n in r.get("notes", ())))
  return ["## Data notes and warnings", ""] + [f"- {n}" for n in seen] + [""] if seen else []


def overlap_summary(rows: Sequence[dict]) -> dict:
  """'target|k' -> mean share of an evaluation draw's images that sit in a tuning draw, from
  the evaluation records that carry it (`--disjoint-tuning`); {} when none do."""
  by: dict = {}
  for r in rows:
    if r["role"] == "eval" and "tune_overlap" in r:
      by.setdefault(f"{r['target']}|{r['shots']}", {})[r["repeat"]] = r["tune_overlap"]
  return {k: float(np.mean(list(v.values()))) for k, v in sorted(by.items())}


def overlap_lines(overlap: dict) -> list[str]:
  """The report's sentence on the tuning draws' overlap with the evaluation draws."""
  if not overlap:
    return []
  parts = [f"{k.replace('|', ' k=')}: {100 * v:.1f}%" for k, v in overlap.items()]
  return ["Tuning-draw overlap (mean share of an evaluation draw's k-shot and validation "
          "images that also sit in a tuning draw; 0% where the pool let the tuning draws avoid "
          "every evaluation draw): " + "; ".join(parts) + ".", ""]


def untested(result: dict, unconverged: dict) -> dict:
  """A claim result whose arm did not converge reads 'not tested' in every row (the
  difference and interval stay, for the record)."""
  arms = [a for a in (result["claim"]["a"], result["claim"]["b"]) if a in unconverged]
  if not arms:
    return result
  out = dict(result, cells=[dict(c, verdict=claims.NOT_TESTED) for c in result["cells"]],
             not_converged=arms)
  if out.get("pooled"):
    out["pooled"] = dict(out["pooled"], verdict=claims.NOT_TESTED)
  return out


def make_report(plan: grid_lib.Plan, records: Sequence[dict]) -> tuple[str, dict]:
  """report.md text and summary.json content of a few-shot study, from its records alone
  (version 1 or 2)."""
  study, config = plan.study, plan.config
  records = rec.read(records, study.cell_fields)
  rows = [rec.flat(r) for r in records]
  labels = study.labels()
  arms = list(config.cells.arms)
  tuned = grid_lib.choices(records, plan)
  summary = best_over_lr(paper_grid_rows(rows, plan), GROUP)
  lines = [study.title, "", f"Source `{config.source.spec}`; {config.protocol.repeats} "
           "evaluation draws per cell.", "",
           protocol_text(config, rows, study.tune_budget) + bn_text(plan), ""]
  out: dict = {"best_over_lr": {"|".join(map(str, k)): v for k, v in summary.items()}}
  unconverged = {}
  if config.protocol.cap_share is not None:  # --cap-share: flag arms still at their cap
    unconverged = convergence.flagged(records, config.protocol.cap_share)
    out["not_converged"] = {a: list(v) for a, v in unconverged.items()}
    labels = {**labels, **{a: f"{labels.get(a, a)} ({convergence.flag_text(*v)})"
                           for a, v in unconverged.items()}}
  overlap = overlap_summary(rows)
  if overlap:  # (only runs made with --disjoint-tuning record it)
    out["tune_overlap"] = overlap
    lines += overlap_lines(overlap)
  if tuned:
    ts = tuned_summary(rows, tuned, study.cell_fields)
    out["tuned"] = {"|".join(map(str, k)): v for k, v in ts.items()}
    out["tuning"] = {"|".join(map(str, k)): v for k, v in tuned.items()}
    lines += ["## Tuned on validation (the protocol's figure)", "",
              "Cells: mean (std) test accuracy in % over evaluation draws at the LR chosen on "
              "the tuning draws; the chosen LR; mean steps trained.", ""]
    shown: set = set()
    for table in (study.tables or [None]):
      heading, members = (table.title, table.rows) if table else ("", arms)
      members = [r for r in members if r in arms]
      if not set(members) - shown:  # only reference rows an earlier table already has
        continue
      shown |= set(members)
      if heading:
        lines += [f"### {heading}", ""]
      lines += tuned_table(ts, plan, members, labels)
    chosen = tuned_rows(rows, tuned, study.cell_fields)
    # Archs share their k-shot draws (the seed depends on k and the repeat): pooled per draw.
    results = [claims.evaluate(c, chosen, ("arch", "target", "shots"), arm_field="arm",
                               draw_fields=("target", "shots", "repeat"))
               for c in study.claims if {c.a, c.b} <= set(arms)]
    if study.extra_claims is not None:
      results += study.extra_claims(plan, chosen)
    results = [untested(r, unconverged) for r in results if r["cells"]]
    if results:
      lines += claims.section(results, labels)
    out["claims"] = results
  p = config.protocol
  if p.paper_grid or not p.tune_draws:
    grid_rows = paper_grid_rows(rows, plan)
    lines += (study.sections(plan, grid_rows, summary) if study.sections is not None
              else best_tables(plan, summary, labels))
  n = len(study.cell_fields)  # (a nested choice's key ends with its draw: key by the arm)
  by_arm = {(i, k[n]): t for i, (k, t) in enumerate(tuned.items())}
  lines += [lr_grid_text(arms, {a.name: a.lrs for a in plan.arms}, by_arm), ""]
  lines += notes_section(rows)
  failed = [r for r in rows if r.get("status") != "ok"]
  if failed:
    lines += [f"{len(failed)} run(s) failed (non-finite loss); see results.json.", ""]
  return "\n".join(lines), out
