"""What DELTA's Table 1 and Figs. 2 and 3 need beyond the strategies: alpha grids, the settings
a run depends on, learning curves and filter distances per stage.

* `parse_alphas` / `alpha_knobs`: an alpha list as given by a user becomes the knob grid and
  default of a strategy (one value fixes alpha, so nothing is tuned; several are the grid the
  protocol tunes over, by cross-validation for DELTA's family, `delta.CV_FOLDS`).
* `parse_taps` / `settings_of`: the tapped conv units per arch, and the `delta.Config` fields a
  recorded run depends on besides its learning rate and alpha (a resume must match them).
* `learning_curve`: one fixed-length run with its training CE at every step and test accuracy
  every few steps (Fig. 2); `stage_filter_distances`: every conv filter's L2 distance from its
  starting point, grouped by stage and sorted (Fig. 3); `plot_curves`, `plot_distances` draw
  the two figures.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from jtransfer import surgery
from jtransfer.data import Batches
from jtransfer.data.base import ImageSet
from jtransfer.errors import InputError
from jtransfer.methods import delta, transfer
from jtransfer.train import accuracy, init_state, predict_logits


def parse_alphas(text: Optional[str], flag: str, positive: bool = False
                 ) -> Optional[tuple[float, ...]]:
  """A comma list of distinct alphas >= 0 (> 0 with `positive`, e.g. learning rates), sorted;
  None when `text` is None.

  Raises:
    InputError: an empty list, a value that is not a finite number >= 0 (> 0), or a repeat.
  """
  if text is None:
    return None
  try:
    values = [float(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or any(not (math.isfinite(v) and (v > 0 or v == 0 and not positive))
                        for v in values) or len(set(values)) != len(values):
    raise InputError(f"{flag} {text!r}: expected distinct numbers {'>' if positive else '>='} "
                     "0, e.g. 0.01 or 0.001,0.01,0.1")
  return tuple(sorted(values))


def alpha_knobs(strategy: transfer.Strategy, grid: Sequence[float]) -> tuple[dict, dict]:
  """(knob grids, knob defaults) of `strategy` with its alpha grid replaced by `grid`: one
  value is also the default (the paper-grid rows use it), several keep the strategy's own."""
  default = grid[0] if len(grid) == 1 else strategy.knob_defaults["alpha"]
  return ({**strategy.knobs, "alpha": tuple(grid)},
          {**strategy.knob_defaults, "alpha": default})


def parse_taps(values: Optional[Sequence[str]]) -> dict[str, tuple[str, ...]]:
  """{arch: tapped conv units} from 'ARCH=UNIT,UNIT' strings (`delta.Config.taps`)."""
  taps = {}
  for value in values or ():
    arch, sep, units = value.partition("=")
    names = tuple(u.strip() for u in units.split(",") if u.strip())
    if not sep or not arch.strip() or not names:
      raise InputError(f"--taps {value!r}: expected ARCH=UNIT[,UNIT...], e.g. "
                       "resnet_s=stage2/block1/conv2,stage3/block1/conv2")
    taps[arch.strip()] = names
  return taps


def settings_of(config: delta.Config) -> dict:
  """The DELTA settings a record depends on besides its key (lr and alpha are in the key)."""
  return dict(beta=config.beta, schedule=config.schedule, att_bn=config.att_bn,
              weight_decay=config.weight_decay, bn_train=config.bn_train,
              taps={k: list(v) for k, v in sorted(config.taps.items())})


def with_schedule(config: delta.Config, schedule: str) -> delta.Config:
  """`config` with another lr schedule (Fig. 2 runs each schedule), validated."""
  return dataclasses.replace(config, schedule=schedule).validate()


def stage_of(unit: str) -> str:
  """'stage2/block0/conv1' -> 'stage2'; VGG 'conv3_1' -> 'stage3'; 'stem' -> 'stem'."""
  m = re.fullmatch(r"conv(\d+)_\d+", unit)
  return f"stage{m.group(1)}" if m else unit.split("/")[0]


def stage_filter_distances(params, start) -> dict[str, list[float]]:
  """Per stage, the L2 distance of every conv filter (output channel) from `start`, sorted
  down (`surgery.filter_distances` per unit, pooled by `stage_of`)."""
  out: dict[str, list[float]] = {}
  for unit, d in surgery.filter_distances(params, start).items():
    out.setdefault(stage_of(unit), []).extend(np.asarray(d).tolist())
  return {s: sorted(v, reverse=True) for s, v in out.items()}


def learning_curve(setup, step: Callable, optimizer, train: ImageSet, test: ImageSet,
                   seed: int, lr: float, steps: int, every: int, batch_size: int
                   ) -> tuple[dict, dict]:
  """One run of exactly `steps` steps (no early stopping: a learning curve).

  Args:
    setup: the strategy's Setup (its init and eval forward).
    step, optimizer: its compiled train step and the optimizer that step updates.
    train, test: the k-shot training set and the test set.
    seed, lr: the run's seed (init and batches) and learning rate.
    every: test accuracy every `every` steps and at the last.

  Returns:
    ({'step', 'ce', 'loss' per step; 'eval_step', 'test_acc'; 'failed_at' if a step was not
    finite (the curve stops there)}, the final params).
  """
  params, stats = setup.init(seed, train.images, train.labels)
  batches = Batches(train.images, train.labels, batch_size, seed)
  state = init_state(params, stats, optimizer, seed, lr)
  curve = dict(step=[], ce=[], loss=[], eval_step=[], test_acc=[])
  for t in range(steps):
    state, m = step(state, batches.at(t))
    if not bool(m["finite"]):
      curve["failed_at"] = t
      break
    curve["step"].append(t + 1)
    curve["ce"].append(float(m["ce"]))
    curve["loss"].append(float(m["loss"]))
    if (t + 1) % every == 0 or t + 1 == steps:
      logits = predict_logits(setup.forward, state.params, state.batch_stats, test.images)
      curve["eval_step"].append(t + 1)
      curve["test_acc"].append(accuracy(logits, test.labels))
  return curve, state.params


def curve_knob_origin(strategy: transfer.Strategy, tuned_hp: Optional[str]) -> dict:
  """The knob values a Fig. 2 run of `strategy` uses and where they come from: 'fixed' (every
  knob grid one value), 'tuned' (`tuned_hp`, the table's choice for the curves' cell), else
  'paper' (`Strategy.knob_defaults`)."""
  if all(len(v) == 1 for v in strategy.knobs.values()):
    return dict(hp=transfer.hp_string({k: v[0] for k, v in strategy.knobs.items()}),
                origin="fixed")
  if tuned_hp is not None:
    return dict(hp=tuned_hp, origin="tuned")
  return dict(hp=transfer.hp_string(strategy.knob_defaults), origin="paper")


def plot_curves(curves: dict, path: str, labels: Mapping[str, str]) -> None:
  """Fig. 2 (learning_curves.png): training CE and test accuracy vs iteration per schedule,
  one line per strategy of `curves` ('curves' {'schedule|strategy': `learning_curve`'s
  dict}, 'config' {'schedules', 'arch', 'target', 'shots', 'lr'}); `labels` names them."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  schedules = curves["config"]["schedules"]
  fig, axes = plt.subplots(2, len(schedules), figsize=(5 * len(schedules), 6.5), squeeze=False)
  names = {"step": "StepLR", "exp": "ExponentialLR"}
  for j, schedule in enumerate(schedules):
    for name in dict.fromkeys(k.split("|")[1] for k in curves["curves"]):
      cv = curves["curves"].get(f"{schedule}|{name}")
      if not cv:
        continue
      axes[0][j].plot(cv["step"], cv["ce"], label=labels.get(name, name), lw=1)
      axes[1][j].plot(cv["eval_step"], [100 * a for a in cv["test_acc"]], marker="o", ms=3,
                      label=labels.get(name, name))
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


def plot_distances(distances: dict, path: str, labels: Mapping[str, str]) -> None:
  """Fig. 3 (filter_distance.png): per stage, each strategy's filter distances
  (`stage_filter_distances`), sorted, log scale; `labels` names them."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  stages = list(next(iter(distances.values())))
  fig, axes = plt.subplots(1, len(stages), figsize=(3.2 * len(stages), 3), squeeze=False)
  for ax, stage in zip(axes[0], stages):
    for name in distances:
      d = distances[name][stage]
      ax.plot(np.arange(len(d)), d, label=labels.get(name, name))
    ax.set_title(stage, fontsize=9)
    ax.set_xlabel("filters, sorted")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("||w - w0|| per filter")
  axes[0][0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def curve_lines(curves: dict, titles: Mapping[str, str], strategies: Sequence[str]) -> list[str]:
  """The report's Fig. 2 table (final training CE and test accuracy per schedule and
  strategy) and Fig. 3 table (median filter distance per stage), from curves.json."""
  c = curves["config"]
  lines = ["## Fig. 2: learning curves (learning_curves.png)", "",
           f"{c['arch']} -> {c['target']}, k={c['shots']}, {c['steps']} iterations (fixed), "
           f"lr {c['lr']:g}; "
           + "; ".join(f"{titles[n]} {c['knobs'][n]['hp'] or 'no knobs'} "
                       f"({c['knobs'][n]['origin']})"
                       for n in strategies if n in c.get("knobs", {})) + ".", "",
           "| schedule | strategy | final train CE | final test acc (%) |",
           "|---|---|---|---|"]
  for key in (f"{s}|{n}" for s in c["schedules"] for n in strategies):
    cv = curves["curves"].get(key)
    if cv is None:
      continue
    schedule, name = key.split("|")
    ce = f"{cv['ce'][-1]:.4f}" if cv["ce"] else "-"
    acc = f"{100 * cv['test_acc'][-1]:.1f}" if cv["test_acc"] else "-"
    lines.append(f"| {schedule} | {titles[name]} | {ce} | {acc} |")
  lines.append("")
  d = curves["distances"]
  if all(n in d for n in strategies):
    lines += ["## Fig. 3: filter distance from the starting point (filter_distance.png)", "",
              "| stage | filters | median L2-SP | median DELTA | DELTA farther at the same rank |",
              "|---|---|---|---|---|"]
    for stage in d["l2sp"]:
      a, b = np.asarray(d["l2sp"][stage]), np.asarray(d["delta"][stage])
      lines.append(f"| {stage} | {len(a)} | {np.median(a):.4f} | {np.median(b):.4f} | "
                   f"{np.mean(b > a):.0%} |")
    lines.append("")
  return lines
