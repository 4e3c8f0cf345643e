"""Wall time of the CWL Table I grid (Freeze, Freeze+CWL) by three paths, and their accuracies.

  python -m bench.bench_grid [--repeats 1] [--steps 100] [--out bench/GRID.md]

The grid is `experiments.cwl_tables`' Table I: both small archs, both embedded targets,
k in {1,3,5,10}, the paper's freeze LR grid (4 values), `--repeats` draws (the paper: 10),
`--steps` Adam steps per run, then validation and test accuracy. Timed, sources cached:
  * jtransfer default: `cwl_tables --strategies freeze,freeze_cwl` as a user runs it (Freeze
    on cached features; `--batch-runs auto`);
  * jtransfer plain: the same runs one at a time through the full model
    (`--no-feature-cache --batch-runs 1`);
  * jtransfer batched: `--batch-runs 64` (Freeze+CWL runs of a (target, k) trained together as
    one vmapped step; what 'auto' picks on GPU/TPU);
  * jtransfer processes: the default path split by target over one single-threaded process
    per core, each pinned to its core (XLA intra-op threads 1), run at the same time;
  * PyTorch loop: the same runs (same k-shot draws, batches, steps, Adam) one at a time with
    bench/torch_ref.py's nets (NCHW, explicit CWL layer), each ending in an eval forward over
    the validation and test images.
Accuracies of the default and batched paths are compared run by run with the plain path's.
Compilation is inside the timed region of the JAX paths (it is part of a grid's wall time).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from bench.common import command, emit
from experiments import cwl_tables, fewshot, pretrain
from jtransfer.data import Batches, load_spec, sample_kshot
from jtransfer.methods import transfer

TARGETS = ("fmnist:1,5,7,8,9", "digits")


def _grid_argv(args, targets, out) -> list[str]:
  """`experiments.cwl_tables` flags of the timed grid over `targets`, writing to `out`."""
  argv = ["--arch", args.archs, "--shots", args.shots, "--repeats", str(args.repeats),
          "--steps", str(args.steps), "--strategies", "freeze,freeze_cwl", "--lrs", "paper",
          "--test-per-class", str(args.test_per_class), "--out", out, "--overwrite", "--quiet"]
  for t in targets:
    argv += ["--target", t]
  return argv


def _jax_grid(args, extra, out) -> tuple[float, list]:
  argv = _grid_argv(args, args.targets.split(";"), out)
  t0 = time.perf_counter()
  assert cwl_tables.main(argv + extra) == 0
  seconds = time.perf_counter() - t0
  with open(os.path.join(out, "results.json")) as f:
    return seconds, json.load(f)


def _process_grid(args, out, workers: int) -> tuple[float, list]:
  """The default path split by target over `workers` single-threaded processes, each pinned to
  its own core."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false",
                               "intra_op_parallelism_threads=1"]).strip()
  targets = args.targets.split(";")
  procs = []
  t0 = time.perf_counter()
  for w in range(workers):
    # The child pins itself (no preexec_fn: forking this multithreaded process is unsafe).
    pin = f"import os, runpy, sys; os.sched_setaffinity(0, {{{w}}}) if hasattr(os, " \
          "'sched_setaffinity') else None; sys.argv[0] = 'cwl_tables'; " \
          "runpy.run_module('experiments.cwl_tables', run_name='__main__')"
    argv = [sys.executable, "-c", pin, *_grid_argv(args, targets[w::workers],
                                                   os.path.join(out, str(w)))]
    procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))
  if any(p.wait() != 0 for p in procs):
    raise RuntimeError("a bench_grid worker process failed")
  seconds = time.perf_counter() - t0
  records = []
  for w in range(workers):
    with open(os.path.join(out, str(w), "results.json")) as f:
      records += json.load(f)
  return seconds, records


def _torch_grid(args) -> tuple[float, int]:
  """The same runs one at a time in PyTorch; returns (seconds, runs)."""
  import torch
  import torch.nn.functional as F
  from bench import torch_ref
  torch.manual_seed(0)
  runs = 0
  t0 = time.perf_counter()
  for arch in args.archs.split(","):
    shape = pretrain.DEFAULT_SHAPE
    for spec in args.targets.split(";"):
      data = load_spec(spec, shape, flag="--target")
      test = fewshot.cap_per_class(data.test, args.test_per_class)
      to_t = lambda im: torch.from_numpy((im.astype(np.float32) / 255.0 - 0.5) / 0.25
                                         ).permute(0, 3, 1, 2).contiguous()
      x_test = to_t(test.images)
      for shots in [int(k) for k in args.shots.split(",")]:
        for repeat in range(args.repeats):
          seed = (shots * 1009 + repeat) % (2 ** 31)
          tr, va = sample_kshot(data.train.labels, shots, seed, val_per_class=10,
                                num_classes=data.train.num_classes)
          x_val = to_t(data.train.images[va])
          for strategy in ("freeze", "freeze_cwl"):
            for lr in transfer.FREEZE_LRS:
              model = torch_ref.make(arch, shape, data.train.num_classes,
                                     cwl=strategy == "freeze_cwl").eval()
              for name, p in model.named_parameters():
                p.requires_grad_(name.startswith("head") or name.endswith("sigma"))
              opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
              batches = Batches(data.train.images[tr], data.train.labels[tr], 64, seed)
              for step in range(args.steps):
                b = batches.at(step)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(to_t(b["image"])),
                                       torch.from_numpy(b["label"].astype(np.int64)))
                loss.backward()
                opt.step()
              with torch.no_grad():
                model(x_val).argmax(-1)
                for i in range(0, len(x_test), 512):
                  model(x_test[i:i + 512]).argmax(-1)
              runs += 1
  return time.perf_counter() - t0, runs


def _max_diff(a: list, b: list) -> tuple[float, int]:
  """(max |test_acc difference|, runs compared) over runs both paths finished."""
  key = lambda r: tuple(map(str, fewshot.record_key(r)))
  bb = {key(r): r for r in b}
  diffs = [abs(r["test_acc"] - bb[key(r)]["test_acc"]) for r in a
           if r["status"] == "ok" and bb.get(key(r), {}).get("status") == "ok"]
  return (max(diffs) if diffs else float("nan")), len(diffs)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--archs", default="vgg_s,resnet_s")
  p.add_argument("--targets", default=";".join(TARGETS))
  p.add_argument("--shots", default="1,3,5,10")
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--test-per-class", type=int, default=300)
  p.add_argument("--paths", default="default,plain,batched,processes,torch")
  p.add_argument("--out", default="bench/GRID.md")
  args = p.parse_args(argv)
  paths = args.paths.split(",")
  for arch in args.archs.split(","):  # sources are cached before timing
    pretrain.source_for(arch, pretrain.DEFAULT_SOURCE, epochs=2.0, seed=0, progress=False)
  rows, results = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, extra in (("default", []), ("plain", ["--no-feature-cache", "--batch-runs", "1"]),
                        ("batched", ["--batch-runs", "64"])):
      if name in paths:
        seconds, results[name] = _jax_grid(args, extra, os.path.join(tmp, name))
        rows.append((f"jtransfer {name}", seconds, len(results[name])))
    if "processes" in paths:  # one worker per core, at most one per target
      workers = min(os.cpu_count() or 1, len(args.targets.split(";")))
      seconds, results["processes"] = _process_grid(args, os.path.join(tmp, "processes"), workers)
      rows.append((f"jtransfer processes ({workers} x 1 core)", seconds,
                   len(results["processes"])))
  if "torch" in paths:
    seconds, n = _torch_grid(args)
    rows.append(("PyTorch loop (one run at a time)", seconds, n))
  torch_s = next((s for n, s, _ in rows if n.startswith("PyTorch")), float("nan"))
  lines = ["# Table I grid wall time\n",
           f"Command: `{command('bench_grid', argv)}`; {platform.machine()}, "
           f"{os.cpu_count()} cores, "
           f"backend {jax.default_backend()}, jax {jax.__version__}. Grid: {args.archs} x "
           f"{args.targets} x k={args.shots} x 4 LRs x {args.repeats} repeat(s) x "
           f"{{freeze, freeze_cwl}}, {args.steps} Adam steps per run.\n",
           "| path | runs | wall s | s / run | speed vs PyTorch loop |", "|---|---|---|---|---|"]
  for name, s, n in rows:
    lines.append(f"| {name} | {n} | {s:.1f} | {s / n:.3f} | {torch_s / s:.2f}x |")
  if "plain" in results:
    for name in ("default", "batched", "processes"):
      if name in results:
        d, n = _max_diff(results["plain"], results[name])
        lines.append(f"\nmax |test accuracy difference| {name} vs plain over {n} runs: {d:.2e}")
  emit("\n".join(lines) + "\n", args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
