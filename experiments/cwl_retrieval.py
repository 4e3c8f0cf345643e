"""Table III analogue of the CWL paper: MAC retrieval after transferring on the query images.

  python -m experiments.cwl_retrieval --out results/cwl_retrieval

As in the paper (sec. V-B), each strategy (freeze, freeze_cwl, finetune, finetune_cwl) is
trained as a classifier on the labelled query images only; the head is then dropped and images
are described by MAC (global max-pool of the last conv layer's output after ReLU,
l2-normalised; `--mac-tap pooled` pools the 'last_conv' tap instead, which for vgg_s comes
after the last 2x2 max pool, so one row and column of the 7x7 map never reach it), the
database ranked by cosine similarity and scored by mAP. Freeze leaves
the conv layers as they are, so its row is the original source's MAC (the paper's
"Original / Freeze"). One LR per strategy (`--lrs reduced`, or one value): the paper searches
the LR grid by the reported mAP, which would choose on test data, and this module has no
validation split to choose on instead, so a grid of several LRs is refused (session 10).

Embedded task (default): database = the target's test images (`--db-per-class` per class),
queries = `--queries` labelled images per class from the target's train split (disjoint),
`--repeats` query draws; positives = database images of the query's class (Easy = Medium;
Hard has none). mAP uses revisitop's trapezoid AP.

Revisited Oxford/Paris (the paper's Table III): pass the ground truth as JSON (convert
revisitop's pickle once with `jtransfer.methods.retrieval.gnd_pickle_to_json`, or pass the
.pkl with --allow-pickle) and the image folder:

  python -m experiments.cwl_retrieval --arch resnet50 --source ckpt:PATH \
      --gnd gnd_roxford5k.json --images roxford5k/jpg --image-size 224,224 --out results/rox

Queries are cropped to their bounding box, labelled by their landmark (name without the
trailing _NNNNNN), and Easy / Medium / Hard mAP is reported as in Table III. The image size
must suit the model (small VGGs flatten a fixed-size map; ResNets and VGG-16 take any size).

The flags, output folder, resume and publishing are the study runner's (`jtransfer.study`); a
run is `jtransfer.methods.retrieval_run`'s (train on the queries, MAC, rank, mAP).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time
import types
from typing import Optional, Sequence

import numpy as np

from jtransfer import models, sources, study
from jtransfer.data import load_spec, parse_spec
from jtransfer.errors import InputError
from jtransfer.methods import retrieval, retrieval_run, transfer
from jtransfer.protocol import claims
from jtransfer.study import records as rec
from jtransfer.study.config import at_least, comma_list
from jtransfer.study.draws import Draw
from jtransfer.study.tables import mean_std

STRATEGIES = ("freeze", "freeze_cwl", "finetune", "finetune_cwl")
LABELS = types.MappingProxyType({
    "freeze": "Original / Freeze", "freeze_cwl": "Freeze + CWL", "finetune": "Finetune",
    "finetune_cwl": "Finetune + CWL", "finetune_lowconv": "Alg. 1 (low-lr conv) + CWL"})
REDUCED = types.MappingProxyType({"freeze": (1e-2,), "finetune": (1e-4,)})
MAC_TAP_TEXT = types.MappingProxyType({
    "conv": "the last conv layer's output after ReLU (`--mac-tap conv`)",
    "pooled": "the 'last_conv' tap, after the last max pool for VGGs (`--mac-tap pooled`)"})


def _image_size(text: Optional[str]) -> Optional[tuple[int, int]]:
  if not text:
    return None
  try:
    size = tuple(int(v) for v in text.split(","))
  except ValueError:
    size = ()
  if len(size) != 2 or min(size) < 1:
    raise InputError(f"--image-size {text!r}: expected H,W")
  return size


@dataclasses.dataclass(frozen=True)
class Knobs:
  """The module's flags (the runner adds --source, --source-epochs and the output flags)."""
  arch: str = study.flag("--arch", "vgg_s", "architecture", choices=models.names())
  target: str = study.flag("--target", "fmnist:1,5,7,8,9", "embedded task's dataset")
  queries: int = study.flag("--queries", 5, "labelled queries per class",
                            check=at_least(1, "--queries"))
  db_per_class: int = study.flag("--db-per-class", 300, "database images per class",
                                 check=at_least(1, "--db-per-class"))
  repeats: int = study.flag("--repeats", 3, "query draws (embedded task)",
                            check=at_least(1, "--repeats"))
  strategies: tuple[str, ...] = study.flag("--strategies", STRATEGIES, "comma list of "
                                           "strategies", cli=",".join(STRATEGIES),
                                           parse=comma_list("--strategies"))
  lrs: str = study.flag("--lrs", "reduced", "'paper' (each strategy's grid), 'reduced' (one "
                        "per family) or a list")
  steps: int = study.flag("--steps", 100, "Adam steps on the queries",
                          check=at_least(1, "--steps"))
  batch_size: int = study.flag("--batch-size", 64, "images per step",
                               check=at_least(1, "--batch-size"))
  gnd: Optional[str] = study.flag("--gnd", None, "revisited ground truth (.json, or .pkl)")
  allow_pickle: bool = study.flag("--allow-pickle", False, "allow reading a .pkl --gnd",
                                  action="store_true")
  images: Optional[str] = study.flag("--images", None, "folder of the --gnd images")
  ext: str = study.flag("--ext", ".jpg", "image file extension for --images")
  image_size: Optional[tuple[int, int]] = study.flag(
      "--image-size", None, "H,W for --images (default: the source's)", parse=_image_size)
  data_dir: Optional[str] = study.flag("--data-dir", None, "TFDS data_dir or the "
                                       "Fashion-MNIST IDX directory")
  mac_tap: str = study.flag("--mac-tap", "conv", "map MAC pools: 'conv', the last conv "
                            "layer's output (default), or 'pooled', the 'last_conv' tap (after "
                            "vgg_s's last max pool)", choices=retrieval.MAC_TAPS)
  seed: int = study.flag("--seed", 0, "seeds the query draws and the training")

  def lr_plan(self) -> dict[str, tuple[float, ...]]:
    """strategy -> its one LR (freeze: 0, its conv layers untouched: the source's MAC).

    Raises:
      InputError: an unknown strategy, or a list giving a strategy several LRs.
    """
    lrs = {}
    for s in self.strategies:
      strategy = transfer.get_strategy(s)
      if self.lrs == "reduced":
        lrs[s] = REDUCED["freeze" if strategy.paper_lrs == transfer.FREEZE_LRS else "finetune"]
      else:
        lrs[s] = transfer.lr_grid(strategy, self.lrs)
      if s == "freeze":
        lrs[s] = (0.0,)
      if len(lrs[s]) > 1:
        # The paper picks the LR by the reported mAP; docs/protocol.md forbids choosing on
        # test data, and this module holds no validation split to choose on instead.
        raise InputError(f"--lrs {self.lrs!r} gives {s} {len(lrs[s])} learning rates, but "
                         "cwl_retrieval has no validation split to choose among them (the "
                         "mAP it reports is the test): give one LR per strategy, e.g. --lrs "
                         "reduced")
    return lrs


def check(config) -> None:
  """The flags' rules across fields, before anything is loaded."""
  k = config.extra
  k.lr_plan()
  if not config.source.spec.startswith("ckpt:"):
    parse_spec(config.source.spec, flag="--source")
  if k.gnd is None:
    parse_spec(k.target, flag="--target")
  elif k.images is None:
    raise InputError("--gnd needs --images (the folder holding the listed images)")


def draws(k: Knobs) -> range:
  """The query draws: one on a revisited dataset."""
  return range(1 if k.gnd else k.repeats)


def keys(records, plan) -> set[tuple]:
  """Every (strategy, query draw, LR) the grid runs, as record keys."""
  k = plan.config.extra
  return {rec.run_key(name, {}, Draw("eval", repeat), {"lr": lr})
          for name, lrs in k.lr_plan().items() for repeat in draws(k) for lr in lrs}


def run(_, config, results) -> list[dict]:
  """Every missing (strategy, query draw) run into `results`; returns all records."""
  k, quiet = config.extra, config.output.quiet
  done = {rec.key(r) for r in rec.read(results.records, ())}
  # Records from before --mac-tap existed pooled the 'last_conv' tap.
  taps = {r.get("mac_tap", "pooled") for r in rec.rows(results.records, ())}
  if taps - {k.mac_tap}:
    raise InputError(f"--out holds records with MAC of {sorted(taps)}, not {k.mac_tap!r}: use "
                     "the same --mac-tap or --overwrite")
  source = sources.source_for(k.arch, config.source.spec, epochs=config.source.epochs,
                               seed=k.seed, progress=not quiet)
  if k.gnd is not None:
    shape = retrieval_run.check_image_size(source, k.image_size)
    # The shape only changes the maps' size; train and describe at it.
    source = dataclasses.replace(source, input_shape=shape)
    task = retrieval_run.revisited_task(k.gnd, k.images, k.ext, shape, k.allow_pickle)
  else:
    data = load_spec(k.target, source.input_shape, flag="--target", data_dir=k.data_dir)
  mac = None
  for repeat in draws(k):
    if k.gnd is None:
      task = retrieval_run.embedded_task(data, k.queries, k.db_per_class, k.seed + repeat)
    q_img, q_lab, db_img, truth, num_classes = task
    if mac is None:
      trainer = retrieval_run.QueryTrainer(source, num_classes, k.steps, k.batch_size, k.seed)
      mac = retrieval_run.mac_fn(transfer.target_model(source, num_classes), source.mean,
                                 source.std, k.mac_tap)
    for name, lrs in k.lr_plan().items():
      for lr in lrs:
        draw = Draw("eval", repeat)
        if rec.run_key(name, {}, draw, {"lr": lr}) in done:
          continue
        t0 = time.time()
        _, params, stats = trainer(name, q_img, q_lab, lr)
        describe = lambda x: retrieval_run.describe(mac, params, stats, x)
        scores = (retrieval_run.score(describe(q_img), describe(db_img), gnd=truth)
                  if k.gnd else retrieval_run.score(describe(q_img), describe(db_img), q_lab,
                                                    truth))
        record = rec.make(name, {}, draw, {"lr": lr}, scores, time.time() - t0,
                          dict(n_queries=len(q_img), n_db=len(db_img), mac_tap=k.mac_tap))
        results.add(record)
        if not quiet:
          print(f"[cwl_retrieval] r={repeat} {name} lr={lr:g} "
                f"{ {m: round(v, 4) for m, v in scores.items()} } "
                f"({record['seconds']:.1f}s)", file=sys.stderr)
  return results.records


def summarize(records: list[dict], metrics: Sequence[str]) -> dict:
  """Per strategy: the LR with the best mean of the first metric; mean/std of each metric."""
  out = {}
  for name in dict.fromkeys(r["arm"] for r in records):
    rs = [r for r in records if r["arm"] == name]
    lrs = sorted({r["lr"] for r in rs})
    score = lambda lr: np.mean([np.mean([r[m] for m in metrics]) for r in rs if r["lr"] == lr])
    best = max(lrs, key=score)
    sel = [r for r in rs if r["lr"] == best]
    out[name] = dict(best_lr=best, n=len(sel), **{m: mean_std(r[m] for r in sel)
                                                  for m in metrics})
  return out


CLAIMS = (
    claims.Claim("CWL", "MAC retrieval: weighting convolutions keeps or improves the frozen "
                 "features' mAP", "freeze_cwl", "freeze", at_least=True, margin=0.01,
                 source="Table III"),
    claims.Claim("CWL", "MAC retrieval: finetuning with weighting convolutions keeps or "
                 "improves finetuning's mAP", "finetune_cwl", "finetune", at_least=True,
                 margin=0.01, source="Table III"),
)


def claim_results(records: list[dict], summary: dict, metrics: Sequence[str]) -> list[dict]:
  """The claims, each strategy at its reported LR, paired by query draw; the compared value is
  the mean of `metrics` (mAP, or Easy/Medium/Hard's mean)."""
  rows = [dict(r, value=float(np.mean([r[m] for m in metrics]))) for r in records
          if r["arm"] in summary and r["lr"] == summary[r["arm"]]["best_lr"]]
  out = [claims.evaluate(c, rows, (), arm_field="arm", draw_field="repeat", value="value")
         for c in CLAIMS if {c.a, c.b} <= set(summary)]
  return [r for r in out if r["cells"]]


def make_report(plan, records: list[dict], folder: str = "") -> tuple[str, dict]:
  """report.md and summary.json ({'strategies': per strategy, 'claims': [...]}) from the
  records alone (either record version)."""
  config, k = plan.config, plan.config.extra
  records = rec.rows(records, ())
  revisited = k.gnd is not None
  metrics = list(retrieval.SETUPS) if revisited else ["map"]
  summary = summarize(records, metrics)
  order = list(k.strategies)
  summary = {n: summary[n] for n in sorted(summary, key=lambda n: (
      order.index(n) if n in order else len(order), n))}
  lines = ["# CWL retrieval (Table III analogue)", "",
           f"{k.arch} from `{config.source.spec}`; MAC of {MAC_TAP_TEXT[k.mac_tap]} (head "
           "removed), cosine "
           f"ranking, revisitop trapezoid AP; strategies trained on the labelled queries "
           f"({k.steps} Adam steps, BN eval mode). Best LR per strategy (mean mAP).", ""]
  if revisited:
    lines += [f"Ground truth `{k.gnd}`, images `{k.images}`.", "",
              "| strategy | Easy | Medium | Hard | Mean | LR |", "|---|---|---|---|---|---|"]
    for name, v in summary.items():
      mean = np.mean([v[s][0] for s in retrieval.SETUPS])
      lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(
          f"{100 * v[s][0]:.2f}" for s in retrieval.SETUPS) + f" | {100 * mean:.2f} | "
          f"{v['best_lr']:g} |")
  else:
    lines += [f"Embedded task: `{k.target}`, database {k.db_per_class}/class of the test "
              f"split, {k.queries} queries/class from the train split, {k.repeats} "
              "query draws; mean (std) over draws, in %.", "",
              "| strategy | mAP | LR |", "|---|---|---|"]
    for name, v in summary.items():
      lines.append(f"| {LABELS.get(name, name)} | {100 * v['map'][0]:.2f} "
                   f"({100 * v['map'][1]:.2f}) | {v['best_lr']:g} |")
  lines.append("")
  results = claim_results(records, summary, metrics)
  if results:
    lines += claims.section(results, LABELS)
    test_picked = sorted(n for n in summary if len({r["lr"] for r in records
                                                    if r["arm"] == n}) > 1)
    lines += ["Draws: the query draws (a new query set and database each). " + (
        f"The LR of {', '.join(test_picked)} was picked on mean mAP, i.e. on the evaluation "
        "queries, as the paper; the claim rows are optimistic for them. Use one LR per "
        "strategy (`--lrs reduced`) for a comparison free of that selection." if test_picked
        else "One LR per strategy: no selection on the evaluation queries."), ""]
  return "\n".join(lines), dict(strategies=summary, claims=results)


def plot(summary: dict, metrics: Sequence[str], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = list(summary)
  fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(names) * len(metrics) / 2, 3.4))
  width = 0.8 / len(metrics)
  for j, m in enumerate(metrics):
    ax.bar(np.arange(len(names)) + j * width - 0.4 + width / 2,
           [100 * summary[n][m][0] for n in names], width,
           yerr=[100 * summary[n][m][1] for n in names], capsize=3, label=m)
  ax.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], rotation=20, ha="right",
                fontsize=8)
  ax.set_ylabel("mAP (%)")
  if len(metrics) > 1:
    ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


STUDY = study.Study(
    module="experiments.cwl_retrieval", title="# CWL retrieval (Table III analogue)",
    cell_fields=(), extra=Knobs, groups=("source", "output"), hidden=frozenset({"shard"}),
    defaults={"out": "results/cwl_retrieval"}, check=check, run=run, keys=keys,
    # --repeats may grow on --resume: query draw r is seeded by --seed + r alone
    grows=frozenset({"repeats"}),
    report=make_report, doc=__doc__,
    plots=lambda summary, plan, folder: plot(
        summary["strategies"], list(retrieval.SETUPS) if plan.config.extra.gnd else ["map"],
        os.path.join(folder, "map.png")))
PUBLISHER = study.publisher(STUDY)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the study (`jtransfer.study.main`); the exit code."""
  return study.main(STUDY, argv)


if __name__ == "__main__":
  study.script(STUDY)
