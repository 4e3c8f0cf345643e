"""The few-shot studies' hooks: a cell's shared data (`prepare`), the target check before any
training (`check_data`), and the accuracy-vs-shots plot.

The source comes from the module (`load_source(arch, config) -> transfer.Source`, e.g.
`jtransfer.sources.study_source`): the hooks do not choose how a source is made. One source
and its targets are held at a time: a new arch drops the previous arch's (the runner visits
cells arch by arch).
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

from jtransfer.data import sample_kshot
from jtransfer.study.target import TargetRuns, load_target, stored_shape


def prepare(load_source: Callable) -> Callable:
  """The `Study.prepare` hook of a few-shot study: (plan, cell, cache) -> `TargetRuns`."""
  def hook(plan, cell: dict, cache: dict) -> TargetRuns:
    config, arch, spec = plan.config, cell["arch"], cell["target"]
    if cache.get("arch") != arch:  # the previous arch's source, setups and features go
      for k in [k for k in cache if isinstance(k, tuple) and k[0] in ("source", "runs")]:
        del cache[k]
      cache["setups"], cache["arch"] = {}, arch
    if ("source", arch) not in cache:
      cache[("source", arch)] = load_source(arch, config)
    if ("runs", spec) not in cache:
      cache[("runs", spec)] = TargetRuns(
          cache[("source", arch)], spec, config.protocol, cache.setdefault("data", {}),
          cache["setups"], {a.name: a.options for a in plan.arms if a.options},
          source_label=config.source.spec, quiet=config.output.quiet)
    return cache[("runs", spec)]
  return hook


def check_data(input_shape: Callable) -> Callable:
  """The `Study.check_data` hook: loads every target (at `input_shape(config)`, the source's
  input, read without loading the source) and checks the largest k against each class."""
  def hook(config, cache: dict) -> None:
    shape = stored_shape(config.protocol, input_shape(config))
    for spec in config.cells.targets:
      train = load_target(spec, shape, config.protocol, cache.setdefault("data", {})).train
      sample_kshot(train.labels, max(config.cells.shots), 0, num_classes=train.num_classes)
  return hook


def plot_accuracy(summary: dict, plan, folder: str, name: str = "accuracy_vs_shots.png"
                  ) -> None:
  """Accuracy vs k per (arch, target): the tuned figure when there is one, else best over LR."""
  summary = summary.get("tuned") or summary.get("best_over_lr") or summary
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  c = plan.config.cells
  archs, targets, shots = c.archs, c.targets, list(c.shots)
  fig, axes = plt.subplots(len(archs), len(targets), figsize=(4.5 * len(targets),
                                                            3.5 * len(archs)), squeeze=False)
  for i, arch in enumerate(archs):
    for j, target in enumerate(targets):
      ax = axes[i][j]
      for arm in c.arms:
        pts = [(k, summary.get(f"{arch}|{target}|{arm}|{k}")) for k in shots]
        pts = [(k, v) for k, v in pts if v]
        if pts:
          m, sd = ("mean", "std") if "mean" in pts[0][1] else ("test_mean", "test_std")
          ax.errorbar([k for k, _ in pts], [100 * v[m] for _, v in pts],
                      yerr=[100 * v[sd] for _, v in pts], marker="o", capsize=3, label=arm)
      ax.set_title(f"{arch} -> {target}", fontsize=9)
      ax.set_xlabel("images per class (k)")
      ax.set_ylabel("test accuracy (%)")
      ax.set_xscale("log")
      ax.set_xticks(shots, [str(k) for k in shots])
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(folder, name), dpi=110)
  plt.close(fig)


def arms_with(names: Sequence[str], labels: dict) -> tuple:
  """Declared strategy arms with display names (`Arm(name, label)`), in order."""
  from jtransfer.study.declare import Arm
  return tuple(Arm(n, labels.get(n, "")) for n in names)
