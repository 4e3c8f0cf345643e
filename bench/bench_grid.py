"""Whole-table wall time: the CWL Table I grid under the protocol, jtransfer against a PyTorch loop.

  python -m bench.bench_grid [--repeats 1] [--out bench/GRID.md]

The grid is `experiments.cwl_tables`' Table I (Freeze, Freeze+CWL; both small archs; both
embedded targets; k in {1,3,5,10}; the paper's freeze LR grid) under the protocol of
docs/protocol.md, the same in both arms:
  * every run evaluates its validation accuracy every `--eval-every` steps, stops once it has
    not improved for `--patience` steps (at most `--steps`) and keeps its best validation state;
  * per (arch, target, k, strategy), the LR is chosen by mean validation accuracy over
    `--tune-repeats` tuning draws (not evaluation draws), the grid extended at an edge
    (`--tune-extend`); the `--repeats` evaluation draws then run at the chosen LR (with
    `--paper-grid`, at every grid LR too) and are tested.

Arms (sources cached before timing; everything else, data loading and compilation included, is
inside the timed region):
  * jtransfer: `python -m experiments.cwl_tables --strategies freeze,freeze_cwl` with these flags,
    as a user runs it: Freeze trains its head on backbone features computed once per image,
    Freeze+CWL runs through the full model, one jitted step per shape, runs one at a time (the
    grid runner trains runs one at a time under early stopping: batched runs need fixed-length
    runs);
  * PyTorch loop: what a researcher writes around bench/torch_ref.py's nets (NCHW, CWL as an
    explicit scale layer): per run a copy of the pretrained net, Adam on the head (+ scales), the
    full forward every step (no cached features, no batching of runs), a validation forward every
    `--eval-every` steps with the same stopping rule, the best state restored, then the test
    forward. Same source weights and new-head init (copied from jtransfer), same k-shot draws and
    validation sets (experiments.fewshot's seeds), same batch at every step (`Batches.at`), same
    tuning runs; its LR is chosen on its own validation accuracies (the same selection rule).
The two arms alternate by arch (jtransfer's arch, PyTorch's same arch, the next arch ...), so a
change in a shared machine's load falls on both; jtransfer compiles per arch either way (its setups
are shared across targets with the same class count, not across archs).
Optional paths (`--paths`): `plain` (jtransfer with `--no-feature-cache`: Freeze through the full
model, the cached-features lever removed) and `processes` (the jtransfer arm split by target over
one single-threaded process per core, each pinned to its core).

The report (bench/GRID.md): wall time per arm and the ratio, the time split (Freeze vs
Freeze+CWL runs, tuning vs evaluation runs, validation/test forwards, compilation, feature
extraction), steps trained against the cap (what early stopping saves), and accuracy parity:
jtransfer minus PyTorch test accuracy per evaluation run at each arm's chosen LR (mean, 95% CI,
`jtransfer.protocol.stats.paired`), plus the same-LR tuning runs' validation accuracies.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

from bench.common import command, emit
from experiments import cwl_tables, fewshot, pretrain

TARGETS = ("fmnist:1,5,7,8,9", "digits")
STRATEGIES = ("freeze", "freeze_cwl")
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default="vgg_s,resnet_s")
  p.add_argument("--targets", default=";".join(TARGETS), help="';'-separated target specs")
  p.add_argument("--shots", default="1,3,5,10")
  p.add_argument("--repeats", type=int, default=1, help="evaluation draws per cell")
  p.add_argument("--tune-repeats", type=int, default=2, help="tuning draws per cell")
  p.add_argument("--tune-extend", type=int, default=2)
  p.add_argument("--steps", type=int, default=1000, help="step cap per run (cwl_tables' default)")
  p.add_argument("--patience", type=int, default=200, help="(cwl_tables' default)")
  p.add_argument("--eval-every", type=int, default=10)
  p.add_argument("--val-per-class", type=int, default=20)
  p.add_argument("--paper-grid", action=argparse.BooleanOptionalAction, default=False,
                 help="also run every grid LR on the evaluation draws, in both arms "
                      "(cwl_tables' 'best over LR' tables); off: evaluation draws run only at "
                      "the chosen LR")
  p.add_argument("--test-per-class", type=int, default=300)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--source", default=pretrain.DEFAULT_SOURCE,
                 help="dataset spec (pretrained, cached) or ckpt:PATH")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--torch-threads", default="auto",
                 help="PyTorch intra-op threads; 'auto' = whichever of 1 and torch's default "
                      "runs a probe step faster now (on a loaded machine torch's OpenMP threads "
                      "can run 10x slower than one thread)")
  p.add_argument("--paths", default="jtransfer,torch",
                 help="comma list of jtransfer, torch, plain, processes")
  p.add_argument("--out", default="bench/GRID.md")
  return p.parse_args(argv)


def grid_argv(args, targets, out: str) -> list[str]:
  """`experiments.cwl_tables` flags of the timed grid over `targets`, writing to `out`."""
  argv = ["--arch", args.archs, "--shots", args.shots, "--repeats", str(args.repeats),
          "--tune-repeats", str(args.tune_repeats), "--tune-extend", str(args.tune_extend),
          "--steps", str(args.steps), "--patience", str(args.patience),
          "--eval-every", str(args.eval_every), "--val-per-class", str(args.val_per_class),
          "--strategies", ",".join(STRATEGIES), "--lrs", "paper",
          "--test-per-class", str(args.test_per_class), "--batch-size", str(args.batch_size),
          "--source", args.source, "--source-epochs", str(args.source_epochs),
          "--seed", str(args.seed), "--paper-grid" if args.paper_grid else "--no-paper-grid",
          "--out", out, "--overwrite", "--quiet"]
  for t in targets:
    argv += ["--target", t]
  return argv


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- jtransfer arm
class _Timer:
  """Wraps `module.name` (a function) to sum the seconds spent in it; `restore()` undoes it."""

  def __init__(self, module, name: str):
    self.module, self.name, self.fn, self.seconds = module, name, getattr(module, name), 0.0

    def timed(*a, **kw):
      t0 = time.perf_counter()
      try:
        return self.fn(*a, **kw)  # both wrapped functions return host arrays (synchronised)
      finally:
        self.seconds += time.perf_counter() - t0

    setattr(module, name, timed)

  def restore(self):
    setattr(self.module, self.name, self.fn)


def jax_grid(args, extra: list[str], out: str) -> dict:
  """The jtransfer arm in this process: wall seconds, records (with per-run seconds) and the
  seconds in eval forwards, feature extraction and compilation."""
  import jax.monitoring
  from jtransfer.methods import transfer
  compile_s = defaultdict(float)

  def on_event(event, duration, **_):
    if event in COMPILE_EVENTS:
      compile_s[event] += duration

  jax.monitoring.register_event_duration_secs_listener(on_event)
  evals = _Timer(fewshot, "predict_logits")  # validation and test forwards of every run
  feats = _Timer(transfer, "extract_features")  # Freeze's cached backbone features
  try:
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # its report; the records are read below
      rc = cwl_tables.main(grid_argv(args, args.targets.split(";"), out) + extra)
    seconds = time.perf_counter() - t0
    if rc != 0:
      raise RuntimeError("experiments.cwl_tables failed")
  finally:
    evals.restore()
    feats.restore()
    jax.monitoring.unregister_event_duration_listener(on_event)
  return dict(wall=seconds, records=_read_jsonl(os.path.join(out, "results.jsonl")),
              eval_s=evals.seconds, features_s=feats.seconds,
              compile_s=sum(compile_s.values()))


def process_grid(args, out: str, workers: int) -> dict:
  """The jtransfer arm split by target over `workers` single-threaded processes, each pinned
  to its own core, run at the same time."""
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
    argv = [sys.executable, "-c", pin, *grid_argv(args, targets[w::workers],
                                                  os.path.join(out, str(w)))]
    procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))
  if any(p.wait() != 0 for p in procs):
    raise RuntimeError("a bench_grid worker process failed")
  seconds = time.perf_counter() - t0
  records = []
  for w in range(workers):
    records += _read_jsonl(os.path.join(out, str(w), "results.jsonl"))
  return dict(wall=seconds, records=records)


# ----------------------------------------------------------------------------- PyTorch arm
def with_cwl(net):
  """A copy of a bench/torch_ref.py net with a CWL scale layer (sigma = 1) in every conv unit,
  after its BN when it has one (as `torch_ref.make(..., cwl=True)` places them); conv and BN
  parameters keep their state-dict names."""
  import torch.nn as nn
  from bench import torch_ref
  net = copy.deepcopy(net)

  def visit(module):
    for name, child in module.named_children():
      if isinstance(child, nn.Sequential) and len(child) and isinstance(child[0], nn.Conv2d):
        layers = list(child)
        at = 2 if len(layers) > 1 and isinstance(layers[1], nn.BatchNorm2d) else 1
        layers.insert(at, torch_ref.Scale(layers[0].out_channels))
        setattr(module, name, nn.Sequential(*layers))
      else:
        visit(child)

  visit(net)
  return net


class TorchTarget:
  """The PyTorch loop's runs of one (source, target): the researcher's loop, plus (untimed) the
  jtransfer head init of each draw's seed, copied in so both arms start from the same net."""

  def __init__(self, source, spec: str, args, budget):
    import torch
    from jtransfer.data import load_spec
    from jtransfer.methods import transfer
    self.torch, self.source, self.args, self.budget = torch, source, args, budget
    data = load_spec(spec, source.input_shape, flag="--target")
    self.pool = data.train
    self.test = fewshot.cap_per_class(data.test, args.test_per_class)
    self.num_classes = self.pool.num_classes
    self.mean = np.asarray(source.mean, np.float32)
    self.std = np.asarray(source.std, np.float32)
    self.x_test = self.tensor(self.test.images)
    self.y_test = self.test.labels
    self._setup = transfer.get_strategy("freeze").build(source, self.num_classes, args.steps)
    self._nets: dict = {}
    self.untimed = 0.0  # seconds spent building jtransfer's head init (not the loop's cost)
    self.eval_s = 0.0  # seconds in validation and test forwards

  def tensor(self, images: np.ndarray):
    """uint8 NHWC images -> normalised float32 NCHW tensor."""
    x = (images.astype(np.float32) / np.float32(255.0) - self.mean) / self.std
    return self.torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

  def net(self, seed: int, cwl: bool):
    """A fresh copy of the source net with the new head's init of `seed` (+ CWL scales)."""
    if seed not in self._nets:
      from bench import parity
      t0 = time.perf_counter()
      params, stats = self._setup.init(seed, self.pool.images[:1], self.pool.labels[:1])
      plain = parity.torch_net(self.source.arch, dict(self.source.config), self.num_classes,
                               self.source.input_shape, params, stats)
      self._nets[seed] = {False: plain, True: with_cwl(plain)}
      self.untimed += time.perf_counter() - t0
    return copy.deepcopy(self._nets[seed][cwl])

  def _accuracy(self, net, x, y) -> float:
    t0 = time.perf_counter()
    with self.torch.no_grad():
      pred = self.torch.cat([net(x[i:i + 500]).argmax(-1) for i in range(0, len(x), 500)])
    self.eval_s += time.perf_counter() - t0
    return float(np.mean(pred.numpy() == y))  # float64, as jtransfer's `accuracy`

  def run(self, name: str, train_idx, val_idx, lr: float, seed: int, test: bool) -> dict:
    """One run under the protocol's stopping rule; the dict a jtransfer record holds."""
    import torch.nn.functional as F
    from jtransfer.data import Batches
    torch = self.torch
    net = self.net(seed, cwl=name == "freeze_cwl").eval()  # BN on running statistics
    for n, p in net.named_parameters():
      p.requires_grad_(n.startswith("head.") or n.endswith(".sigma"))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    batches = Batches(self.pool.images[train_idx], self.pool.labels[train_idx],
                      self.args.batch_size, seed)
    x_val = self.tensor(self.pool.images[val_idx])
    y_val = self.pool.labels[val_idx]
    budget = self.budget
    evals = set(budget.eval_steps())
    best, best_step, best_params = -math.inf, 0, [p.detach().clone() for p in params]
    stopped, step = "cap", 0
    for step in range(1, budget.cap + 1):
      b = batches.at(step - 1)
      opt.zero_grad(set_to_none=True)
      loss = F.cross_entropy(net(self.tensor(b["image"])),
                             torch.from_numpy(b["label"].astype(np.int64)))
      if not torch.isfinite(loss):
        return dict(status="failed", error=f"non-finite loss at step {step - 1}",
                    test_acc=None, val_acc=None)
      loss.backward()
      opt.step()
      if step not in evals:
        continue
      acc = self._accuracy(net, x_val, y_val)
      if acc > best + budget.min_delta:
        best, best_step = acc, step
        best_params = [p.detach().clone() for p in params]
      if step - best_step >= budget.patience:
        stopped = "patience"
        break
    with torch.no_grad():
      for p, v in zip(params, best_params):
        p.copy_(v)
    test_acc = self._accuracy(net, self.x_test, self.y_test) if test else None
    return dict(status="ok", val_acc=best, test_acc=test_acc, steps=step, best_step=best_step,
                stopped=stopped)


def torch_threads(value: str) -> tuple[int, dict]:
  """(threads, probe ms per step by thread count): 'auto' times a vgg_s Freeze+CWL step on 25
  random images with 1 thread and with torch's default (median of up to 8 steps after 2, at
  most ~3 s each), and takes the faster."""
  import torch
  import torch.nn.functional as F
  from bench import torch_ref
  default = torch.get_num_threads()
  if value != "auto":
    return int(value), {}
  probe = {}
  for n in sorted({1, default}):
    torch.set_num_threads(n)
    torch.manual_seed(0)
    net = torch_ref.make("vgg_s", (28, 28, 1), 5, cwl=True).eval()
    for name, p in net.named_parameters():
      p.requires_grad_(name.startswith("head.") or name.endswith(".sigma"))
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.randn(25, 1, 28, 28), torch.randint(0, 5, (25,))
    times, start = [], time.perf_counter()
    for i in range(10):
      t0 = time.perf_counter()
      opt.zero_grad(set_to_none=True)
      F.cross_entropy(net(x), y).backward()
      opt.step()
      if i >= 2:
        times.append(time.perf_counter() - t0)
      if times and time.perf_counter() - start > 3.0:
        break
    probe[n] = 1000 * float(np.median(times))
  return min(probe, key=probe.get), probe


def torch_grid(args) -> dict:
  """The PyTorch arm: the same runs, cells and selection as `experiments.fewshot.run_grid`."""
  import torch
  torch.manual_seed(args.seed)
  gargs = cwl_tables.parse_args(grid_argv(args, args.targets.split(";"), "unused"))
  plan = cwl_tables.make_plan(gargs)
  budget = fewshot.budget_of(gargs)
  records: list[dict] = []
  untimed = eval_s = 0.0
  t_start = time.perf_counter()
  for arch in plan["archs"]:
    source = pretrain.source_for(arch, gargs.source, epochs=gargs.source_epochs,
                                 seed=gargs.seed, progress=False)
    for spec in plan["targets"]:
      tt = TorchTarget(source, spec, gargs, budget)
      for shots in plan["shots"]:
        draws = {}
        for repeat in range(-gargs.tune_repeats, gargs.repeats):
          seed = fewshot.draw_seed(gargs, shots, repeat)
          draws[repeat] = (seed, *fewshot.sample_kshot(
              tt.pool.labels, shots, seed, val_per_class=gargs.val_per_class,
              num_classes=tt.num_classes))

        def run_one(key):
          name, _, _, _, repeat, lr, hp, fold = key
          seed, train_idx, val_idx = draws[repeat]
          t0 = time.perf_counter()
          untimed0 = tt.untimed
          out = tt.run(name, train_idx, val_idx, lr, seed, test=repeat >= 0)
          record = dict(zip(fewshot.KEY, key), **out, role="tune" if repeat < 0 else "eval",
                        seconds=time.perf_counter() - t0 - (tt.untimed - untimed0))
          records.append(record)
          return record

        one_cell = dict(plan, archs=[arch], targets=[spec], shots=[shots])
        tuned = fewshot.choose(records, one_cell, gargs, run_missing=run_one)
        done = {fewshot.record_key(r) for r in records}
        for name in plan["strategies"]:
          for repeat in range(gargs.repeats):
            for lr, hp in fewshot.eval_points(plan, gargs, tuned, (arch, spec, shots, name)):
              key = (name, arch, spec, shots, repeat, lr, hp, -1)
              if key not in done:
                run_one(key)
      untimed += tt.untimed
      eval_s += tt.eval_s
  wall = time.perf_counter() - t_start - untimed
  return dict(wall=wall, records=records, eval_s=eval_s, untimed=untimed)


# ----------------------------------------------------------------------------- report
def chosen(records: list[dict], args) -> dict:
  """(arch, target, shots, strategy) -> the LR the records' tuning runs choose."""
  gargs = cwl_tables.parse_args(grid_argv(args, args.targets.split(";"), "unused"))
  plan = cwl_tables.make_plan(gargs)
  return {cell: t["choice"]["lr"] for cell, t in fewshot.choose(records, plan, gargs).items()}


def tuned_eval(records: list[dict], lrs: dict) -> dict:
  """(arch, target, shots, strategy, repeat) -> test accuracy of the evaluation run at the
  chosen LR (None when it failed)."""
  out = {}
  for r in records:
    cell = (r["arch"], r["target"], r["shots"], r["strategy"])
    if r["repeat"] >= 0 and lrs.get(cell) == r["lr"]:
      out[cell + (r["repeat"],)] = r["test_acc"] if r["status"] == "ok" else None
  return out


def _split(records: list[dict]) -> dict:
  """Seconds, runs, steps by strategy and by role."""
  out = defaultdict(lambda: dict(seconds=0.0, runs=0, steps=0, patience=0))
  for r in records:
    for group in (r["strategy"], r.get("role", "eval"), "all"):
      g = out[group]
      g["seconds"] += r.get("seconds", 0.0)
      g["runs"] += 1
      g["steps"] += r.get("steps") or 0
      g["patience"] += r.get("stopped") == "patience"
  return out


def _paired_line(what: str, a: list, b: list) -> str:
  from jtransfer.protocol import stats
  if not a:
    return f"| {what} | 0 | - | - | - |"
  pr = stats.paired(a, b)
  ci = "-" if math.isnan(pr.lo) else f"[{100 * pr.lo:+.2f}, {100 * pr.hi:+.2f}]"
  holds = "-" if math.isnan(pr.lo) else ("yes" if pr.lo <= 0 <= pr.hi else "**no**")
  return (f"| {what} | {pr.n} | {100 * pr.mean:+.2f} | {ci} | {pr.wins}/{pr.ties}/{pr.losses} "
          f"| {holds} | {100 * max(abs(x - y) for x, y in zip(a, b)):.2f} |")


def report(args, argv, arms: dict, load: tuple) -> str:
  cap = args.steps
  lines = ["# Table I grid wall time under the protocol", "", "```", command("bench_grid", argv),
           "```", ""]
  import jax
  tv = ""
  if "torch" in arms:
    import torch
    probe = arms["torch"]["probe"]
    tv = (f", torch {torch.__version__} with {arms['torch']['threads']} intra-op thread(s)" +
          (" (probe step, ms: " + ", ".join(f"{n} thread(s) {ms:.1f}" for n, ms in probe.items())
           + ")" if probe else ""))
  lines += [
      f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
      f"({jax.default_backend()}){tv}. **Measured on a shared machine** (other engineers' jobs "
      f"running): 1/5/15-min load average {load[0]} at the start, {load[1]} at the end; figures "
      "are from this one run and only their ratios are comparable.", "",
      f"Grid: {args.archs} x {args.targets} x k={args.shots} x {{freeze, freeze_cwl}}, the "
      f"paper's freeze LR grid (1e-3, 5e-3, 1e-2, 5e-2, extended up to {args.tune_extend} values "
      f"at an edge); {args.tune_repeats} tuning draw(s) and {args.repeats} evaluation draw(s) "
      f"per cell; evaluation draws at the chosen LR"
      f"{' and at every grid LR (--paper-grid)' if args.paper_grid else ' only'}. Runs stop when "
      f"validation accuracy ({args.val_per_class}/class) has not improved for {args.patience} "
      f"steps, checked every {args.eval_every}, at most {cap}; best validation state kept; test "
      f"<= {args.test_per_class}/class. Batch min({args.batch_size}, k-shot set). The two arms "
      "alternate by arch (one `cwl_tables` invocation per arch, then PyTorch's runs of it).", ""]
  full = dict(archs="vgg_s,resnet_s", targets=";".join(TARGETS), shots="1,3,5,10",
              tune_repeats=2, repeats=10)
  cut = [f"--{k.replace('_', '-')} {full[k]} (here {getattr(args, k)})" for k in full
         if str(getattr(args, k)) != str(full[k])]
  if cut:
    lines += ["Reduced from cwl_tables' full Table I to fit the time budget: " + "; ".join(cut)
              + ".", ""]
  torch_wall = arms["torch"]["wall"] if "torch" in arms else float("nan")
  names = {"jtransfer": "jtransfer (`cwl_tables`, Freeze on cached features)",
           "plain": "jtransfer plain (`--no-feature-cache`)",
           "processes": "jtransfer processes (one pinned 1-thread process per target)",
           "torch": "PyTorch loop (full forward every step, one run at a time)"}
  lines += ["## Wall time", "",
            "| arm | runs (tune + eval) | steps trained / cap | stopped by patience | wall s | "
            "Freeze runs s | Freeze+CWL runs s | PyTorch wall / this |",
            "|---|---|---|---|---|---|---|---|"]
  for arm, res in arms.items():
    sp = _split(res["records"])
    a = sp["all"]
    per = (f"{sp['freeze']['seconds']:.0f} | {sp['freeze_cwl']['seconds']:.0f}"
           if arm != "processes" else "- | -")
    lines.append(f"| {names[arm]} | {a['runs']} ({sp['tune']['runs']} + {sp['eval']['runs']}) | "
                 f"{a['steps'] / max(1, a['runs'] * cap):.0%} | "
                 f"{a['patience']}/{a['runs']} | {res['wall']:.1f} | {per} | "
                 f"**{torch_wall / res['wall']:.2f}x** |")
  lines.append("")
  if "jtransfer" in arms and "torch" in arms:
    lines += split_section(arms, cap)
    lines += parity_section(arms, args)
    lines += reading(arms)
  lines += ["Not timed: batched runs (`--batch-runs`). The grid runner trains runs one at a time "
            "under early stopping (a vmapped group would have to run until its slowest run "
            "stops, and each run stops at its own step), so `--batch-runs 64` would time the "
            "same thing as the jtransfer arm; batching also measured 0.75-0.89x of one run at "
            "a time on this 2-core CPU at fixed length (docs/decisions.md).", ""]
  return "\n".join(lines)


def reading(arms: dict) -> list[str]:
  """What moved the ratio, from the numbers above."""
  j, t = arms["jtransfer"], arms["torch"]
  sj, st = _split(j["records"]), _split(t["records"])
  jf, jc = sj["freeze"]["seconds"], sj["freeze_cwl"]["seconds"]
  tf, tc = st["freeze"]["seconds"], st["freeze_cwl"]["seconds"]
  jw, tw = j["wall"], t["wall"]
  out = ["## Reading", ""]
  out.append(f"- **Ratio {tw / jw:.2f}x** (PyTorch {tw:.0f} s / jtransfer {jw:.0f} s). "
             f"PyTorch minus jtransfer: {tw - jw:+.0f} s, of which Freeze runs {tf - jf:+.0f} s, "
             f"Freeze+CWL runs {tc - jc:+.0f} s, outside runs "
             f"{(tw - st['all']['seconds']) - (jw - sj['all']['seconds']):+.0f} s.")
  out.append(f"- **Cached features (Freeze)**: {tf / max(jf, 1e-9):.1f}x. jtransfer's Freeze step "
             "is a head matmul on features computed once per image; PyTorch's runs the frozen "
             "backbone forward on every step and every validation check. Were jtransfer's Freeze "
             f"runs as slow as PyTorch's, the ratio would be {tw / (jw - jf + tf):.2f}x.")
  out.append(f"- **Freeze+CWL** (the same work per step in both: forward and backward-data "
             f"through every layer): {tc / max(jc, 1e-9):.2f}x; it is "
             f"{jc / jw:.0%} of jtransfer's wall time, so it bounds the ratio: with Freeze free, "
             f"the ratio could reach at most {tw / max(jw - jf, 1e-9):.2f}x.")
  out.append(f"- **Compilation**: {j['compile_s']:.0f} s, {j['compile_s'] / jw:.0%} of "
             f"jtransfer's wall time (one step and forward per arch, strategy and batch shape; "
             f"LR and seed do not recompile); without it the ratio would be "
             f"{tw / max(jw - j['compile_s'], 1e-9):.2f}x.")
  out.append(f"- **Validation and test forwards**: jtransfer {j['eval_s']:.0f} s "
             f"({j['eval_s'] / jw:.0%}), PyTorch {t['eval_s']:.0f} s ({t['eval_s'] / tw:.0%}); "
             "a check every eval-every steps is a forward over the validation set (Freeze: a "
             "matmul on cached features in jtransfer).")
  out.append("- **Early stopping** is the protocol in both arms, not a lever of one: it cuts "
             "both arms' steps alike (above), so it moves the ratio only through the costs that "
             "do not scale with steps (compilation, data, features).")
  return out + [""]


def split_section(arms: dict, cap: int) -> list[str]:
  j, t = arms["jtransfer"], arms["torch"]
  sj, st = _split(j["records"]), _split(t["records"])
  out = ["## Where the time goes", "",
         "Per-run seconds summed (a run: its training steps, validation forwards, test forward; "
         "for jtransfer also the compilations and the Freeze features it triggers); 'outside "
         "runs' = wall minus those (data and source loading, report writing).", "",
         "| | jtransfer s | PyTorch s | PyTorch / jtransfer |", "|---|---|---|---|"]

  def row(label, a, b):
    ratio = f"{b / a:.2f}x" if a > 0 else "-"
    out.append(f"| {label} | {a:.1f} | {b:.1f} | {ratio} |")

  for label, g in (("Freeze runs", "freeze"), ("Freeze+CWL runs", "freeze_cwl"),
                   ("tuning runs", "tune"), ("evaluation runs", "eval")):
    row(label, sj[g]["seconds"], st[g]["seconds"])
  row("validation + test forwards (inside runs)", j["eval_s"], t["eval_s"])
  out.append(f"| compilation (trace + lower + XLA compile, inside runs) | "
             f"{j['compile_s']:.1f} | - | - |")
  out.append(f"| Freeze backbone features (once per image, inside runs) | {j['features_s']:.1f} "
             "| - | - |")
  row("outside runs", j["wall"] - sj["all"]["seconds"], t["wall"] - st["all"]["seconds"])
  out.append("")
  out += ["Steps per run and per-step cost (seconds of a strategy's runs / its steps trained; "
          "includes that strategy's forwards and compiles):", "",
          "| strategy | jtransfer mean steps | PyTorch mean steps | jtransfer ms/step | "
          "PyTorch ms/step | PyTorch / jtransfer |", "|---|---|---|---|---|---|"]
  for g in STRATEGIES:
    a, b = sj[g], st[g]
    if not a["runs"] or not b["runs"]:
      continue
    ma, mb = 1000 * a["seconds"] / max(1, a["steps"]), 1000 * b["seconds"] / max(1, b["steps"])
    out.append(f"| {g} | {a['steps'] / a['runs']:.0f} | {b['steps'] / b['runs']:.0f} | "
               f"{ma:.2f} | {mb:.2f} | {mb / ma:.1f}x |")
  out.append("")
  # Early stopping: both arms use it (it is the protocol); what it saves against the cap, if
  # each run's seconds scaled with its steps (an estimate: fixed per-run costs do not scale).
  at_cap = {name: sum(r.get("seconds", 0.0) * cap / r["steps"] for r in res["records"]
                      if r.get("steps"))
            for name, res in (("jtransfer", j), ("torch", t))}
  out += [f"Early stopping (both arms): runs trained {sj['all']['steps'] / (sj['all']['runs'] * cap):.0%}"
          f" (jtransfer) and {st['all']['steps'] / (st['all']['runs'] * cap):.0%} (PyTorch) of "
          f"the {cap}-step cap. Every run at the cap would take about "
          f"{at_cap['jtransfer']:.0f} s (jtransfer) and {at_cap['torch']:.0f} s (PyTorch) of run "
          f"time (run seconds scaled by cap / steps), {at_cap['torch'] / max(at_cap['jtransfer'], 1e-9):.2f}x.",
          ""]
  return out


def parity_section(arms: dict, args) -> list[str]:
  j, t = arms["jtransfer"], arms["torch"]
  lr_j, lr_t = chosen(j["records"], args), chosen(t["records"], args)
  ej, et = tuned_eval(j["records"], lr_j), tuned_eval(t["records"], lr_t)
  out = ["## Accuracy parity (jtransfer minus PyTorch)", "",
         "Points of accuracy; per run: mean, 95% CI (Student t over runs, "
         "`jtransfer.protocol.stats.paired`), wins/ties/losses of jtransfer, whether the CI holds "
         "0, the largest |difference|. Failed runs (non-finite) are left out and counted.", "",
         "| runs compared | n | mean | 95% CI | w/t/l | CI holds 0 | max abs |",
         "|---|---|---|---|---|---|---|"]
  for label, strats in (("evaluation runs, each arm at its own chosen LR: test accuracy",
                         STRATEGIES),
                        ("  Freeze only", ("freeze",)), ("  Freeze+CWL only", ("freeze_cwl",))):
    keys = sorted(k for k in ej if k[3] in strats and ej[k] is not None and
                  et.get(k) is not None)
    out.append(_paired_line(label, [ej[k] for k in keys], [et[k] for k in keys]))
  key = lambda r: tuple(map(str, fewshot.record_key(r)))
  tj = {key(r): r for r in j["records"]}
  same = [(tj[key(r)], r) for r in t["records"] if key(r) in tj and
          tj[key(r)]["status"] == "ok" and r["status"] == "ok"]
  tune = [(a, b) for a, b in same if a["repeat"] < 0]
  ev = [(a, b) for a, b in same if a["repeat"] >= 0]
  out.append(_paired_line("tuning runs, same draw and LR: validation accuracy",
                          [a["val_acc"] for a, _ in tune], [b["val_acc"] for _, b in tune]))
  out.append(_paired_line("evaluation runs, same draw and LR: test accuracy",
                          [a["test_acc"] for a, _ in ev], [b["test_acc"] for _, b in ev]))
  steps = [(a["steps"], b["steps"]) for a, b in same]
  cells = sorted(set(lr_j) & set(lr_t))
  agree = sum(lr_j[c] == lr_t[c] for c in cells)
  failed = {n: sum(r["status"] != "ok" for r in res["records"]) for n, res in arms.items()}
  out += ["", f"Chosen LR equal in {agree}/{len(cells)} cells"
          + (": " + "; ".join(f"{'/'.join(map(str, c))}: {lr_j[c]:g} vs {lr_t[c]:g}"
                              for c in cells if lr_j[c] != lr_t[c]) if agree < len(cells) else "")
          + f". Runs stopping at the same step in both arms: "
          f"{sum(a == b for a, b in steps)}/{len(steps)}. Failed runs: "
          + ", ".join(f"{n} {v}" for n, v in failed.items()) + ".", ""]
  return out


def _merge(a: dict | None, b: dict) -> dict:
  """Two partial results of one arm (seconds added, records joined)."""
  if a is None:
    return b
  return {k: a[k] + b[k] for k in a}


def main(argv=None) -> int:
  args = parse_args(argv)
  paths = [p for p in args.paths.split(",") if p]
  for p in paths:
    if p not in ("jtransfer", "torch", "plain", "processes"):
      raise SystemExit(f"--paths: unknown path {p!r}")
  for arch in args.archs.split(","):  # sources are cached before timing
    pretrain.source_for(arch, args.source, epochs=args.source_epochs, seed=args.seed,
                        progress=False)
  load0 = " / ".join(f"{v:.2f}" for v in os.getloadavg())
  arms: dict = {}
  if "torch" in paths:
    import torch
    threads, probe = torch_threads(args.torch_threads)
    torch.set_num_threads(threads)
  with tempfile.TemporaryDirectory() as tmp:
    # The two main arms alternate by arch (jtransfer compiles per arch either way), so a change
    # in the shared machine's load falls on both rather than on one.
    for arch in args.archs.split(","):
      one = argparse.Namespace(**{**vars(args), "archs": arch})
      for arm in ("jtransfer", "torch"):
        if arm in paths:
          res = (jax_grid(one, [], os.path.join(tmp, f"jtransfer-{arch}")) if arm == "jtransfer"
                 else torch_grid(one))
          arms[arm] = _merge(arms.get(arm), res)
    if "torch" in arms:
      arms["torch"].update(threads=threads, probe=probe)
    if "plain" in paths:
      arms["plain"] = jax_grid(args, ["--no-feature-cache"], os.path.join(tmp, "plain"))
    if "processes" in paths:  # one worker per core, at most one per target
      workers = min(os.cpu_count() or 1, len(args.targets.split(";")))
      arms["processes"] = process_grid(args, os.path.join(tmp, "processes"), workers)
  load1 = " / ".join(f"{v:.2f}" for v in os.getloadavg())
  emit(report(args, argv, arms, (load0, load1)) + "\n", args.out)
  return 0


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  raise SystemExit(main())
