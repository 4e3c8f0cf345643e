"""DELTA's Table 1, Fig. 2 and Fig. 3 on the embedded few-shot benchmark, under the protocol.

  python -m experiments.delta_table --out results/delta_table

runs, for both small archs (vgg_s without BN, resnet_s with BN) pretrained on Fashion-MNIST
{0,2,3,4,6}, on both embedded targets (Fashion-MNIST {1,5,7,8,9}, digits), at k = 5, 10, 30
per class:
  * Table 1: L2-FE, L2, L2-SP, DELTA w/o ATT, DELTA, each at its alpha chosen by 5-fold
    cross-validation (as the paper) on one tuning draw per (arch, target, k) that is never
    tested; mean (std) test accuracy over 5 evaluation draws (one k-shot draw each, shared by
    every strategy), then a Claims section testing Table 1's orderings per draw (paired
    difference, 95% CI, wins, verdict) per cell and pooled: DELTA >= DELTA w/o ATT >= L2-SP
    >= L2 (non-inferiority, 1-point margin), DELTA > L2-SP, and each of them > L2-FE;
  * beside it, labelled, the paper's protocol: lr 0.01 at the paper's alpha, no tuning;
  * Fig. 2: training CE and test accuracy vs iteration, L2-SP vs DELTA, with StepLR and
    ExponentialLR (resnet_s on the first target, k=30 by default), fixed --curve-steps;
  * Fig. 3: the distance of every conv filter from its starting point, sorted, per stage,
    L2-SP vs DELTA (from the ExponentialLR runs of Fig. 2).
  Figs. 2 and 3 use the alpha tuned for their (arch, target, k) cell when the table has it,
  else the paper's (the report says which).
It writes results.jsonl / results.json (one record per run, tuning runs included),
summary.json, curves.json, report.md, accuracy_vs_shots.png, learning_curves.png and
filter_distance.png.

Recipe (the paper and the authors' code, see jtransfer/methods/delta.py): SGD momentum 0.9,
batch 64 (a smaller k-shot set is one batch), beta = 0.01, BN in train mode for the fine-tuned
strategies, lr 0.01 (`--lrs`; a list is tuned too, extended at an edge), lr x0.1 at 67% of the
step cap `--steps` (exponentially per epoch by default, `--schedule step` for StepLR): the
schedule is defined over the cap, so a run stopped early by `--patience` stops before its lr has
fully decayed, and keeps its best validation state. Budget: cap 200 steps, stop after 100 steps
without a validation gain (checked every 10). alpha: tuned over delta.ALPHAS (1e-3, 1e-2, 1e-1)
for L2-SP and DELTA, delta.ALPHAS_NOATT (1e-5, 1e-4, 1e-3) for DELTA w/o ATT (its unnormalised
sum is ~H*W times stiffer; at 0.01 it diverges here), each extended by up to `--tune-extend`
values at an edge. `--alpha 0.01` (one value) fixes alpha, no alpha tuning, and the paper-grid
rows use it too; `--alpha 0.001,0.01` sets the grid. Same for `--alpha-noatt`. The paper's
alpha (0.01; 1e-4 for DELTA w/o ATT) gives the paper-grid rows. `--att-bn` sets BatchNorm in
DELTA's attention probe (delta.ATT_BN_MODES; 'authors' = channel_eval.py). L2-FE has no knob to
tune and at lr 0.01 stops at the 200-step cap in 13 of 20 published runs: `--l2fe-lrs 0.01,0.1`
tunes its LR on the tuning draw like the other arms' knobs (same patience), the setting for a
rerun (docs/decisions.md); the default keeps the published folders' grid.

Cost. Per (arch, target, k) cell: tuning 5 folds x 3 alphas (plus extensions) for each of L2-SP,
DELTA w/o ATT and DELTA (45+ runs, each of DELTA's computing its attention), one validation run
for L2 and L2-FE, then 5 evaluation draws x (paper point + tuned point) per strategy: ~80-110
runs of <= 200 SGD steps. The full grid (12 cells) is ~1000-1300 runs, up to ~250k steps: about
a day on 2 CPU cores (not measured on a GPU). Reduced (vgg_s, digits, k = 10, alpha fixed, so
one tuning run per strategy on the tuning draw's validation set, 2 evaluation draws; 15 runs +
4 curves; measured: 6.5 CPU-minutes, 16 min wall on a shared, loaded 2-core machine):
  python -m experiments.delta_table --arch vgg_s --target digits --shots 10 --repeats 2 \
      --alpha 0.01 --alpha-noatt 1e-4 --cv-folds 0 --test-per-class 200 --curve-arch vgg_s \
      --curve-shots 10 --curve-steps 100 --curve-every 20 --out results/delta_table_reduced
Measured there: every run finite, stopped after 130-200 steps; test accuracy (mean of 2 draws)
L2-FE 84.8, L2 83.1, L2-SP 83.1 (L2-SP = L2: at alpha 0.01 its penalty hardly acts), DELTA w/o
ATT 86.2, DELTA 85.5; every claim inconclusive on 2 draws (CIs of several points).
Smoke tests (tiny source, a few steps; mostly XLA compilation): tests/test_delta_experiment.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Sequence

import numpy as np

from experiments import cli, fewshot, pretrain, publish
from experiments.knobs import plan_knobs, strategy_of
from experiments.report import ResultsDir
from jtransfer import models, surgery
from jtransfer.data import Batches, parse_spec, sample_kshot
from jtransfer.errors import InputError
from jtransfer.methods import delta, transfer
from jtransfer.protocol import claims
from jtransfer.train import accuracy, init_state, predict_logits

STRATEGIES = ("l2fe", "l2", "l2sp", "delta_noatt", "delta")
# Later baselines of the same family (issue 20), rows of the table when --strategies names them;
# each keeps its own recipe (Adam, its LR grid), not DELTA's SGD one.
BASELINES = ("bss", "lpft", "wise_ft", "cotuning")
TITLES = {"l2fe": "L2-FE", "l2": "L2", "l2sp": "L2-SP", "delta_noatt": "DELTA w/o ATT",
          "delta": "DELTA", "bss": "BSS", "lpft": "LP-FT", "wise_ft": "WiSE-FT",
          "cotuning": "Co-Tuning"}
CURVE_STRATEGIES = ("l2sp", "delta")
# Which strategies each alpha flag sets.
ALPHA_FLAGS = {"alpha": ("l2sp", "delta"), "alpha_noatt": ("delta_noatt",)}
# The protocol's defaults for DELTA's SGD recipe: the cap is the schedule's length (lr x0.1 at
# 67% of it); one tuning draw, on which alpha is chosen by 5-fold cross-validation.
STEP_CAP, PATIENCE, TUNE_REPEATS, VAL_PER_CLASS = 200, 100, 1, 20


def _claim(text: str, a: str, b: str, at_least: bool) -> claims.Claim:
  return claims.Claim("DELTA", text, a, b, at_least=at_least, margin=0.01 if at_least else 0.0,
                      source="Table 1")


# DELTA's Table 1 orderings; '>=' as non-inferiority within one point, '>' strictly.
CLAIMS = (
    _claim("DELTA >= DELTA w/o ATT", "delta", "delta_noatt", True),
    _claim("DELTA w/o ATT >= L2-SP", "delta_noatt", "l2sp", True),
    _claim("L2-SP >= L2", "l2sp", "l2", True),
    _claim("DELTA > L2-SP", "delta", "l2sp", False),
    *(_claim(f"{TITLES[s]} > L2-FE", s, "l2fe", False)
      for s in ("l2", "l2sp", "delta_noatt", "delta")),
    claims.Claim("BSS", "BSS beats plain L2 fine-tuning at few shots", "bss", "l2",
                 source="Chen et al. 2019, Table 1"),
    claims.Claim("LP-FT", "LP-FT at least matches fine-tuning", "lpft", "l2", at_least=True,
                 margin=0.01, source="Kumar et al. 2022 (in-distribution)"),
    claims.Claim("DELTA", "DELTA beats the later baselines: DELTA > BSS", "delta", "bss",
                 source="issue 20 (not in the paper)"),
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="vgg_s,resnet_s", help="comma list of architectures")
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE,
                 help="dataset spec to pretrain on (cached), or ckpt:PATH")
  p.add_argument("--target", action="append", default=None,
                 help="target dataset spec; repeat the flag for several (default: both "
                      "embedded targets)")
  p.add_argument("--shots", default="5,10,30", help="comma list of k (images per class)")
  p.add_argument("--repeats", type=int, default=5, help="evaluation draws per cell")
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--lrs", default="paper",
                 help="'paper' (0.01) or a comma list (tuned on validation with the knobs)")
  p.add_argument("--l2fe-lrs", default=None, metavar="LR[,LR...]",
                 help="L2-FE's own LR grid, tuned on the tuning draw and extended at an edge "
                      "like the other arms' knobs (e.g. 0.01,0.1: its head-only objective sits "
                      "at the step cap in 13 of 20 runs at 0.01, issue 29); default: --lrs")
  fewshot.add_protocol_flags(p, steps=STEP_CAP, patience=PATIENCE, tune_repeats=TUNE_REPEATS,
                             val_per_class=VAL_PER_CLASS)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--test-per-class", type=int, default=300,
                 help="cap on test images per class (0 = all)")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir or Fashion-MNIST directory")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--alpha", default=None, metavar="A[,A...]",
                 help="alpha of L2-SP and DELTA: one value fixes it (no alpha tuning; the "
                      "paper-grid rows use it too), several are the grid tuned over "
                      f"(default: tuned over {', '.join(f'{a:g}' for a in delta.ALPHAS)}; "
                      "paper rows at 0.01)")
  p.add_argument("--alpha-noatt", default=None, metavar="A[,A...]",
                 help="the same for DELTA w/o ATT (default: tuned over "
                      f"{', '.join(f'{a:g}' for a in delta.ALPHAS_NOATT)}; paper rows at "
                      f"{delta.ALPHAS_NOATT[1]:g})")
  p.add_argument("--beta", type=float, default=None, help="weight of the head term (0.01)")
  p.add_argument("--schedule", choices=delta.SCHEDULES, default=None,
                 help="lr schedule of the table's runs over the step cap (default exp, as the "
                      "authors' run.sh)")
  p.add_argument("--att-bn", choices=delta.ATT_BN_MODES, default=None,
                 help="BatchNorm in DELTA's attention probe (default 'authors': as "
                      "channel_eval.py, probe head trained in train mode, ablation in eval "
                      "mode with the running statistics so moved; see delta.Config.att_bn)")
  p.add_argument("--taps", action="append", default=None, metavar="ARCH=UNIT,UNIT",
                 help="DELTA's tapped conv units for an arch (default: the last conv of each "
                      "stage); repeat for several archs")
  p.add_argument("--no-curves", action="store_true", help="skip Fig. 2 and Fig. 3")
  p.add_argument("--curve-arch", default="resnet_s")
  p.add_argument("--curve-target", default=None, help="default: the first target")
  p.add_argument("--curve-shots", type=int, default=30)
  p.add_argument("--curve-steps", type=int, default=300,
                 help="fixed steps of each Fig. 2 run (no early stopping: a learning curve)")
  p.add_argument("--curve-every", type=int, default=25, help="test accuracy every N steps")
  p.add_argument("--curve-test-per-class", type=int, default=100)
  p.add_argument("--curve-lr", type=float, default=0.01)
  p.add_argument("--curve-schedules", default="step,exp")
  cli.add_results_flags(p, "results/delta_table")
  args = p.parse_args(argv)
  # fewshot's grid runner reads its own flags: take its defaults for any not set here.
  return argparse.Namespace(**{**vars(fewshot.parse_args([])), **vars(args),
                               "no_feature_cache": False})


def parse_taps(values: Sequence[str] | None) -> dict[str, tuple[str, ...]]:
  taps = {}
  for value in values or ():
    arch, sep, units = value.partition("=")
    names = tuple(u.strip() for u in units.split(",") if u.strip())
    if not sep or not arch.strip() or not names:
      raise InputError(f"--taps {value!r}: expected ARCH=UNIT[,UNIT...], e.g. "
                       "resnet_s=stage2/block1/conv2,stage3/block1/conv2")
    taps[arch.strip()] = names
  return taps


def l2fe_lrs(text: str) -> tuple[float, ...]:
  """--l2fe-lrs: distinct LRs > 0, sorted."""
  try:
    values = sorted(float(v) for v in text.split(",") if v.strip())
  except ValueError:
    values = []
  if not values or any(not (math.isfinite(v) and v > 0) for v in values) or \
      len(set(values)) != len(values):
    raise InputError(f"--l2fe-lrs {text!r}: expected distinct numbers > 0, e.g. 0.01,0.1")
  return tuple(values)


def parse_alphas(text: str | None, flag: str) -> tuple[float, ...] | None:
  """A comma list of distinct alphas >= 0, sorted; None when the flag is not given."""
  if text is None:
    return None
  try:
    values = [float(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or any(not (math.isfinite(v) and v >= 0) for v in values) or \
      len(set(values)) != len(values):
    raise InputError(f"{flag} {text!r}: expected distinct numbers >= 0, e.g. 0.01 or "
                     "0.001,0.01,0.1")
  return tuple(sorted(values))


def alpha_overrides(args, plan: dict) -> dict[str, tuple[dict, dict]]:
  """strategy -> (knob grids, knob defaults) with the alpha grid and paper-grid alpha an alpha
  flag sets, for plan['knobs'] (`experiments.knobs.strategy_of`)."""
  out = {}
  for field, names in ALPHA_FLAGS.items():
    grid = parse_alphas(getattr(args, field), "--" + field.replace("_", "-"))
    if grid is None:
      continue
    for name in names:
      s = strategy_of(plan, name)
      default = grid[0] if len(grid) == 1 else s.knob_defaults["alpha"]
      out[name] = ({**s.knobs, "alpha": grid}, {**s.knob_defaults, "alpha": default})
  return out


def settings_of(config: delta.Config) -> dict:
  """The DELTA settings a record depends on besides its key (lr and alpha are in the key)."""
  return dict(beta=config.beta, schedule=config.schedule, att_bn=config.att_bn,
              weight_decay=config.weight_decay, bn_train=config.bn_train,
              taps={k: list(v) for k, v in sorted(config.taps.items())})


class DeltaResults(ResultsDir):
  """A ResultsDir whose records carry the DELTA settings they were made with ('delta'); a
  resume with other settings is refused."""

  def __init__(self, path: str, delta_settings: dict, **kw):
    super().__init__(path, **kw)
    self.settings = settings = delta_settings
    seen = {json.dumps(r.get("delta"), sort_keys=True) for r in self.records}
    if seen - {json.dumps(settings, sort_keys=True)}:
      raise InputError(f"--out {path} holds runs made with other DELTA settings "
                       f"({', '.join(sorted(seen))}), not {json.dumps(settings, sort_keys=True)}"
                       ": use the same --beta/--schedule/--att-bn/--taps, or another --out")

  def add(self, record: dict) -> None:
    record["delta"] = self.settings
    super().add(record)


def validate(args: argparse.Namespace) -> dict:
  """Checks every flag (fewshot's checks plus ours) before anything is loaded or compiled."""
  plan = fewshot.validate(args)
  if args.l2fe_lrs is not None and "l2fe" in plan["lrs"]:
    plan["lrs"]["l2fe"] = l2fe_lrs(args.l2fe_lrs)
  changes = {k: getattr(args, k) for k in ("beta", "schedule", "att_bn")
             if getattr(args, k) is not None}
  taps = parse_taps(args.taps)
  if taps:
    changes["taps"] = taps
  # DELTA's config reaches the strategies as their `config` knob (plan['options']).
  options, env_knobs = plan_knobs(plan["strategies"], changes)
  config = (next(iter(options.values()))["config"] if options
            else delta.Config(**changes).validate())
  plan["delta"] = changes
  plan["delta_config"] = config
  plan["options"] = options
  plan["settings"] = settings_of(config)
  plan["knobs"] = {**env_knobs, **alpha_overrides(args, plan)}
  plan["curves"] = None
  if not args.no_curves:
    schedules = [s.strip() for s in args.curve_schedules.split(",") if s.strip()]
    bad = [s for s in schedules if s not in ("step", "exp")]
    if bad or not schedules:
      raise InputError(f"--curve-schedules {args.curve_schedules!r}: expected step and/or exp")
    for flag in ("curve_shots", "curve_steps", "curve_every"):
      if getattr(args, flag) < 1:
        raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if not (math.isfinite(args.curve_lr) and args.curve_lr > 0):
      raise InputError(f"--curve-lr must be a finite number > 0, got {args.curve_lr}")
    target = args.curve_target or plan["targets"][0]
    parse_spec(target, flag="--curve-target")
    if args.curve_arch not in models.names():
      raise InputError(f"--curve-arch {args.curve_arch!r} is unknown; expected one of "
                       f"{', '.join(models.names())}")
    plan["curves"] = dict(arch=args.curve_arch, target=target, shots=args.curve_shots,
                          steps=args.curve_steps, every=args.curve_every, lr=args.curve_lr,
                          test_per_class=args.curve_test_per_class, schedules=schedules)
  if plan["curves"] and plan["shard"] and plan["shard"][0] != 0:
    plan["curves"] = None  # Figs. 2 and 3 run once, in shard 0 (merge takes its curves.json)
  return plan


# ----------------------------------------------------------------------------- Fig. 2 / Fig. 3
def stage_of(unit: str) -> str:
  """'stage2/block0/conv1' -> 'stage2'; VGG 'conv3_1' -> 'stage3'; 'stem' -> 'stem'."""
  m = re.fullmatch(r"conv(\d+)_\d+", unit)
  return f"stage{m.group(1)}" if m else unit.split("/")[0]


def filter_distances(params, w0) -> dict[str, list[float]]:
  """Per stage, the L2 distance of every conv filter (output channel) from w0, sorted down."""
  out: dict[str, list[float]] = {}
  for unit, d in surgery.filter_distances(params, w0).items():
    out.setdefault(stage_of(unit), []).extend(d.tolist())
  return {s: sorted(v, reverse=True) for s, v in out.items()}


def learning_curve(runs: fewshot.TargetRuns, name: str, train_idx, seed: int, lr: float,
                   every: int, hp: str = "") -> tuple[dict, dict]:
  """One run of `name` (knob values `hp`) for exactly --steps steps, with its train CE at every
  step and test accuracy every `every`."""
  setup, step, opt, _ = runs.setup(name, hp)
  images, labels = runs.pool.images[train_idx], runs.pool.labels[train_idx]
  params, stats = setup.init(seed, images, labels)
  batches = Batches(images, labels, runs.args.batch_size, seed)
  state = init_state(params, stats, opt, seed, lr)
  curve = dict(step=[], ce=[], loss=[], eval_step=[], test_acc=[])
  for t in range(runs.args.steps):
    state, m = step(state, batches.at(t))
    if not bool(m["finite"]):
      curve["failed_at"] = t
      break
    curve["step"].append(t + 1)
    curve["ce"].append(float(m["ce"]))
    curve["loss"].append(float(m["loss"]))
    if (t + 1) % every == 0 or t + 1 == runs.args.steps:
      logits = predict_logits(setup.forward, state.params, state.batch_stats, runs.test.images)
      curve["eval_step"].append(t + 1)
      curve["test_acc"].append(accuracy(logits, runs.test.labels))
  return curve, state.params


def curve_knobs(records: list[dict], plan: dict, args) -> dict[str, dict]:
  """Per Fig. 2 strategy, its knob values and where they come from: 'fixed' (a one-value alpha
  grid), 'tuned' (chosen for the curves' (arch, target, k) cell by the table's tuning), else
  'paper' (`Strategy.knob_defaults`: the cell is not in the table or not tuned)."""
  c = plan["curves"]
  tuned = fewshot.choose(records, plan, args)
  out = {}
  for name in CURVE_STRATEGIES:
    strategy = strategy_of(plan, name)
    t = tuned.get((c["arch"], c["target"], c["shots"], name))
    if all(len(v) == 1 for v in strategy.knobs.values()):
      out[name] = dict(hp=transfer.hp_string({k: v[0] for k, v in strategy.knobs.items()}),
                       origin="fixed")
    elif t:
      out[name] = dict(hp=t["hp"], origin="tuned")
    else:
      out[name] = dict(hp=transfer.hp_string(strategy.knob_defaults), origin="paper")
  return out


def run_curves(args, plan: dict, knobs: dict) -> dict:
  """Fig. 2 runs (L2-SP, DELTA per schedule) and Fig. 3 distances (from the exp runs)."""
  c = plan["curves"]
  source = pretrain.source_for(c["arch"], args.source, epochs=args.source_epochs,
                               seed=args.seed, progress=not args.quiet)
  curve_args = argparse.Namespace(**{**vars(args), "steps": c["steps"],
                                     "test_per_class": c["test_per_class"]})
  out = dict(config=curve_config(plan, knobs), curves={}, distances={})
  data_cache: dict = {}
  for schedule in c["schedules"]:
    config = dataclasses.replace(plan["delta_config"], schedule=schedule)
    options = {name: {"config": config} for name in CURVE_STRATEGIES}
    runs = fewshot.TargetRuns(source, c["target"], curve_args, data_cache, {}, options)
    train_idx, _ = sample_kshot(runs.pool.labels, c["shots"], args.seed,
                                num_classes=runs.num_classes)
    for name in CURVE_STRATEGIES:
      t0 = time.time()
      curve, params = learning_curve(runs, name, train_idx, args.seed, c["lr"], c["every"],
                                     knobs[name]["hp"])
      out["curves"][f"{schedule}|{name}"] = curve
      if schedule == "exp" or len(c["schedules"]) == 1:
        out["distances"][name] = filter_distances(params, source.variables["params"])
      if not args.quiet:
        acc = curve["test_acc"][-1] if curve["test_acc"] else float("nan")
        print(f"[curves] {schedule} {name} {knobs[name]['hp']}: test {acc:.4f} "
              f"({time.time() - t0:.1f}s)", file=sys.stderr)
  return out


def curve_config(plan: dict, knobs: dict) -> dict:
  """What determines the curves (a finished curves.json is reused only when it matches)."""
  return dict(plan["curves"], knobs=knobs, settings=plan["settings"])


def plot_curves(curves: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  schedules = curves["config"]["schedules"]
  fig, axes = plt.subplots(2, len(schedules), figsize=(5 * len(schedules), 6.5), squeeze=False)
  names = {"step": "StepLR", "exp": "ExponentialLR"}
  for j, schedule in enumerate(schedules):
    for name in CURVE_STRATEGIES:
      cv = curves["curves"].get(f"{schedule}|{name}")
      if not cv:
        continue
      axes[0][j].plot(cv["step"], cv["ce"], label=TITLES[name], lw=1)
      axes[1][j].plot(cv["eval_step"], [100 * a for a in cv["test_acc"]], marker="o", ms=3,
                      label=TITLES[name])
    axes[0][j].set_title(f"{names[schedule]}: training CE", fontsize=9)
    axes[1][j].set_title(f"{names[schedule]}: test accuracy (%)", fontsize=9)
    for ax in (axes[0][j], axes[1][j]):
      ax.set_xlabel("iteration")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  c = curves["config"]
  fig.suptitle(f"{c['arch']} -> {c['target']}, k={c['shots']}, lr {c['lr']:g}", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_distances(distances: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  stages = list(next(iter(distances.values())))
  fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 3), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    for name in CURVE_STRATEGIES:
      if name in distances:
        d = distances[name][stage]
        ax.plot(np.arange(len(d)), d, label=TITLES[name])
    ax.set_title(stage, fontsize=9)
    ax.set_xlabel("filters, sorted")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("||w - w0|| per filter")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------- report
def recipe_text(plan: dict, args) -> str:
  """One paragraph: DELTA's recipe, its alpha grids and how alpha was chosen."""
  config = plan["delta_config"]
  grids = []
  for name in ("l2sp", "delta_noatt", "delta"):
    if name in plan["strategies"]:
      s = strategy_of(plan, name)
      grids.append(f"{TITLES[name]} {{{', '.join(f'{a:g}' for a in s.knobs['alpha'])}}} "
                   f"(paper rows {s.knob_defaults['alpha']:g})")
  folds = {fewshot.cv_folds(args, n) for n in plan["strategies"] if n in ALPHA_FLAGS["alpha"]
           + ALPHA_FLAGS["alpha_noatt"]}
  how = (f"by {'/'.join(map(str, sorted(folds)))}-fold cross-validation on each tuning draw's "
         "labelled pool (k-shot + validation images)" if folds - {0} else
         "on each tuning draw's validation set")
  if not grids:
    alpha = ""
  elif args.tune_repeats:
    alpha = (f" alpha grids: {'; '.join(grids)}; chosen {how} (a one-value grid fixes "
             "alpha).")
  else:
    alpha = f" alpha (no tuning draws: the paper-row values): {'; '.join(grids)}."
  return (f"DELTA recipe: SGD momentum {config.momentum}, batch {args.batch_size} (a smaller "
          f"k-shot set is one batch), lr x0.1 at {config.decay_fraction:.0%} of the "
          f"{args.steps}-step cap ({config.schedule}); beta {config.beta:g}; L2 weight decay "
          f"{config.weight_decay:g}; BN in train mode for fine-tuned strategies: "
          f"{config.bn_train}; attention probe BN: {config.att_bn}.{alpha}")


FIG3_CLAIM = claims.Claim(
    "DELTA", "DELTA's filters move farther from the starting point than L2-SP's (effect: mean "
    "conv-filter L2 distance x 100)", "delta", "l2sp", source="Fig. 3")


def fig3_claim(tuned_records: list[dict]) -> list[dict]:
  """Fig. 3 as a paired claim: each evaluation run's mean filter distance from the source
  (`surgery.mean_filter_distance`), DELTA against L2-SP, each at its tuned alpha."""
  rows = [r for r in tuned_records if r.get("filter_distance") is not None]
  return [claims.evaluate(FIG3_CLAIM, rows, ("arch", "target", "shots"),
                          value="filter_distance", draw_fields=("target", "shots", "repeat"))]


def make_report(records: list[dict], plan: dict, args, curves: dict | None
                ) -> tuple[str, dict]:
  """report.md text and summary.json content, from the records (and curves) alone."""
  title = "\n".join(["# DELTA: Table 1, Fig. 2, Fig. 3 on the embedded benchmark", "",
                     recipe_text(plan, args)])
  text, summary = fewshot.make_report(
      records, plan, args, title=title, claim_list=CLAIMS,
      tables=[("Table 1 layout", [s for s in STRATEGIES + BASELINES
                                  if s in plan["strategies"]])],
      labels=TITLES,
      extra_claims=fig3_claim if {"delta", "l2sp"} <= set(plan["strategies"]) else None)
  if curves:
    text = "\n".join([text.rstrip("\n"), ""] + curve_lines(curves))
  return text, summary


def curve_lines(curves: dict) -> list[str]:
  c = curves["config"]
  lines = ["## Fig. 2: learning curves (learning_curves.png)", "",
           f"{c['arch']} -> {c['target']}, k={c['shots']}, {c['steps']} iterations (fixed), "
           f"lr {c['lr']:g}; "
           + "; ".join(f"{TITLES[n]} {c['knobs'][n]['hp'] or 'no knobs'} "
                       f"({c['knobs'][n]['origin']})"
                       for n in CURVE_STRATEGIES if n in c.get("knobs", {})) + ".", "",
           "| schedule | strategy | final train CE | final test acc (%) |",
           "|---|---|---|---|"]
  for key in (f"{s}|{n}" for s in c["schedules"] for n in CURVE_STRATEGIES):
    cv = curves["curves"].get(key)
    if cv is None:
      continue
    schedule, name = key.split("|")
    ce = f"{cv['ce'][-1]:.4f}" if cv["ce"] else "-"
    acc = f"{100 * cv['test_acc'][-1]:.1f}" if cv["test_acc"] else "-"
    lines.append(f"| {schedule} | {TITLES[name]} | {ce} | {acc} |")
  lines.append("")
  d = curves["distances"]
  if all(n in d for n in CURVE_STRATEGIES):
    lines += ["## Fig. 3: filter distance from the starting point (filter_distance.png)", "",
              "| stage | filters | median L2-SP | median DELTA | DELTA farther at the same rank |",
              "|---|---|---|---|---|"]
    for stage in d["l2sp"]:
      a, b = np.asarray(d["l2sp"][stage]), np.asarray(d["delta"][stage])
      lines.append(f"| {stage} | {len(a)} | {np.median(a):.4f} | {np.median(b):.4f} | "
                   f"{np.mean(b > a):.0%} |")
    lines.append("")
  return lines


def curves_for(args, plan: dict, results: ResultsDir) -> dict | None:
  """Fig. 2 / Fig. 3 data: run, or reuse a finished curves.json with the same config."""
  if not plan["curves"]:
    return None
  knobs = curve_knobs(results.records, plan, args)
  path = os.path.join(results.path, "curves.json")
  if args.resume and os.path.exists(path):
    with open(path) as f:
      curves = json.load(f)
    if curves.get("config") == json.loads(json.dumps(curve_config(plan, knobs))):
      return curves
  curves = run_curves(args, plan, knobs)
  results.write_json("curves.json", curves)
  return curves


def read_curves(folder: str) -> dict | None:
  path = os.path.join(folder, "curves.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def publish_report(records: list[dict], plan: dict, args, folder: str) -> tuple[str, dict]:
  """The report from a folder's records and curves.json, under the plan's DELTA settings."""
  return make_report(records, plan, args, read_curves(folder) if plan["curves"] else None)


def grid_keys(records: list[dict], plan: dict, args) -> set[tuple]:
  """Every run key the grid holds (the plan's alpha grids included)."""
  return fewshot.grid_keys(records, plan, args)


def write_outputs(results: ResultsDir, plan: dict, args, curves: dict | None, argv,
                  t0: float) -> str:
  text, summary = publish.save(results, PUBLISHER, argv,
                               fewshot.results_records(results.records), plan, args, t0)
  fewshot.plot(summary, plan, os.path.join(results.path, "accuracy_vs_shots.png"))
  if curves:
    plot_curves(curves, os.path.join(results.path, "learning_curves.png"))
    if curves["distances"]:
      plot_distances(curves["distances"], os.path.join(results.path, "filter_distance.png"))
  return text


@cli.interruptible("experiments.delta_table", lambda argv: parse_args(argv))
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  made_by = cli.settings("experiments.delta_table", args)
  cli.apply_devices(args)
  t0 = time.time()
  try:
    plan = validate(args)
    results = cli.open_results(args, made_by, parse_args, cls=DeltaResults,
                               delta_settings=plan["settings"])
    fewshot.run_grid(args, plan, results)
    curves = curves_for(args, plan, results)
    text = write_outputs(results, plan, args, curves, argv, t0)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return cli.finish(results, text, t0)


PUBLISHER = publish.Publisher("experiments.delta_table", parse_args, validate, publish_report,
                              grid_keys, fewshot.record_key)


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
