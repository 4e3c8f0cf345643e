"""Table IV and Fig. 3 of the CWL paper: prune a CWL-transferred model by its scales.

  python -m experiments.cwl_pruning --out results/cwl_pruning

Per k-shot draw (`--repeats`, default 3; draw seeds as experiments.fewshot's, so the draws
match cwl_tables' at the same k and --seed) of the target (default fmnist:1,5,7,8,9, k=10) with
`--val-per-class` validation images disjoint from the k-shot set and from test: transfers the
source (default vgg_s pretrained on fmnist:0,2,3,4,6) with Freeze+CWL (`--strategy
finetune_cwl` for Finetune+CWL) until the validation accuracy has not improved for
`--patience` steps (at most `--steps`; best validation state kept), then for each tau removes
every conv channel with |sigma| < tau (`prune.prune_by_sigma`: the scales are folded into the
weights, so the pruned model has none; ResNet stage channels are removed only when all coupled
units are below tau, see `jtransfer.methods.prune`) and reports, as Table IV: test accuracy
before finetuning, after 1 and 30 epochs of finetuning on the k-shot set (the paper's rows,
`--ft-epochs`; all layers, Adam, BN in eval mode), % params and % feature maps kept, and the
measured forward latency (jitted, batch 1 and 128, median of `--latency-runs` after warm-up) of
draw 0's pruned and unpruned models, timed together round-robin (so a load change on a shared
machine hits them alike). The finetuning LR is chosen per draw, tau and epoch count
on that draw's validation set from `--ft-lrs` (extended at an edge, `--tune-extend`); the test
split reaches no choice. The unpruned model is finetuned the same way, as a control.

Claims (report.md's "Claims" section, paired by draw, per tau and epoch count): pruned and
finetuned >= unpruned within 1 point (Table IV's reading), and >= the unpruned model finetuned
alike within 1 point (the control). Claims need >= 2 draws for an interval.

Draw 0's pruned models are saved with their widths config under models/tau_<tau>
(`transfer.load_source` reads them back). Writes results.jsonl, results.json (the same without
timings; `make_report` regenerates report.md from it), report.md, summary.json (claims),
compression_per_layer.png (Fig. 3: % filters removed per conv layer, draw 0, one bar per tau)
and sigma_hist.png.

A reduced run (2 draws, 4 thresholds, 200 test images per class):

  python -m experiments.cwl_pruning --repeats 2 --taus 0.4,0.8,1.0,1.2 --test-per-class 200 \
      --out results/cwl_pruning_reduced

The paper (VGG-16 ImageNet -> Kvasir, 50 shots) keeps 0.905 accuracy down to tau=0.2 with 95%
of the params, and loses accuracy from tau=0.8 on, most of which 1 epoch of finetuning
recovers. Latencies are only meaningful on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Sequence

import jax
import numpy as np

from experiments import cli, grid_progress, pretrain, publish
from experiments.fewshot import budget_of, cap_per_class, draw_seed
from experiments.report import (TIMED_AFTER_RESUME, TIMED_TOGETHER, ResultsDir, float_list,
                                mean_std, positive_floats, timing_text)
from jtransfer import models, surgery
from jtransfer.data import Batches, load_spec, parse_spec, sample_kshot
from jtransfer.errors import InputError
from jtransfer.methods import cwl, prune, prune_finetune, transfer
from jtransfer.protocol import claims, fit_converged, progress
from jtransfer.train import accuracy, fit, init_state, make_train_step, predict_logits

CWL_STRATEGIES = ("freeze_cwl", "finetune_cwl", "finetune_lowconv")
DEFAULT_LR = {"freeze_cwl": 1e-2, "finetune_cwl": 1e-4, "finetune_lowconv": 1e-2}
CLAIMS = (
    claims.Claim("CWL", "pruning by |sigma| keeps accuracy after finetuning", "pruned_ft",
                 "unpruned", at_least=True, margin=0.01, source="Table IV, Fig. 3"),
    claims.Claim("CWL", "pruning by |sigma| keeps accuracy after finetuning, against the "
                 "unpruned model finetuned alike (a control the paper does not report)",
                 "pruned_ft", "unpruned_ft", at_least=True, margin=0.01, source="Table IV"),
)
LABELS = {"pruned_ft": "pruned + finetuned", "unpruned": "unpruned",
          "unpruned_ft": "unpruned + finetuned"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="vgg_s", choices=models.names())
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE, help="dataset spec or ckpt:PATH")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--target", default="fmnist:1,5,7,8,9")
  p.add_argument("--shots", type=int, default=10, help="k-shot training images per class")
  p.add_argument("--repeats", type=int, default=3,
                 help="k-shot draws (the claims pair pruned and unpruned by draw; an interval "
                      "needs >= 2)")
  p.add_argument("--val-per-class", type=int, default=20,
                 help="validation images per class, disjoint from the k-shot set and test")
  p.add_argument("--strategy", default="freeze_cwl", choices=CWL_STRATEGIES)
  p.add_argument("--lr", type=float, default=None,
                 help="transfer learning rate (default: 1e-2 freeze_cwl, 1e-4 finetune_cwl)")
  cli.add_stopping_flags(p, 100, "the transfer", steps=500)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--taus", default="0.2,0.4,0.6,0.8,1.0,1.2")
  p.add_argument("--multiple", type=int, default=1,
                 help="round kept channel counts up to a multiple of this, by |sigma| (8 makes "
                      "pruned models faster on CPU; 1 = the paper's threshold rule)")
  p.add_argument("--residual", default="group", choices=prune.RESIDUAL_MODES,
                 help="ResNet stage channels: prune as one group, or keep them")
  p.add_argument("--ft-epochs", default="1,30",
                 help="finetuning epochs at which to evaluate (the paper: 1 and 30)")
  p.add_argument("--ft-lrs", default="1e-5,1e-4,1e-3",
                 help="finetuning learning rates (Adam), comma list; chosen per draw, tau and "
                      "epoch count on the draw's validation set")
  cli.add_tune_extend_flag(p, 1)
  p.add_argument("--test-per-class", type=int, default=300, help="0 = all")
  p.add_argument("--latency-runs", type=int, default=20)
  p.add_argument("--latency-batches", default="1,128")
  p.add_argument("--no-save-models", action="store_true")
  p.add_argument("--data-dir", default=None,
                 help="TFDS data_dir or the Fashion-MNIST IDX directory")
  p.add_argument("--seed", type=int, default=0)
  cli.add_results_flags(p, "results/cwl_pruning")
  return p.parse_args(argv)


def validate(args) -> dict:
  """Checks every flag before loading anything."""
  parse_spec(args.target, flag="--target")
  if not args.source.startswith("ckpt:"):
    parse_spec(args.source, flag="--source")
  for flag, v in (("--shots", args.shots), ("--steps", args.steps),
                  ("--batch-size", args.batch_size), ("--latency-runs", args.latency_runs),
                  ("--repeats", args.repeats), ("--eval-every", args.eval_every)):
    if v < 1:
      raise InputError(f"{flag} must be >= 1, got {v}")
  for flag, v in (("--patience", args.patience), ("--val-per-class", args.val_per_class),
                  ("--tune-extend", args.tune_extend), ("--test-per-class",
                                                        args.test_per_class)):
    if v < 0:
      raise InputError(f"{flag} must be >= 0, got {v}")
  at_least_1 = dict(ok=lambda v: v >= 1, what="values must be finite and >= 1")
  epochs = sorted({int(e) for e in float_list(args.ft_epochs, "--ft-epochs", **at_least_1)})
  batches = [int(b) for b in float_list(args.latency_batches, "--latency-batches", **at_least_1)]
  ft_lrs = sorted(set(positive_floats(args.ft_lrs, "--ft-lrs")))
  lr = args.lr if args.lr is not None else DEFAULT_LR[args.strategy]
  if not lr > 0:
    raise InputError("--lr must be > 0")
  if not args.val_per_class and (args.patience or len(ft_lrs) > 1):
    raise InputError("early stopping (--patience) and choosing the finetuning LR (several "
                     "--ft-lrs) need validation images: set --val-per-class >= 1")
  taus = float_list(args.taus, "--taus", lambda v: v >= 0, "values must be finite and >= 0")
  return dict(taus=sorted(set(taus)), epochs=epochs,
              batches=batches, lr=lr, ft_lrs=ft_lrs)


# ----------------------------------------------------------------------------- pieces
def draw_splits(data, args, repeat: int) -> tuple[int, prune_finetune.Splits]:
  """(seed, splits) of k-shot draw `repeat`: its training, validation and test images."""
  seed = draw_seed(args, args.shots, repeat)
  train_idx, val_idx = sample_kshot(data.train.labels, args.shots, seed,
                                    val_per_class=args.val_per_class,
                                    num_classes=data.train.num_classes)
  return seed, prune_finetune.Splits(data.train.take(train_idx),
                                     data.train.take(val_idx) if len(val_idx) else None,
                                     cap_per_class(data.test, args.test_per_class))


def transfer_cwl(setup, transfer_step, splits, seed: int, args, plan, on_step=None):
  """Trains the CWL strategy on one draw under the run budget; `on_step` (step, cap, val
  acc) is a long run's progress hook (`jtransfer.protocol.progress.ticker`).

  Returns:
    (params with 'cwl', batch stats, info {'steps', 'best_step', 'stopped'}).
  """
  train = splits.train
  params, stats = setup.init(seed, train.images, train.labels)
  state = init_state(params, stats, setup.optimizer, seed, plan["lr"])
  batches = Batches(train.images, train.labels, args.batch_size, seed)
  budget = budget_of(args)
  if budget is None or splits.val is None:
    state = fit(state, transfer_step, batches.at, args.steps, on_step=on_step)
    info = dict(steps=args.steps, best_step=args.steps, stopped="fixed")
  else:
    val = lambda st: accuracy(predict_logits(setup.forward, st.params, st.batch_stats,
                                             splits.val.images), splits.val.labels)
    state, info = fit_converged(state, transfer_step, batches.at, val, budget,
                                on_step=on_step)
    info.pop("curve")
  return jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.batch_stats), \
      info


def finetune_chosen(finetuner, config, params, stats, splits, seed, args, plan) -> dict:
  """The finetuning grid of one (pruned) model, its LR chosen per epoch count on validation
  (`prune_finetune.choose_per_epochs`)."""
  return prune_finetune.choose_per_epochs(
      lambda lr: finetuner.curve(config, params, stats, splits, seed, plan["epochs"], lr),
      plan["epochs"], plan["ft_lrs"], args.tune_extend, validated=splits.val is not None)


# ----------------------------------------------------------------------------- report
def _ms(values, digits: int = 3) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  m, s = mean_std(values)
  return f"{m:.{digits}f}" + (f" ({s:.{digits}f})" if len(values) > 1 else "")


def claim_records(records: list[dict]) -> list[dict]:
  """Per draw, tau and epoch count: the pruned + finetuned model, the unpruned model and the
  unpruned model finetuned alike (the arms of CLAIMS), for `claims.evaluate`."""
  base = {r.get("repeat", 0): r for r in records if r["tau"] is None}
  out = []
  for r in records:
    b = base.get(r.get("repeat", 0))
    if r["tau"] is None or b is None:
      continue
    for e, ft in r["ft"].items():
      cell = dict(tau=r["tau"], epochs=int(e), repeat=r.get("repeat", 0))
      out += [dict(cell, arm="pruned_ft", test_acc=ft["test_acc"]),
              dict(cell, arm="unpruned", test_acc=b["acc"])]
      if e in b.get("ft", {}):
        out.append(dict(cell, arm="unpruned_ft", test_acc=b["ft"][e]["test_acc"]))
  return out


def claim_results(records: list[dict]) -> list[dict]:
  recs = claim_records(records)
  # Every tau and epoch count of a draw prunes the same transferred model: one draw, pooled once.
  out = [claims.evaluate(c, recs, ("tau", "epochs"), arm_field="arm", draw_fields=("repeat",))
         for c in CLAIMS]
  return [r for r in out if r["cells"]]


def make_report(records: list[dict], args, plan) -> str:
  """report.md from the records alone (results.json), the flags and the plan."""
  bases = [r for r in records if r["tau"] is None]
  base0 = next((r for r in bases if r.get("repeat", 0) == 0), None)
  by_tau = defaultdict(list)
  for r in records:
    if r["tau"] is not None:
      by_tau[r["tau"]].append(r)
  e = plan["epochs"]
  reps = sorted({r.get("repeat", 0) for r in records})
  head = ["τ", "Acc."] + [f"FT@{k}" for k in e] + ["#Param", "#Feat"] + \
      [f"latency b={b} (ms)" for b in plan["batches"]]
  if args.patience:
    budget = (f"until its validation accuracy has not improved for {args.patience} steps "
              f"(checked every {args.eval_every}, at most {args.steps}; best validation state "
              "kept)")
  else:
    budget = f"{args.steps} steps"
  steps = [b["transfer"]["steps"] for b in bases if "transfer" in b]
  lines = ["# CWL pruning (Table IV)", "",
           f"{args.arch} from `{args.source}` -> `{args.target}`, k={args.shots}, "
           f"{len(reps)} k-shot draw(s) (repeats {reps}), validation {args.val_per_class}/class "
           "disjoint from the k-shot set and from test, test "
           f"{'all' if not args.test_per_class else f'<= {args.test_per_class}/class'}. "
           f"Transfer: {args.strategy} (lr {plan['lr']:g}, fixed) {budget}"
           + (f"; {np.mean(steps):.0f} steps on average" if steps else "") +
           f". Pruning: residual={args.residual}, multiple={args.multiple}. Finetuning: all "
           "layers, Adam, epochs of the k-shot set (the paper's rows); LR chosen per draw, tau "
           "and epoch count on the draw's validation set from {"
           + ", ".join(f"{v:g}" for v in plan["ft_lrs"]) +
           f"}} (extended up to {args.tune_extend} value(s) at an edge); the test split reaches "
           "no choice.", "",
           "Cells: mean (std) test accuracy over draws. The unpruned row's FT columns are the "
           "unpruned model finetuned alike (a control; the paper leaves them empty). Latency: "
           f"draw 0's models, jitted forward, median of {args.latency_runs} runs"
           + timing_text(records, ", all timed together round-robin")
           + ", pruned (unpruned in brackets).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lat0 = (base0 or {}).get("latency_ms", {})
  if bases:
    ft = [_ms([b.get("ft", {}).get(str(k), {}).get("test_acc") for b in bases]) for k in e]
    lat = [f"{lat0[str(b)]:.2f}" if str(b) in lat0 else "-" for b in plan["batches"]]
    lines.append("| - | " + f"{_ms([b['acc'] for b in bases])} | " + " | ".join(ft) +
                 " | 100% | 100% | " + " | ".join(lat) + " |")
  for tau in sorted(by_tau):
    rs = by_tau[tau]
    ft = [_ms([r["ft"].get(str(k), {}).get("test_acc") for r in rs]) for k in e]
    r0 = next((r for r in rs if r.get("repeat", 0) == 0), {})
    lat = []
    for b in plan["batches"]:
      v = r0.get("latency_ms", {}).get(str(b))
      lat.append("-" if v is None else f"{v:.2f}" + (f" ({lat0[str(b)]:.2f})"
                                                      if str(b) in lat0 else ""))
    lines.append(f"| {tau:g} | {_ms([r['acc'] for r in rs])} | " + " | ".join(ft) +
                 f" | {100 * np.mean([r['params_frac'] for r in rs]):.0f}% | "
                 f"{100 * np.mean([r['feat_frac'] for r in rs]):.0f}% | " + " | ".join(lat) +
                 " |")
  lines += ["", "Finetuning LR chosen on validation, per draw (in repeat order):", "",
            "| τ | " + " | ".join(f"FT@{k}" for k in e) + " |", "|---|" + "---|" * len(e)]
  edges = []
  for tau, rs in ([(None, bases)] + sorted(by_tau.items())):
    cells = []
    for k in e:
      chosen = [r["ft"][str(k)] for r in sorted(rs, key=lambda r: r.get("repeat", 0))
                if str(k) in r.get("ft", {})]
      cells.append(", ".join(f"{c['lr']:g}" for c in chosen) or "-")
      edges += [f"τ={'-' if tau is None else f'{tau:g}'} FT@{k} draw {i}: "
                + ", ".join(c["edges"]) for i, c in enumerate(chosen) if c.get("edges")]
    lines.append(f"| {'-' if tau is None else f'{tau:g}'} | " + " | ".join(cells) + " |")
  lines.append("")
  if edges:
    lines += ["Chosen LR still on a grid edge after extension (the optimum may lie beyond): "
              + "; ".join(edges) + ".", ""]
  rows0 = sorted((r for r in records if r["tau"] is not None and r.get("repeat", 0) == 0),
                 key=lambda r: r["tau"])
  lines += ["Per-layer filters kept (kept/total), draw 0:", ""]
  if rows0:
    units = list(rows0[0]["kept"])
    lines += ["| τ | " + " | ".join(units) + " |", "|" + "---|" * (len(units) + 1)]
    for r in rows0:
      lines.append(f"| {r['tau']:g} | " + " | ".join(f"{r['kept'][u][0]}/{r['kept'][u][1]}"
                                                     for u in units) + " |")
  lines.append("")
  results = claim_results(records)
  if results:
    lines += claims.section(results, LABELS)
    lines += ["Claim cells: τ, finetuning epochs; 'all cells' pools them, each draw once (its "
              "cells averaged).", ""]
    if len(reps) < 2:
      lines += [f"Only {len(reps)} k-shot draw: a confidence interval needs at least 2 "
                "paired draws, so every verdict above is inconclusive; rerun with --repeats 3 "
                "or more.", ""]
  return "\n".join(lines)


def plot(records: list[dict], scales: dict, path_bars: str, path_hist: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = sorted((r for r in records if r["tau"] is not None and r.get("repeat", 0) == 0),
                key=lambda r: r["tau"])
  if rows:
    units = list(rows[0]["kept"])
    fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(units) * max(1, len(rows)) / 2), 3.8))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
      removed = [100 * (1 - r["kept"][u][0] / r["kept"][u][1]) for u in units]
      ax.bar(np.arange(len(units)) + i * width - 0.4 + width / 2, removed, width,
             label=f"τ={r['tau']:g}")
    ax.set_xticks(range(len(units)), units, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("filters removed (%)")
    ax.set_ylim(0, 100)
    ax.set_title("compression rate per conv layer")
    ax.legend(fontsize=7, ncol=min(len(rows), 6))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path_bars, dpi=110)
    plt.close(fig)
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.hist(np.abs(np.concatenate([np.ravel(s) for s in scales.values()])), bins=50)
  ax.set_xlabel("|sigma| (all conv units)")
  ax.set_ylabel("channels")
  fig.tight_layout()
  fig.savefig(path_hist, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------- main
def run(args, plan, results: ResultsDir) -> dict:
  """Every draw, unpruned and at each tau; returns draw 0's CWL scales (for the histogram)."""
  done = {(r.get("repeat", 0), r["tau"]) for r in results.records}
  log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
  source = pretrain.source_for(args.arch, args.source, epochs=args.source_epochs,
                               seed=args.seed, progress=not args.quiet)
  data = load_spec(args.target, source.input_shape, flag="--target",
                   data_dir=args.data_dir)
  setup = transfer.get_strategy(args.strategy).build(source, data.train.num_classes, args.steps)
  transfer_step = make_train_step(setup.loss_fn, setup.optimizer)
  finetuner = prune_finetune.Finetuner(source, args.batch_size)
  config = models.model_config(transfer.target_model(source, data.train.num_classes))
  scales0 = None
  emit = grid_progress.stderr_or_quiet(args)
  grid = progress.GridProgress(
      progress.plan_counts({"unpruned runs (draws)": args.repeats,
                            "pruned runs (taus x draws)": args.repeats * len(plan["taus"])}),
      saved=sum((repeat, tau) in done for repeat in range(args.repeats)
                for tau in [None] + plan["taus"]), emit=emit)
  grid.announce("cwl_pruning")
  for repeat in range(args.repeats):
    todo = [t for t in [None] + plan["taus"] if (repeat, t) not in done]
    if not todo and repeat > 0:  # draw 0 always transfers: its scales make sigma_hist.png
      continue
    seed, splits = draw_splits(data, args, repeat)
    pending: list = []  # draw 0's records, added once their models are timed
    t0 = time.time()
    params, stats, info = transfer_cwl(
        setup, transfer_step, splits, seed, args, plan,
        on_step=progress.ticker(f"draw {repeat} {args.strategy} transfer", emit))
    log(f"[cwl_pruning] draw {repeat}: {args.strategy} transfer, {info['steps']} steps "
        f"({info['stopped']}) in {time.time() - t0:.1f} s")
    scales, rest = cwl.split_cwl(params)
    if repeat == 0:
      scales0 = scales
    folded = jax.tree.map(np.asarray, cwl.apply_cwl(rest, scales))
    first = repeat == 0
    if None in todo:
      model, _, _, forward = finetuner.compiled(config, folded)
      accs = splits.accs(forward, folded, stats)
      record = dict(tau=None, repeat=repeat, seed=seed, acc=accs["test_acc"],
                    val_acc=accs["val_acc"], transfer=dict(info, lr=plan["lr"]),
                    params=surgery.count(rest),
                    feature_maps=int(sum(np.size(s) for s in scales.values())),
                    **finetune_chosen(finetuner, config, folded, stats, splits, seed, args,
                                      plan))
      if first:
        pending.append((record, model, folded, stats))
      else:
        results.add(record)
      grid.finished(f"draw {repeat} unpruned: acc {record['acc']:.4f}, finetuned "
          f"{ {e: round(v['test_acc'], 4) for e, v in record['ft'].items()} }")
    for tau in plan["taus"]:
      if tau not in todo:
        continue
      t1 = time.time()
      res = prune.prune_by_sigma(rest, stats, config, scales, tau, args.residual,
                                 args.multiple)
      small, _, _, fwd = finetuner.compiled(res.config, res.params)
      accs = splits.accs(fwd, res.params, res.batch_stats)
      record = dict(tau=tau, repeat=repeat, seed=seed, acc=accs["test_acc"],
                    val_acc=accs["val_acc"],
                    **finetune_chosen(finetuner, res.config, res.params, res.batch_stats,
                                      splits, seed, args, plan),
                    **prune_finetune.removed(res), config=res.config)
      if first:
        pending.append((record, small, res.params, res.batch_stats))
      if first and not args.no_save_models:
        variables = {"params": res.params, **({"batch_stats": res.batch_stats}
                                              if res.batch_stats else {})}
        transfer.save_source(os.path.join(results.path, "models", f"tau_{tau:g}"),
                             transfer.Source(source.arch, res.config, variables,
                                             source.input_shape, source.mean, source.std,
                                             dict(tau=tau, strategy=args.strategy,
                                                  target=args.target, shots=args.shots,
                                                  test_acc=record["acc"],
                                                  kept=record["kept"])))
      record["seconds"] = round(time.time() - t1, 2)
      if not first:
        results.add(record)
      grid.finished(f"draw {repeat} tau={tau:g}: acc {record['acc']:.4f} ft "
          f"{ {e: (v['lr'], round(v['test_acc'], 4)) for e, v in record['ft'].items()} } "
          f"params {100 * record['params_frac']:.0f}% maps {100 * record['feat_frac']:.0f}%")
    if pending:  # draw 0's models, timed together so load changes hit them alike
      resumed = len(todo) < len(plan["taus"]) + 1  # part of the draw recorded before a kill
      times = prune_finetune.latencies([(m, p, st) for _, m, p, st in pending], source,
                                       plan["batches"],
                        args.latency_runs)
      results.add_many([dict(record, latency_ms=t,
                             latency_timing=TIMED_AFTER_RESUME if resumed else TIMED_TOGETHER)
                        for (record, *_), t in zip(pending, times)])
  return scales0


def records_of(results, _) -> list[dict]:
  """results.json: what the seeds determine (timings stay in results.jsonl), in draw and tau
  order; the report is made from exactly what it holds."""
  records = sorted(results.records, key=lambda r: (r.get("repeat", 0), r["tau"] is not None,
                                                   r["tau"] or 0.0))
  return json.loads(json.dumps([{k: v for k, v in r.items() if k != "seconds"}
                                for r in records], sort_keys=True))


def main(argv: Sequence[str] | None = None) -> int:
  return cli.main(argv, PUBLISHER, run, records_of,
                  lambda summary, plan, args, results, scales: plot(
                      records_of(results, scales), scales,
                      os.path.join(results.path, "compression_per_layer.png"),
                      os.path.join(results.path, "sigma_hist.png")))


PUBLISHER = publish.Publisher(
    "experiments.cwl_pruning", parse_args, validate,
    lambda records, plan, args, _: (make_report(records, args, plan),
                                    dict(claims=claim_results(records))))


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
