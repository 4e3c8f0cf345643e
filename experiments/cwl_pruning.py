"""Table IV and Fig. 3 of the CWL paper: prune a CWL-transferred model by its scales.

  python -m experiments.cwl_pruning --out results/cwl_pruning

Per k-shot draw (`--repeats`; the study runner's draw seeds, so the draws match cwl_tables'
at the same k and --seed) of the target with `--val-per-class` validation images disjoint
from the k-shot set and from test: transfers the source with Freeze+CWL (`--strategy
finetune_cwl` for Finetune+CWL) until the validation accuracy has not improved for
`--patience` steps (at most `--steps`; best validation state kept), then for each tau removes
every conv channel with |sigma| < tau (`prune.prune_by_sigma`: scales folded into the weights;
ResNet stage channels go only when all coupled units are below tau) and reports, as Table IV:
test accuracy before finetuning and after 1 and 30 epochs of finetuning on the k-shot set (the
paper's rows, `--ft-epochs`; all layers, Adam, BN in eval mode), % params and % feature maps
kept, and the forward latency (jitted, median of `--latency-runs`) of draw 0's pruned and
unpruned models, timed together round-robin (a load change on a shared machine hits them
alike). The finetuning LR is chosen per draw, tau and epoch count on that draw's validation
set from `--ft-lrs` (extended at an edge, `--tune-extend`); the test split reaches no choice.
The unpruned model is finetuned the same way, as a control. Claims (paired by draw, per tau
and epoch count; an interval needs >= 2 draws): pruned and finetuned >= unpruned within 1
point (Table IV's reading), and >= the unpruned model finetuned alike (the control).

Writes results.jsonl, results.json (version-2 records: arm 'unpruned' or 'pruned', the cell
its tau, the dose axis), report.md, summary.json, compression_per_layer.png (Fig. 3: % filters
removed per conv layer, draw 0, one bar per tau), sigma_hist.png (drawn when draw 0 transfers)
and draw 0's pruned models under models/tau_<tau> (`transfer.load_source` reads them). Flags,
output folder, resume and publishing are the study runner's (`jtransfer.study`); pruning,
finetuning and timing are `jtransfer.methods.prune_finetune`'s.

A reduced run (2 draws, 4 thresholds, 200 test images per class):

  python -m experiments.cwl_pruning --repeats 2 --taus 0.4,0.8,1.0,1.2 --test-per-class 200 \
      --out results/cwl_pruning_reduced

The paper (VGG-16 ImageNet -> Kvasir, 50 shots) keeps 0.905 accuracy down to tau=0.2 with 95%
of the params, and loses accuracy from tau=0.8 on, most of which 1 epoch of finetuning
recovers. Latencies are only meaningful on an otherwise idle machine.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import types
from collections import defaultdict
from typing import Optional, Sequence

import jax
import numpy as np

from jtransfer import models, sources, study, surgery
from jtransfer.study.tables import TIMED_AFTER_RESUME, TIMED_TOGETHER, timing_text
from jtransfer.data import Batches, load_spec, parse_spec, sample_kshot
from jtransfer.errors import InputError
from jtransfer.methods import cwl, prune, prune_finetune, transfer
from jtransfer.protocol import Budget, claims, progress
from jtransfer.protocol.run import train_run
from jtransfer.study import publish
from jtransfer.study import records as rec
from jtransfer.study.config import at_least
from jtransfer.study.draws import Draw, draw_seed
from jtransfer.study.tables import float_list, mean_std, positive_floats
from jtransfer.study.target import cap_per_class
from jtransfer.train import accuracy, init_state, make_train_step, predict_logits

CWL_STRATEGIES = ("freeze_cwl", "finetune_cwl", "finetune_lowconv")
DEFAULT_LR = types.MappingProxyType({"freeze_cwl": 1e-2, "finetune_cwl": 1e-4,
                                     "finetune_lowconv": 1e-2})
CELL = ("tau",)  # the dose axis: None for the unpruned model
CLAIMS = (
    claims.Claim("CWL", "pruning by |sigma| keeps accuracy after finetuning", "pruned_ft",
                 "unpruned", at_least=True, margin=0.01, source="Table IV, Fig. 3"),
    claims.Claim("CWL", "pruning by |sigma| keeps accuracy after finetuning, against the "
                 "unpruned model finetuned alike (a control the paper does not report)",
                 "pruned_ft", "unpruned_ft", at_least=True, margin=0.01, source="Table IV"),
)
LABELS = types.MappingProxyType({"pruned_ft": "pruned + finetuned", "unpruned": "unpruned",
                                 "unpruned_ft": "unpruned + finetuned"})


def _at_least_1(flag: str):
  return lambda text: float_list(text, flag, lambda v: v >= 1, "values must be finite and >= 1")


def _int(name: str, default: int, lo: int, help: str):
  """An int flag >= lo."""
  return study.flag(name, default, help, check=at_least(lo, name))


def _lr(text: str) -> float:
  values = positive_floats(text, "--lr")
  if len(values) != 1:
    raise InputError(f"--lr {text!r}: expected one learning rate")
  return values[0]


@dataclasses.dataclass(frozen=True)
class Knobs:
  """The module's flags (the runner adds --source, --source-epochs and the output flags)."""
  arch: str = study.flag("--arch", "vgg_s", "architecture", choices=models.names())
  target: str = study.flag("--target", "fmnist:1,5,7,8,9", "target dataset spec")
  shots: int = _int("--shots", 10, 1, "k-shot training images per class")
  repeats: int = _int("--repeats", 3, 1, "k-shot draws (the claims pair pruned and unpruned "
                      "by draw; an interval needs >= 2)")
  val_per_class: int = _int("--val-per-class", 20, 0, "validation images per class, disjoint "
                            "from the k-shot set and test")
  strategy: str = study.flag("--strategy", "freeze_cwl", "the CWL transfer",
                             choices=CWL_STRATEGIES)
  lr: Optional[float] = study.flag("--lr", None, "transfer learning rate (default: 1e-2 "
                                   "freeze_cwl, 1e-4 finetune_cwl)", parse=_lr)
  steps: int = _int("--steps", 500, 1, "step cap of the transfer (with --patience 0: the "
                    "exact number of steps)")
  patience: int = _int("--patience", 100, 0, "stop the transfer once its validation accuracy "
                       "has not improved for this many steps and keep its best validation "
                       "state; 0 = train to the cap")
  eval_every: int = _int("--eval-every", 10, 1, "steps between validation evaluations")
  batch_size: int = _int("--batch-size", 64, 1, "images per step")
  taus: tuple[float, ...] = study.flag(
      "--taus", (0.2, 0.4, 0.6, 0.8, 1.0, 1.2), "comma list of |sigma| thresholds",
      cli="0.2,0.4,0.6,0.8,1.0,1.2", parse=lambda t: tuple(sorted(set(float_list(
          t, "--taus", lambda v: v >= 0, "values must be finite and >= 0")))))
  multiple: int = study.flag("--multiple", 1, "round kept channel counts up to a multiple of "
                             "this, by |sigma| (8 makes pruned models faster on CPU; 1 = the "
                             "paper's threshold rule)")
  residual: str = study.flag("--residual", "group", "ResNet stage channels: prune as one "
                             "group, or keep them", choices=prune.RESIDUAL_MODES)
  ft_epochs: tuple[int, ...] = study.flag(
      "--ft-epochs", (1, 30), "finetuning epochs at which to evaluate (the paper: 1 and 30)",
      cli="1,30", parse=lambda t: tuple(sorted({int(e) for e in _at_least_1("--ft-epochs")(t)})))
  ft_lrs: tuple[float, ...] = study.flag(
      "--ft-lrs", (1e-5, 1e-4, 1e-3), "finetuning learning rates (Adam), comma list; chosen "
      "per draw, tau and epoch count on the draw's validation set", cli="1e-5,1e-4,1e-3",
      parse=lambda t: tuple(sorted(set(positive_floats(t, "--ft-lrs")))))
  tune_extend: int = _int("--tune-extend", 1, 0, "when a chosen LR is the first or last of its "
                          "grid, extend that grid by up to this many values on that side")
  test_per_class: int = _int("--test-per-class", 300, 0, "0 = all")
  latency_runs: int = _int("--latency-runs", 20, 1, "timed forwards per model")
  latency_batches: tuple[int, ...] = study.flag(
      "--latency-batches", (1, 128), "batch sizes timed", cli="1,128",
      parse=lambda t: tuple(int(b) for b in _at_least_1("--latency-batches")(t)))
  no_save_models: bool = study.flag("--no-save-models", False, "do not save draw 0's pruned "
                                    "models", action="store_true")
  data_dir: Optional[str] = study.flag("--data-dir", None, "TFDS data_dir or the "
                                       "Fashion-MNIST IDX directory")
  seed: int = study.flag("--seed", 0, "seeds the draws, the source's pretraining and the runs")

  @property
  def transfer_lr(self) -> float:
    """--lr, or the strategy's default."""
    return self.lr if self.lr is not None else DEFAULT_LR[self.strategy]


def check(config) -> None:
  """The flags' rules across fields, before anything is loaded."""
  k = config.extra
  parse_spec(k.target, flag="--target")
  if not config.source.spec.startswith("ckpt:"):
    parse_spec(config.source.spec, flag="--source")
  if not k.transfer_lr > 0:
    raise InputError("--lr must be > 0")
  if not k.val_per_class and (k.patience or len(k.ft_lrs) > 1):
    raise InputError("early stopping (--patience) and choosing the finetuning LR (several "
                     "--ft-lrs) need validation images: set --val-per-class >= 1")


def rows(records) -> list[dict]:
  """Report rows of records of either version: 'tau' (None: unpruned), 'repeat' and what the
  run measured."""
  return rec.rows(records, CELL)


# ----------------------------------------------------------------------------- runs
def draw_splits(data, k: Knobs, repeat: int) -> tuple[int, prune_finetune.Splits]:
  """(seed, splits) of k-shot draw `repeat` (the seeds of the study runner's draws, so the
  draws match cwl_tables' at the same k and --seed)."""
  seed = draw_seed(k.seed, k.shots, repeat)
  train_idx, val_idx = sample_kshot(data.train.labels, k.shots, seed,
                                    val_per_class=k.val_per_class,
                                    num_classes=data.train.num_classes)
  return seed, prune_finetune.Splits(data.train.take(train_idx),
                                     data.train.take(val_idx) if len(val_idx) else None,
                                     cap_per_class(data.test, k.test_per_class))


def transfer_cwl(setup, step, splits, seed: int, k: Knobs, on_step=None):
  """Trains the CWL strategy on one draw under the run budget (`protocol.train_run`): (params
  with 'cwl', batch stats, info {'steps', 'best_step', 'stopped'})."""
  train, val = splits.train, splits.val
  params, stats = setup.init(seed, train.images, train.labels)
  out = train_run(init_state(params, stats, setup.optimizer, seed, k.transfer_lr), step,
                  Batches(train.images, train.labels, k.batch_size, seed).at, steps=k.steps,
                  budget=Budget.from_flags(k.steps, k.eval_every, k.patience),
                  val_acc=None if val is None else lambda st: accuracy(predict_logits(
                      setup.forward, st.params, st.batch_stats, val.images), val.labels),
                  on_step=on_step)
  info = {key: v for key, v in out.info.items() if key != "curve"}
  return (jax.tree.map(np.asarray, out.state.params),
          jax.tree.map(np.asarray, out.state.batch_stats), info)


def run(_, config, results) -> list[dict]:
  """Every draw, unpruned and at each tau, into `results`; returns all records."""
  k, quiet = config.extra, config.output.quiet
  done = {(r["tau"], r["repeat"]) for r in rows(results.records)}
  emit = None if quiet else (lambda line: print(line, file=sys.stderr, flush=True))
  source = sources.source_for(k.arch, config.source.spec, epochs=config.source.epochs,
                               seed=k.seed, progress=not quiet)
  data = load_spec(k.target, source.input_shape, flag="--target", data_dir=k.data_dir)
  setup = transfer.get_strategy(k.strategy).build(source, data.train.num_classes, k.steps)
  step = make_train_step(setup.loss_fn, setup.optimizer)
  finetuner = prune_finetune.Finetuner(source, k.batch_size)
  base = models.model_config(transfer.target_model(source, data.train.num_classes))
  grid = progress.GridProgress(
      progress.plan_counts({"unpruned runs (draws)": k.repeats,
                            "pruned runs (taus x draws)": k.repeats * len(k.taus)}),
      saved=sum((tau, r) in done for r in range(k.repeats) for tau in (None, *k.taus)),
      emit=emit)
  grid.announce("cwl_pruning")
  for repeat in range(k.repeats):
    todo = [t for t in (None, *k.taus) if (t, repeat) not in done]
    if not todo and repeat > 0:  # draw 0 always transfers: its scales make sigma_hist.png
      continue
    seed, splits = draw_splits(data, k, repeat)
    draw, t0, pending = Draw("eval", repeat), time.time(), []
    params, stats, info = transfer_cwl(setup, step, splits, seed, k, progress.ticker(
        f"draw {repeat} {k.strategy} transfer", emit))
    if emit:
      emit(f"[cwl_pruning] draw {repeat}: {k.strategy} transfer, {info['steps']} steps "
           f"({info['stopped']}) in {time.time() - t0:.1f} s")
    scales, rest = cwl.split_cwl(params)
    if repeat == 0 and results.writer:
      plot_sigma(scales, os.path.join(results.path, "sigma_hist.png"))
    folded = jax.tree.map(np.asarray, cwl.apply_cwl(rest, scales))
    for tau in todo:
      t1 = time.time()
      if tau is None:
        cfg, p, st, extra = base, folded, stats, dict(
            transfer=dict(info, lr=k.transfer_lr),
            feature_maps=int(sum(np.size(s) for s in scales.values())))
      else:
        res = prune.prune_by_sigma(rest, stats, base, scales, tau, k.residual, k.multiple)
        cfg, p, st, extra = res.config, res.params, res.batch_stats, dict(config=res.config)
      outcome = dict(prune_finetune.measure(finetuner, cfg, p, st, splits, seed, k.ft_epochs,
                                            k.ft_lrs, k.tune_extend),
                     **(dict(params=surgery.count(rest)) if tau is None
                        else prune_finetune.removed(res)))
      if tau is not None and repeat == 0 and not k.no_save_models:
        prune_finetune.save_pruned(
            os.path.join(results.path, "models", f"tau_{tau:g}"), source, res,
            dict(tau=tau, strategy=k.strategy, target=k.target, shots=k.shots,
                 test_acc=outcome["acc"], kept=outcome["kept"]))
      record = rec.make("unpruned" if tau is None else "pruned", {"tau": tau}, draw, {},
                        outcome, time.time() - t1, dict(extra, seed=seed))
      if repeat == 0:
        pending.append((record, finetuner.compiled(cfg, p)[0], p, st))
      else:
        results.add(record)
      ft = {e: (v["lr"], round(v["test_acc"], 4)) for e, v in outcome["ft"].items()}
      grid.finished(f"draw {repeat} " + ("unpruned" if tau is None else f"tau={tau:g}") +
                    f": acc {outcome['acc']:.4f} ft {ft}")
    if pending:  # draw 0's models, timed together so load changes hit them alike
      timing = TIMED_AFTER_RESUME if len(todo) < len(k.taus) + 1 else TIMED_TOGETHER
      times = prune_finetune.latencies([n[1:] for n in pending], source, k.latency_batches,
                                       k.latency_runs)
      for (record, *_), t in zip(pending, times):
        record["outcome"].update(latency_ms=t, latency_timing=timing)
      results.add_many([r for r, *_ in pending])
  return results.records


# ----------------------------------------------------------------------------- report
def _ms(values, digits: int = 3) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  m, s = mean_std(values)
  return f"{m:.{digits}f}" + (f" ({s:.{digits}f})" if len(values) > 1 else "")


def claim_results(records: list[dict]) -> list[dict]:
  """The CLAIMS per tau and epoch count and pooled, on report rows (`rows`)."""
  recs = prune_finetune.claim_rows(records)
  # Every tau and epoch count of a draw prunes the same transferred model: one draw, pooled once.
  out = [claims.evaluate(c, recs, ("tau", "epochs"), arm_field="arm", draw_fields=("repeat",))
         for c in CLAIMS]
  return [r for r in out if r["cells"]]


def make_report(plan, records: list[dict], folder: str = "") -> tuple[str, dict]:
  """report.md and summary.json ({'claims'}) from the records alone (either version) and the
  plan's config."""
  config, opts = plan.config, plan.config.extra
  records = rows(records)
  bases = [r for r in records if r["tau"] is None]
  base0 = next((r for r in bases if r.get("repeat", 0) == 0), None)
  by_tau = defaultdict(list)
  for r in records:
    if r["tau"] is not None:
      by_tau[r["tau"]].append(r)
  e = opts.ft_epochs
  reps = sorted({r.get("repeat", 0) for r in records})
  head = ["τ", "Acc."] + [f"FT@{k}" for k in e] + ["#Param", "#Feat"] + \
      [f"latency b={b} (ms)" for b in opts.latency_batches]
  budget = (f"until its validation accuracy has not improved for {opts.patience} steps "
            f"(checked every {opts.eval_every}, at most {opts.steps}; best validation state "
            "kept)") if opts.patience else f"{opts.steps} steps"
  steps = [b["transfer"]["steps"] for b in bases if "transfer" in b]
  lines = ["# CWL pruning (Table IV)", "",
           f"{opts.arch} from `{config.source.spec}` -> `{opts.target}`, k={opts.shots}, "
           f"{len(reps)} k-shot draw(s) (repeats {reps}), validation {opts.val_per_class}/class "
           "disjoint from the k-shot set and from test, test "
           f"{'all' if not opts.test_per_class else f'<= {opts.test_per_class}/class'}. "
           f"Transfer: {opts.strategy} (lr {opts.transfer_lr:g}, fixed) {budget}"
           + (f"; {np.mean(steps):.0f} steps on average" if steps else "") +
           f". Pruning: residual={opts.residual}, multiple={opts.multiple}. Finetuning: all "
           "layers, Adam, epochs of the k-shot set (the paper's rows); LR chosen per draw, tau "
           "and epoch count on the draw's validation set from {"
           + ", ".join(f"{v:g}" for v in opts.ft_lrs) +
           f"}} (extended up to {opts.tune_extend} value(s) at an edge); the test split reaches "
           "no choice.", "",
           "Cells: mean (std) test accuracy over draws. The unpruned row's FT columns are the "
           "unpruned model finetuned alike (a control; the paper leaves them empty). Latency: "
           f"draw 0's models, jitted forward, median of {opts.latency_runs} runs"
           + timing_text(records, ", all timed together round-robin")
           + ", pruned (unpruned in brackets).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lat0 = (base0 or {}).get("latency_ms", {})
  if bases:
    ft = [_ms([b.get("ft", {}).get(str(k), {}).get("test_acc") for b in bases]) for k in e]
    lat = [f"{lat0[str(b)]:.2f}" if str(b) in lat0 else "-" for b in opts.latency_batches]
    lines.append("| - | " + f"{_ms([b['acc'] for b in bases])} | " + " | ".join(ft) +
                 " | 100% | 100% | " + " | ".join(lat) + " |")
  for tau in sorted(by_tau):
    rs = by_tau[tau]
    ft = [_ms([r["ft"].get(str(k), {}).get("test_acc") for r in rs]) for k in e]
    r0 = next((r for r in rs if r.get("repeat", 0) == 0), {})
    lat = []
    for b in opts.latency_batches:
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
  return "\n".join(lines), dict(claims=results)


def plot_compression(records: list[dict], path: str) -> None:
  """Fig. 3: % filters removed per conv layer, draw 0, one bar per tau."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows0 = sorted((r for r in records if r["tau"] is not None and r.get("repeat", 0) == 0),
                 key=lambda r: r["tau"])
  if not rows0:
    return
  units = list(rows0[0]["kept"])
  fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(units) * max(1, len(rows0)) / 2), 3.8))
  width = 0.8 / len(rows0)
  for i, r in enumerate(rows0):
    removed = [100 * (1 - r["kept"][u][0] / r["kept"][u][1]) for u in units]
    ax.bar(np.arange(len(units)) + i * width - 0.4 + width / 2, removed, width,
           label=f"τ={r['tau']:g}")
  ax.set_xticks(range(len(units)), units, rotation=60, ha="right", fontsize=7)
  ax.set_ylabel("filters removed (%)")
  ax.set_ylim(0, 100)
  ax.set_title("compression rate per conv layer")
  ax.legend(fontsize=7, ncol=min(len(rows0), 6))
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_sigma(scales: dict, path: str) -> None:
  """The histogram of |sigma| over every conv unit's channels."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.2))
  ax.hist(np.abs(np.concatenate([np.ravel(s) for s in scales.values()])), bins=50)
  ax.set_xlabel("|sigma| (all conv units)")
  ax.set_ylabel("channels")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


STUDY = study.Study(
    module="experiments.cwl_pruning", title="# CWL pruning (Table IV)", cell_fields=CELL,
    extra=Knobs, groups=("source", "output"), hidden=frozenset({"shard"}),
    defaults={"out": "results/cwl_pruning"}, check=check, run=run, report=make_report,
    # --repeats may grow on --resume: draw r's seed is draw_seed(seed, k, r), tuned on its own
    # validation split, so the first draws of a bigger grid are the smaller grid's
    grows=frozenset({"repeats"}),
    plots=lambda summary, plan, folder: plot_compression(
        rows(publish.jsonl_records(folder)), os.path.join(folder, "compression_per_layer.png")),
    doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
