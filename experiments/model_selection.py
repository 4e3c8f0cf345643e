"""Base-model selection (base-model-selection-metrics, Figs. 2 and 3): do S1..S6 rank a zoo?

  python -m experiments.model_selection --out results/model_selection

For each target (default: Fashion-MNIST {1,5,7,8,9} and digits; any `--target` spec works) and
each base model of the zoo (experiments.model_zoo, trained and cached on first use):
  1. one forward of the source model over the target's labelled training images gives the
     map S1..S6 read (`--map-tap`: 'conv', the default, is the last conv layer's output after
     ReLU, as the paper says; 'pooled' is the 'last_conv' tap, which for vgg_s comes after the
     last max pool), the selection features (`--selection-features`: 'target', the default, is
     the head input of the fine-tuned target, i.e. what fine-tuning keeps; for vgg_s the
     flattened pooled conv map, since the target drops fc6/fc7 (transfer.target_model), which
     takes a second forward of the target model; 'source' is the source's penultimate layer,
     fc7 for vgg_s) and the source softmax over its own source classes;
  2. from those, once per (model, target): S1..S6 on the map, LogME and H-score on the
     selection features (LogME as the authors' published code computes it, `--logme
     published`, the default, so values compare with published LogME numbers; `--logme exact`
     for the exact evidence, see selection.logme), LEEP and NCE on the source softmax / its
     argmax; and the target-blind baselines: source test accuracy and parameter count (what a
     target inherits);
  3. fine-tuning the base model (all layers, new head) gives the ground-truth accuracy on the
     target's test split.
One record per finished (model, target) goes to results.jsonl (--resume skips them).

The computation is library code: scores `jtransfer.scoring.source_scores`, the ground truth
`jtransfer.zoo.ground_truth`, the analysis `jtransfer.zoo.analysis`, the report's sections
`jtransfer.zoo.sections`; this module is the command line, the grid and the report.

Report (report.md, summary.json, spearman.png, alpha_curves.png):
  * Spearman's rho and weighted Kendall tau between each scorer and fine-tuned accuracy, per
    (family, target) as the paper's Fig. 2 (per (architecture, task), ranking that
    architecture's models), with every score oriented so that larger means predicted better
    (S2, S4, S5, S6 negated), and pooled over families per target; S6 also under the other
    sign, as selection.S6_APPENDIX (the paper's text says smaller is better, its App. A.2
    reports positive correlations of raw S6 with accuracy);
  * C_ij(alpha) = (1 - alpha) S_i + alpha S_j on metrics scaled to [-1, 1] over all models and
    targets, alpha step 0.001 (Fig. 3): the best (i, j, alpha) with the mean and variance of rho
    over groups (paper: C_56(0.574), mean 0.7514, variance 0.005993), and C_56(0.574) as
    published;
  * LogME, LEEP, NCE, H-score, TransRate (methods/transrate.py) and SFDA (methods/sfda.py)
    and the target-blind baselines side by side;
  * with `--scratch`, each family's architecture from a random init, fine-tuned the same way
    and not ranked: how far the zoo lands above it and how far its members spread, next to
    the test set's binomial noise. A ranking can only be as sharp as that spread allows.

Fine-tuning protocol (the ground truth each metric is ranked against): `--train-per-class`
labelled images per class (a seeded draw from the target's train split; the same images feed
the metrics, as the paper computes them on the target training set), SGD with batches of
`--ft-batch-size`, lr x0.1 at 7/30, 14/30, 21/30, 28/30 of the run (the paper's schedule,
compressed), momentum 0.9, weight decay 5e-4, BN running statistics frozen. Since session 9
under docs/protocol.md: each run stops once its accuracy on `--val-per-class` validation
images (disjoint from the training draw and from test) has not improved for `--patience`
steps, at most `--steps`, keeping its best validation state, and the LR is chosen per (model,
target) from `--ft-lrs` by validation accuracy (`finetune_tuned`; `--tune-extend 1` grows the
grid past a winning edge, which new runs should pass: 17 of the 30 choices of the session-9
reduced run sat on the grid's low edge); `--val-per-class 0` is the
paper's fixed `--steps` at `--ft-lr`. Test on at most `--test-per-class` images per class of
the target's test split. Zoo training: see experiments.model_zoo.

Cost: a reduced run, 15 models x 2 targets,
  --epochs 3 --per-class 300 --zoo-lr 0.01 --train-per-class 20 --steps 30 --ft-batch-size 50 \
  --test-per-class 100
took 14 min wall (zoo included; 6 CPU-min) on a shared 2-core machine. Its result: C_56(0.765)
mean rho 0.75 in-sample, 0.42 when alpha is chosen on the other groups; S1..S6 alone 0.37 at
best; source accuracy 0.25. The defaults (bigger zoo and fine-tuning sets) cost ~3x that.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Sequence

import numpy as np

from experiments import cli, grid_progress, model_zoo, publish
from experiments.report import ResultsDir, positive_floats
from jtransfer.data import parse_spec
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.methods import selection
from jtransfer.protocol import claims, progress
from jtransfer.scoring import SCORE_SETTINGS, SELECTION_FEATURES, source_scores
from jtransfer.zoo import ground_truth as gt
from jtransfer.zoo.analysis import (S_METRICS, analyze, group_label, oriented_scores, ranked,
                                    scratch_summary, score_settings)
from jtransfer.zoo.members import Member, param_count, scratch_references, zoo_table
from jtransfer.zoo.sections import (fmt, runs_table, scorer_table, score_settings_text,
                                    scratch_table, verdict)
from jtransfer.zoo.training import Compiled, TrainConfig
# (experiments.truncation and bench.bench_selection still reach these through this module)
from jtransfer.scoring import LABEL_SCORES, model_outputs, score_outputs  # noqa: F401
from jtransfer.zoo.analysis import PAPER_ALPHA, rank_summary as _summary  # noqa: F401
from jtransfer.zoo.targets import TargetTask, load_target  # noqa: F401

KEY = ("model", "target")
DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")
# --tiny: seconds-long fine-tuning for smoke tests (with model_zoo.TINY for the zoo).
TINY_FINETUNE = dict(train_per_class=4, test_per_class=5, steps=2, ft_batch_size=8)


# ----------------------------------------------------------------------------- ground truth
def protocol_from_args(args) -> gt.FineTuneProtocol:
  """The typed fine-tuning protocol from `add_finetune_args` and `add_protocol_args` flags
  (validated: one InputError sentence per problem)."""
  lrs = positive_floats(args.ft_lrs, "--ft-lrs")
  return gt.FineTuneProtocol(
      steps=args.steps, lr=args.ft_lr, lrs=tuple(lrs), batch_size=args.ft_batch_size,
      train_per_class=args.train_per_class, test_per_class=args.test_per_class,
      val_per_class=args.val_per_class, patience=args.patience, eval_every=args.eval_every,
      tune_extend=args.tune_extend, seed=args.seed)


def ground_truth(source, task: TargetTask, args, config: TrainConfig, compiled: Compiled,
                 ticker=None, **overrides) -> dict:
  """`jtransfer.zoo.ground_truth.ground_truth` under the flags' protocol (`config` is the
  flags' schedule, which the protocol carries too)."""
  return gt.ground_truth(source, task, protocol_from_args(args), compiled, ticker, **overrides)


def finetune_text(args, chosen_per: str = "run") -> str:
  """`jtransfer.zoo.ground_truth.finetune_text` of the flags' protocol."""
  return gt.finetune_text(protocol_from_args(args), chosen_per)


def ground_truth_kind(args) -> str:
  """`jtransfer.zoo.ground_truth.ground_truth_kind` of the flags' protocol."""
  return gt.ground_truth_kind(protocol_from_args(args))


def check_protocol_args(args) -> list[float]:
  """The protocol flags' checks; returns the LR grid."""
  return list(protocol_from_args(args).lrs)


def check_resume_protocol(records: Sequence[dict], args) -> None:
  """`jtransfer.zoo.ground_truth.check_resume` with the flags' --tune-extend."""
  gt.check_resume(records, args.tune_extend)


def make_report(records: Sequence[dict], summary: dict, args, zoo_lines: list[str]) -> str:
  best = summary["best_pair"]
  lines = ["# Base-model selection (Figs. 2, 3)", "",
           f"{summary['n_models']} base models x {len(set(r['target'] for r in records))} "
           f"targets. Fine-tuning: {finetune_text(args)} "
           f"Test: <= {args.test_per_class} images/class.", "",
           "## Zoo", ""] + zoo_lines + ["", "## Fine-tuned test accuracy", ""]
  targets = list(dict.fromkeys(r["target"] for r in records))
  by = {(r["model"], r["target"]): r["test_acc"] for r in records}
  lines += ["| model | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
  for m in dict.fromkeys(r["model"] for r in records):
    lines.append(f"| {m} | " + " | ".join(f"{by[(m, t)]:.4f}" if (m, t) in by else "-"
                                          for t in targets) + " |")
  lines += [""] + runs_table(records, ("model", "target"))
  lines += scratch_table(summary.get("scratch", {}))
  settings = score_settings(records)
  lines += ["## Scores", "", score_settings_text(settings)]
  lines += ["", "## Spearman rho per (family, target) (Fig. 2)", "",
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
  lines += ["", "## C_ij(alpha), alpha step 0.001 (Fig. 3)", "",
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
  if summary.get("claims"):
    lines += [""] + claims.section(summary["claims"], {})
    lines += [f"'{BEST_SINGLE}' = {summary['claims'][0]['best_single']} (the single metric with "
              "the best mean rho here). Effects are in rho x 100, not accuracy points; 'draws' "
              "are the (family, target) groups.", ""]
  lines += ["", "## Verdict", "", "Per (family, target): " + verdict(summary)]
  if summary["pooled"]:
    lines += ["", "Pooled over families, per target: " + verdict(summary, "pooled")]
  lines += ["", "Spearman over a handful of models per group moves in steps of 0.1 or more, and "
            "each accuracy is one fine-tuning run: read differences below ~0.2 as noise.", ""]
  return "\n".join(lines)

PAPER_RHO = 0.7514  # the paper's mean rho of C_56(0.574) (Fig. 3)
HELD_OUT = "C_ij held out"
BEST_SINGLE = "best single S"
CLAIMS = (
    claims.Claim("Selection", "C_ij(alpha), pair and alpha chosen on the other groups, ranks "
                 "better than the best single metric S1..S6 (effect: rho x 100)", HELD_OUT,
                 BEST_SINGLE, source="Fig. 3, sec. 5.3"),
    claims.Claim("Selection", "C_ij(alpha) reaches mean Spearman ~0.75 (within 0.1 of the "
                 "paper's 0.7514, on held-out groups; effect: rho x 100)", HELD_OUT,
                 "paper's rho", at_least=True, margin=0.1, source="Fig. 3"),
)


def claim_results(summary: dict) -> list[dict]:
  """The claims, paired over (family, target) groups: the held-out C_ij's rho on a group against
  the best single S metric's rho there (the single metric with the best mean rho over groups,
  chosen after the fact, which favours it) and against the paper's mean rho."""
  held = summary.get("held_out") or {}
  single = {n: summary["scorers"][n] for n in S_METRICS if n in summary["scorers"] and
            summary["scorers"][n]["spearman_mean"] is not None}
  if not held.get("per_group") or not single:
    return []
  best = max(single, key=lambda n: single[n]["spearman_mean"])
  rows = []
  for g, v in held["per_group"].items():
    s = single[best]["per_group"].get(g, {}).get("spearman")
    if v["spearman"] is None or s is None:
      continue
    rows += [dict(arm=HELD_OUT, group=g, test_acc=v["spearman"]),
             dict(arm=BEST_SINGLE, group=g, test_acc=s),
             dict(arm="paper's rho", group=g, test_acc=PAPER_RHO)]
  out = [claims.evaluate(c, rows, (), arm_field="arm", draw_field="group") for c in CLAIMS]
  for res in out:
    res["best_single"] = best
  return [r for r in out if r["cells"]]


def publish_report(records: list[dict], args, folder: str) -> tuple[str, dict]:
  """report.md and summary.json from the records and the zoo table written beside them."""
  with open(os.path.join(folder, "zoo.json")) as f:
    zoo_lines = json.load(f)
  summary = analyze(ranked(records), step=args.alpha_step)
  summary["claims"] = claim_results(summary)
  scratch = scratch_summary(records)
  if scratch:  # (folders without references keep their summary.json byte for byte)
    summary["scratch"] = scratch
  return make_report(records, summary, args, zoo_lines), summary


def validate(args) -> dict:
  """Checks the flags (targets, fine-tuning, zoo) without building anything."""
  return dict(specs=target_specs(args), config=finetune_config(args),
              zoo=model_zoo.zoo_from_args(args), ft_lrs=check_protocol_args(args))


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


# ----------------------------------------------------------------------------- command line

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  model_zoo.add_zoo_args(p)
  add_finetune_args(p)
  add_protocol_args(p)
  p.add_argument("--target", action="append", default=None,
                 help="target dataset spec; repeat the flag (or separate with ';') for several")
  p.add_argument("--alpha-step", type=float, default=0.001)
  add_score_args(p)
  p.add_argument("--scratch", action="store_true",
                 help="also fine-tune each family's architecture from a random init (not "
                      "ranked): how much the sources add next to the zoo's spread")
  p.add_argument("--save-features", action="store_true",
                 help="save each (model, target)'s outputs as features/<model>__<target>.npz")
  cli.add_results_flags(p, "results/model_selection",
                        resume_help="skip finished (model, target) pairs")
  return p.parse_args(argv)


def add_score_args(p: argparse.ArgumentParser, *, maps: bool = True) -> None:
  """Score flags (the open readings of the papers), shared with experiments.truncation."""
  g = p.add_argument_group("scores")
  if maps:
    g.add_argument("--map-tap", choices=selection.MAP_TAPS, default=SCORE_SETTINGS["map_tap"],
                   help="map S1..S6 read: 'conv', the last conv layer's output (the paper), or "
                        "'pooled', the 'last_conv' tap (after vgg_s's last max pool)")
    g.add_argument("--selection-features", choices=SELECTION_FEATURES,
                   default=SCORE_SETTINGS["selection_features"],
                   help="LogME / H-score features: 'target', the fine-tuned target's head input, "
                        "or 'source', the source's penultimate layer (fc7 for vgg_s)")
  g.add_argument("--logme", choices=selection.LOGME_VARIANTS,
                 default=SCORE_SETTINGS["logme_variant"],
                 help="LogME as the authors' published code ('published', comparable with "
                      "published numbers) or the exact evidence ('exact')")


def add_finetune_args(p: argparse.ArgumentParser) -> None:
  """Fine-tuning and target flags, shared with experiments.truncation."""
  g = p.add_argument_group("fine-tuning")
  g.add_argument("--train-per-class", type=int, default=50,
                 help="labelled target images per class (fine-tuning and metrics)")
  g.add_argument("--test-per-class", type=int, default=200)
  g.add_argument("--steps", type=int, default=100, help="fine-tuning SGD steps")
  g.add_argument("--ft-lr", type=float, default=0.01)
  g.add_argument("--ft-batch-size", type=int, default=50)
  g.add_argument("--data-dir", default=None, help="TFDS data_dir or Fashion-MNIST directory")


def add_protocol_args(p: argparse.ArgumentParser) -> None:
  """The ground truth's protocol flags (docs/protocol.md), shared with truncation."""
  g = p.add_argument_group("protocol (docs/protocol.md)")
  g.add_argument("--val-per-class", type=int, default=20,
                 help="validation images per class, disjoint from the training draw: each "
                      "fine-tuning run stops by validation patience, its LR is chosen on it; "
                      "0 = the paper's fixed --steps at --ft-lr, no validation")
  g.add_argument("--ft-lrs", default="0.003,0.01,0.03",
                 help="SGD LR grid, one chosen per run by validation accuracy")
  g.add_argument("--patience", type=int, default=100)
  g.add_argument("--eval-every", type=int, default=10)
  # Default 0: the folders published before session 10 ran without extension, and their
  # commands must still mean what they ran. New runs should pass --tune-extend 1 or more.
  cli.add_tune_extend_flag(g, 0)
  p.set_defaults(steps=1000)  # the cap of a converged run


def finetune_config(args) -> TrainConfig:
  """The fine-tuning schedule from `add_finetune_args` flags (validated; `--tiny` shrinks them
  to TINY_FINETUNE)."""
  if getattr(args, "tiny", False):
    for k, v in TINY_FINETUNE.items():
      setattr(args, k, v)
  if args.train_per_class < 2 or args.steps < 1 or args.ft_batch_size < 1 or args.ft_lr <= 0:
    raise InputError("--train-per-class must be >= 2 and --steps, --ft-batch-size, --ft-lr > 0")
  return TrainConfig(lr=args.ft_lr, batch_size=args.ft_batch_size, bn_train=False)


def target_specs(args, default=DEFAULT_TARGETS) -> list[str]:
  """The --target specs (default `default`), each parsed (InputError on a bad one)."""
  specs = cli.target_list(args.target, default)
  for t in specs:
    parse_spec(t, flag="--target")
  return specs


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def run(args, members: Sequence[Member], specs: Sequence[str], config: TrainConfig,
        results: ResultsDir) -> None:
  """Scores and fine-tunes every (model, target) not yet in `results`.

  Raises:
    InputError: `results` holds records scored with other score flags.
  """
  done = results.done(KEY)
  settings = dict(map_tap=args.map_tap, selection_features=args.selection_features,
                  logme_variant=args.logme)
  old = score_settings(results.records) if results.records else settings
  if old != settings:
    raise InputError(f"--out holds records scored with {old}, not {settings}: use the same "
                     "flags or --overwrite")
  protocol = protocol_from_args(args)
  gt.check_resume(results.records, protocol.tune_extend)
  compiled = Compiled()
  shape = members[0].source.input_shape
  emit = grid_progress.stderr_or_quiet(args)
  grid = progress.GridProgress(
      {gt.ground_truth_kind(protocol): len(members) * len(specs)},
      saved=sum((m.name, spec) in done for m in members for spec in specs), emit=emit)
  grid.announce("model_selection")
  for spec in specs:
    if all((m.name, spec) in done for m in members):
      continue
    task = load_target(spec, shape, args.train_per_class, args.test_per_class, args.seed,
                       args.data_dir, args.val_per_class)
    for m in members:
      if (m.name, spec) in done:
        continue
      t0 = time.time()
      scores, outputs = source_scores(m.source, task.train.images, task.train.labels, compiled,
                                      **settings)
      if args.save_features:
        os.makedirs(os.path.join(results.path, "features"), exist_ok=True)
        np.savez(os.path.join(results.path, "features", f"{m.name}__{_safe(spec)}.npz"),
                 labels=task.train.labels, **outputs)
      t1 = time.time()
      run_info = gt.ground_truth(m.source, task, protocol, compiled, lambda lr: progress.ticker(
          f"{m.name} -> {spec} lr={lr:g}", emit))
      acc = run_info["test_acc"]
      ref = dict(reference="scratch") if m.spec.fraction == 0 else {}
      record = dict(model=m.name, target=spec, family=m.spec.family, arch=m.spec.arch, **ref,
                    source_accuracy=m.source.meta["source_test_acc"],
                    param_count=param_count(m.source), n_train=len(task.train),
                    n_test=len(task.test), **run_info, score_seconds=round(t1 - t0, 3),
                    finetune_seconds=round(time.time() - t1, 3), **settings, **scores)
      results.add(record)
      grid.finished(f"{m.name} -> {spec}: acc {acc:.4f} S6 {scores['S6']:.4g} "
                    f"LogME {scores['LogME']:.4g} ({time.time() - t0:.1f}s)")


# A resume may add the random-init reference (--scratch) beside the finished runs.
ADDITIVE = ("scratch",)


@cli.interruptible("experiments.model_selection", lambda argv: parse_args(argv))
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  made_by = cli.settings("experiments.model_selection", args, ADDITIVE)
  cli.apply_devices(args)
  t0 = time.time()
  log = None if args.quiet else (lambda s: print(s, file=sys.stderr))
  try:
    plan = validate(args)
    specs, config, (zoo, settings) = plan["specs"], plan["config"], plan["zoo"]
    results = cli.open_results(args, made_by, parse_args, additive=ADDITIVE)
    members = model_zoo.build_zoo(zoo, settings, args.zoo_root or model_zoo.CACHE_ROOT, log=log)
    refs = scratch_references(members, args.seed) if args.scratch else []
    run(args, members + refs, specs, config, results)
    names = {m.name for m in members + refs}
    records = [r for r in results.records if r["model"] in names and r["target"] in specs]
    analyze(ranked(records), step=args.alpha_step)  # fails early on a group too small
  except (InputError, NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  records = sorted(records, key=lambda r: (r["target"], r["model"]))
  results.write_json("zoo.json", zoo_table(members))
  text, summary = publish.save(results, PUBLISHER, argv, records, plan, args, t0)
  plot_spearman(summary, os.path.join(results.path, "spearman.png"))
  plot_alpha_curves(ranked(records), summary, os.path.join(results.path, "alpha_curves.png"),
                    args.alpha_step)
  return cli.finish(results, text, t0)


PUBLISHER = publish.Publisher(
    "experiments.model_selection", parse_args, validate,
    lambda records, plan, args, folder: publish_report(records, args, folder),
    key=lambda r: (r["model"], r["target"]))


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
