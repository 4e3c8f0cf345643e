"""PyTorch accuracy parity: the same few-shot protocol in jtransfer and in PyTorch, paired per draw.

  python -m bench.parity [--draws 10] [--steps 100] [--out bench/PARITY.md]

For each (arch, target, strategy) cell and each k-shot draw, one fixed-step run in jtransfer
(as `experiments.fewshot` makes one: the strategy's Setup, Freeze on cached backbone features,
Finetune through the full model, the generic jitted step and `fit`) and one in PyTorch with
bench/torch_ref.py's net of the same definition, sharing everything a run is made of:
  * the source weights (`experiments.pretrain.source_for`, copied into the torch net; the
    report gives the largest logit difference of the two nets on the test set before training);
  * the new head's initial weights (jtransfer's, copied);
  * the k-shot draw (`sample_kshot` with experiments.fewshot's seeds) and the batch of every
    step (`Batches.at`, same seed), preprocessing (`normalize` with the source's mean/std);
  * the loss (mean cross-entropy), the optimiser (Adam, lr, betas (0.9, 0.999), eps 1e-8: optax
    and torch defaults agree), the step count, the trained params (Freeze: the head; Finetune:
    all) and BN mode (running statistics in both strategies, torch `eval()`);
  * the test set (the target's test split capped per class as experiments.fewshot does).
The report gives, per cell, jtransfer minus PyTorch test accuracy per draw (mean, 95% CI, wins /
ties / losses, `jtransfer.protocol.stats.paired`) and how far the two runs of a draw are apart
(test predictions that agree, largest |test accuracy difference|).

Rounding control (`--rounding-control`, on by default): every Finetune run of the parity table
is trained once more in PyTorch with each batch's rows reversed -- the same batch, the same mean
loss, summed in another order -- and PyTorch-reversed minus PyTorch is reported per cell beside
jtransfer minus PyTorch. It measures how far float rounding alone moves a PyTorch run's test
accuracy, and sets the equivalence margin of each cell's parity verdict: "equal within rounding"
when the jtransfer - PyTorch 95% interval lies within +-max(0.5 pt, the largest |PyTorch-reversed
- PyTorch| of the cell's draws), "different" otherwise.

Stem study (`--stem-study`, on by default): resnet_s with its default stride-2 stem against a
stride-1 stem (a second source, pretrained the same way and cached), Freeze and Finetune on the
same draws and head inits, jtransfer only, with the train-step and eval-forward time ratio.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from bench.common import command, emit

TARGETS = ("fmnist:1,5,7,8,9", "digits")
SOURCE = "fmnist:0,2,3,4,6"
LRS = {"freeze": 1e-2, "finetune": 1e-4}
MARGIN_FLOOR = 0.005  # the equivalence margin's floor, accuracy (0.5 pt)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--archs", default="vgg_s,resnet_s")
  p.add_argument("--targets", default=";".join(TARGETS), help="';'-separated target specs")
  p.add_argument("--strategies", default="freeze,finetune")
  p.add_argument("--shots", type=int, default=10)
  p.add_argument("--draws", type=int, default=10, help="k-shot draws per cell (repeats)")
  p.add_argument("--steps", type=int, default=100, help="Adam steps per run")
  p.add_argument("--lr-freeze", type=float, default=LRS["freeze"])
  p.add_argument("--lr-finetune", type=float, default=LRS["finetune"])
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--val-per-class", type=int, default=10)
  p.add_argument("--test-per-class", type=int, default=300)
  p.add_argument("--source", default=SOURCE,
                 help="source dataset spec (pretrained and cached), or 'random' (an untrained "
                      "source, for tests)")
  p.add_argument("--source-epochs", type=float, default=2.0)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--stem-study", dest="stem_study", action="store_true", default=True)
  p.add_argument("--no-stem-study", dest="stem_study", action="store_false")
  p.add_argument("--stem-draws", type=int, default=None,
                 help="draws of the stem study (the first ones of the parity table's; default "
                      "--draws): a stride-1 finetune run costs ~3.5x a stride-2 one")
  p.add_argument("--rounding-control", dest="rounding_control", action="store_true",
                 default=True,
                 help="train each Finetune run's PyTorch arm again with each batch's rows "
                      "reversed (on by default)")
  p.add_argument("--no-rounding-control", dest="rounding_control", action="store_false")
  p.add_argument("--logit-tol", type=float, default=1e-3,
                 help="largest |logit| difference of the two nets before training (relative "
                      "to the largest |logit|) accepted as the same net")
  p.add_argument("--torch-threads", type=int, default=1,
                 help="torch.set_num_threads (0 = torch's default)")
  p.add_argument("--max-minutes", type=float, default=12.0,
                 help="start no run after this many minutes; the report then says what is "
                      "left, and the same command continues from the records")
  p.add_argument("--records", default=None,
                 help="JSON-lines file of finished runs (default: --out with .jsonl)")
  p.add_argument("--out", default="bench/PARITY.md")
  return p.parse_args(argv)


# ----------------------------------------------------------------------------- sources
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


def get_source(arch: str, args, stem_stride: Optional[int] = None):
  """The cached pretrained source (`pretrain.source_for`), or a stride-`stem_stride` resnet_s
  pretrained the same way and cached beside it."""
  config = None if stem_stride is None else {"stem_stride": stem_stride}
  if args.source == "random":
    return random_source(arch, config)
  from experiments import pretrain
  from jtransfer.methods import transfer
  if config is None:
    return pretrain.source_for(arch, args.source, epochs=args.source_epochs, seed=args.seed,
                               progress=False)
  path = pretrain.cache_dir(f"{arch}-stem{stem_stride}", args.source, args.source_epochs,
                            args.seed)
  if os.path.isdir(path):
    return transfer.load_source(path)
  print(f"[parity] pretraining {arch} with stem stride {stem_stride}, cache {path}",
        file=sys.stderr)
  source = pretrain.pretrain(arch, args.source, epochs=args.source_epochs, seed=args.seed,
                             progress=False, model_config=config)
  transfer.save_source(path, source)
  return source


# ----------------------------------------------------------------------------- torch net
def torch_net(arch: str, config: dict, num_classes: int, shape, params, batch_stats):
  """bench/torch_ref.py's net for a jtransfer target model, with its weights copied in."""
  import torch
  from bench import torch_ref
  from jtransfer import surgery
  h, w, c = shape
  if arch == "vgg_s":
    widths = tuple(tuple(s) for s in config["conv_widths"])
    net = torch_ref.VGGS(c, num_classes, widths=widths, hw=h)
    units = {f"conv{s + 1}_{i + 1}": net.features[s * (len(stage) + 1) + i]
             for s, stage in enumerate(widths) for i in range(len(stage))}
  elif arch == "resnet_s":
    if tuple(config["stage_sizes"]) != (2, 2, 2) or config["block"] != "basic" or \
        config["stem_kernel"] != 3 or config["stem_pool"]:
      raise ValueError(f"no torch_ref net for resnet_s config {config}")
    net = torch_ref.ResNetS(c, num_classes, widths=tuple(config["stage_widths"]),
                            stem=config["stem_width"], stem_stride=config["stem_stride"])
    units = {"stem": net.stem}
    for i, block in enumerate(net.blocks):
      name = f"stage{i // 2 + 1}/block{i % 2}"
      units.update({f"{name}/conv1": block.conv1, f"{name}/conv2": block.conv2})
      if block.down is not None:
        units[f"{name}/downsample"] = block.down
  else:
    raise ValueError(f"no torch_ref net for {arch!r}")
  flat = surgery.flatten(params)
  stats = surgery.flatten(batch_stats) if batch_stats else {}
  state = {}
  for name, unit in units.items():
    conv = unit[0]
    state[conv.weight] = np.transpose(flat.pop(f"{name}/conv/kernel"), (3, 2, 0, 1))
    if conv.bias is not None:
      state[conv.bias] = flat.pop(f"{name}/conv/bias")
    if isinstance(unit[1], torch.nn.BatchNorm2d):
      bn = unit[1]
      state[bn.weight] = flat.pop(f"{name}/bn/scale")
      state[bn.bias] = flat.pop(f"{name}/bn/bias")
      state[bn.running_mean] = stats.pop(f"{name}/bn/mean")
      state[bn.running_var] = stats.pop(f"{name}/bn/var")
  kernel = np.asarray(flat.pop("head/kernel"))
  if arch == "vgg_s":  # jtransfer flattens (H, W, C), torch (C, H, W)
    hw, ch = int(round(math.sqrt(kernel.shape[0] // widths[-1][-1]))), widths[-1][-1]
    kernel = kernel.reshape(hw, hw, ch, -1).transpose(2, 0, 1, 3).reshape(ch * hw * hw, -1)
  state[net.head.weight] = kernel.T
  state[net.head.bias] = flat.pop("head/bias")
  if flat or stats:
    raise ValueError(f"jtransfer params without a torch counterpart: {sorted(flat) + sorted(stats)}")
  with torch.no_grad():
    for tensor, value in state.items():
      # A copy: jax-backed arrays are read-only, which torch.from_numpy warns about.
      value = torch.from_numpy(np.array(value, np.float32, order="C"))
      if tensor.shape != value.shape:
        raise ValueError(f"shape {tuple(value.shape)} does not fit {tuple(tensor.shape)}")
      tensor.copy_(value)
  return net.eval()


def to_nchw(x: np.ndarray):
  import torch
  return torch.from_numpy(np.array(np.transpose(np.asarray(x), (0, 3, 1, 2)), np.float32))


def torch_logits(net, images: np.ndarray, mean, std, batch: int = 500) -> np.ndarray:
  import torch
  from jtransfer.data.preprocess import normalize
  out = []
  with torch.no_grad():
    for i in range(0, len(images), batch):
      out.append(net(to_nchw(normalize(images[i:i + batch], mean, std))).numpy())
  return np.concatenate(out)


def reversed_rows(batch: dict) -> dict:
  """The same batch with its rows in reverse order: the same mean loss, summed in another
  order (BN uses running statistics, so every row's forward is unchanged)."""
  return {k: np.ascontiguousarray(v[::-1]) for k, v in batch.items()}


def torch_run(net, strategy: str, batches, steps: int, lr: float, mean, std,
              reverse_rows: bool = False):
  """Trains `net` in place: Adam on the head (freeze) or all params (finetune), BN eval mode;
  `reverse_rows`: each batch's rows in reverse order (the rounding control)."""
  import torch
  import torch.nn.functional as F
  from jtransfer.data.preprocess import normalize
  net.eval()  # BN running statistics in both strategies, as jtransfer's
  for name, p in net.named_parameters():
    p.requires_grad_(strategy == "finetune" or name.startswith("head."))
  opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=lr,
                         betas=(0.9, 0.999), eps=1e-8)
  for step in range(steps):
    b = batches.at(step)
    if reverse_rows:
      b = reversed_rows(b)
    x = to_nchw(normalize(b["image"], mean, std))
    y = torch.from_numpy(b["label"].astype(np.int64))
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(net(x), y)
    if not torch.isfinite(loss):
      raise FloatingPointError(f"torch run: non-finite loss at step {step}")
    loss.backward()
    opt.step()
  return net


# ----------------------------------------------------------------------------- protocol
def draws(pool_labels, num_classes, args, n: int) -> list:
  """(seed, train_idx, val_idx) of the first `n` repeats, with experiments.fewshot's seeds."""
  from experiments.fewshot import draw_seed
  from jtransfer.data import sample_kshot
  out = []
  for repeat in range(n):
    seed = draw_seed(args, args.shots, repeat)
    out.append((seed, *sample_kshot(pool_labels, args.shots, seed,
                                    val_per_class=args.val_per_class, num_classes=num_classes)))
  return out


class JaxArm:
  """jtransfer's runs of one (source, target), as experiments.fewshot makes a fixed-step run:
  a head-only strategy (Freeze) trains its head on backbone features computed once, the
  others the full model; `Batches(seed)`, `init_state`, the generic jitted step, `fit`."""

  def __init__(self, source, num_classes: int, args):
    self.source, self.num_classes, self.args = source, num_classes, args
    self._setups: dict = {}
    self._test_features = None

  def setup(self, name: str):
    """(Setup, compiled step, optimizer, head_only), built once per strategy."""
    from jtransfer.methods import transfer
    from jtransfer.train import make_optimizer, make_train_step
    if name not in self._setups:
      strategy = transfer.get_strategy(name)
      setup = strategy.build(self.source, self.num_classes, self.args.steps)
      if strategy.head_only:
        label = setup.optimizer.labels["head"]["kernel"]
        dummy = np.zeros((1, *self.source.input_shape), np.uint8)
        params, _ = setup.init(0, dummy, np.zeros(1, np.int32))
        opt = make_optimizer({"head": params["head"]}, [(".*", label)],
                             {label: setup.optimizer.groups[label]}, injected_lr=True)
        step = make_train_step(transfer.head_loss_fn(), opt)
      else:
        opt, step = setup.optimizer, make_train_step(setup.loss_fn, setup.optimizer)
      self._setups[name] = (setup, step, opt, strategy.head_only)
    return self._setups[name]

  def features(self, images):
    from jtransfer.methods import transfer
    return transfer.extract_features(self.source, self.num_classes, images, batch_size=256)

  def run(self, name: str, images, labels, test_images, lr: float, seed: int) -> np.ndarray:
    """Trains one run for `--steps` steps; returns its test logits."""
    from jtransfer.data import Batches
    from jtransfer.methods import transfer
    from jtransfer.train import fit, init_state, predict_logits
    setup, step, opt, head_only = self.setup(name)
    params, stats = setup.init(seed, images, labels)
    if head_only:
      if self._test_features is None or self._test_features[0] is not test_images:
        self._test_features = (test_images, self.features(test_images))
      params, stats, forward = {"head": params["head"]}, {}, transfer.head_forward
      x_train, x_test = self.features(images), self._test_features[1]
    else:
      x_train, x_test, forward = images, test_images, setup.forward
    state = init_state(params, stats, opt, seed, lr)
    state = fit(state, step, Batches(x_train, labels, self.args.batch_size, seed).at,
                self.args.steps)
    return predict_logits(forward, state.params, state.batch_stats, x_test)


def load_target(spec: str, shape, args, data_cache: dict):
  """(train pool, test set capped per class as experiments.fewshot does)."""
  from experiments.fewshot import cap_per_class
  from jtransfer.data import load_spec
  key = (spec, tuple(shape))
  if key not in data_cache:
    data = load_spec(spec, tuple(shape), flag="--targets")
    data_cache[key] = (data.train, cap_per_class(data.test, args.test_per_class))
  return data_cache[key]


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
    return self.items.get(tuple(key))

  def add(self, key: tuple, **fields) -> dict:
    r = dict(key=list(key), config=self.config, **fields)
    with open(self.path, "a") as f:
      f.write(json.dumps(r, sort_keys=True) + "\n")
    self.items[tuple(key)] = json.loads(json.dumps(r))
    return r


class OutOfTime(Exception):
  pass


def run_target(source, stem: int, spec: str, args, lrs: dict, with_torch: bool,
               data_cache: dict, records: Records, deadline: float) -> None:
  """Every strategy's runs on every draw of one (source, target), skipping recorded ones;
  with the rounding control, each Finetune draw's PyTorch run again with rows reversed."""
  from jtransfer.data import Batches
  pool, test = load_target(spec, source.input_shape, args, data_cache)
  jax_arm = JaxArm(source, pool.num_classes, args)
  arch = source.arch
  for name in args.strategies.split(","):
    setup = None
    n = args.draws if stem == 2 else args.stem_draws

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
      torch_run(net, name, Batches(images, labels, args.batch_size, seed), args.steps,
                lrs[name], source.mean, source.std, reverse_rows=reverse_rows)
      pred = np.argmax(torch_logits(net, test.images, source.mean, source.std), -1)
      return pred, time.perf_counter() - t0

    for i, (seed, train_idx, val_idx) in enumerate(draws(pool.labels, pool.num_classes, args, n)):
      images, labels = pool.images[train_idx], pool.labels[train_idx]
      key = ("run", arch, stem, spec, name, i)
      if records.get(key) is None:
        if time.time() > deadline:
          raise OutOfTime()
        setup = setup or jax_arm.setup(name)[0]
        t0 = time.perf_counter()
        pred_j = np.argmax(jax_arm.run(name, images, labels, test.images, lrs[name], seed), -1)
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
      if with_torch and controlled(args, name) and records.get(rev_key) is None:
        if time.time() > deadline:
          raise OutOfTime()
        setup = setup or jax_arm.setup(name)[0]
        pred_r, secs = torch_trained(seed, images, labels, reverse_rows=True)
        rec = records.add(rev_key, seed=int(seed), torch_rev=float(np.mean(pred_r == test.labels)),
                          torch_rev_s=secs)
        print(f"[parity] {arch} stem{stem} {spec} {name} draw {i}: torch, rows reversed "
              f"{rec['torch_rev']:.4f}", file=sys.stderr)


def controlled(args, name: str) -> bool:
  """Whether the rounding control retrains this strategy's PyTorch runs (Finetune only:
  Freeze's runs classify every test image the same)."""
  return args.rounding_control and name == "finetune"


def step_times(source, spec: str, args, data_cache: dict) -> dict:
  """Median seconds of the jtransfer finetune train step (k-shot batch and batch 128) and of
  the eval forward over 500 images, for one source."""
  import jax
  from jtransfer.train import init_state
  pool, _ = load_target(spec, source.input_shape, args, data_cache)
  setup, step, opt, _ = JaxArm(source, pool.num_classes, args).setup("finetune")
  n = min(args.shots * pool.num_classes, args.batch_size)
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


# ----------------------------------------------------------------------------- report
def _pct(v: float) -> str:
  return f"{100 * v:.1f}"


def _cell(records: Records, arch, stem, spec, name, n) -> list:
  return [records.get(("run", arch, stem, spec, name, i)) for i in range(n)]


EQUAL, DIFFERENT = "equal within rounding", "different"


def within(pr, margin: float) -> Optional[bool]:
  """Whether a paired interval lies within +-margin (ends included); None without an interval
  (fewer than 2 draws)."""
  if pr.n < 2 or math.isnan(pr.lo):
    return None
  eps = 1e-12  # accuracies are k/n: a bound equal to the margin is inside
  return -margin - eps <= pr.lo and pr.hi <= margin + eps


def control_row(arch: str, spec: str, name: str, runs: list, revs: Optional[list],
                floor: float = MARGIN_FLOOR) -> tuple:
  """One row of the rounding-control table and the cell's verdict.

  Args:
    runs: the cell's parity records (`jax`, `torch` accuracies), draw by draw.
    revs: the same draws' rounding-control records (`torch_rev`; None where a draw has none),
      or None for a cell without a control.
    floor: the smallest equivalence margin (accuracy, 0.005 = 0.5 pt).

  Returns:
    (markdown row, verdict: EQUAL, DIFFERENT or None without an interval).
  """
  from jtransfer.protocol import stats
  pr = stats.paired([r["jax"] for r in runs], [r["torch"] for r in runs])
  holds = (pr.lo <= 0 <= pr.hi) if not math.isnan(pr.lo) else pr.mean == 0
  pairs = [(r, v) for r, v in zip(runs, revs or []) if v is not None]
  margin, rev_txt, wtl, moved, maxd = floor, "-", "-", "-", "-"
  if pairs:
    rev = stats.paired([v["torch_rev"] for _, v in pairs], [r["torch"] for r, _ in pairs])
    d = [v["torch_rev"] - r["torch"] for r, v in pairs]
    margin = max(floor, max(abs(x) for x in d))
    rev_txt = stats.format_paired(rev, digits=2)
    wtl = f"{rev.wins}/{rev.ties}/{rev.losses}"
    on_jax = sum(1 for r, v in pairs if v["torch_rev"] != r["torch"] and v["torch_rev"] == r["jax"])
    moved = f"{on_jax}/{sum(1 for x in d if x != 0)}"
    maxd = f"{100 * max(abs(x) for x in d):.2f}"
  ok = within(pr, margin)
  verdict = None if ok is None else (EQUAL if ok else DIFFERENT)
  shown = "-" if verdict is None else (f"**{verdict}**" if verdict == DIFFERENT else verdict)
  row = (f"| {arch} | {spec} | {name} | {stats.format_paired(pr, digits=2)} | {rev_txt} | {wtl} "
         f"| {moved} | {maxd} | +-{100 * margin:.2f} | {'yes' if holds else 'NO'} | {shown} |")
  return row, verdict


def control_section(args, records: Records, plan: dict) -> list:
  """The rounding-control table (PyTorch-reversed - PyTorch beside jtransfer - PyTorch) and
  each parity cell's equivalence verdict."""
  n = args.draws
  pct = f"{100 * MARGIN_FLOOR:.1f}"
  lines = ["## Rounding control and parity verdict", ""]
  if args.rounding_control:
    lines += ["PyTorch against itself: each Finetune draw's PyTorch run trained again with each "
              "batch's rows reversed -- the same batches, head init and steps, the same mean "
              "loss summed in another order (BN uses running statistics, so each row's forward "
              "is unchanged). rev = PyTorch-reversed - PyTorch per draw, in points: mean [95% "
              "CI] wins/n (`jtransfer.protocol.stats.paired`), beside jtransfer - PyTorch from "
              "the table above; rev w/t/l = wins/ties/losses; onto jtransfer = of the draws whose "
              "reversed run's accuracy differs from PyTorch's, those where it equals "
              "jtransfer's; max |rev| = the largest per-draw |rev|, points. Freeze "
              "cells have no control (their runs classify every test image the same).", ""]
  else:
    lines += ["No rounding control in this run (`--no-rounding-control`): every margin is the "
              "floor.", ""]
  lines += [f"Verdict rule: a cell's parity is **{EQUAL}** when its jtransfer - PyTorch 95% "
            f"interval lies within +-m, m = max({pct} pt, the largest |PyTorch-reversed - "
            f"PyTorch| of the cell's draws) ({pct} pt where a cell has no control); "
            f"**{DIFFERENT}** otherwise; no verdict with fewer than 2 draws. \"CI holds 0\" "
            "is the table above's column, kept for reference: it asks for a difference of "
            "exactly 0, which rounding alone can miss.", "",
            "| arch | target | strategy | jtransfer - PyTorch [95% CI] wins/n | PyTorch-reversed "
            "- PyTorch [95% CI] wins/n | rev w/t/l | onto jtransfer | max abs rev | "
            "margin m, pt | CI holds 0 | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  verdicts, complete, spread = [], True, 0
  for arch in plan["archs"]:
    for spec in plan["targets"]:
      for name in plan["strategies"]:
        cell = _cell(records, arch, 2, spec, name, n)
        idx = [i for i, r in enumerate(cell) if r]
        if not idx:
          complete = False
          continue
        revs = None
        if controlled(args, name):
          revs = [records.get(("rev", arch, 2, spec, name, i)) for i in idx]
          complete &= all(v is not None for v in revs)
        complete &= len(idx) == n
        row, verdict = control_row(arch, spec, name, [cell[i] for i in idx], revs)
        lines.append(row)
        verdicts.append(verdict)
        js = [cell[i]["jax"] - cell[i]["torch"] for i in idx]
        spread += len(set(js)) > 1  # an interval wider than a point
  so_far = "" if complete else " so far"
  n_eq = sum(v == EQUAL for v in verdicts)
  lines += ["", f"Parity{so_far}: **{n_eq} of {len(verdicts)} cells {EQUAL}**"
            + (f"; {DIFFERENT}: {sum(v == DIFFERENT for v in verdicts)}" if
               any(v == DIFFERENT for v in verdicts) else "")
            + (f"; no verdict: {sum(v is None for v in verdicts)}" if None in verdicts else "")
            + "."]
  if spread:
    lines += ["", f"{spread} cell(s) of the table above have an interval wider than a point "
              "(the others' draws all differ by the same amount, mostly 0): were they independent "
              f"and every true difference 0, at least one of {spread} 95% intervals would miss "
              f"0 with probability 1 - 0.95^{spread} = {1 - 0.95 ** spread:.2f}."]
  lines.append("")
  return lines


def report(args, argv, records: Records, plan: dict, missing: int) -> str:
  from jtransfer.protocol import stats
  n = args.draws
  lines = ["# PyTorch accuracy parity", "", "```", command("parity", argv), "```", ""]
  if missing:
    lines += [f"**Incomplete: {missing} run(s) not done yet (time cap); run the same command "
              "again to continue (finished runs are read from "
              f"`{os.path.relpath(args.records)}`).**", ""]
  lines += [f"Source `{args.source}` ({args.source_epochs:g} epochs, seed {args.seed}); "
            f"k={args.shots}; {n} draws per cell (experiments.fewshot's seeds); "
            f"{args.steps} Adam steps per run, lr freeze {args.lr_freeze:g}, finetune "
            f"{args.lr_finetune:g}; batch min({args.batch_size}, k-shot set) with the same batch "
            f"sequence (`Batches.at`) in both; BN running statistics in both strategies; test "
            f"<= {args.test_per_class}/class. jtransfer: the strategies' Setups, the generic "
            "jitted step and `fit` (Freeze on cached features, as experiments.fewshot); "
            "PyTorch: bench/torch_ref.py's nets with the source weights and the new head's "
            "init copied from jtransfer, `torch.optim.Adam` (defaults). Per-run records: "
            f"`{os.path.relpath(args.records)}`.", "",
            "Sources: " + "; ".join(f"{k} test accuracy {_pct(v)}%"
                                    for k, v in plan["sources"].items()), "",
            "## Same net before training", "",
            "Largest |logit| difference on the target's test set, source weights and the new "
            "head copied into the torch net (eval mode, first draw's head):", "",
            "| arch | target | max abs diff | max abs logit | relative |", "|---|---|---|---|---|"]
  for arch in plan["archs"]:
    for spec in plan["targets"]:
      c = records.get(("check", arch, 2, spec))
      if c:
        lines.append(f"| {arch} | {spec} | {c['diff']:.2e} | {c['scale']:.2f} | "
                     f"{c['diff'] / c['scale']:.1e} |")
  lines += ["", "## Parity: jtransfer minus PyTorch", "",
            "Test accuracy in %; diff = jtransfer - PyTorch per draw, in points: mean [95% CI] "
            "wins/n (`jtransfer.protocol.stats.paired`); w/t/l = wins/ties/losses; agree = "
            "share of test images both runs of a draw classify the same (mean, min); max |diff| "
            "= the largest per-draw accuracy difference, points; s = seconds in runs.", "",
            "| arch | target | strategy | jtransfer | PyTorch | diff [95% CI] wins/n | w/t/l | p "
            "| CI holds 0 | agree % (min) | max abs diff | s jax / torch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  all_zero, complete = True, True
  for arch in plan["archs"]:
    for spec in plan["targets"]:
      for name in plan["strategies"]:
        rs = [r for r in _cell(records, arch, 2, spec, name, n) if r]
        if len(rs) < n:
          complete = False
        if not rs:
          continue
        j, t, agree = ([r[k] for r in rs] for k in ("jax", "torch", "agree"))
        pr = stats.paired(j, t)
        holds = (pr.lo <= 0 <= pr.hi) if not math.isnan(pr.lo) else pr.mean == 0
        all_zero &= holds
        maxd = max(abs(a - b) for a, b in zip(j, t))
        p = "-" if math.isnan(pr.p) else f"{pr.p:.2f}"
        lines.append(
            f"| {arch} | {spec} | {name} | {_pct(np.mean(j))} | {_pct(np.mean(t))} | "
            f"{stats.format_paired(pr, digits=2)} | {pr.wins}/{pr.ties}/{pr.losses} | {p} | "
            f"{'yes' if holds else 'NO'} | {_pct(np.mean(agree))} ({_pct(min(agree))}) | "
            f"{100 * maxd:.2f} | {sum(r['jax_s'] for r in rs):.0f} / "
            f"{sum(r['torch_s'] for r in rs):.0f} |")
  lines += ["", f"CI includes 0 in every cell{'' if complete else ' so far'}: "
            f"**{'yes' if all_zero else 'no'}**.", "",
            "Where float rounding is expected to show: Freeze trains a linear head on features "
            "that agree to ~1e-6, a convex problem, so both runs should classify every test "
            "image the same. Finetune moves every weight for the whole run; the convolutions "
            "round differently in XLA and in oneDNN, and Adam divides each gradient by its own "
            "running RMS, so rounding-level differences in the gradients of weights whose "
            "gradient is near zero become full-size steps. Its runs should therefore disagree "
            "on a few test images near a decision boundary, in either direction.", ""]
  lines += control_section(args, records, plan)
  if plan["stem"]:
    lines += ["## resnet_s stem: stride 1 against stride 2", "",
              f"jtransfer only; the first {args.stem_draws} draws of the table above, with the "
              "same head inits, steps and LRs; each stem has "
              "its own source, pretrained the same way (same data, epochs, seed); the stride-2 "
              "runs are the parity table's. diff = stride 1 - stride 2 per draw, test accuracy "
              "in points.", "",
              "| target | strategy | stride 2 | stride 1 | diff [95% CI] wins/n | p |",
              "|---|---|---|---|---|---|"]
    for spec in plan["targets"]:
      for name in plan["strategies"]:
        pairs = [(a, b) for a, b in zip(_cell(records, "resnet_s", 2, spec, name, n),
                                        _cell(records, "resnet_s", 1, spec, name,
                                              args.stem_draws))
                 if a and b]
        if not pairs:
          continue
        two, one = [a["jax"] for a, _ in pairs], [b["jax"] for _, b in pairs]
        pr = stats.paired(one, two)
        p = "-" if math.isnan(pr.p) else f"{pr.p:.3f}"
        lines.append(f"| {spec} | {name} | {_pct(np.mean(two))} | {_pct(np.mean(one))} | "
                     f"{stats.format_paired(pr)} | {p} |")
    t2, t1 = records.get(("timing", 2)), records.get(("timing", 1))
    if t2 and t1:
      lines += ["", "jtransfer time on this machine (median; the machine is shared, so "
                "ratios are the figure to read):", "",
                "| what | stride 2 (ms) | stride 1 (ms) | stride 1 / stride 2 |",
                "|---|---|---|---|"]
      # the records' JSON has sorted keys: steps by batch size, then the forward
      for what in sorted(t2["times"], key=lambda w: (w.startswith("eval"),
                                                     int("".join(filter(str.isdigit, w))))):
        a, b = t2["times"][what], t1["times"][what]
        lines.append(f"| {what} | {1000 * a:.1f} | {1000 * b:.1f} | {b / a:.2f}x |")
      lines.append(f"| source pretraining (2 epochs), s | {t2['pretrain_s']:.0f} | "
                   f"{t1['pretrain_s']:.0f} | {t1['pretrain_s'] / t2['pretrain_s']:.2f}x |")
    lines.append("")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  if args.stem_draws is None:
    args.stem_draws = args.draws
  if args.records is None:
    args.records = os.path.splitext(args.out)[0] + ".jsonl"
  import torch
  torch.manual_seed(0)
  if args.torch_threads:
    # one intra-op thread: on a shared 2-core machine torch's OpenMP pool with 2 threads ran
    # these small steps 2-6x slower than with 1 (it spins while the other core is taken)
    torch.set_num_threads(args.torch_threads)
  lrs = {"freeze": args.lr_freeze, "finetune": args.lr_finetune}
  deadline = time.time() + 60 * args.max_minutes
  config = {k: getattr(args, k) for k in ("source", "source_epochs", "seed", "shots", "steps",
                                          "lr_freeze", "lr_finetune", "batch_size",
                                          "val_per_class", "test_per_class")}
  records = Records(args.records, config)
  data_cache: dict = {}
  archs = [a for a in args.archs.split(",") if a]
  targets = [t for t in args.targets.split(";") if t]
  strategies = [s for s in args.strategies.split(",") if s]
  stem = args.stem_study and "resnet_s" in archs
  plan = dict(archs=archs, targets=targets, strategies=strategies, stem=stem, sources={})
  try:
    jobs = [(arch, 2) for arch in archs] + ([("resnet_s", 1)] if stem else [])
    for arch, stride in jobs:
      source = get_source(arch, args, stem_stride=1 if stride == 1 else None)
      label = arch if stride == 2 else f"{arch} stride-1 stem"
      plan["sources"][label] = source.meta.get("source_test_acc", float("nan"))
      for spec in targets:
        run_target(source, stride, spec, args, lrs, stride == 2, data_cache, records, deadline)
      if stem and arch == "resnet_s" and records.get(("timing", stride)) is None:
        if time.time() > deadline:
          raise OutOfTime()
        records.add(("timing", stride), times=step_times(source, targets[0], args, data_cache),
                    pretrain_s=float(source.meta.get("train_seconds", float("nan"))))
  except OutOfTime:
    pass
  want = len(archs) * len(targets) * len(strategies) * args.draws + (
      len(targets) * len(strategies) * args.stem_draws if stem else 0)
  have = sum(1 for k in records.items if k[0] == "run" and k[1] in archs and k[3] in targets
             and k[4] in strategies and k[5] < (args.draws if k[2] == 2 else args.stem_draws)
             and (k[2] == 2 or stem))
  controls = [s for s in strategies if controlled(args, s)]
  want += len(archs) * len(targets) * len(controls) * args.draws
  have += sum(1 for k in records.items if k[0] == "rev" and k[1] in archs and k[2] == 2
              and k[3] in targets and k[4] in controls and k[5] < args.draws)
  if stem:  # the two step-time measurements count as runs
    want += 2
    have += sum(records.get(("timing", stride)) is not None for stride in (1, 2))
  emit(report(args, argv, records, plan, int(want - have)), args.out)
  bad = [r for k, r in records.items.items()
         if k[0] == "check" and r["diff"] > args.logit_tol * max(1.0, r["scale"])]
  if bad:
    print(f"error: the torch net's logits differ from jtransfer's: {bad}", file=sys.stderr)
    return 1
  if want > have:
    print(f"[parity] {int(want - have)} run(s) left: run the same command again",
          file=sys.stderr)
    return 3
  return 0


if __name__ == "__main__":
  from jtransfer.compile_cache import enable_compilation_cache
  enable_compilation_cache()  # before the first compilation
  sys.exit(main())
