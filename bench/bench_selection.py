"""Cost of scoring a base-model zoo from cached outputs: every metric, 12 models x 2 targets.

  JAX_PLATFORMS=cpu python -m bench.bench_selection [--images 50] [--repeats 3]
  JAX_PLATFORMS=cpu python -m bench.bench_selection --features results/model_selection/features

For each (model, target) pair, `score_outputs` (jtransfer.scoring) computes S1..S6 on
the last-conv map, LogME and H-score on the penultimate features, LEEP and NCE on the source
logits; then `analyze` normalises, sweeps C_ij(alpha) for the 15 pairs at step 0.001 and ranks
every scorer per group. By default the outputs are synthetic with the zoo's shapes (4 models
each of resnet_s 4x4x128 / 128-d, vgg_s 3x3x128 / 256-d, resnet_s_narrow 4x4x64 / 64-d, at
28x28 input) on a 5-class and a 10-class target with `--images` images per class; with
--features, the .npz files written by `model_selection --save-features` are used instead.
Prints cold (first pass, with jit compilation) and warm (median) seconds.

Measured on the shared 2-core machine (load ~11), 50 images/class (9000 images in all):
  OPENBLAS_NUM_THREADS=1: metrics cold 13.7 s (jit compiles of the S1..S6 kernel), warm 1.3 s
    (54 ms per pair); analysis 0.75 s.
  default OpenBLAS threads: metrics warm 24 s: LogME's SVD and H-score's eigh run ~10-20x
    slower when OpenBLAS's 2 threads fight other processes for the cores; set
    OPENBLAS_NUM_THREADS=1 on a busy machine.
Either way seconds, against ~10-30 s of fine-tuning per pair for the ground truth.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import numpy as np

from jtransfer.scoring import score_outputs
from jtransfer.zoo.analysis import analyze

SHAPES = {"resnet_s": ((4, 4, 128), 128), "vgg_s": ((3, 3, 128), 256),
          "resnet_s_narrow": ((4, 4, 64), 64)}


def synthetic(images_per_class: int, models_per_family: int = 4, seed: int = 0) -> list[dict]:
  """Outputs shaped like the default zoo's on a 5-class and a 10-class target."""
  rng = np.random.default_rng(seed)
  pairs = []
  for target, k in (("t5", 5), ("t10", 10)):
    labels = np.repeat(np.arange(k), images_per_class).astype(np.int32)
    for family, (shape, dim) in SHAPES.items():
      for m in range(models_per_family):
        shift = rng.normal(size=(k, *shape)) * 0.5
        maps = np.maximum(rng.normal(size=(len(labels), *shape)) + shift[labels], 0)
        pairs.append(dict(model=f"{family}-{m}", family=family, target=target, labels=labels,
                          last_conv=maps.astype(np.float32),
                          features=rng.normal(size=(len(labels), dim)).astype(np.float32),
                          logits=rng.normal(size=(len(labels), 5)).astype(np.float32)))
  return pairs


def from_dir(path: str) -> list[dict]:
  """Outputs saved by model_selection --save-features (features/<model>__<target>.npz)."""
  pairs = []
  for f in sorted(glob.glob(os.path.join(path, "*.npz"))):
    model, target = os.path.basename(f)[:-4].split("__", 1)
    with np.load(f) as z:
      pairs.append(dict(model=model, family=model.split("-")[0], target=target,
                        **{k: z[k] for k in ("labels", "last_conv", "features", "logits")}))
  if not pairs:
    raise SystemExit(f"no .npz files in {path}")
  return pairs


def score_all(pairs: list[dict]) -> list[dict]:
  """One record per pair: every score (accuracy is a random stand-in; only timing matters)."""
  rng = np.random.default_rng(1)
  return [dict(model=p["model"], family=p["family"], target=p["target"],
               test_acc=float(rng.uniform()), source_accuracy=float(rng.uniform()),
               param_count=1,
               **score_outputs(p["labels"], p["last_conv"], p["features"], p["logits"]))
          for p in pairs]


def timed(fn, repeats: int) -> tuple[float, float]:
  """(cold seconds, median warm seconds)."""
  t0 = time.perf_counter()
  fn()
  cold = time.perf_counter() - t0
  warm = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    warm.append(time.perf_counter() - t0)
  return cold, statistics.median(warm)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--images", type=int, default=50, help="images per class (synthetic)")
  p.add_argument("--features", default=None, help="directory of saved .npz outputs")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  pairs = from_dir(args.features) if args.features else synthetic(args.images)
  n_img = sum(len(p["labels"]) for p in pairs)
  box = {}
  cold, warm = timed(lambda: box.update(records=score_all(pairs)), args.repeats)
  a_cold, a_warm = timed(lambda: analyze(box["records"]), args.repeats)
  print(f"{len(pairs)} (model, target) pairs, {n_img} images in all")
  print("| step | cold s | warm s | warm ms per pair |\n|---|---|---|---|")
  print(f"| all metrics (S1..S6, LogME, H-score, LEEP, NCE) | {cold:.2f} | {warm:.2f} | "
        f"{1000 * warm / len(pairs):.0f} |")
  print(f"| analysis (normalise, 15 alpha sweeps at 0.001, rank correlations) | {a_cold:.2f} | "
        f"{a_warm:.2f} | {1000 * a_warm / len(pairs):.0f} |")


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  main()
