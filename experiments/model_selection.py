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
import dataclasses
import json
import os
import re
import sys
import time
from typing import Sequence

import numpy as np

from experiments import cli, grid_progress, model_zoo, publish
from experiments.fewshot import cap_per_class
from experiments.model_zoo import Compiled, TrainConfig, prenormalize
from experiments.report import ResultsDir, positive_floats
from jtransfer.data import ImageSet, load_spec, parse_spec, sample_kshot
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.methods import selection, sfda, transfer, transrate
from jtransfer.protocol import Budget, claims, progress, tuning

KEY = ("model", "target")
DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")
S_METRICS = selection.METRIC_NAMES
LABEL_SCORES = ("LogME", "LEEP", "NCE", "H-score", "TransRate", "SFDA")
SELECTION_FEATURES = ("target", "source")
# Settings that change the scores; stored in every record. Records written before they existed
# were computed with the values in LEGACY_SETTINGS.
SCORE_SETTINGS = dict(map_tap="conv", selection_features="target", logme_variant="published")
LEGACY_SETTINGS = dict(map_tap="pooled", selection_features="source", logme_variant="exact")
BLIND = ("source_accuracy", "param_count")
PAPER_ALPHA = 0.574
_ONE_CHUNK_ELEMENTS = 1 << 24
# --tiny: seconds-long fine-tuning for smoke tests (with model_zoo.TINY for the zoo).
TINY_FINETUNE = dict(train_per_class=4, test_per_class=5, steps=2, ft_batch_size=8)


# ----------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class TargetTask:
  """A target: labelled training images (fine-tuning and metrics), test images, and (for
  converged fine-tuning) validation images disjoint from both."""
  spec: str
  train: ImageSet
  test: ImageSet
  val: ImageSet | None = None

  @property
  def num_classes(self) -> int:
    return self.train.num_classes


def load_target(spec: str, image_shape, train_per_class: int, test_per_class: int,
                seed: int = 0, data_dir: str | None = None,
                val_per_class: int = 0) -> TargetTask:
  """Loads `spec`, draws `train_per_class` training images per class (and `val_per_class`
  disjoint validation images from the train split), caps the test split.

  Raises:
    InputError: a bad spec, or a class with fewer than `train_per_class` training images.
  """
  data = load_spec(spec, tuple(image_shape), flag="--target", data_dir=data_dir)
  idx, val = sample_kshot(data.train.labels, train_per_class, seed,
                          val_per_class=val_per_class, num_classes=data.train.num_classes)
  return TargetTask(spec, data.train.take(idx), cap_per_class(data.test, test_per_class),
                    data.train.take(val) if val_per_class else None)


# ----------------------------------------------------------------------------- scores
def model_outputs(model, params, stats, x: np.ndarray, taps: Sequence[str], compiled: Compiled,
                  batch_size: int = 250) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """(logits, {tap: array}) of `model` in eval mode over pre-normalised images, in batches.

  Taps are model taps or `selection.LAST_CONV_OUTPUT`. The last batch is padded to
  `batch_size` so one shape compiles once.
  """
  forward = compiled.forward(model, tuple(taps))
  bs = min(batch_size, len(x))
  logits, got = [], {t: [] for t in taps}
  for start in range(0, len(x), bs):
    chunk = x[start:start + bs]
    n = len(chunk)
    if n < bs:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
    out, t = forward(params, stats, chunk)
    logits.append(np.asarray(out)[:n])
    for name in taps:
      got[name].append(np.asarray(t[name])[:n])
  return np.concatenate(logits), {k: np.concatenate(v) for k, v in got.items()}


def score_outputs(labels: np.ndarray, last_conv: np.ndarray, features: np.ndarray | None = None,
                  source_logits: np.ndarray | None = None, *,
                  logme_variant: str = SCORE_SETTINGS["logme_variant"]) -> dict[str, float]:
  """Every transferability score of one (model, target) from the model's outputs.

  Args:
    labels: (N,) target labels.
    last_conv: (N, H, W, C) last conv map after ReLU: S1..S6.
    features: (N, D) selection features: LogME, H-score, TransRate, SFDA (skipped when None).
    source_logits: (N, K_src) source-head logits: LEEP on their softmax, NCE on their argmax
      (skipped when None).
    logme_variant: `selection.logme`'s variant; 'published' (default) as the LogME authors'
      code, whose numbers the literature reports.

  Returns:
    {'S1'..'S6', 'LogME', 'H-score', 'TransRate', 'SFDA', 'LEEP', 'NCE'} raw values (S2, S4,
    S5, S6 smaller is better; the others larger).
  """
  # One chunk when it fits (one compilation per map shape and image count); else bounded chunks.
  chunk = None if np.size(last_conv) <= _ONE_CHUNK_ELEMENTS else 256
  out = selection.feature_map_metrics(last_conv, labels, chunk_size=chunk)
  if features is not None:
    out["LogME"] = selection.logme(features, labels, variant=logme_variant)
    out["H-score"] = selection.h_score(features, labels)
    out["TransRate"] = transrate.transrate(features, labels)
    out["SFDA"] = sfda.sfda(features, labels)
  if source_logits is not None:
    z = np.asarray(source_logits, np.float64)
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    out["LEEP"] = selection.leep(probs / probs.sum(axis=1, keepdims=True), labels)
    out["NCE"] = selection.nce(np.argmax(z, axis=1), labels)
  return out


def source_scores(source: transfer.Source, images: np.ndarray, labels: np.ndarray,
                  compiled: Compiled, *, map_tap: str = SCORE_SETTINGS["map_tap"],
                  selection_features: str = SCORE_SETTINGS["selection_features"],
                  logme_variant: str = SCORE_SETTINGS["logme_variant"]
                  ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Scores of a base model on labelled target images, from eval-mode forwards.

  Args:
    source: the base model.
    images: (N, H, W, C) uint8 labelled target images.
    labels: (N,) their labels.
    compiled: shared compilations.
    map_tap: the map S1..S6 read (`selection.MAP_TAPS`): 'conv' (default), the last conv layer's
      output after ReLU, as the paper says; 'pooled', the 'last_conv' tap (after the last max
      pool in VGG / AlexNet; the same map for ResNets).
    selection_features: what LogME and H-score read: 'target' (default), the head input of the
      fine-tuned target (`transfer.target_model`, which drops the source's fc6/fc7), i.e. the
      features fine-tuning builds on; 'source', the source's own penultimate layer (fc7 for
      vgg_s; the same as 'target' for ResNets).
    logme_variant: see `score_outputs`.

  Returns:
    (scores as `score_outputs`, the outputs they came from: {map tap name, 'features',
    'logits'}, the map under the name of the tap read, `selection.LAST_CONV_OUTPUT` or
    'last_conv').

  Raises:
    InputError: an unknown map tap or selection_features value.
  """
  tap = selection.map_tap_name(map_tap)
  if selection_features not in SELECTION_FEATURES:
    raise InputError(f"selection features {selection_features!r}: expected one of "
                     f"{', '.join(SELECTION_FEATURES)}")
  x = prenormalize(images, source.mean, source.std)
  v = source.variables
  logits, taps = model_outputs(source.model, v["params"], v.get("batch_stats", {}), x,
                               (tap, "features"), compiled)
  if selection_features == "target" and source.config.get("dense_widths"):
    # The target drops the source's hidden dense layers: its head reads another vector.
    model = transfer.target_model(source, len(np.unique(labels)))
    params, stats = transfer.init_target(source, model, 0)
    _, target_taps = model_outputs(model, params, stats, x, ("features",), compiled)
    taps["features"] = target_taps["features"]
  outputs = dict(taps, logits=logits)
  scores = score_outputs(labels, taps[tap], taps["features"], logits, logme_variant=logme_variant)
  return scores, outputs


# ----------------------------------------------------------------------------- fine-tuning
def finetune(source: transfer.Source, task: TargetTask, steps: int, config: TrainConfig,
             compiled: Compiled, seed: int = 0, **overrides) -> float:
  """Test accuracy after fine-tuning every layer of `source` with a new head on `task`.

  Args:
    source: the base model.
    task: target data.
    steps: SGD steps.
    config: schedule (BN mode included).
    compiled: shared compilations (one per target model config).
    seed: head init, batch order.
    **overrides: target model config overrides, e.g. truncate_after='stage2/block0' (source
      params the truncated model lacks are dropped).

  Returns:
    Top-1 accuracy on `task.test`.
  """
  model = transfer.target_model(source, task.num_classes, **overrides)
  params, stats = transfer.init_target(source, model, seed)
  x = prenormalize(task.train.images, source.mean, source.std)
  params, stats = model_zoo.train_classifier(model, {"params": params, "batch_stats": stats}, x,
                                             task.train.labels, steps, config, compiled, seed)
  return model_zoo.evaluate(model, params, stats,
                            prenormalize(task.test.images, source.mean, source.std),
                            task.test.labels, compiled)


def finetune_converged(source: transfer.Source, task: TargetTask, budget, config: TrainConfig,
                       compiled: Compiled, seed: int = 0, on_step=None, **overrides) -> dict:
  """`finetune` under the protocol: the run stops by `task.val` accuracy (`budget`) and keeps
  its best validation state (model_zoo.train_classifier_converged); `on_step` is a long run's
  progress hook (`jtransfer.protocol.progress.ticker`).

  Returns:
    {'test_acc', 'val_acc', 'steps', 'best_step', 'stopped'}.
  """
  if task.val is None:
    raise InputError("converged fine-tuning needs validation images (val_per_class > 0)")
  model = transfer.target_model(source, task.num_classes, **overrides)
  params, stats = transfer.init_target(source, model, seed)
  norm = lambda images: prenormalize(images, source.mean, source.std)
  xval = norm(task.val.images)
  params, stats, info = model_zoo.train_classifier_converged(
      model, {"params": params, "batch_stats": stats}, norm(task.train.images),
      task.train.labels, (xval, task.val.labels), budget, config, compiled, seed, on_step)
  return dict(info, val_acc=model_zoo.evaluate(model, params, stats, xval, task.val.labels,
                                               compiled),
              test_acc=model_zoo.evaluate(model, params, stats, norm(task.test.images),
                                          task.test.labels, compiled))


def finetune_tuned(source: transfer.Source, task: TargetTask, args, config: TrainConfig,
                   compiled: Compiled, ticker=None, **overrides) -> dict:
  """The ground-truth fine-tuning under the protocol: a converged run (`finetune_converged`)
  at each LR of `--ft-lrs`; the LR with the best validation accuracy (ties: the smaller) is
  kept. With `--tune-extend N` a grid whose best LR is its first or last grows by up to N
  LRs on that side (`jtransfer.protocol.tuning.tune`, the grid's own ratio). `ticker(lr)`
  gives each LR's run its progress hook (or None).

  Returns:
    The kept run: {'test_acc', 'val_acc', 'lr', 'steps', 'best_step', 'stopped', 'n_val',
    'lr_val': {lr: validation accuracy, None where the run diverged}}, plus 'edges' (['lr:low']
    or ['lr:high'] when the choice is still on an edge) with `--tune-extend` > 0; the other
    LRs' test accuracies are dropped unread.

  Raises:
    NonFiniteError: every LR tried diverged.
  """
  budget = Budget(cap=args.steps, eval_every=min(args.eval_every, args.steps),
                  patience=args.patience)
  runs, diverged = {}, []

  def val_acc(point: dict) -> float:
    lr = point["lr"]
    try:
      runs[lr] = finetune_converged(source, task, budget, dataclasses.replace(config, lr=lr),
                                    compiled, args.seed, on_step=ticker and ticker(lr),
                                    **overrides)
    except NonFiniteError as e:  # this LR diverged: out of the choice, as validation would say
      runs[lr] = None
      diverged.append(e)
      return -1.0
    return runs[lr]["val_acc"]

  grid = sorted(set(positive_floats(args.ft_lrs, "--ft-lrs")))
  extend = getattr(args, "tune_extend", 0)
  if len(grid) == 1:  # tune() scores nothing on one point; the ground truth needs its run
    val_acc({"lr": grid[0]})
    tuned = None        # (check_protocol_args refuses --tune-extend with one LR)
  else:
    tuned = tuning.tune({"lr": grid}, val_acc, extend)
  if all(r is None for r in runs.values()):
    raise diverged[-1]
  best = grid[0] if tuned is None else tuned.choice["lr"]
  out = dict(runs[best], lr=best, n_val=len(task.val),
             lr_val={f"{lr:g}": None if r is None else r["val_acc"]
                     for lr, r in sorted(runs.items())})
  if extend:
    out.update(edges=tuned.edges, tune_extend=extend)
  return out


def ground_truth(source: transfer.Source, task: TargetTask, args, config: TrainConfig,
                 compiled: Compiled, ticker=None, **overrides) -> dict:
  """The accuracy a metric is ranked against, as the flags say: `finetune_tuned` (the
  protocol; `ticker(lr)` -> progress hook of that LR's run), or with `--val-per-class 0` one
  fixed `--steps` run at `--ft-lr` ({'test_acc', 'steps'})."""
  if args.val_per_class:
    return finetune_tuned(source, task, args, config, compiled, ticker, **overrides)
  return dict(test_acc=finetune(source, task, args.steps, config, compiled, args.seed,
                                **overrides), steps=args.steps)


def finetune_text(args, chosen_per: str = "run") -> str:
  """How the ground truth was fine-tuned, from the flags (for the reports); `chosen_per`
  names what each LR choice covers."""
  if not args.val_per_class:
    return (f"{args.steps} SGD steps of {args.ft_batch_size} on {args.train_per_class} "
            f"images/class, lr {args.ft_lr:g} x0.1 at 7/30..28/30 of the run, momentum 0.9, "
            "weight decay 5e-4, BN stats frozen (the paper's 30-epoch schedule, shortened).")
  return (f"SGD (momentum 0.9, weight decay 5e-4, batch {args.ft_batch_size}) on "
          f"{args.train_per_class} images/class until validation accuracy "
          f"({args.val_per_class}/class, disjoint from training and test) has not improved for "
          f"{args.patience} steps (checked every {args.eval_every}), at most {args.steps} "
          f"steps, keeping the best validation state; the LR chosen per {chosen_per} from "
          f"{{{args.ft_lrs}}}{extend_text(args)} by validation accuracy (ties: the smaller); "
          "lr x0.1 at 7/30..28/30 of the cap; BN stats frozen. The test split reaches no "
          "choice.")


def extend_text(args) -> str:
  """How far the LR grid may grow at an edge, for `finetune_text` (empty without extension)."""
  n = getattr(args, "tune_extend", 0)
  return (f" (extended by up to {n} LR{'s' if n > 1 else ''} past an edge that wins, at the "
          "grid's ratio)") if n else ""


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


def check_protocol_args(args) -> list[float]:
  """The protocol flags' checks; returns the LR grid."""
  for flag, value, least in (("--val-per-class", args.val_per_class, 0),
                             ("--tune-extend", args.tune_extend, 0),
                             ("--patience", args.patience, 1),
                             ("--eval-every", args.eval_every, 1)):
    if value < least:
      raise InputError(f"{flag} must be >= {least}, got {value}")
  grid = positive_floats(args.ft_lrs, "--ft-lrs")
  if args.tune_extend and (not args.val_per_class or len(set(grid)) < 2):
    raise InputError(f"--tune-extend {args.tune_extend} extends an LR grid chosen on "
                     "validation: it needs --val-per-class >= 1 and at least two --ft-lrs")
  return grid


def check_resume_protocol(records: Sequence[dict], args) -> None:
  """Refuses to add runs to `records` whose LR grids were (or were not) extended otherwise.

  Raises:
    InputError: the folder's tuned runs used extension and the flags do not, or the reverse.
  """
  used = {bool(r.get("tune_extend", "edges" in r)) for r in records if "lr_val" in r}
  if used - {bool(args.tune_extend)}:
    was = "with" if True in used else "without"
    raise InputError(f"--out holds runs tuned {was} LR-grid extension, not --tune-extend "
                     f"{args.tune_extend}: use the same flag or --overwrite")


# ----------------------------------------------------------------------------- analysis
def group_label(record: dict) -> str:
  """The paper's group: one architecture (zoo family) on one target."""
  return f"{record['family']} @ {record['target']}"


def oriented_scores(records: Sequence[dict]) -> dict[str, np.ndarray]:
  """Scores with larger = predicted better: S1..S6 scaled to [-1, 1] over all records (S2, S4,
  S5, S6 negated, as the paper does before combining), then S6 under App. A.2's sign
  (`selection.S6_APPENDIX`: raw S6 larger = better, the scaled value not negated), then the
  others as they are."""
  stacked = selection.stack_metrics([{k: r[k] for k in S_METRICS} for r in records])
  out = dict(selection.normalize_metrics(stacked))
  out[selection.S6_APPENDIX] = -out["S6"]
  for name in LABEL_SCORES + BLIND:
    if all(name in r for r in records):
      out[name] = np.array([r[name] for r in records], np.float64)
  return out


def _summary(rank: selection.RankSummary) -> dict:
  rho, tau = rank.spearman, rank.weighted_tau
  ok = np.isfinite(rho)
  return dict(
      spearman_mean=float(np.mean(rho[ok])) if ok.any() else None,
      spearman_var=float(np.var(rho[ok])) if ok.any() else None,
      weighted_tau_mean=float(np.nanmean(tau)) if np.isfinite(tau).any() else None,
      groups_defined=int(ok.sum()),
      per_group={str(g): dict(spearman=_num(r), weighted_tau=_num(t))
                 for g, r, t in zip(rank.groups, rho, tau)})


def _num(x: float) -> float | None:
  return float(x) if np.isfinite(x) else None


def held_out_combination(norm: dict[str, np.ndarray], acc: np.ndarray, groups: Sequence[str],
                         step: float) -> dict | None:
  """Leave-one-group-out estimate of the best C_ij(alpha): (i, j, alpha) chosen on the other
  groups, rho measured on the held-out one. The in-sample best is optimistic, the more so with
  few models per group; this is the figure a new (architecture, target) could expect.

  Returns:
    {'per_group': {group: {'pair', 'alpha', 'spearman'}}, 'spearman_mean', 'spearman_var'}, or
    None with fewer than 2 groups.
  """
  labels = list(dict.fromkeys(groups))
  if len(labels) < 2:
    return None
  groups = np.asarray(groups, dtype=object)
  per_group = {}
  for g in labels:
    fit_on, test_on = groups != g, groups == g
    sweeps = selection.sweep_pairs({k: v[fit_on] for k, v in norm.items()}, acc[fit_on],
                                   list(groups[fit_on]), step=step)
    finite = {k: sw for k, sw in sweeps.items() if np.isfinite(sw.best_mean)}
    if not finite:
      continue
    (a, b), sw = max(finite.items(), key=lambda kv: kv[1].best_mean)
    rho = selection.spearman(selection.combine(norm[a][test_on], norm[b][test_on],
                                               sw.best_alpha), acc[test_on])
    per_group[g] = dict(pair=f"{a}+{b}", alpha=sw.best_alpha, spearman=_num(rho))
  rhos = np.array([v["spearman"] for v in per_group.values() if v["spearman"] is not None])
  return dict(per_group=per_group,
              spearman_mean=float(rhos.mean()) if rhos.size else None,
              spearman_var=float(rhos.var()) if rhos.size else None)


def analyze(records: Sequence[dict], *, step: float = 0.001) -> dict:
  """Rank correlations of every scorer with fine-tuned accuracy, and the C_ij(alpha) sweep.

  Args:
    records: one per (model, target) with 'family', 'target', 'test_acc', S1..S6 and
      optionally LogME, LEEP, NCE, H-score, source_accuracy, param_count.
    step: alpha increment of the sweep.

  Returns:
    JSON-ready dict: 'groups', 'scorers' ({name: summary per (family, target)}), 'pooled'
    ({name: summary per target, all families together}), 'pairs' ({'S5+S6': best alpha, mean,
    var, mean curve}), 'best_pair', 'held_out' (see `held_out_combination`).

  Raises:
    InputError: a (family, target) group with fewer than 2 models.
  """
  records = sorted(records, key=lambda r: (r["family"], r["target"], r["model"]))
  acc = np.array([r["test_acc"] for r in records], np.float64)
  groups = [group_label(r) for r in records]
  scores = oriented_scores(records)
  norm = {k: scores[k] for k in S_METRICS}
  sweeps = selection.sweep_pairs(norm, acc, groups, step=step)
  pairs = {}
  for (a, b), sw in sweeps.items():
    at_paper = int(np.argmin(np.abs(sw.alphas - PAPER_ALPHA)))
    pairs[f"{a}+{b}"] = dict(
        i=a, j=b, best_alpha=sw.best_alpha, best_mean=_num(sw.best_mean),
        best_var=_num(sw.best_var), mean_curve=[_num(v) for v in sw.mean],
        groups=[str(g) for g in sw.groups], per_group_at_best=[
            _num(v) for v in sw.spearman[int(np.argmin(np.abs(sw.alphas - sw.best_alpha)))]],
        mean_at_paper_alpha=_num(sw.mean[at_paper]), var_at_paper_alpha=_num(sw.var[at_paper]))
  finite = {k: v for k, v in pairs.items() if v["best_mean"] is not None}
  best = max(finite, key=lambda k: finite[k]["best_mean"]) if finite else None
  if best is not None:
    p = pairs[best]
    scores[f"C_{p['i'][1]}{p['j'][1]}({p['best_alpha']:.3f})"] = selection.combine(
        norm[p["i"]], norm[p["j"]], p["best_alpha"])
  scores[f"C_56({PAPER_ALPHA})"] = selection.combine(norm["S5"], norm["S6"], PAPER_ALPHA)
  per_group = selection.rank_correlations(scores, acc, groups)
  targets = [r["target"] for r in records]
  pooled = {}
  if len({r["family"] for r in records}) > 1:
    pooled = {k: _summary(v) for k, v in
              selection.rank_correlations(scores, acc, targets).items()}
  return dict(groups=list(dict.fromkeys(groups)), scorers={k: _summary(v)
                                                           for k, v in per_group.items()},
              pooled=pooled, pairs=pairs, best_pair=best, alphas_step=step,
              held_out=held_out_combination(norm, acc, groups, step),
              n_models=len({r["model"] for r in records}), n_records=len(records))


def scratch_references(members: Sequence[model_zoo.Member], seed: int = 0
                       ) -> list[model_zoo.Member]:
  """One random-init reference per zoo family (`model_zoo.scratch_member`), shaped and
  normalised as the family's first member."""
  first = {}
  for m in members:
    first.setdefault(m.spec.family, m)
  return [model_zoo.scratch_member(m, seed) for m in first.values()]


def ranked(records: Sequence[dict]) -> list[dict]:
  """The zoo's records: what the scorers rank (the `--scratch` references left out)."""
  return [r for r in records if not r.get("reference")]


def scratch_summary(records: Sequence[dict]) -> dict:
  """Per (family, target) group with a random-init reference: how far the fine-tuned zoo
  members land from it and from each other, next to the test set's own noise.

  Returns:
    {group: {'scratch', 'best', 'worst', 'mean', 'spread', 'above', 'members', 'test_se'}}
    in accuracy (0-1); test_se is the binomial standard error of one accuracy at the
    members' mean on the group's test set. Empty without references.
  """
  out, zoo = {}, ranked(records)
  for ref in (r for r in records if r.get("reference") == "scratch"):
    g = group_label(ref)
    accs = np.array([r["test_acc"] for r in zoo if group_label(r) == g])
    if not accs.size:
      continue
    p = float(accs.mean())
    out[g] = dict(scratch=ref["test_acc"], best=float(accs.max()), worst=float(accs.min()),
                  mean=p, spread=float(accs.max() - accs.min()),
                  above=int((accs > ref["test_acc"]).sum()), members=int(accs.size),
                  test_se=float(np.sqrt(p * (1 - p) / ref["n_test"])))
  return out


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


# ----------------------------------------------------------------------------- report
def _fmt(x) -> str:
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
    cells = [_fmt(s["per_group"][g]["spearman"]) for g in groups]
    var = "n/a" if s["spearman_var"] is None else f"{s['spearman_var']:.4f}"
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(s['spearman_mean'])} | {var} | "
                 f"{_fmt(s['weighted_tau_mean'])} |")
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


def score_settings(records: Sequence[dict]) -> dict:
  """The score settings (SCORE_SETTINGS keys) of `records`, which must all share them.

  Raises:
    InputError: records computed with different settings.
  """
  seen = {tuple(r.get(k, LEGACY_SETTINGS[k]) for k in SCORE_SETTINGS) for r in records}
  if len(seen) > 1:
    raise InputError(f"records were scored with different settings {sorted(seen)} "
                     f"({', '.join(SCORE_SETTINGS)}); rerun with --overwrite")
  return dict(zip(SCORE_SETTINGS, seen.pop())) if seen else dict(SCORE_SETTINGS)


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
    lines.append(f"| C_{p['i'][1]}{p['j'][1]} | {p['best_alpha']:.3f} | {_fmt(p['best_mean'])} | "
                 f"{var} | {_fmt(p['mean_at_paper_alpha'])} |")
  if best:
    p = summary["pairs"][best]
    lines += ["", f"Best: **C_{p['i'][1]}{p['j'][1]}({p['best_alpha']:.3f})**, mean rho "
              f"{_fmt(p['best_mean'])}, variance {p['best_var']:.5f} over "
              f"{len(p['groups'])} groups (paper: C_56(0.574), mean 0.7514, variance 0.005993)."]
  held = summary.get("held_out")
  if held and held["spearman_mean"] is not None:
    lines += ["", "Leave-one-group-out (pair and alpha chosen on the other groups, rho on the "
              "held-out group):", "", "| held-out group | chosen | rho |", "|---|---|---|"]
    for g, v in held["per_group"].items():
      lines.append(f"| {g} | C_{v['pair'][1]}{v['pair'][4]}({v['alpha']:.3f}) | "
                   f"{_fmt(v['spearman'])} |")
    lines.append(f"| mean (var) | | {_fmt(held['spearman_mean'])} "
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
  specs = cli.target_list(args.target, default)
  for t in specs:
    parse_spec(t, flag="--target")
  return specs


def ground_truth_kind(args) -> str:
  """How a grid's runs are named in its plan line: each one scores a model on a target and
  fine-tunes it for the ground truth (an LR grid under the protocol, one fixed run else)."""
  if args.val_per_class:
    lrs = len(set(positive_floats(args.ft_lrs, "--ft-lrs")))
    return f"ground-truth fine-tunings ({lrs} LR{'s' * (lrs > 1)} each, converged)"
  return "ground-truth fine-tunings (fixed steps)"


def _safe(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def run(args, members: Sequence[model_zoo.Member], specs: Sequence[str], config: TrainConfig,
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
  check_resume_protocol(results.records, args)
  compiled = Compiled()
  shape = members[0].source.input_shape
  emit = grid_progress.stderr_or_quiet(args)
  grid = progress.GridProgress(
      {ground_truth_kind(args): len(members) * len(specs)},
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
      run_info = ground_truth(m.source, task, args, config, compiled, lambda lr: progress.ticker(
          f"{m.name} -> {spec} lr={lr:g}", emit))
      acc = run_info["test_acc"]
      ref = dict(reference="scratch") if m.spec.fraction == 0 else {}
      record = dict(model=m.name, target=spec, family=m.spec.family, arch=m.spec.arch, **ref,
                    source_accuracy=m.source.meta["source_test_acc"],
                    param_count=model_zoo.param_count(m.source), n_train=len(task.train),
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
    members = model_zoo.build_zoo(zoo, settings, args.zoo_root, log=log)
    refs = scratch_references(members, args.seed) if args.scratch else []
    run(args, members + refs, specs, config, results)
    names = {m.name for m in members + refs}
    records = [r for r in results.records if r["model"] in names and r["target"] in specs]
    analyze(ranked(records), step=args.alpha_step)  # fails early on a group too small
  except (InputError, NonFiniteError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  records = sorted(records, key=lambda r: (r["target"], r["model"]))
  results.write_json("zoo.json", model_zoo.zoo_table(members))
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
