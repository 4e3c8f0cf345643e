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
`jtransfer.zoo.sections`, the flags `jtransfer.zoo.flags`. This module declares the study
(`jtransfer.study`): one version-2 record per (model, target), arm = the zoo member, cell = the
target; its own run loop (a zoo member is scored and fine-tuned once per target, no draws), its
report and claims (over (family, target) groups, from the analysis, not over draws).

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

import dataclasses
import json
import os
import re
import time
from typing import Sequence

import numpy as np

from experiments.model_zoo import log_of, members_of
from jtransfer import study
from jtransfer.data import parse_spec
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.protocol import claims, progress
from jtransfer.scoring import source_scores
from jtransfer.study import records as rec
from jtransfer.study.config import flag, target_list
from jtransfer.study.draws import Draw
from jtransfer.zoo import ground_truth as gt
from jtransfer.zoo import plots as zoo_plots
from jtransfer.zoo.analysis import S_METRICS, analyze, ranked, scratch_summary, score_settings
from jtransfer.zoo.flags import TINY_FINETUNE, TINY_ZOO, FineTuneFlags, ScoreFlags, ZooFlags
from jtransfer.zoo.members import param_count, scratch_references, zoo_table
from jtransfer.zoo.sections import (accuracy_table, combination_section, runs_table,
                                    score_settings_text, scratch_table, spearman_section, verdict)
from jtransfer.zoo.targets import load_target
from jtransfer.zoo.training import Compiled

DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")
OUTCOME = ("test_acc", "val_acc", "steps", "best_step", "stopped", "lr_val", "edges")


@dataclasses.dataclass(frozen=True)
class SelectionFlags(ScoreFlags, FineTuneFlags, ZooFlags):
  """model_selection's flags: the zoo, the ground truth, the scores, and these."""
  targets: tuple = flag("--target", DEFAULT_TARGETS, "target dataset spec; repeat the flag (or "
                        "separate with ';') for several", dest="target", cli=None,
                        parse=lambda v: target_list(v, DEFAULT_TARGETS), action="append")
  alpha_step: float = flag("--alpha-step", 0.001, "alpha increment of the C_ij(alpha) sweep")
  scratch: bool = flag("--scratch", False, "also fine-tune each family's architecture from a "
                       "random init (not ranked): how much the sources add next to the zoo's "
                       "spread", action="store_true")
  save_features: bool = flag("--save-features", False, "save each (model, target)'s outputs "
                             "as features/<model>__<target>.npz", action="store_true")
  tiny: bool = flag("--tiny", False, "seconds-long zoo and fine-tuning for smoke tests: "
                    + json.dumps({**TINY_ZOO, **TINY_FINETUNE}), action="store_true")


def plan_of(config) -> dict:
  """The typed plan: targets, zoo (specs, settings), fine-tuning protocol, score settings.

  Raises:
    InputError: a bad target, zoo or protocol flag (one sentence).
  """
  x = config.extra
  for t in x.targets:
    parse_spec(t, flag="--target")
  return dict(specs=list(x.targets), protocol=x.protocol(), zoo=x.zoo(),
              settings=x.settings(), alpha_step=x.alpha_step)


def rows(records: Sequence[dict]) -> list[dict]:
  """Flat rows of records of either version (`records.rows`), each with its 'model'."""
  return [dict(r, model=r["arm"]) for r in rec.rows(records, ("target",))]


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def run(_, config, results) -> list[dict]:
  """Scores and fine-tunes every (model, target) not yet recorded; the records of this
  invocation's zoo and targets.

  Raises:
    InputError: the folder holds records scored with other score flags or tuned otherwise, a
      group too small to rank, or every LR of a ground truth diverged.
  """
  p, x = plan_of(config), config.extra
  protocol, settings, specs = p["protocol"], p["settings"], p["specs"]
  old = score_settings(rows(results.records)) if results.records else settings
  if old != settings:
    raise InputError(f"--out holds records scored with {old}, not {settings}: use the same "
                     "flags or --overwrite")
  gt.check_resume(rows(results.records), protocol.tune_extend)
  emit = log_of(config)
  zoo = members_of(config, emit)
  members = zoo + (scratch_references(zoo, x.seed) if x.scratch else [])
  done = {(r["model"], r["target"]) for r in rows(results.records)}
  grid = progress.GridProgress(
      {gt.ground_truth_kind(protocol): len(members) * len(specs)},
      saved=sum((m.name, spec) in done for m in members for spec in specs), emit=emit)
  grid.announce("model_selection")
  compiled = Compiled()
  try:
    for spec in specs:
      if all((m.name, spec) in done for m in members):
        continue
      task = load_target(spec, members[0].source.input_shape, protocol.train_per_class,
                         protocol.test_per_class, x.seed, x.data_dir, protocol.val_per_class)
      for m in members:
        if (m.name, spec) not in done:
          record = _score_and_finetune(m, spec, task, protocol, settings, compiled, emit,
                                       results.path if x.save_features else None)
          results.add(record)
          r = rows([record])[0]
          grid.finished(f"{m.name} -> {spec}: acc {r['test_acc']:.4f} S6 {r['S6']:.4g} "
                        f"LogME {r['LogME']:.4g} ({record['seconds']:.1f}s)")
  except NonFiniteError as e:  # every LR of a ground truth diverged: one line, exit code 2
    raise InputError(str(e)) from None
  names = {m.name for m in members}
  records = [r for r, f in zip(results.records, rows(results.records))
             if f["model"] in names and f["target"] in specs]
  analyze(ranked(rows(records)), step=x.alpha_step)  # fails early on a group too small
  results.write_json("zoo.json", zoo_table(zoo))
  return records


def _score_and_finetune(m, spec, task, protocol, settings, compiled, emit, save_to) -> dict:
  """One (model, target): its scores, then its ground truth; the version-2 record."""
  t0 = time.time()
  scores, outputs = source_scores(m.source, task.train.images, task.train.labels, compiled,
                                  **settings)
  if save_to:
    os.makedirs(os.path.join(save_to, "features"), exist_ok=True)
    np.savez(os.path.join(save_to, "features", f"{m.name}__{_safe(spec)}.npz"),
             labels=task.train.labels, **outputs)
  t1 = time.time()
  truth = gt.ground_truth(m.source, task, protocol, compiled, lambda lr: progress.ticker(
      f"{m.name} -> {spec} lr={lr:g}", emit))
  ref = dict(reference="scratch") if m.spec.fraction == 0 else {}
  extra = dict(family=m.spec.family, arch=m.spec.arch, **ref,
               source_accuracy=m.source.meta["source_test_acc"],
               param_count=param_count(m.source), n_train=len(task.train),
               n_test=len(task.test), **{k: v for k, v in truth.items()
                                         if k not in OUTCOME and k != "lr"},
               score_seconds=round(t1 - t0, 3), finetune_seconds=round(time.time() - t1, 3),
               **settings, **scores)
  knobs = {"lr": truth["lr"]} if "lr" in truth else {}
  return rec.make(m.name, {"target": spec}, Draw("eval", 0), knobs,
                  {k: truth[k] for k in OUTCOME if k in truth}, time.time() - t0, extra)


def make_report(records: Sequence[dict], summary: dict, protocol, zoo_lines: list[str]) -> str:
  """report.md from the rows (`rows`), their summary, the fine-tuning protocol and the zoo
  table."""
  lines = ["# Base-model selection (Figs. 2, 3)", "",
           f"{summary['n_models']} base models x {len(set(r['target'] for r in records))} "
           f"targets. Fine-tuning: {gt.finetune_text(protocol)} "
           f"Test: <= {protocol.test_per_class} images/class.", "",
           "## Zoo", ""] + zoo_lines + ["", "## Fine-tuned test accuracy", ""]
  lines += accuracy_table(records)
  lines += [""] + runs_table(records, ("model", "target"))
  lines += scratch_table(summary.get("scratch", {}))
  settings = score_settings(records)
  lines += ["## Scores", "", score_settings_text(settings)]
  lines += spearman_section(summary) + combination_section(summary)
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


def report(plan, records, folder) -> tuple[str, dict]:
  """report.md and summary.json from the records and the zoo table written beside them."""
  with open(os.path.join(folder, "zoo.json")) as f:
    zoo_lines = json.load(f)
  flat = rows(records)
  summary = analyze(ranked(flat), step=plan["alpha_step"])
  summary["claims"] = claim_results(summary)
  scratch = scratch_summary(flat)
  if scratch:  # (folders without references keep their summary.json byte for byte)
    summary["scratch"] = scratch
  return make_report(flat, summary, plan["protocol"], zoo_lines), summary


def plots(summary: dict, plan: dict, folder: str) -> None:
  """spearman.png and alpha_curves.png beside the report."""
  with open(os.path.join(folder, "results.json")) as f:
    flat = ranked(rows(json.load(f)))
  zoo_plots.plot_spearman(summary, os.path.join(folder, "spearman.png"))
  zoo_plots.plot_alpha_curves(flat, summary, os.path.join(folder, "alpha_curves.png"), plan["alpha_step"])


STUDY = study.Study(
    module="experiments.model_selection", title="# Base-model selection (Figs. 2, 3)",
    cell_fields=("target",), claims=CLAIMS, groups=("output",), hidden=frozenset({"shard"}),
    extra=SelectionFlags, defaults={"out": "results/model_selection"}, check=plan_of,
    plan=plan_of, run=run, report=report, plots=plots,
    record_key=lambda r: (rows([r])[0]["target"], rows([r])[0]["model"]),
    additive=frozenset({"scratch"}), doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
