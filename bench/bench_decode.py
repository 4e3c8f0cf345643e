"""Input pipeline against the device: JPEG decoding throughput and peak memory of a streamed
folder (jtransfer.data.stream), next to the train step's throughput.

  JAX_PLATFORMS=cpu python -m bench.bench_decode --folder /tmp/fmnist_jpeg --make 20000

`--make N` first writes N Fashion-MNIST training images as 256 px RGB JPEGs (quality 90) into
`--folder/<class>/` (skipped when the folder already holds them). Then, in this order:
  1. peak memory: the whole folder listed as a `LazyImages` (stored at `--size`) and read
     through once in batches of `--batch` (as evaluation reads a test set), printing the
     process's peak resident memory before and after: the pixels of the folder would need
     N x size^2 x 3 bytes in memory;
  2. decoding throughput at `--size` px: images/s with 1 thread and with `--threads` threads
     (images/s per core = that / min(threads, cores));
  3. the train step's throughput: a `--arch` finetune step (Adam, BN running stats) at
     `--size` px, batch `--step-batch`, random weights, images/s.
If decoding with the cores a run can spare is slower than the step, the input pipeline is the
bottleneck. Timings on a shared machine: compare the ratios within one run.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import time

import numpy as np


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def make_folder(root: pathlib.Path, n: int, side: int = 256) -> None:
  """N Fashion-MNIST training images as side-px RGB JPEGs under root/<class>/."""
  from PIL import Image

  from jtransfer.data import fmnist
  existing = sum(1 for _ in root.glob("*/*.jpg")) if root.is_dir() else 0
  if existing >= n:
    return
  data = fmnist.load_fmnist(None).train
  for c in data.class_names:
    (root / c).mkdir(parents=True, exist_ok=True)
  for i in range(n):
    image = Image.fromarray(data.images[i, :, :, 0]).convert("RGB").resize((side, side),
                                                                           Image.BILINEAR)
    image.save(root / data.class_names[data.labels[i]] / f"{i:06d}.jpg", quality=90)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--folder", default="/tmp/fmnist_jpeg")
  p.add_argument("--make", type=int, default=0, help="write this many JPEGs first")
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
  p.add_argument("--decode-images", type=int, default=512, help="images timed per setting")
  p.add_argument("--arch", default="resnet50")
  p.add_argument("--step-batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=3)
  args = p.parse_args(argv)
  root = pathlib.Path(args.folder)
  if args.make:
    t0 = time.perf_counter()
    make_folder(root, args.make)
    print(f"folder {root}: {args.make} JPEGs at 256 px ready ({time.perf_counter() - t0:.0f} s)")

  from jtransfer.data import folder, stream
  before = peak_rss_gb()
  lazy = folder.load_folder(root, image_size=args.size, channels=3, test_fraction=0.01,
                            stream=stream.StreamOptions(threads=args.threads))
  images = lazy.train.images
  n, t0 = len(images), time.perf_counter()
  for start in range(0, n, args.batch):
    images[start:start + args.batch]
  wall = time.perf_counter() - t0
  print(f"1. streamed {n} images ({n * args.size ** 2 * 3 / 2 ** 30:.1f} GB of pixels at "
        f"{args.size} px) in batches of {args.batch} with {args.threads} threads in {wall:.0f} s "
        f"({n / wall:.0f} images/s); peak resident memory {before:.2f} GB before, "
        f"{peak_rss_gb():.2f} GB after")

  rows = np.arange(min(args.decode_images, n))
  rates = {}
  for threads in sorted({1, args.threads}):
    sub = stream.LazyImages(images.source, images.rows[rows],
                            stream.StreamOptions(threads=threads))
    t0 = time.perf_counter()
    sub[:]
    rates[threads] = len(rows) / (time.perf_counter() - t0)
  cores = os.cpu_count() or 1
  print(f"2. JPEG 256 px -> {args.size} px decode: " + ", ".join(
      f"{t} thread{'s' if t > 1 else ''} {r:.0f} images/s ({r / min(t, cores):.0f} per core)"
      for t, r in rates.items()))

  import jax

  from bench.bench_delta import random_source
  from jtransfer.methods import transfer
  from jtransfer.train import init_state, make_train_step
  source = random_source(args.arch, (args.size, args.size, 3), classes=10)
  setup = transfer.get_strategy("finetune").build(source, 10, 1000)
  x = np.asarray(images[:args.step_batch])
  y = np.asarray(lazy.train.labels[:args.step_batch], np.int32)
  params, stats = setup.init(0, x, y)
  step = make_train_step(setup.loss_fn, setup.optimizer)
  state = init_state(params, stats, setup.optimizer, 0, 1e-4)
  state, m = step(state, {"image": x, "label": y})
  jax.block_until_ready(m["loss"])
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = step(state, {"image": x, "label": y})
  jax.block_until_ready(m["loss"])
  rate = args.steps * args.step_batch / (time.perf_counter() - t0)
  best = max(rates.values())
  print(f"3. {args.arch} finetune step at {args.size} px, batch {args.step_batch}: {rate:.1f} "
        f"images/s on {jax.devices()[0].platform}; decoding at {best:.0f} images/s is "
        f"{best / rate:.0f}x that ({'the device' if best > rate else 'the input pipeline'} is "
        "the bottleneck)")


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  main()
