"""bench/bench_grid.py's PyTorch arm: the loop a researcher writes around bench/torch_ref.py's
nets, running the same cells, draws, tuning and stopping rule as the jtransfer arm."""
from __future__ import annotations

import copy
import math
import time

import numpy as np

from bench import torch_twin
from bench.grid_jax import STUDY, GridConfig, study_config
from jtransfer import sources
from jtransfer.study import draws as draws_lib
from jtransfer.study import grid as grid_lib
from jtransfer.study import records as rec
from jtransfer.study import runner
from jtransfer.study.config import Protocol
from jtransfer.study.target import cap_per_class


class TorchTarget:
  """The PyTorch loop's runs of one (source, target): the researcher's loop, plus (untimed) the
  jtransfer head init of each draw's seed, copied in so both arms start from the same net."""

  def __init__(self, source, spec: str, protocol: Protocol):
    import torch
    from jtransfer.data import load_spec
    from jtransfer.methods import transfer
    self.torch, self.source, self.protocol = torch, source, protocol
    data = load_spec(spec, source.input_shape, flag="--target")
    self.pool = data.train
    self.test = cap_per_class(data.test, protocol.test_per_class)
    self.num_classes = self.pool.num_classes
    self.mean = np.asarray(source.mean, np.float32)
    self.std = np.asarray(source.std, np.float32)
    self.x_test = self.tensor(self.test.images)
    self.y_test = self.test.labels
    self._setup = transfer.get_strategy("freeze").build(source, self.num_classes,
                                                        protocol.steps)
    self._nets: dict = {}
    self.untimed = 0.0  # seconds spent building jtransfer's head init (not the loop's cost)
    self.eval_s = 0.0  # seconds in validation and test forwards

  def tensor(self, images: np.ndarray):
    """uint8 NHWC images -> the loop's normalised float32 NCHW tensor."""
    return torch_twin.tensor(images, self.mean, self.std)

  def net(self, seed: int, cwl: bool):
    """A fresh copy of the source net with the new head's init of `seed` (+ CWL scales)."""
    if seed not in self._nets:
      t0 = time.perf_counter()
      params, stats = self._setup.init(seed, self.pool.images[:1], self.pool.labels[:1])
      plain = torch_twin.torch_net(self.source.arch, dict(self.source.config),
                                   self.num_classes, self.source.input_shape, params, stats)
      self._nets[seed] = {False: plain, True: torch_twin.with_cwl(plain)}
      self.untimed += time.perf_counter() - t0
    return copy.deepcopy(self._nets[seed][cwl])

  def _accuracy(self, net, x, y) -> float:
    t0 = time.perf_counter()
    with self.torch.no_grad():
      pred = self.torch.cat([net(x[i:i + 500]).argmax(-1) for i in range(0, len(x), 500)])
    self.eval_s += time.perf_counter() - t0
    return float(np.mean(pred.numpy() == y))  # float64, as jtransfer's `accuracy`

  def run(self, name: str, train_idx, val_idx, lr: float, seed: int, test: bool,
          budget) -> dict:
    """One run under the protocol's stopping rule (`budget`, a `jtransfer.protocol.Budget`);
    the outcome a jtransfer record holds."""
    import torch.nn.functional as F
    from jtransfer.data import Batches
    torch = self.torch
    net = self.net(seed, cwl=name == "freeze_cwl").eval()  # BN on running statistics
    for n, p in net.named_parameters():
      p.requires_grad_(n.startswith("head.") or n.endswith(".sigma"))
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    batches = Batches(self.pool.images[train_idx], self.pool.labels[train_idx],
                      self.protocol.batch_size, seed)
    x_val = self.tensor(self.pool.images[val_idx])
    y_val = self.pool.labels[val_idx]
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


def torch_grid(config: GridConfig) -> dict:
  """The PyTorch arm: the same cells, draws, tuning and evaluation points as the study runner
  gives the jtransfer arm (`jtransfer.study.grid` on the same `Config`), trained by the loop;
  version-2 records (`jtransfer.study.records`)."""
  import torch
  torch.manual_seed(config.protocol.seed)
  sc = study_config(config, config.targets, "unused")
  plan = grid_lib.plan(STUDY, sc)
  p = sc.protocol
  records: list[dict] = []
  found: dict = {}
  untimed = eval_s = 0.0
  t_start = time.perf_counter()
  for arch in sc.cells.archs:
    source = sources.study_source(arch, sc)  # the jtransfer arm's (cached before timing)
    for spec in sc.cells.targets:
      tt = TorchTarget(source, spec, p)
      for cell in (c for c in plan.cells if (c["arch"], c["target"]) == (arch, spec)):
        budget, _ = runner.cell_budget(STUDY, sc, cell)
        draws = draws_lib.cell_draws(tt.pool.labels, tt.num_classes, cell["shots"], p.seed,
                                     p.repeats, p.tune_draws, p.val_per_class)

        def run_one(arm, key, cell=cell, draws=draws, budget=budget):
          draw, point = draws_lib.Draw(*key[2:5]), dict(key[5])
          seed, train_idx, val_idx = draws[draw.repeat]
          t0, untimed0 = time.perf_counter(), tt.untimed
          out = tt.run(arm.name, train_idx, val_idx, point["lr"], seed,
                       test=draw.role == draws_lib.EVAL, budget=budget)
          r = rec.make(arm.name, cell, draw, point, out,
                       time.perf_counter() - t0 - (tt.untimed - untimed0))
          records.append(r)
          found[rec.key(r)] = r["outcome"]
          return r["outcome"]

        for arm in plan.arms:
          tuned = grid_lib.choose(found, plan, cell, arm,
                                  run_missing=lambda k, a=arm: run_one(a, k))
          for point in grid_lib.eval_points(plan, arm, tuned):
            for i in range(p.repeats):
              key = rec.run_key(arm.name, cell, draws_lib.Draw(draws_lib.EVAL, i), point)
              if key not in found:
                run_one(arm, key)
      untimed += tt.untimed
      eval_s += tt.eval_s
  wall = time.perf_counter() - t_start - untimed
  return dict(wall=wall, records=records, eval_s=eval_s, untimed=untimed)
