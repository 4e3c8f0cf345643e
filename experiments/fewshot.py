"""Few-shot transfer of a pretrained source to a k-shot target: strategies side by side.

  python -m experiments.fewshot --arch vgg_s,resnet_s --source fmnist:0,2,3,4,6 \
      --target 'fmnist:1,5,7,8,9' --target digits --shots 1,3,5,10 --repeats 10 \
      --strategies freeze,finetune --lrs paper --out results/fewshot

writes results.jsonl (one record per finished run), results.json, report.md (mean (std) of the
best-over-LR test accuracy, as the CWL paper reports, and of the validation-selected LR) and
accuracy_vs_shots.png. With no flags it runs the embedded default: both small archs, both
embedded targets, freeze and finetune, a reduced grid (shots 1,5,10; 2 repeats; 2 LRs per
strategy; 50 steps per run; 300 test images per class). BUILD_NOTES.md has its timings, with
and without the sources cached (they are pretrained on first use).

Protocol: for each (arch, target, shots, repeat) one stratified k-shot draw plus a disjoint
validation draw (`--val-per-class`) from the target's train split, shared by every strategy and
LR; `--steps` Adam steps on full batches of the k-shot set (at most `--batch-size`); test on
the target's test split. Frozen-backbone strategies with BN in eval mode train their head on
backbone features computed once per (arch, target).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

import numpy as np

from experiments import cli, pretrain
from experiments.report import ResultsDir, best_over_lr, pct, positive_ints
from jtransfer import models
from jtransfer.data import Batches, ImageSet, load_spec, parse_spec, sample_kshot
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.methods import transfer
from jtransfer.train import (accuracy, fit, init_state, make_optimizer, make_train_step,
                             predict_logits)

KEY = ("strategy", "arch", "target", "shots", "repeat", "lr")
DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")
FEATURE_BATCH = 256
REDUCED_LRS = {"freeze": (1e-2, 5e-2), "finetune": (1e-4, 1e-3)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--arch", default=",".join(models.SMALL_ARCHS),
                 help="comma list of architectures")
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE,
                 help="dataset spec to pretrain on (cached), or ckpt:PATH")
  p.add_argument("--target", action="append", default=None,
                 help="target dataset spec; repeat the flag (or separate with ';') for several")
  p.add_argument("--shots", default="1,5,10", help="comma list of k (images per class)")
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--strategies", default="freeze,finetune")
  p.add_argument("--lrs", default="reduced",
                 help="'paper' (the CWL paper's grid per strategy), 'reduced' (2 per strategy) "
                      "or a comma list")
  p.add_argument("--steps", type=int, default=50, help="train steps per run")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--val-per-class", type=int, default=10)
  p.add_argument("--test-per-class", type=int, default=300,
                 help="cap on test images per class (0 = all)")
  p.add_argument("--data-dir", default=None,
                 help="TFDS data_dir (default $TFDS_DATA_DIR) or the Fashion-MNIST IDX directory")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--no-feature-cache", action="store_true",
                 help="train head-only strategies through the full forward (slow path)")
  p.add_argument("--out", default="results/fewshot")
  p.add_argument("--resume", action="store_true", help="continue a grid, skipping finished runs")
  p.add_argument("--overwrite", action="store_true", help="replace existing results")
  p.add_argument("--quiet", action="store_true", help="no progress output")
  cli.add_devices_flag(p)
  return p.parse_args(argv)


def validate(args: argparse.Namespace) -> dict:
  """Checks every flag before any data is loaded or anything compiled."""
  archs = [a.strip() for a in args.arch.split(",") if a.strip()]
  for a in archs:
    if a not in models.names():
      raise InputError(f"--arch {a!r} is unknown; expected one of {', '.join(models.names())}")
  strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
  for s in strategies:
    transfer.get_strategy(s)
  targets = [t for flag in (args.target or DEFAULT_TARGETS) for t in flag.split(";") if t]
  for t in targets:
    parse_spec(t, flag="--target")
  if not args.source.startswith("ckpt:"):
    parse_spec(args.source, flag="--source")
  if args.repeats < 1:
    raise InputError(f"--repeats must be >= 1, got {args.repeats}")
  if args.steps < 1:
    raise InputError(f"--steps must be >= 1, got {args.steps}")
  if args.batch_size < 1:
    raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
  lrs = {}
  for s in strategies:
    strategy = transfer.get_strategy(s)
    if args.lrs == "reduced":
      lrs[s] = REDUCED_LRS.get(s, strategy.paper_lrs[1::2] or strategy.paper_lrs)
    else:
      lrs[s] = transfer.lr_grid(strategy, args.lrs)
  return dict(archs=archs, strategies=strategies, targets=targets,
              shots=positive_ints(args.shots, "--shots"), lrs=lrs)


def cap_per_class(s: ImageSet, n: int) -> ImageSet:
  """The first `n` images of each class (deterministic), or all when n == 0."""
  if n <= 0:
    return s
  keep = np.concatenate([np.flatnonzero(s.labels == c)[:n] for c in range(s.num_classes)])
  return s.take(np.sort(keep))


class TargetRuns:
  """Everything shared by the runs of one (arch, target): data, cached features, compiled fns."""

  def __init__(self, source: transfer.Source, spec: str, args, data_cache: dict,
               setup_cache: dict):
    key = (spec, source.input_shape)
    if key not in data_cache:
      data_cache[key] = load_spec(spec, source.input_shape, flag="--target",
                                  data_dir=args.data_dir)
    data = data_cache[key]
    self.source, self.spec, self.args = source, spec, args
    self.pool = data.train
    self.test = cap_per_class(data.test, args.test_per_class)
    self.num_classes = data.train.num_classes
    # Setups (and so compiled steps) are shared by every target with the same class count.
    self._setups = setup_cache.setdefault((id(source), self.num_classes), {})
    self._features = None

  def features(self, idx: np.ndarray):
    """Head inputs for pool rows `idx` and for the test set, computed once per image.

    Only the rows runs ask for are computed (k-shot and validation draws, not the whole pool),
    in fixed-size batches so one compiled forward serves every call.
    """
    if self._features is None:
      extract = lambda im: transfer.extract_features(self.source, self.num_classes, im,
                                                     batch_size=FEATURE_BATCH)
      test = extract(self.test.images)
      self._features = (np.zeros((len(self.pool), test.shape[1]), test.dtype),
                        np.zeros(len(self.pool), bool), test)
    pool, have, test = self._features
    todo = np.unique(idx[~have[idx]])
    if todo.size:
      padded = np.resize(todo, -(-todo.size // FEATURE_BATCH) * FEATURE_BATCH)
      pool[padded] = transfer.extract_features(self.source, self.num_classes,
                                               self.pool.images[padded],
                                               batch_size=FEATURE_BATCH)
      have[todo] = True
    return pool[idx], test

  def setup(self, name: str):
    """(Setup, compiled step, head-only optimizer or None) per strategy, built once."""
    if name not in self._setups:
      strategy = transfer.get_strategy(name)
      setup = strategy.build(self.source, self.num_classes, self.args.steps)
      head_only = strategy.head_only and not self.args.no_feature_cache
      if head_only:
        label = setup.optimizer.labels["head"]["kernel"]
        params, _ = setup.init(0, self.pool.images[:1], self.pool.labels[:1])
        opt = make_optimizer({"head": params["head"]}, [(".*", label)],
                             {label: setup.optimizer.groups[label]}, injected_lr=True)
        step = make_train_step(transfer.head_loss_fn(), opt)
      else:
        opt, step = setup.optimizer, make_train_step(setup.loss_fn, setup.optimizer)
      self._setups[name] = (setup, step, opt, head_only)
    return self._setups[name]

  def run(self, name: str, train_idx, val_idx, lr: float, seed: int) -> dict:
    setup, step, opt, head_only = self.setup(name)
    params, stats = setup.init(seed, self.pool.images[train_idx], self.pool.labels[train_idx])
    if head_only:
      rows, test_f = self.features(np.concatenate([train_idx, val_idx]))
      params, stats = {"head": params["head"]}, {}
      x_train, x_val, x_test = rows[:len(train_idx)], rows[len(train_idx):], test_f
      forward = transfer.head_forward
    else:
      x_train, x_val, x_test = (self.pool.images[train_idx], self.pool.images[val_idx],
                                self.test.images)
      forward = setup.forward
    batches = Batches(x_train, self.pool.labels[train_idx], self.args.batch_size, seed)
    state = init_state(params, stats, opt, seed, lr)
    state = fit(state, step, batches.at, self.args.steps)
    val_acc = (accuracy(predict_logits(forward, state.params, state.batch_stats, x_val),
                        self.pool.labels[val_idx]) if len(val_idx) else float("nan"))
    test_acc = accuracy(predict_logits(forward, state.params, state.batch_stats, x_test),
                        self.test.labels)
    return dict(test_acc=test_acc, val_acc=val_acc)


def source_input_shape(source_spec: str) -> tuple[int, ...]:
  """The input shape a source takes, read without loading or training it."""
  if not source_spec.startswith("ckpt:"):
    return tuple(pretrain.DEFAULT_SHAPE)
  import json
  path = os.path.join(source_spec[len("ckpt:"):], "meta.json")
  try:
    with open(path) as f:
      return tuple(int(v) for v in json.load(f)["input_shape"])
  except (OSError, ValueError, KeyError, TypeError):
    raise InputError(f"--source {source_spec}: {path} is missing or has no input_shape; "
                     "expected a model saved by experiments.pretrain or convert_weights") from None


def check_targets(args: argparse.Namespace, plan: dict, data_cache: dict) -> None:
  """Loads every target and checks the largest k against each class, before any training."""
  shape = source_input_shape(args.source)
  for spec in plan["targets"]:
    key = (spec, shape)
    if key not in data_cache:
      data_cache[key] = load_spec(spec, shape, flag="--target", data_dir=args.data_dir)
    train = data_cache[key].train
    sample_kshot(train.labels, max(plan["shots"]), 0, num_classes=train.num_classes)


def run_grid(args: argparse.Namespace, plan: dict, results: ResultsDir) -> None:
  done = results.done(KEY)
  data_cache: dict = {}
  check_targets(args, plan, data_cache)
  total = sum(len(plan["lrs"][s]) for s in plan["strategies"]) * len(plan["shots"]) \
      * args.repeats * len(plan["targets"]) * len(plan["archs"])
  finished = len(done)
  for arch in plan["archs"]:
    source = pretrain.source_for(arch, args.source, epochs=args.source_epochs, seed=args.seed,
                                 progress=not args.quiet)
    setup_cache: dict = {}
    for spec in plan["targets"]:
      runs = TargetRuns(source, spec, args, data_cache, setup_cache)
      for shots in plan["shots"]:
        for repeat in range(args.repeats):
          # One draw per (shots, repeat), shared by all strategies and LRs: paired comparison.
          seed = (args.seed * 1_000_003 + shots * 1009 + repeat) % (2 ** 31)
          train_idx, val_idx = sample_kshot(runs.pool.labels, shots, seed,
                                            val_per_class=args.val_per_class,
                                            num_classes=runs.num_classes)
          for name in plan["strategies"]:
            for lr in plan["lrs"][name]:
              key = (name, arch, spec, shots, repeat, lr)
              if key in done:
                continue
              t0 = time.time()
              record = dict(zip(KEY, key), status="ok", n_train=int(len(train_idx)),
                            n_val=int(len(val_idx)), n_test=len(runs.test), steps=args.steps)
              try:
                record.update(runs.run(name, train_idx, val_idx, lr, seed))
              except NonFiniteError as e:
                record.update(status="failed", error=str(e), test_acc=None, val_acc=None)
              record["seconds"] = round(time.time() - t0, 3)
              results.add(record)
              finished += 1
              if not args.quiet:
                acc = record["test_acc"]
                print(f"[{finished}/{total}] {arch} {spec} k={shots} r={repeat} {name} lr={lr:g}"
                      f" test={'failed' if acc is None else f'{acc:.4f}'} "
                      f"({record['seconds']:.1f}s)", file=sys.stderr)


def make_report(records: list[dict], plan: dict, args) -> tuple[str, dict]:
  summary = best_over_lr(records, ("arch", "target", "strategy", "shots"))
  shots = plan["shots"]
  lines = ["# Few-shot transfer", "",
           f"Source `{args.source}`; {args.repeats} repeats; {args.steps} Adam steps per run; "
           f"validation {args.val_per_class}/class disjoint from the k-shot set; test "
           f"{'all' if not args.test_per_class else f'<= {args.test_per_class}/class'} of the "
           "target's test split.", "",
           "Cells: mean (std) test accuracy in %. **Best over LR** picks, per cell, the LR with "
           "the best mean *test* accuracy (the paper's protocol, optimistic); **val-selected** "
           "picks, per repeat, the LR with the best validation accuracy.", ""]
  failed = [r for r in records if r.get("status") != "ok"]
  for title, m, s in (("Best over LR (test-selected, as the paper)", "test_mean", "test_std"),
                      ("Validation-selected LR", "val_sel_mean", "val_sel_std")):
    lines += [f"## {title}", "", "| arch | target | strategy | " +
              " | ".join(f"k={k}" for k in shots) + " |",
              "|---|---|---|" + "---|" * len(shots)]
    for arch in plan["archs"]:
      for target in plan["targets"]:
        for strat in plan["strategies"]:
          cells = []
          for k in shots:
            v = summary.get((arch, target, strat, k))
            cells.append(pct(v[m], v[s]) if v else "-")
          lines.append(f"| {arch} | {target} | {strat} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["LR grids: " + "; ".join(f"{s}: {', '.join(f'{v:g}' for v in plan['lrs'][s])}"
                                     for s in plan["strategies"]), ""]
  if failed:
    lines += [f"{len(failed)} run(s) failed (non-finite loss); see results.json.", ""]
  return "\n".join(lines), {"|".join(map(str, k)): v for k, v in summary.items()}


def plot(summary: dict, plan: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  archs, targets = plan["archs"], plan["targets"]
  fig, axes = plt.subplots(len(archs), len(targets), figsize=(4.5 * len(targets),
                                                            3.5 * len(archs)), squeeze=False)
  for i, arch in enumerate(archs):
    for j, target in enumerate(targets):
      ax = axes[i][j]
      for strat in plan["strategies"]:
        pts = [(k, summary.get(f"{arch}|{target}|{strat}|{k}")) for k in plan["shots"]]
        pts = [(k, v) for k, v in pts if v]
        if pts:
          ax.errorbar([k for k, _ in pts], [100 * v["test_mean"] for _, v in pts],
                      yerr=[100 * v["test_std"] for _, v in pts], marker="o", capsize=3,
                      label=strat)
      ax.set_title(f"{arch} -> {target}", fontsize=9)
      ax.set_xlabel("images per class (k)")
      ax.set_ylabel("test accuracy (%)")
      ax.set_xscale("log")
      ax.set_xticks(plan["shots"], [str(k) for k in plan["shots"]])
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  cli.apply_devices(args)
  t0 = time.time()
  try:
    plan = validate(args)
    results = ResultsDir(args.out, resume=args.resume, overwrite=args.overwrite)
    run_grid(args, plan, results)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  records = sorted(results.records, key=lambda r: tuple(str(r[k]) for k in KEY))
  # results.json holds only what the seed determines (timings stay in results.jsonl), so two
  # runs of the same config give identical files.
  results.write_json("results.json", [{k: v for k, v in r.items() if k != "seconds"}
                                      for r in records])
  text, summary = make_report(records, plan, args)
  results.write_text("report.md", text)
  results.write_json("summary.json", summary)
  plot(summary, plan, os.path.join(results.path, "accuracy_vs_shots.png"))
  print(text)
  print(f"wrote {results.path}/report.md in {time.time() - t0:.0f} s", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
