"""Truncate fine-tuning (base-model-selection-metrics, App. A.2, Figs. 4 and 5).

  python -m experiments.truncation --arch resnet_s --out results/truncation

For one source model and each truncation point l (resnet: 'stem', 'stage1/block0', ...,
'stage3/block1'; vgg: every conv unit; a ViT, e.g. vit_s28: 'block0', ..., each block, the
final norm then applied to the cut block's tokens and the CLS token (the model's `pool`) fed
to the head, as DINOv2's probes of intermediate layers; Swin is not truncatable), the network is cut after l, global average pooling and
a new head are put on the cut map (config `truncate_after`; source params the truncated model
lacks are dropped by `transfer.init_target`'s restrict_to), and the truncated model is
fine-tuned on each target. Before fine-tuning, S1..S6 are computed on the map at the cut (the
truncated model's 'last_conv' tap, after ReLU: the cut conv layer's own output, before any
pooling; a ViT's normed patch tokens on their grid) and LogME / H-score on its pooled features (the truncated target's head input), from
the same labelled training images. LogME is the authors' published variant by default
(`--logme`, see selection.logme), as in experiments.model_selection.

S6's sign is an open reading: the paper's text (sec. 3.6) says smaller S6 is better, its App.
A.2 (Fig. 5, this experiment) reports rho > 0.7 between raw S6 and truncate-fine-tune
accuracy, i.e. larger is better. The report gives S6 under both signs (rows 'S6' and
selection.S6_APPENDIX) and the point each sign picks (smallest / largest S6).

Writes results.jsonl (one version-2 record per finished (target, point): arm = the point,
cell = the target; --resume skips them), results.json, summary.json, report.md (accuracy per
point, Spearman per target between every metric and the truncate-fine-tune accuracy over the
points, the point S6 picks), truncation_accuracy.png (Fig. 4) and truncation_spearman.png
(Fig. 5). The published folders hold version-1 records (flat, with 'point'); `rows` reads
both the same.

The claims' draws are the targets (each target's points are fine-tuned and scored on their own,
seeded by --seed, not by the target's place in the list), so `--resume` may grow the
`--target` list to a superset: the finished targets keep their runs and only the new ones run.

The source: `--source ckpt:PATH` (e.g. a zoo model, .cache/zoo/resnet_s-c0_2_3_4_6-f100) or a
dataset spec, pretrained once and cached by experiments.pretrain (default: the embedded
Fashion-MNIST {0,2,3,4,6} source). Fine-tuning: SGD with the paper's step decay, BN
statistics frozen, under the protocol (docs/protocol.md): each run stops once its accuracy
on `--val-per-class` validation images (disjoint from the training draw and from test) has not
improved for `--patience` steps, at most `--steps`, keeping its best validation state, and the
LR is chosen per (target, point) from `--ft-lrs` by validation accuracy (`--tune-extend 1`
grows the grid past a winning edge: the session-9 runs chose an edge LR at 8 of vgg_s's 12
points; the default 0 keeps the published commands' meaning). Since session 9: with
model_selection's fixed 100 steps at lr 0.01 a vgg_s cut did not train (digits 8-21% at every
point, 10 classes), so the ranking measured the budget, not the points. `--val-per-class 0`
restores the fixed schedule (`--steps` at `--ft-lr`).

The module declares the study (`jtransfer.study`, its own run loop as
experiments.model_selection's): the flags are `jtransfer.zoo.flags`' `FineTuneFlags` and
`--logme` of `ScoreFlags` plus the source and the points (`TruncationFlags`), the ground truth
`jtransfer.zoo.ground_truth`, the scores `jtransfer.scoring.score_outputs`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Sequence

import numpy as np

from experiments.model_zoo import log_of
from jtransfer import models, sources, study
from jtransfer.data import parse_spec
from jtransfer.errors import InputError, NonFiniteError
from jtransfer.methods import selection, transfer
from jtransfer.protocol import claims, progress
from jtransfer.scoring import SCORE_SETTINGS, model_outputs, score_outputs
from jtransfer.study import records as rec
from jtransfer.study.config import flag, target_list
from jtransfer.study.draws import Draw
from jtransfer.zoo import ground_truth as gt
from jtransfer.zoo.analysis import rank_summary
from jtransfer.zoo.flags import FineTuneFlags, ScoreFlags
from jtransfer.zoo.sections import runs_table, scorer_table
from jtransfer.zoo.targets import TargetTask, load_target
from jtransfer.zoo.training import Compiled, prenormalize

DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")
SCORES = selection.METRIC_NAMES + ("LogME", "H-score")
# S6 sign -> (its report name, which point it picks): the text's smallest, App. A.2's largest.
S6_PICKS = {"text": ("S6", min), "appendix": (selection.S6_APPENDIX, max)}
OUTCOME = ("test_acc", "val_acc", "steps", "best_step", "stopped", "lr_val", "edges")
# --logme, the one score reading truncation has (no map tap: S1..S6 read the cut map itself).
_LOGME = {f.name: f for f in dataclasses.fields(ScoreFlags)}["logme"]


@dataclasses.dataclass(frozen=True)
class TruncationFlags(FineTuneFlags):
  """truncation's flags: the ground truth's (`FineTuneFlags`), --logme, the source, the
  points and the targets."""
  arch: str = flag("--arch", "resnet_s", "architecture of the source", choices=models.names())
  source: str = flag("--source", sources.DEFAULT_SOURCE, "ckpt:PATH, or a dataset spec to "
                     "pretrain on (cached)")
  source_epochs: float = flag("--source-epochs", 2.0, "pretraining epochs of a dataset-spec "
                              "source")
  points: str = flag("--points", "all", "comma list of truncation points, or 'all'")
  targets: tuple = flag("--target", DEFAULT_TARGETS, "target dataset spec; repeat the flag (or "
                        "separate with ';') for several", dest="target", cli=None,
                        parse=lambda v: target_list(v, DEFAULT_TARGETS), action="append")
  logme: str = dataclasses.field(default=_LOGME.default, metadata=_LOGME.metadata)


def truncation_points(source: transfer.Source) -> list[str]:
  """Every truncation point of the source's architecture, input to output."""
  return _truncatable(source.model)


def _truncatable(model) -> list[str]:
  """The model's truncation points.

  Raises:
    InputError: an architecture without truncation points (Swin: its final norm is sized for
      the last stage only).
  """
  if not any(f.name == "truncate_after" for f in dataclasses.fields(model)):
    raise InputError(f"--arch: {type(model).__name__} models cannot be truncated (no "
                     "truncate_after); use e.g. resnet_s or vit_s28")
  return list(model.unit_names())


def _unit_names(x: TruncationFlags):
  """The points of --arch as --source builds it, read without pretraining (a ckpt: source's
  config from its meta.json); None when a ckpt: source is not there (loading it says so)."""
  if not x.source.startswith("ckpt:"):
    return _truncatable(models.get_model(x.arch, 2))
  try:
    with open(os.path.join(x.source[len("ckpt:"):], "meta.json")) as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  return _truncatable(models.from_config(meta.get("arch", x.arch), meta.get("config", {})))


def _check_points(points, valid, text: str) -> None:
  if set(points) - set(valid) or len(points) < 2:
    raise InputError(f"--points {text!r}: expected 'all' or at least 2 of {', '.join(valid)}")


def plan_of(config) -> dict:
  """The typed plan: targets, protocol, LogME variant and the points asked for (None: all).

  Raises:
    InputError: a bad target, source, protocol flag or point (one sentence), before --out is
      opened.
  """
  x = config.extra
  for t in x.targets:
    parse_spec(t, flag="--target")
  if not x.source.startswith("ckpt:"):
    parse_spec(x.source, flag="--source")
  protocol = x.protocol()
  points = None if x.points == "all" else [p.strip() for p in x.points.split(",")]
  valid = _unit_names(x)
  if points is not None and valid is not None:
    _check_points(points, valid, x.points)
  return dict(specs=list(x.targets), protocol=protocol, logme=x.logme, points=points)


def rows(records: Sequence[dict]) -> list[dict]:
  """Flat rows of records of either version, each with its 'point' (version 1 named it so,
  version 2 makes it the arm)."""
  v2 = [r if r.get("version") == rec.VERSION else
        dict(rec.from_v1({k: v for k, v in r.items() if k != "point"}, ("target",)),
             arm=r["point"])
        for r in records]
  return [dict(r, point=r["arm"]) for r in rec.rows(v2, ("target",))]


def point_scores(source: transfer.Source, task: TargetTask, point: str, compiled: Compiled,
                 logme_variant: str = SCORE_SETTINGS["logme_variant"]
                 ) -> tuple[dict[str, float], tuple[int, ...]]:
  """S1..S6 on the map at `point` and LogME (`logme_variant`) / H-score on its pooled features.

  Returns:
    (scores, map shape (H, W, C)).
  """
  model = transfer.target_model(source, task.num_classes, truncate_after=point)
  params, stats = transfer.init_target(source, model, 0)
  x = prenormalize(task.train.images, source.mean, source.std)
  _, taps = model_outputs(model, params, stats, x, ("last_conv", "features"), compiled)
  scores = score_outputs(task.train.labels, taps["last_conv"], taps["features"],
                         logme_variant=logme_variant)
  return scores, tuple(taps["last_conv"].shape[1:])


def run(_, config, results) -> list[dict]:
  """Scores and truncate-fine-tunes every (target, point) not yet recorded; writes
  source.json; the records of this invocation's targets and points.

  Raises:
    InputError: the folder holds records of another LogME variant or tuned otherwise, a point
      the source lacks, or every LR of a ground truth diverged.
  """
  p, x = plan_of(config), config.extra
  protocol, specs = p["protocol"], p["specs"]
  flat = rows(results.records)
  old = {r.get("logme_variant", "exact") for r in flat}
  if old - {x.logme}:
    raise InputError(f"--out holds records with LogME variant {sorted(old)}, not {x.logme!r}:"
                     " use the same --logme or --overwrite")
  gt.check_resume(flat, protocol.tune_extend)
  emit = log_of(config)
  source = sources.source_for(x.arch, x.source, epochs=x.source_epochs, seed=x.seed,
                               progress=emit is not None)
  valid = truncation_points(source)
  points = p["points"] or valid
  _check_points(points, valid, x.points)
  done = {(r["target"], r["point"]) for r in flat}
  grid = progress.GridProgress(
      {f"truncated {gt.ground_truth_kind(protocol)}": len(specs) * len(points)},
      saved=sum((spec, pt) in done for spec in specs for pt in points), emit=emit)
  grid.announce("truncation")
  compiled = Compiled()
  try:
    for spec in specs:
      if all((spec, pt) in done for pt in points):
        continue
      task = load_target(spec, source.input_shape, protocol.train_per_class,
                         protocol.test_per_class, x.seed, x.data_dir, protocol.val_per_class)
      for index, point in enumerate(points):
        if (spec, point) not in done:
          record = _score_and_finetune(source, spec, task, point, index, protocol, x.logme,
                                       compiled, emit)
          results.add(record)
          grid.finished(f"{spec} cut after {point}: acc {record['outcome']['test_acc']:.4f} "
                        f"S6 {record['extra']['S6']:.4g} ({record['seconds']:.1f}s)")
  except NonFiniteError as e:  # every LR of a ground truth diverged: one line, exit code 2
    raise InputError(str(e)) from None
  results.write_json("source.json", dict(source_info(source, x.source), points=list(points)))
  return [r for r, f in zip(results.records, rows(results.records))
          if f["target"] in specs and f["point"] in points]


def _score_and_finetune(source, spec, task, point, index, protocol, logme, compiled,
                        emit) -> dict:
  """One (target, point): its scores, then its ground truth; the version-2 record."""
  t0 = time.time()
  scores, shape = point_scores(source, task, point, compiled, logme)
  truth = gt.ground_truth(source, task, protocol, compiled, lambda lr: progress.ticker(
      f"{spec} cut after {point} lr={lr:g}", emit), truncate_after=point)
  extra = dict(index=index, map_shape=list(shape), n_train=len(task.train),
               n_test=len(task.test), logme_variant=logme,
               **{k: v for k, v in truth.items() if k not in OUTCOME and k != "lr"}, **scores)
  knobs = {"lr": truth["lr"]} if "lr" in truth else {}
  return rec.make(point, {"target": spec}, Draw("eval", 0), knobs,
                  {k: truth[k] for k in OUTCOME if k in truth}, time.time() - t0, extra)


def analyze(records: Sequence[dict], points: Sequence[str]) -> dict:
  """Spearman / weighted tau per target between each oriented score and accuracy over points.

  Returns:
    JSON-ready {'scorers': {name: summary}, 'accuracy': {target: [acc per point]},
    's6_pick': {target: {point, acc, best_point, best_acc}} (smallest S6, the paper's text),
    's6_pick_appendix': the same for the largest S6 (App. A.2's sign)}. Scorers: S1..S6
    oriented larger = better (S2, S4, S5, S6 negated), `selection.S6_APPENDIX` (raw S6),
    LogME, H-score.
  """
  order = {p: i for i, p in enumerate(points)}
  records = sorted(records, key=lambda r: (r["target"], order[r["point"]]))
  acc = np.array([r["test_acc"] for r in records])
  targets = [r["target"] for r in records]
  raw = lambda name: np.array([r[name] for r in records], np.float64)
  scores = {name: raw(name) * (-1.0 if name in selection.SMALLER_IS_BETTER else 1.0)
            for name in selection.METRIC_NAMES}
  scores[selection.S6_APPENDIX] = selection.S6_SIGNS[selection.S6_APPENDIX] * raw("S6")
  scores.update({name: raw(name) for name in SCORES if name not in scores})
  ranks = selection.rank_correlations(scores, acc, targets)
  by_target: dict[str, list[dict]] = {}
  for r in records:
    by_target.setdefault(r["target"], []).append(r)
  picks = {sign: {} for sign in S6_PICKS}
  for t, rs in by_target.items():
    best = max(rs, key=lambda r: r["test_acc"])
    for sign, (_, choose) in S6_PICKS.items():
      s6 = choose(rs, key=lambda r: r["S6"])
      picks[sign][t] = dict(point=s6["point"], acc=s6["test_acc"], best_point=best["point"],
                            best_acc=best["test_acc"])
  return dict(scorers={k: rank_summary(v) for k, v in ranks.items()},
              accuracy={t: {r["point"]: r["test_acc"] for r in rs} for t, rs in by_target.items()},
              s6_pick=picks["text"], s6_pick_appendix=picks["appendix"], points=list(points))


S6_RHO = "raw S6 rho"
CLAIMS = (
    claims.Claim("Selection", "raw S6 correlates with truncate-fine-tune accuracy over the "
                 "truncation points, rho > 0.7 (App. A.2's sign; effect: rho x 100 against 70)",
                 S6_RHO, "0.7", source="App. A.2, Fig. 5"),
    claims.Claim("Selection", "the truncation point S6 picks (largest raw S6) is as accurate as "
                 "the best point", "S6 pick", "best point", at_least=True, margin=0.01,
                 source="App. A.2, Fig. 4"),
)


def claim_results(summary: dict) -> list[dict]:
  """The claims over targets (each target one draw: its own fine-tuning runs and scores)."""
  rows = []
  for t, pick in summary["s6_pick_appendix"].items():
    rho = summary["scorers"][selection.S6_APPENDIX]["per_group"].get(t, {}).get("spearman")
    if rho is not None:
      rows += [dict(arm=S6_RHO, target=t, test_acc=rho), dict(arm="0.7", target=t, test_acc=0.7)]
    rows += [dict(arm="S6 pick", target=t, test_acc=pick["acc"]),
             dict(arm="best point", target=t, test_acc=pick["best_acc"])]
  out = [claims.evaluate(c, rows, (), arm_field="arm", draw_field="target") for c in CLAIMS]
  return [r for r in out if r["cells"]]


def source_info(source: transfer.Source, spec: str) -> dict:
  """What the report says about the source (written to source.json, read back by the report)."""
  return dict(arch=source.arch, spec=source.meta.get("source_spec", spec),
              test_acc=source.meta.get("source_test_acc"))


def make_report(summary: dict, plan: dict, source: dict, records: Sequence[dict] = ()) -> str:
  """report.md from the summary, the plan (`plan_of`), `source_info` and the rows (`rows`,
  the runs table)."""
  points, acc = summary["points"], summary["accuracy"]
  src_acc = float("nan") if source["test_acc"] is None else source["test_acc"]
  lines = ["# Truncate fine-tuning (App. A.2, Figs. 4 and 5)", "",
           f"Source: {source['arch']} `{source['spec']}` (source acc "
           f"{src_acc:.4f}). Each point: cut there, global average pool + new head, "
           + "fine-tune by " + gt.finetune_text(plan["protocol"], chosen_per="point"), "",
           "## Accuracy per truncation point (Fig. 4)", "",
           "| target | " + " | ".join(points) + " |", "|---|" + "---|" * len(points)]
  for t, row in acc.items():
    lines.append(f"| {t} | " + " | ".join(f"{row[p]:.4f}" if p in row else "-" for p in points)
                 + " |")
  order = {p: i for i, p in enumerate(points)}
  lines += [""] + runs_table(records, ("target", "point"),
                                lambda r: (r["target"], order.get(r["point"], 0)))
  lines += ["## Spearman rho between metric and truncate-fine-tune accuracy (Fig. 5)", "",
            "Scores oriented so that larger = predicted better (S2, S4, S5, S6 negated). S6's "
            "sign is an open reading: row S6 follows the paper's text (sec. 3.6, smaller is "
            f"better); row '{selection.S6_APPENDIX}' is raw S6 (larger is better), the sign of "
            "the paper's App. A.2, which reports rho > 0.7 for it on every target. LogME: "
            + ("the LogME authors' published code's variant (thuml/LogME)."
               if plan["logme"] == "published" else
               "the exact evidence (selection.logme variant 'exact')."), ""]
  lines += scorer_table(summary)
  for sign, title in (("s6_pick", "smallest S6, the paper's text"),
                      ("s6_pick_appendix", "largest S6, App. A.2's sign")):
    lines += ["", f"## The point S6 picks ({title})", "",
              "| target | S6 picks | its acc | best point | best acc |", "|---|---|---|---|---|"]
    for t, p in summary[sign].items():
      lines.append(f"| {t} | {p['point']} | {p['acc']:.4f} | {p['best_point']} | "
                   f"{p['best_acc']:.4f} |")
  if summary.get("claims"):
    lines += [""] + claims.section(summary["claims"], {})
    n = len(summary["accuracy"])
    lines += ["Draws are the targets (each with its own fine-tuning runs): " + (
        "with two targets an interval is wide." if n == 2 else
        f"{n} targets; targets that share classes (subsets of one dataset) are not "
        "independent draws, so the interval is narrower than independent targets would "
        "give.") + " The rho claim's effect is rho x 100 minus 70.", ""]
  return "\n".join(lines + [""])


def report(plan: dict, records: Sequence[dict], folder: str) -> tuple[str, dict]:
  """report.md and summary.json from the records and source.json beside them."""
  with open(os.path.join(folder, "source.json")) as f:
    info = json.load(f)
  flat = rows(records)
  summary = analyze(flat, info["points"])
  summary["claims"] = claim_results(summary)
  return make_report(summary, plan, info, flat), summary


def plot(summary: dict, _plan: dict, out_dir: str) -> None:
  """truncation_accuracy.png (Fig. 4) and truncation_spearman.png (Fig. 5) beside the report."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  points = summary["points"]
  fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(points)), 4))
  for t, row in summary["accuracy"].items():
    ax.plot([i for i, p in enumerate(points) if p in row], [row[p] for p in points if p in row],
            marker="o", label=t)
  ax.set_xticks(range(len(points)), points, rotation=30, fontsize=7)
  ax.set_xlabel("truncated after")
  ax.set_ylabel("truncate-fine-tune test accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "truncation_accuracy.png"), dpi=110)
  plt.close(fig)
  sc = summary["scorers"]
  targets = list(summary["accuracy"])
  fig, ax = plt.subplots(figsize=(max(6, 2.5 * len(targets)), 4))
  width = 0.8 / len(sc)
  for i, (name, s) in enumerate(sc.items()):
    vals = [s["per_group"][t]["spearman"] for t in targets]
    ax.bar(np.arange(len(targets)) + i * width - 0.4 + width / 2,
           [np.nan if v is None else v for v in vals], width, label=name)
  ax.axhline(0, color="k", lw=0.5)
  ax.set_xticks(range(len(targets)), targets, fontsize=8)
  ax.set_ylim(-1.05, 1.05)
  ax.set_ylabel("Spearman rho")
  ax.legend(fontsize=7, ncol=4)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "truncation_spearman.png"), dpi=110)
  plt.close(fig)


def _key(row: dict) -> tuple:
  """A run's key; results.json lists a target's points input to output (keys sort as text)."""
  return row["target"], f"{row['index']:04d}", row["point"]


STUDY = study.Study(
    module="experiments.truncation", title="# Truncate fine-tuning (App. A.2, Figs. 4 and 5)",
    cell_fields=("target",), claims=CLAIMS, groups=("output",), hidden=frozenset({"shard"}),
    extra=TruncationFlags, defaults={"out": "results/truncation"}, check=plan_of,
    plan=plan_of, run=run, report=report, plots=plot,
    record_key=lambda r: _key(rows([r])[0]), grows=frozenset({"target"}), doc=__doc__)
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
