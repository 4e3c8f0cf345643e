"""What bench/parity.py measures: its sources, k-shot draws, jtransfer's fixed-step runs beside
their PyTorch twins (bench/torch_twin.py), the run records that let a time-capped command
continue, and the stem study's step times. The report is bench/parity_report.py."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

from bench.torch_twin import torch_logits, torch_net, torch_run
from jtransfer.errors import InputError
from jtransfer.study import Protocol, flag
from jtransfer.study.config import at_least, comma_list, number, offered


STRATEGIES = ("freeze", "finetune")  # the strategies with a PyTorch twin (an LR flag each)


def _specs(text: str) -> tuple[str, ...]:
  """--targets: ';'-separated dataset specs."""
  return tuple(t for t in str(text).split(";") if t.strip())


def _strategies(text: str) -> tuple[str, ...]:
  """--strategies: a comma list of the strategies with a PyTorch twin (freeze, finetune)."""
  names = comma_list("--strategies")(text)
  bad = [n for n in names if n not in STRATEGIES]
  if bad or not names:
    raise InputError(f"--strategies {text!r}: expected a comma list of "
                     f"{', '.join(STRATEGIES)}")
  return names


@dataclasses.dataclass(frozen=True)
class ParityConfig:
  """What one invocation of bench/parity.py runs: its flags, typed (`jtransfer.study.flag`
  fields; `parity.parse` builds it, resolving --stem-draws and --records)."""
  archs: tuple[str, ...] = flag("--archs", ("vgg_s", "resnet_s"), "comma list of archs",
                                cli="vgg_s,resnet_s", parse=comma_list("--archs"))
  targets: tuple[str, ...] = flag("--targets", ("fmnist:1,5,7,8,9", "digits"),
                                  "';'-separated target specs",
                                  cli="fmnist:1,5,7,8,9;digits", parse=_specs)
  strategies: tuple[str, ...] = flag("--strategies", ("freeze", "finetune"),
                                     "comma list of freeze, finetune", cli="freeze,finetune",
                                     parse=_strategies)
  shots: int = flag("--shots", 10, "k, images per class", check=at_least(1, "--shots"))
  # The study runner's protocol under parity's fixed-step runs: no early stopping, no tuning.
  protocol: Protocol = offered(Protocol, {
      "repeats": dict(name="--draws", default=10, help="k-shot draws per cell (repeats)"),
      "steps": dict(default=100, help="Adam steps per run"), "batch_size": {},
      "val_per_class": dict(default=10), "test_per_class": {}, "seed": {}},
      # BN on running statistics in both strategies, as the torch arm's eval() (parity.py).
      fixed={"patience": 0, "tune_draws": 0, "bn": "frozen"})
  lr_freeze: float = flag("--lr-freeze", 1e-2, "Freeze's LR")
  lr_finetune: float = flag("--lr-finetune", 1e-4, "Finetune's LR")
  source: str = flag("--source", "fmnist:0,2,3,4,6", "source dataset spec (pretrained and "
                     "cached), or 'random' (an untrained source, for tests)")
  source_epochs: float = flag("--source-epochs", 2.0, "pretraining epochs of the source")
  stem_study: bool = flag("--stem-study", True, "also run resnet_s with a stride-1 stem "
                          "(jtransfer only)", action="bool")
  stem_draws: Optional[int] = flag(
      "--stem-draws", None, "draws of the stem study (the first ones of the parity table's; "
      "default --draws): a stride-1 finetune run costs ~3.5x a stride-2 one",
      parse=number("--stem-draws", int))
  rounding_control: bool = flag("--rounding-control", True, "train each Finetune run's "
                                "PyTorch arm again with each batch's rows reversed",
                                action="bool")
  logit_tol: float = flag("--logit-tol", 1e-3, "largest |logit| difference of the two nets "
                          "before training (relative to the largest |logit|) accepted as the "
                          "same net")
  torch_threads: int = flag("--torch-threads", 1, "torch.set_num_threads (0 = torch's default)",
                            check=at_least(0, "--torch-threads"))
  max_minutes: float = flag("--max-minutes", 12.0, "start no run after this many minutes; the "
                            "report then says what is left, and the same command continues "
                            "from the records")
  records: Optional[str] = flag("--records", None, "JSON-lines file of finished runs "
                                "(default: --out with .jsonl)")
  out: str = flag("--out", "bench/PARITY.md", "the report")

  def lr(self, strategy: str) -> float:
    """The strategy's fixed LR."""
    return {"freeze": self.lr_freeze, "finetune": self.lr_finetune}[strategy]

  @property
  def stem(self) -> bool:
    """Whether the stem study runs (it needs resnet_s among the archs)."""
    return self.stem_study and "resnet_s" in self.archs

  def settings(self) -> dict:
    """The settings a run record depends on: records of other settings are not reused."""
    p = self.protocol
    return dict(source=self.source, source_epochs=self.source_epochs, seed=p.seed,
                shots=self.shots, steps=p.steps, lr_freeze=self.lr_freeze,
                lr_finetune=self.lr_finetune, batch_size=p.batch_size,
                val_per_class=p.val_per_class, test_per_class=p.test_per_class)


def random_source(arch: str, config: Optional[dict] = None):
  """An untrained source (5 classes, 28x28x1) for tests: random weights drawn with numpy in
  the model's shapes (He-normal kernels, BN statistics near 0 and 1), no init compiled."""
  import jax
  from jtransfer import models, surgery
  from jtransfer.methods import transfer
  model = models.get_model(arch, 5, **(config or {}))
  shapes = jax.eval_shape(lambda: models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1)))
  rng = np.random.default_rng(0)

  def fill(path, x):
    if path.endswith("kernel"):
      return (rng.standard_normal(x.shape) * math.sqrt(2.0 / np.prod(x.shape[:-1]))).astype(
          np.float32)
    base = 1.0 if path.endswith(("scale", "var")) else 0.0
    return (base + 0.1 * rng.standard_normal(x.shape)).astype(np.float32)

  v = {k: surgery.map_with_path(fill, t) for k, t in shapes.items()}
  return transfer.Source(arch, models.model_config(model), v, (28, 28, 1), (0.286,), (0.353,),
                         {"source_test_acc": float("nan")})


def get_source(arch: str, config: ParityConfig, stem_stride: Optional[int] = None):
  """The cached pretrained source (`sources.source_for`), or a stride-`stem_stride` resnet_s
  pretrained the same way and cached beside it."""
  model_config = None if stem_stride is None else {"stem_stride": stem_stride}
  if config.source == "random":
    return random_source(arch, model_config)
  from jtransfer import sources
  from jtransfer.methods import transfer
  if model_config is None:
    return sources.source_for(arch, config.source, epochs=config.source_epochs,
                               seed=config.protocol.seed, progress=False)
  path = sources.cache_dir(f"{arch}-stem{stem_stride}", config.source, config.source_epochs,
                            config.protocol.seed)
  if os.path.isdir(path):
    return transfer.load_source(path)
  print(f"[parity] pretraining {arch} with stem stride {stem_stride}, cache {path}",
        file=sys.stderr)
  source = sources.pretrain(arch, config.source, epochs=config.source_epochs,
                             seed=config.protocol.seed, progress=False,
                             model_config=model_config)
  transfer.save_source(path, source)
  return source


def draws(runs, config: ParityConfig, n: int) -> list:
  """(seed, train_idx, val_idx) of the first `n` evaluation draws of a target, with the study
  runner's seeds (`jtransfer.study.draws`)."""
  from jtransfer.study import draws as draws_lib
  p = config.protocol
  cell = draws_lib.cell_draws(runs.pool.labels, runs.num_classes, config.shots, p.seed, n,
                              p.tune_draws, p.val_per_class)
  return [cell[i] for i in range(n)]


def target_runs(source, spec: str, config: ParityConfig, caches: dict):
  """The study runner's `TargetRuns` of (source, target) under parity's settings: its data (the
  test split capped per class), compiled steps and cached Freeze features, built once."""
  from jtransfer.study.target import TargetRuns
  key = (id(source), spec)
  if key not in caches.setdefault("runs", {}):
    caches["runs"][key] = TargetRuns(source, spec, config.protocol,
                                     caches.setdefault("data", {}),
                                     caches.setdefault("setups", {}), quiet=True)
  return caches["runs"][key]


def jax_run(runs, name: str, train_idx, lr: float, seed: int, config: ParityConfig
            ) -> np.ndarray:
  """One fixed-step jtransfer run as the study runner trains it, on the runner's setup
  (`TargetRuns.setup`: a head-only strategy trains its head on the cached backbone features,
  the others the full model), `Batches(seed)`, `init_state`, `fit`; its test logits."""
  from jtransfer.data import Batches
  from jtransfer.methods import transfer
  from jtransfer.train import fit, init_state, predict_logits
  p = config.protocol
  setup, step, opt, head_only = runs.setup(name, {}, p.steps)
  images, labels = runs.pool.images[train_idx], runs.pool.labels[train_idx]
  params, stats = setup.init(seed, images, labels)
  if head_only:
    x_train, x_test = runs.features(train_idx)
    params, stats, forward = {"head": params["head"]}, {}, transfer.head_forward
  else:
    x_train, x_test, forward = images, runs.test.images, setup.forward
  state = init_state(params, stats, opt, seed, lr)
  state = fit(state, step, Batches(x_train, labels, p.batch_size, seed).at, p.steps)
  return predict_logits(forward, state.params, state.batch_stats, x_test)


class Records:
  """Finished runs, one JSON line each, so an interrupted or time-capped command continues
  where it stopped when run again with the same flags (records of other flags are ignored)."""

  def __init__(self, path: str, config: dict):
    self.path, self.config, self.items = path, config, {}
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          r = json.loads(line)
          if r.get("config") == config:
            self.items[tuple(r["key"])] = r
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def get(self, key: tuple):
    """The record of `key`, or None."""
    return self.items.get(tuple(key))

  def add(self, key: tuple, **fields) -> dict:
    """Appends a finished run's record to the file and returns it."""
    r = dict(key=list(key), config=self.config, **fields)
    with open(self.path, "a") as f:
      f.write(json.dumps(r, sort_keys=True) + "\n")
    self.items[tuple(key)] = json.loads(json.dumps(r))
    return r


class OutOfTime(Exception):
  """The time cap (--max-minutes) came before a run would start."""


def run_target(source, stem: int, spec: str, config: ParityConfig, with_torch: bool,
               caches: dict, records: Records, deadline: float) -> None:
  """Every strategy's runs on every draw of one (source, target), skipping recorded ones;
  with the rounding control, each Finetune draw's PyTorch run again with rows reversed."""
  from jtransfer.data import Batches
  runs = target_runs(source, spec, config, caches)
  pool, test = runs.pool, runs.test
  arch, p = source.arch, config.protocol
  for name in config.strategies:
    setup = None
    n = p.repeats if stem == 2 else config.stem_draws

    def torch_trained(seed, images, labels, reverse_rows=False):
      """The torch net with this draw's source weights and head init, trained; its test
      predictions and seconds."""
      params, stats = setup.init(seed, images, labels)
      net = torch_net(arch, dict(source.config), pool.num_classes, source.input_shape,
                      params, stats)
      check = ("check", arch, stem, spec)
      if records.get(check) is None:  # the same net: equal logits before training
        lj = np.asarray(setup.forward(params, stats, test.images))
        lt = torch_logits(net, test.images, source.mean, source.std)
        records.add(check, diff=float(np.abs(lj - lt).max()), scale=float(np.abs(lj).max()))
      t0 = time.perf_counter()
      torch_run(net, name, Batches(images, labels, p.batch_size, seed), p.steps,
                config.lr(name), source.mean, source.std, reverse_rows=reverse_rows)
      pred = np.argmax(torch_logits(net, test.images, source.mean, source.std), -1)
      return pred, time.perf_counter() - t0

    for i, (seed, train_idx, _) in enumerate(draws(runs, config, n)):
      images, labels = pool.images[train_idx], pool.labels[train_idx]
      key = ("run", arch, stem, spec, name, i)
      if records.get(key) is None:
        if time.time() > deadline:
          raise OutOfTime()
        setup = setup or runs.setup(name, {}, p.steps)[0]
        t0 = time.perf_counter()
        pred_j = np.argmax(jax_run(runs, name, train_idx, config.lr(name), seed, config), -1)
        rec = dict(seed=int(seed), jax=float(np.mean(pred_j == test.labels)),
                   jax_s=time.perf_counter() - t0)
        if with_torch:
          pred_t, secs = torch_trained(seed, images, labels)
          rec.update(torch=float(np.mean(pred_t == test.labels)),
                     agree=float(np.mean(pred_t == pred_j)), torch_s=secs)
        records.add(key, **rec)
        print(f"[parity] {arch} stem{stem} {spec} {name} draw {i}: jtransfer {rec['jax']:.4f}"
              + (f" torch {rec['torch']:.4f} agree {rec['agree']:.4f}" if with_torch else ""),
              file=sys.stderr)
      rev_key = ("rev", arch, stem, spec, name, i)
      if with_torch and controlled(config, name) and records.get(rev_key) is None:
        if time.time() > deadline:
          raise OutOfTime()
        setup = setup or runs.setup(name, {}, p.steps)[0]
        pred_r, secs = torch_trained(seed, images, labels, reverse_rows=True)
        rec = records.add(rev_key, seed=int(seed), torch_rev=float(np.mean(pred_r == test.labels)),
                          torch_rev_s=secs)
        print(f"[parity] {arch} stem{stem} {spec} {name} draw {i}: torch, rows reversed "
              f"{rec['torch_rev']:.4f}", file=sys.stderr)


def controlled(config: ParityConfig, name: str) -> bool:
  """Whether the rounding control retrains this strategy's PyTorch runs (Finetune only:
  Freeze's runs classify every test image the same)."""
  return config.rounding_control and name == "finetune"


def step_times(source, spec: str, config: ParityConfig, caches: dict) -> dict:
  """Median seconds of the jtransfer finetune train step (k-shot batch and batch 128) and of
  the eval forward over 500 images, for one source."""
  import jax
  from jtransfer.train import init_state
  runs = target_runs(source, spec, config, caches)
  pool = runs.pool
  setup, step, opt, _ = runs.setup("finetune", {}, config.protocol.steps)
  n = min(config.shots * pool.num_classes, config.protocol.batch_size)
  out = {}
  for label, b in ((f"finetune step, batch {n}", n), ("finetune step, batch 128", 128)):
    batch = {"image": pool.images[:b], "label": pool.labels[:b]}
    params, stats = setup.init(0, batch["image"], batch["label"])
    state = init_state(params, stats, opt, 0, 1e-4)
    times = []
    for i in range(12):
      t0 = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m["loss"])
      if i >= 2:
        times.append(time.perf_counter() - t0)
    out[label] = float(np.median(times))
  params, stats = setup.init(0, pool.images[:1], pool.labels[:1])
  x = pool.images[:500]
  times = []
  for i in range(7):
    t0 = time.perf_counter()
    jax.block_until_ready(setup.forward(params, stats, x))
    if i >= 2:
      times.append(time.perf_counter() - t0)
  out["eval forward, 500 images"] = float(np.median(times))
  return out

