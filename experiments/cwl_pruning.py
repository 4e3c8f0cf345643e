"""Table IV and Fig. 3 of the CWL paper: prune a CWL-transferred model by its scales.

  python -m experiments.cwl_pruning --out results/cwl_pruning

Transfers the source (default vgg_s pretrained on fmnist:0,2,3,4,6) to a k-shot target
(default fmnist:1,5,7,8,9, k=10) with Freeze+CWL (`--strategy finetune_cwl` for Finetune+CWL),
then for each tau removes every conv channel with |sigma| < tau (`prune.prune_by_sigma`: the
scales are folded into the weights, so the pruned model has none; ResNet stage channels are
removed only when all coupled units are below tau, see `jtransfer.methods.prune`) and reports,
as Table IV: test accuracy before finetuning, after 1 and 30 epochs of finetuning on the
k-shot set (all layers, Adam `--ft-lr`, BN in eval mode), % params and % feature maps kept,
and the measured forward latency (jitted, batch 1 and 128, median of `--latency-runs` after
warm-up) of the pruned and unpruned models. Each pruned model is saved with its widths config
under models/tau_<tau> (`transfer.load_source` reads it back). Writes results.json(l),
report.md, compression_per_layer.png (Fig. 3: % filters removed per conv layer, one bar per
tau) and sigma_hist.png.

The paper (VGG-16 ImageNet -> Kvasir, 50 shots) keeps 0.905 accuracy down to tau=0.2 with 95%
of the params, and loses accuracy from tau=0.8 on, most of which 1 epoch of finetuning
recovers. Measured: 1.6 CPU-minutes with --taus 0.4,0.8,1.0,1.2 --test-per-class 200 once the
source is cached. Latencies are only meaningful on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import jax
import numpy as np

from experiments import cli, pretrain
from experiments.report import ResultsDir
from jtransfer import models, surgery
from jtransfer.data import Batches, load_spec, parse_spec, sample_kshot
from jtransfer.errors import InputError
from jtransfer.methods import cwl, prune, transfer
from jtransfer.train import (accuracy, adam, fit, init_state, make_optimizer, make_train_step,
                             predict_logits)
from jtransfer.train.evaluate import median_latency_ms

CWL_STRATEGIES = ("freeze_cwl", "finetune_cwl", "finetune_lowconv")
DEFAULT_LR = {"freeze_cwl": 1e-2, "finetune_cwl": 1e-4, "finetune_lowconv": 1e-2}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default="vgg_s", choices=models.names())
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE, help="dataset spec or ckpt:PATH")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--target", default="fmnist:1,5,7,8,9")
  p.add_argument("--shots", type=int, default=10, help="k-shot training images per class")
  p.add_argument("--strategy", default="freeze_cwl", choices=CWL_STRATEGIES)
  p.add_argument("--lr", type=float, default=None,
                 help="transfer learning rate (default: 1e-2 freeze_cwl, 1e-4 finetune_cwl)")
  p.add_argument("--steps", type=int, default=200, help="transfer steps")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--taus", default="0.2,0.4,0.6,0.8,1.0,1.2")
  p.add_argument("--multiple", type=int, default=1,
                 help="round kept channel counts up to a multiple of this, by |sigma| (8 makes "
                      "pruned models faster on CPU; 1 = the paper's threshold rule)")
  p.add_argument("--residual", default="group", choices=prune.RESIDUAL_MODES,
                 help="ResNet stage channels: prune as one group, or keep them")
  p.add_argument("--ft-epochs", default="1,30", help="finetuning epochs at which to evaluate")
  p.add_argument("--ft-lr", type=float, default=1e-4, help="finetuning learning rate (Adam)")
  p.add_argument("--test-per-class", type=int, default=300, help="0 = all")
  p.add_argument("--latency-runs", type=int, default=20)
  p.add_argument("--latency-batches", default="1,128")
  p.add_argument("--no-save-models", action="store_true")
  p.add_argument("--data-dir", default=None,
                 help="TFDS data_dir or the Fashion-MNIST IDX directory")
  p.add_argument("--seed", type=int, default=0)
  cli.add_results_flags(p, "results/cwl_pruning")
  return p.parse_args(argv)


def _floats(text: str, flag: str, minimum: float = 0.0) -> list[float]:
  try:
    values = [float(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise InputError(f"{flag} {text!r}: expected a comma list of numbers") from None
  if not values or any(not np.isfinite(v) or v < minimum for v in values):
    raise InputError(f"{flag} {text!r}: values must be finite and >= {minimum}")
  return values


def validate(args) -> dict:
  """Checks every flag before loading anything."""
  parse_spec(args.target, flag="--target")
  if not args.source.startswith("ckpt:"):
    parse_spec(args.source, flag="--source")
  for flag, v in (("--shots", args.shots), ("--steps", args.steps),
                  ("--batch-size", args.batch_size), ("--latency-runs", args.latency_runs)):
    if v < 1:
      raise InputError(f"{flag} must be >= 1, got {v}")
  epochs = sorted({int(e) for e in _floats(args.ft_epochs, "--ft-epochs", 1)})
  batches = [int(b) for b in _floats(args.latency_batches, "--latency-batches", 1)]
  lr = args.lr if args.lr is not None else DEFAULT_LR[args.strategy]
  if not lr > 0 or not args.ft_lr > 0:
    raise InputError("--lr and --ft-lr must be > 0")
  return dict(taus=sorted(set(_floats(args.taus, "--taus"))), epochs=epochs,
              batches=batches, lr=lr)


# ----------------------------------------------------------------------------- pieces
def transfer_cwl(source, data, args, plan):
  """Trains the CWL strategy on one k-shot draw; returns (params with 'cwl', stats, idx)."""
  train_idx, _ = sample_kshot(data.train.labels, args.shots, args.seed,
                              num_classes=data.train.num_classes)
  setup = transfer.get_strategy(args.strategy).build(source, data.train.num_classes, args.steps)
  images, labels = data.train.images[train_idx], data.train.labels[train_idx]
  params, stats = setup.init(args.seed, images, labels)
  state = init_state(params, stats, setup.optimizer, args.seed, plan["lr"])
  state = fit(state, make_train_step(setup.loss_fn, setup.optimizer),
              Batches(images, labels, args.batch_size, args.seed).at, args.steps)
  return jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.batch_stats), \
      train_idx


def finetune_curve(model, params, stats, source, images, labels, test, args, epochs):
  """Test accuracy after each of `epochs` epochs of finetuning every layer (BN eval mode)."""
  opt = make_optimizer(params, [(".*", "all")], {"all": adam(args.ft_lr)})
  step = make_train_step(transfer.ce_loss_fn(model, source.mean, source.std), opt)
  forward = transfer.eval_forward(model, source.mean, source.std)
  batches = Batches(images, labels, args.batch_size, args.seed + 1)
  state = init_state(params, stats, opt, args.seed)
  out = {}
  for e in epochs:
    state = fit(state, step, batches.at, e * batches.steps_per_epoch)
    out[e] = accuracy(predict_logits(forward, state.params, state.batch_stats, test.images),
                      test.labels)
  return out


def latency_ms(model, params, stats, source, batch: int, runs: int) -> float:
  """Median wall time (ms) of the jitted eval forward on one batch, after two warm-up calls."""
  forward = transfer.eval_forward(model, source.mean, source.std)
  x = jax.device_put(np.zeros((batch, *source.input_shape), np.uint8))
  return median_latency_ms(forward, jax.device_put(params), jax.device_put(stats), x, runs=runs)


def _test_set(data, n: int):
  if n <= 0:
    return data.test
  keep = np.concatenate([np.flatnonzero(data.test.labels == c)[:n]
                         for c in range(data.test.num_classes)])
  return data.test.take(np.sort(keep))


# ----------------------------------------------------------------------------- report
def make_report(records: list[dict], args, plan) -> str:
  base = next((r for r in records if r["tau"] is None), None)
  rows = sorted((r for r in records if r["tau"] is not None), key=lambda r: r["tau"])
  e = plan["epochs"]
  head = ["τ", "Acc."] + [f"FT@{k}" for k in e] + ["#Param", "#Feat"] + \
      [f"latency b={b} (ms)" for b in plan["batches"]]
  lines = ["# CWL pruning (Table IV)", "",
           f"{args.arch} from `{args.source}` -> `{args.target}`, k={args.shots}, "
           f"{args.strategy} (lr {plan['lr']:g}, {args.steps} steps), residual={args.residual}, "
           f"multiple={args.multiple}; "
           f"finetuning: all layers, Adam {args.ft_lr:g}, epochs of the k-shot set. "
           "Latency: jitted forward, median of "
           f"{args.latency_runs} runs, pruned (unpruned in brackets).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  if base:
    lines.append("| - | " + f"{base['acc']:.3f} | " + " | ".join("-" for _ in e) +
                 " | 100% | 100% | " + " | ".join(f"{base['latency_ms'][str(b)]:.2f}"
                                                  for b in plan["batches"]) + " |")
  for r in rows:
    ft = [f"{r['ft'].get(str(k), float('nan')):.3f}" for k in e]
    lat = [f"{r['latency_ms'][str(b)]:.2f} ({base['latency_ms'][str(b)]:.2f})" if base else
           f"{r['latency_ms'][str(b)]:.2f}" for b in plan["batches"]]
    lines.append(f"| {r['tau']:g} | {r['acc']:.3f} | " + " | ".join(ft) +
                 f" | {100 * r['params_frac']:.0f}% | {100 * r['feat_frac']:.0f}% | " +
                 " | ".join(lat) + " |")
  lines += ["", "Per-layer filters kept (kept/total):", ""]
  if rows:
    units = list(rows[0]["kept"])
    lines += ["| τ | " + " | ".join(units) + " |", "|" + "---|" * (len(units) + 1)]
    for r in rows:
      lines.append(f"| {r['tau']:g} | " + " | ".join(f"{r['kept'][u][0]}/{r['kept'][u][1]}"
                                                     for u in units) + " |")
  return "\n".join(lines + [""])


def plot(records: list[dict], scales: dict, path_bars: str, path_hist: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = sorted((r for r in records if r["tau"] is not None), key=lambda r: r["tau"])
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
  done = {r["tau"] for r in results.records}
  log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
  source = pretrain.source_for(args.arch, args.source, epochs=args.source_epochs,
                               seed=args.seed, progress=not args.quiet)
  data = load_spec(args.target, source.input_shape, flag="--target",
                   data_dir=args.data_dir)
  test = _test_set(data, args.test_per_class)
  t0 = time.time()
  params, stats, train_idx = transfer_cwl(source, data, args, plan)
  log(f"[cwl_pruning] {args.strategy} transfer done in {time.time() - t0:.1f} s")
  scales, rest = cwl.split_cwl(params)
  config = models.model_config(transfer.target_model(source, data.train.num_classes))
  model = models.from_config(source.arch, config)
  folded = jax.tree.map(np.asarray, cwl.apply_cwl(rest, scales))
  images, labels = data.train.images[train_idx], data.train.labels[train_idx]
  forward = transfer.eval_forward(model, source.mean, source.std)
  if None not in done:
    lat = {str(b): latency_ms(model, folded, stats, source, b, args.latency_runs)
           for b in plan["batches"]}
    acc = accuracy(predict_logits(forward, folded, stats, test.images), test.labels)
    results.add(dict(tau=None, acc=acc, latency_ms=lat, params=surgery.count(rest),
                     feature_maps=int(sum(np.size(s) for s in scales.values()))))
    log(f"[cwl_pruning] unpruned: acc {acc:.4f}, latency {lat} ms")
  for tau in plan["taus"]:
    if tau in done:
      continue
    t1 = time.time()
    res = prune.prune_by_sigma(rest, stats, config, scales, tau, args.residual,
                               args.multiple)
    small = models.from_config(source.arch, res.config)
    fwd = transfer.eval_forward(small, source.mean, source.std)
    acc = accuracy(predict_logits(fwd, res.params, res.batch_stats, test.images), test.labels)
    ft = finetune_curve(small, res.params, res.batch_stats, source, images, labels, test,
                        args, plan["epochs"])
    lat = {str(b): latency_ms(small, res.params, res.batch_stats, source, b, args.latency_runs)
           for b in plan["batches"]}
    kept_maps, total_maps = res.feature_maps_kept
    record = dict(tau=tau, acc=acc, ft={str(k): v for k, v in ft.items()}, latency_ms=lat,
                  params=res.params_kept, params_frac=res.params_kept / res.params_total,
                  feat_frac=kept_maps / total_maps, kept={u: list(v) for u, v in res.kept.items()},
                  config=res.config, seconds=round(time.time() - t1, 2))
    if not args.no_save_models:
      variables = {"params": res.params, **({"batch_stats": res.batch_stats}
                                            if res.batch_stats else {})}
      transfer.save_source(os.path.join(results.path, "models", f"tau_{tau:g}"), transfer.Source(
          source.arch, res.config, variables, source.input_shape, source.mean, source.std,
          dict(tau=tau, strategy=args.strategy, target=args.target, shots=args.shots,
               test_acc=acc, kept=record["kept"])))
    results.add(record)
    log(f"[cwl_pruning] tau={tau:g}: acc {acc:.4f} ft {ft} params "
        f"{100 * record['params_frac']:.0f}% maps {100 * record['feat_frac']:.0f}%")
  return scales


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  cli.apply_devices(args)
  t0 = time.time()
  started = cli.start(args, validate, run)
  if started is None:
    return 2
  plan, results, scales = started
  records = results.records
  results.write_json("results.json", records)
  text = make_report(records, args, plan)
  results.write_text("report.md", text)
  plot(records, scales, os.path.join(results.path, "compression_per_layer.png"),
       os.path.join(results.path, "sigma_hist.png"))
  return cli.finish(results, text, t0)


if __name__ == "__main__":
  sys.exit(main())
