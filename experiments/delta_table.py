"""DELTA's Table 1, Fig. 2 and Fig. 3 on the embedded few-shot benchmark.

  python -m experiments.delta_table --out results/delta_table

reproduces, for both small archs (vgg_s without BN, resnet_s with BN) pretrained on
Fashion-MNIST {0,2,3,4,6}, on both embedded targets (Fashion-MNIST {1,5,7,8,9}, digits):
  * Table 1's layout: L2-FE, L2, L2-SP, DELTA w/o ATT, DELTA; mean +- std test accuracy over 5
    repeats (one k-shot draw per repeat, shared by every strategy), at k = 5, 10, 30 per class;
  * Fig. 2: training CE and test accuracy vs iteration, L2-SP vs DELTA, with StepLR and
    ExponentialLR (resnet_s on the first target by default);
  * Fig. 3: the distance of every conv filter from its starting point, sorted, per stage,
    L2-SP vs DELTA (from the ExponentialLR runs of Fig. 2).
It writes results.jsonl / results.json (one record per run), summary.json, curves.json,
report.md, accuracy_vs_shots.png, learning_curves.png and filter_distance.png.

Protocol (the paper and the authors' code, see jtransfer/methods/delta.py): SGD momentum 0.9,
lr 0.01 (`--lrs`), batch 64 (a k-shot set smaller than that is one full batch), `--steps`
iterations, lr x0.1 at 67% of them (exponentially per epoch by default, `--schedule step` for
StepLR); alpha = beta = 0.01 (`--alpha-noatt` sets DELTA w/o ATT's alpha apart: with 0.01
its unnormalised sum diverges at lr 0.01 here); BN in train mode for the fine-tuned
strategies. The full grid (2 archs x 2 targets x 3 k x 5 repeats x 5 strategies, 200 steps) is
about 50k SGD steps: hours on 2 CPU cores. Measured, reduced (vgg_s, both targets, 40 runs +
4 curves, 7 CPU-minutes, 21 min wall on a shared 2-core machine):
  python -m experiments.delta_table --arch vgg_s --shots 5,10 --repeats 2 --steps 50 \
      --test-per-class 200 --val-per-class 5 --alpha-noatt 1e-4 --curve-arch vgg_s \
      --curve-shots 10 --curve-steps 50 --curve-every 10 --out results/delta_table_vgg_reduced
Smoke test (a few CPU-seconds per strategy, mostly compilation):
  python -m experiments.delta_table --arch vgg_s --curve-arch vgg_s --source ckpt:DIR \
      --target digits --shots 2 --repeats 1 --steps 2 --test-per-class 5 --val-per-class 0 \
      --curve-steps 2 --curve-every 1 --curve-shots 2 --curve-schedules exp --out /tmp/d
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

from experiments import cli, fewshot, pretrain
from experiments.report import ResultsDir, best_over_lr
from jtransfer import models, surgery
from jtransfer.data import Batches, parse_spec, sample_kshot
from jtransfer.errors import InputError
from jtransfer.methods import delta
from jtransfer.train import accuracy, init_state, predict_logits

STRATEGIES = ("l2fe", "l2", "l2sp", "delta_noatt", "delta")
TITLES = {"l2fe": "L2-FE", "l2": "L2", "l2sp": "L2-SP", "delta_noatt": "DELTA w/o ATT",
          "delta": "DELTA"}
CURVE_STRATEGIES = ("l2sp", "delta")


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
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--lrs", default="paper", help="'paper' (0.01) or a comma list")
  p.add_argument("--steps", type=int, default=200, help="SGD iterations per run")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--val-per-class", type=int, default=10)
  p.add_argument("--test-per-class", type=int, default=300,
                 help="cap on test images per class (0 = all)")
  p.add_argument("--data-dir", default=None, help="TFDS data_dir or Fashion-MNIST directory")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--alpha", type=float, default=None, help="weight of Omega (default 0.01)")
  p.add_argument("--alpha-noatt", type=float, default=None,
                 help="alpha of DELTA w/o ATT (default: --alpha)")
  p.add_argument("--beta", type=float, default=None, help="weight of the head term (0.01)")
  p.add_argument("--schedule", choices=delta.SCHEDULES, default=None,
                 help="lr schedule of the table's runs (default exp, as the authors' run.sh)")
  p.add_argument("--taps", action="append", default=None, metavar="ARCH=UNIT,UNIT",
                 help="DELTA's tapped conv units for an arch (default: the last conv of each "
                      "stage); repeat for several archs")
  p.add_argument("--no-curves", action="store_true", help="skip Fig. 2 and Fig. 3")
  p.add_argument("--curve-arch", default="resnet_s")
  p.add_argument("--curve-target", default=None, help="default: the first target")
  p.add_argument("--curve-shots", type=int, default=30)
  p.add_argument("--curve-steps", type=int, default=300)
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


def validate(args: argparse.Namespace) -> dict:
  """Checks every flag (fewshot's checks plus ours) before anything is loaded or compiled."""
  plan = fewshot.validate(args)
  changes = {k: getattr(args, k) for k in ("alpha", "alpha_noatt", "beta", "schedule")
             if getattr(args, k) is not None}
  taps = parse_taps(args.taps)
  if taps:
    changes["taps"] = taps
  dataclasses.replace(delta.get_config(), **changes).validate()
  plan["delta"] = changes
  plan["curves"] = None
  if not args.no_curves:
    schedules = [s.strip() for s in args.curve_schedules.split(",") if s.strip()]
    bad = [s for s in schedules if s not in ("step", "exp")]
    if bad or not schedules:
      raise InputError(f"--curve-schedules {args.curve_schedules!r}: expected step and/or exp")
    for flag in ("curve_shots", "curve_steps", "curve_every"):
      if getattr(args, flag) < 1:
        raise InputError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    target = args.curve_target or plan["targets"][0]
    parse_spec(target, flag="--curve-target")
    if args.curve_arch not in models.names():
      raise InputError(f"--curve-arch {args.curve_arch!r} is unknown; expected one of "
                       f"{', '.join(models.names())}")
    plan["curves"] = dict(arch=args.curve_arch, target=target, shots=args.curve_shots,
                          steps=args.curve_steps, every=args.curve_every, lr=args.curve_lr,
                          test_per_class=args.curve_test_per_class, schedules=schedules)
  return plan


# ----------------------------------------------------------------------------- Fig. 2 / Fig. 3
def stage_of(unit: str) -> str:
  """'stage2/block0/conv1' -> 'stage2'; VGG 'conv3_1' -> 'stage3'; 'stem' -> 'stem'."""
  m = re.fullmatch(r"conv(\d+)_\d+", unit)
  return f"stage{m.group(1)}" if m else unit.split("/")[0]


def filter_distances(params, w0) -> dict[str, list[float]]:
  """Per stage, the L2 distance of every conv filter (output channel) from w0, sorted down."""
  flat, ref = surgery.flatten(params), surgery.flatten(w0)
  out: dict[str, list[float]] = {}
  for unit in surgery.conv_units(w0):
    k = f"{unit}/conv/kernel"
    diff = np.asarray(flat[k], np.float64) - np.asarray(ref[k], np.float64)
    d = np.sqrt(np.sum(diff.reshape(-1, diff.shape[-1]) ** 2, axis=0))
    out.setdefault(stage_of(unit), []).extend(d.tolist())
  return {s: sorted(v, reverse=True) for s, v in out.items()}


def learning_curve(runs: fewshot.TargetRuns, name: str, train_idx, seed: int, lr: float,
                   every: int) -> tuple[dict, dict]:
  """One run of `name` with its train CE at every step and test accuracy every `every`."""
  setup, step, opt, _ = runs.setup(name)
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


def run_curves(args, plan: dict) -> dict:
  """Fig. 2 runs (L2-SP, DELTA per schedule) and Fig. 3 distances (from the exp runs)."""
  c = plan["curves"]
  source = pretrain.source_for(c["arch"], args.source, epochs=args.source_epochs,
                               seed=args.seed, progress=not args.quiet)
  curve_args = argparse.Namespace(**{**vars(args), "steps": c["steps"],
                                     "test_per_class": c["test_per_class"]})
  out = dict(config=c, curves={}, distances={})
  data_cache: dict = {}
  for schedule in c["schedules"]:
    old = delta.configure(schedule=schedule)
    try:
      runs = fewshot.TargetRuns(source, c["target"], curve_args, data_cache, {})
      train_idx, _ = sample_kshot(runs.pool.labels, c["shots"], args.seed,
                                  num_classes=runs.num_classes)
      for name in CURVE_STRATEGIES:
        t0 = time.time()
        curve, params = learning_curve(runs, name, train_idx, args.seed, c["lr"], c["every"])
        out["curves"][f"{schedule}|{name}"] = curve
        if schedule == "exp" or len(c["schedules"]) == 1:
          out["distances"][name] = filter_distances(params, source.variables["params"])
        if not args.quiet:
          acc = curve["test_acc"][-1] if curve["test_acc"] else float("nan")
          print(f"[curves] {schedule} {name}: test {acc:.4f} ({time.time() - t0:.1f}s)",
                file=sys.stderr)
    finally:
      delta.set_config(old)
  return out


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
def table_lines(summary: dict, plan: dict, mean_key: str, std_key: str) -> tuple[list, list]:
  """Table 1's layout per arch, and per row whether DELTA >= L2-SP >= L2 held."""
  strategies = [s for s in STRATEGIES if s in plan["strategies"]]
  lines, orders = [], []
  for arch in plan["archs"]:
    lines += [f"**{arch}**", "", "| target | k | " + " | ".join(TITLES[s] for s in strategies)
              + " |", "|---|---|" + "---|" * len(strategies)]
    for target in plan["targets"]:
      for k in plan["shots"]:
        cells, means = [], {}
        for s in strategies:
          v = summary.get((arch, target, s, k))
          if v:
            means[s] = v[mean_key]
          cells.append(f"{100 * v[mean_key]:.1f} ± {100 * v[std_key]:.1f}" if v else "-")
        if means:
          best = max(means.values())
          cells = [f"**{c}**" if means.get(s) == best else c for s, c in zip(strategies, cells)]
        lines.append(f"| {target} | {k} | " + " | ".join(cells) + " |")
        if all(s in means for s in ("delta", "l2sp", "l2")):
          orders.append(((arch, target, k), means["delta"] >= means["l2sp"] >= means["l2"],
                         means["delta"] >= means["l2sp"]))
    lines.append("")
  return lines, orders


def make_report(records: list[dict], plan: dict, args, curves: dict | None
                ) -> tuple[str, dict]:
  summary = best_over_lr(records, ("arch", "target", "strategy", "shots"))
  config = delta.get_config()
  noatt = (f" (DELTA w/o ATT {config.alpha_noatt:g})" if config.alpha_noatt is not None
           else "")
  lines = ["# DELTA: Table 1, Fig. 2, Fig. 3 on the embedded benchmark", "",
           f"Source `{args.source}`; {args.repeats} repeats (one k-shot draw each, shared by "
           f"every strategy); {args.steps} SGD iterations (momentum {config.momentum}), batch "
           f"{args.batch_size} (a smaller k-shot set is one batch); lr x0.1 at "
           f"{config.decay_fraction:.0%} of training ({config.schedule}); alpha "
           f"{config.alpha:g}{noatt}, beta {config.beta:g}; L2 weight decay "
           f"{config.weight_decay:g}; BN in train mode for fine-tuned strategies: "
           f"{config.bn_train}. Test: "
           f"{'all' if not args.test_per_class else f'<= {args.test_per_class}/class'} of the "
           "target's test split.", ""]
  multi_lr = any(len(v) > 1 for v in plan["lrs"].values())
  heading = ("Best over LR (test-selected, as the paper)" if multi_lr else
             f"Test accuracy (%), mean ± std over {args.repeats} repeats")
  table, orders = table_lines(summary, plan, "test_mean", "test_std")
  lines += [f"## Table 1 layout: {heading}", ""] + table
  if multi_lr:
    val_table, _ = table_lines(summary, plan, "val_sel_mean", "val_sel_std")
    lines += ["## Validation-selected LR", ""] + val_table
  if orders:
    held = sum(o[1] for o in orders)
    held_delta = sum(o[2] for o in orders)
    lines += [f"DELTA >= L2-SP >= L2 (means) held in {held} of {len(orders)} rows; "
              f"DELTA >= L2-SP in {held_delta} of {len(orders)}.", ""]
  lines += ["LR grids: " + "; ".join(f"{s}: {', '.join(f'{v:g}' for v in plan['lrs'][s])}"
                                     for s in plan["strategies"]), ""]
  failed = [r for r in records if r.get("status") != "ok"]
  if failed:
    lines += [f"{len(failed)} run(s) failed (non-finite loss); see results.json.", ""]
  if curves:
    lines += curve_lines(curves)
  return "\n".join(lines), {"|".join(map(str, k)): v for k, v in summary.items()}


def curve_lines(curves: dict) -> list[str]:
  c = curves["config"]
  lines = ["## Fig. 2: learning curves (learning_curves.png)", "",
           f"{c['arch']} -> {c['target']}, k={c['shots']}, {c['steps']} iterations, lr "
           f"{c['lr']:g}.", "", "| schedule | strategy | final train CE | final test acc (%) |",
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
  path = os.path.join(results.path, "curves.json")
  if args.resume and os.path.exists(path):
    with open(path) as f:
      curves = json.load(f)
    if curves.get("config") == plan["curves"]:
      return curves
  curves = run_curves(args, plan)
  results.write_json("curves.json", curves)
  return curves


def write_outputs(results: ResultsDir, plan: dict, args, curves: dict | None) -> str:
  records = sorted(results.records, key=lambda r: tuple(map(str, fewshot.record_key(r))))
  results.write_json("results.json", records)
  text, summary = make_report(records, plan, args, curves)
  results.write_text("report.md", text)
  results.write_json("summary.json", summary)
  fewshot.plot(summary, plan, os.path.join(results.path, "accuracy_vs_shots.png"))
  if curves:
    plot_curves(curves, os.path.join(results.path, "learning_curves.png"))
    if curves["distances"]:
      plot_distances(curves["distances"], os.path.join(results.path, "filter_distance.png"))
  return text


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  cli.apply_devices(args)
  t0 = time.time()
  old = delta.get_config()
  try:
    plan = validate(args)
    results = ResultsDir(args.out, resume=args.resume, overwrite=args.overwrite)
    delta.configure(**plan["delta"])
    fewshot.run_grid(args, plan, results)
    curves = curves_for(args, plan, results)
    text = write_outputs(results, plan, args, curves)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  finally:
    delta.set_config(old)   # main() may run in-process (tests): leave the defaults as found
  return cli.finish(results, text, t0)


if __name__ == "__main__":
  sys.exit(main())
