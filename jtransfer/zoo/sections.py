"""Report sections of the selection study, shared by `experiments.model_selection` and
`experiments.truncation`: the fine-tuning runs, the scorer tables, the verdict, the score
settings and the random-init references, as markdown lines."""
from __future__ import annotations

from typing import Sequence

from jtransfer.methods import selection
from jtransfer.zoo.analysis import BLIND, S_METRICS


def runs_table(records: Sequence[dict], key: Sequence[str], order=None) -> list[str]:
  """Each kept fine-tuning run: LR, validation accuracy per LR, steps, why it stopped."""
  rows = [r for r in records if "stopped" in r]
  if not rows:
    return []
  lines = ["## Fine-tuning runs (the LR chosen on validation)", "",
           "| " + " | ".join(key) + " | lr | val acc (each LR) | steps (best) | stopped |",
           "|" + "---|" * (len(key) + 4)]
  for r in sorted(rows, key=order or (lambda r: tuple(str(r[k]) for k in key))):
    grid = ", ".join(f"{lr}: " + ("diverged" if v is None else f"{v:.3f}")
                     for lr, v in r["lr_val"].items())
    lines.append("| " + " | ".join(str(r[k]) for k in key) + f" | {r['lr']:g} | "
                 f"{r['val_acc']:.3f} ({grid}) | {r['steps']} ({r['best_step']}) | "
                 f"{r['stopped']} |")
  edged = [r for r in rows if r.get("edges")]
  if edged:
    lines += ["", "Chosen LR still on an edge of the extended grid (the optimum may lie "
              "beyond): " + "; ".join(" ".join(str(r[k]) for k in key) + f" {','.join(r['edges'])}"
                                      for r in edged) + "."]
  return lines + [""]

def scratch_table(block: dict) -> list[str]:
  """Markdown for `scratch_summary`, in points."""
  if not block:
    return []
  lines = ["## What the sources add: a random-init reference (--scratch)", "",
           "Each family's architecture initialised at random and fine-tuned under the same "
           "protocol as the zoo; not ranked. Points of test accuracy; test SE is one "
           "accuracy's binomial standard error on this test set (a difference of two "
           "accuracies has about 1.4x it, and 'zoo best' is the largest of several noisy "
           "accuracies, so it reads high).", "",
           "| group | scratch | zoo best - scratch | zoo mean - scratch | zoo worst - scratch "
           "| members above scratch | zoo spread | test SE |", "|---|---|---|---|---|---|---|---|"]
  pt = lambda x: f"{100 * x:+.1f}"
  for g, v in block.items():
    lines.append(f"| {g} | {100 * v['scratch']:.1f} | {pt(v['best'] - v['scratch'])} | "
                 f"{pt(v['mean'] - v['scratch'])} | {pt(v['worst'] - v['scratch'])} | "
                 f"{v['above']}/{v['members']} | {100 * v['spread']:.1f} | "
                 f"{100 * v['test_se']:.1f} |")
  return lines + [""]

def fmt(x) -> str:
  """A correlation with its sign and 3 decimals, or 'n/a' when undefined."""
  return "n/a" if x is None else f"{x:+.3f}"


def scorer_table(summary: dict, key: str = "scorers") -> list[str]:
  """Markdown: rho per group for each scorer, mean and variance over the groups where defined."""
  block = summary[key]
  if not block:
    return []
  groups = list(next(iter(block.values()))["per_group"])
  lines = ["| scorer | " + " | ".join(groups) + " | mean rho | var rho | mean tau_w |",
           "|---|" + "---|" * (len(groups) + 3)]
  for name, s in block.items():
    cells = [fmt(s["per_group"][g]["spearman"]) for g in groups]
    var = "n/a" if s["spearman_var"] is None else f"{s['spearman_var']:.4f}"
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(s['spearman_mean'])} | {var} | "
                 f"{fmt(s['weighted_tau_mean'])} |")
  return lines


def verdict(summary: dict, key: str = "scorers") -> str:
  """A few sentences: do the paper's metrics beat the target-blind baselines in `summary[key]`?"""
  sc = summary[key]
  mean = lambda names: {n: sc[n]["spearman_mean"] for n in names
                        if n in sc and sc[n]["spearman_mean"] is not None}
  paper = mean([n for n in sc if n in S_METRICS or n.startswith("C_")])
  single = mean(S_METRICS)
  blind = mean(BLIND)
  if not single:
    return "No feature-map metric had a defined Spearman here."
  best_s = max(single, key=single.get)
  best_p = max(paper, key=paper.get)
  text = (f"Best single metric {best_s}: mean rho {single[best_s]:+.3f}; best including the "
          f"combinations fitted in-sample: {best_p} {paper[best_p]:+.3f}.")
  held = summary.get("held_out") if key == "scorers" else None
  if held and held["spearman_mean"] is not None:
    text += (" The best C_ij(alpha) chosen on the other groups scores "
             f"{held['spearman_mean']:+.3f} on the held-out group (mean over groups).")
  if not blind:
    return text + " The target-blind baselines are constant within every group here."
  best_b = max(blind, key=blind.get)
  text += f" Best target-blind baseline: {best_b}, {blind[best_b]:+.3f}:"
  for name, value in (("the best single metric", single[best_s]),
                      ("the best in-sample combination", paper[best_p])):
    diff = value - blind[best_b]
    # Spearman over a few models is coarse: call differences under 0.05 a draw.
    word = "beats" if diff >= 0.05 else ("matches" if diff > -0.05 else "does not beat")
    text += f" {name} {word} it{',' if name.endswith('metric') else '.'}"
  return text

def score_settings_text(settings: dict) -> str:
  """One paragraph for the report: which map, which features, which LogME."""
  maps = {"conv": "the last conv layer's output after ReLU (before any pooling), as the paper",
          "pooled": "the 'last_conv' tap (for vgg_s after the last max pool, not the paper's "
                    "last conv layer output)"}
  feats = {"target": "the head input of the fine-tuned target (the features fine-tuning keeps: "
                     "for vgg_s the flattened pooled conv map, fc6/fc7 dropped)",
           "source": "the source's penultimate layer (fc7 for vgg_s, which the fine-tuned target "
                     "drops)"}
  logme = {"published": "as the LogME authors' published code (github.com/thuml/LogME) computes "
                        "it, which is what published LogME numbers are: with fewer samples than "
                        "feature dimensions it truncates the log-determinant to the nonzero "
                        "singular values (see selection.logme)",
           "exact": "the exact evidence (selection.logme variant 'exact'), which differs from "
                    "the published code's value when N < D or features are rank-deficient"}
  return (f"S1..S6 read {maps[settings['map_tap']]} (--map-tap {settings['map_tap']}). LogME "
          f"and H-score read {feats[settings['selection_features']]} (--selection-features "
          f"{settings['selection_features']}). LogME is computed "
          f"{logme[settings['logme_variant']]} (--logme {settings['logme_variant']}).")


def accuracy_table(records: Sequence[dict]) -> list[str]:
  """Markdown: fine-tuned test accuracy, one row per model, one column per target."""
  targets = list(dict.fromkeys(r["target"] for r in records))
  by = {(r["model"], r["target"]): r["test_acc"] for r in records}
  lines = ["| model | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
  for m in dict.fromkeys(r["model"] for r in records):
    lines.append(f"| {m} | " + " | ".join(f"{by[(m, t)]:.4f}" if (m, t) in by else "-"
                                          for t in targets) + " |")
  return lines


def spearman_section(summary: dict) -> list[str]:
  """Markdown: rho per (family, target) of every scorer (Fig. 2), and pooled over families."""
  lines = ["", "## Spearman rho per (family, target) (Fig. 2)", "",
            "Scores oriented so that larger = predicted better (S2, S4, S5, S6 negated); rho of "
            "the raw S2, S4, S5, S6 is the negative. n/a: the score is constant in that group "
            "(e.g. parameter count within a family). tau_w: weighted Kendall tau.", "",
            f"S6's sign is an open reading: row S6 follows the paper's text (sec. 3.6, \"the "
            f"smaller the S6 value, the better\"; sec. 5.3 inverts S6 before combining, and so "
            f"do the C_ij below), row '{selection.S6_APPENDIX}' takes larger raw S6 as better, "
            "as the paper's App. A.2 (Fig. 5) reports rho > 0.7 between raw S6 and accuracy. "
            "Its rho is the negative of row S6's; tau_w is not symmetric and differs. The "
            "verdict below uses the text's sign.", ""]
  lines += scorer_table(summary)
  if summary["pooled"]:
    lines += ["", "## Pooled over families, per target", ""] + scorer_table(summary, "pooled")
  return lines


def combination_section(summary: dict) -> list[str]:
  """Markdown: C_ij(alpha) per pair, the best one and its leave-one-group-out estimate
  (Fig. 3)."""
  best = summary["best_pair"]
  lines = ["", "## C_ij(alpha), alpha step 0.001 (Fig. 3)", "",
            "| pair | best alpha | mean rho | var rho | mean rho at alpha 0.574 |",
            "|---|---|---|---|---|"]
  for k, p in summary["pairs"].items():
    var = "n/a" if p["best_var"] is None else f"{p['best_var']:.5f}"
    lines.append(f"| C_{p['i'][1]}{p['j'][1]} | {p['best_alpha']:.3f} | {fmt(p['best_mean'])} | "
                 f"{var} | {fmt(p['mean_at_paper_alpha'])} |")
  if best:
    p = summary["pairs"][best]
    lines += ["", f"Best: **C_{p['i'][1]}{p['j'][1]}({p['best_alpha']:.3f})**, mean rho "
              f"{fmt(p['best_mean'])}, variance {p['best_var']:.5f} over "
              f"{len(p['groups'])} groups (paper: C_56(0.574), mean 0.7514, variance 0.005993)."]
  held = summary.get("held_out")
  if held and held["spearman_mean"] is not None:
    lines += ["", "Leave-one-group-out (pair and alpha chosen on the other groups, rho on the "
              "held-out group):", "", "| held-out group | chosen | rho |", "|---|---|---|"]
    for g, v in held["per_group"].items():
      lines.append(f"| {g} | C_{v['pair'][1]}{v['pair'][4]}({v['alpha']:.3f}) | "
                   f"{fmt(v['spearman'])} |")
    lines.append(f"| mean (var) | | {fmt(held['spearman_mean'])} "
                 f"({held['spearman_var']:.4f}) |")
  return lines
