"""End to end as a user with their own 224 px folder: a torchvision checkpoint converted, then
few-shot fine-tuning with augmentation from images stored at 256 px.

  JAX_PLATFORMS=cpu python -m bench.e2e_folder --arch resnet50 --work /tmp/e2e

Steps (each printed with its wall time; the last with the peak resident memory of the
fine-tuning process, from getrusage of the child):
  1. `--images` Fashion-MNIST training images written as 256 px RGB JPEGs in
     `--work/images/<class>/` (bench.bench_decode.make_folder);
  2. a torchvision `--arch` with random weights (no download) saved as a state dict `.pth`,
     converted by `python -m experiments.convert_weights` at 224x224x3 with ImageNet
     normalisation;
  3. `python -m experiments.fewshot` on the folder: `--strategies` (default finetune),
     `--shots` per class, `--augment rrc+flip`, `--stored-size 256`, `--steps` steps, every
     `--extra` flag appended.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import subprocess
import sys
import time


def run(cmd: list[str]) -> float:
  print("$ " + " ".join(cmd), flush=True)
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True)
  return time.perf_counter() - t0


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", default="resnet50")
  p.add_argument("--work", default="/tmp/e2e")
  p.add_argument("--images", type=int, default=400)
  p.add_argument("--strategies", default="finetune")
  p.add_argument("--shots", default="5")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--extra", default="", help="more fewshot flags, space separated")
  args = p.parse_args(argv)
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)

  from bench.bench_decode import make_folder
  t0 = time.perf_counter()
  make_folder(work / "images", args.images)
  print(f"1. {args.images} JPEGs at 256 px: {time.perf_counter() - t0:.0f} s", flush=True)

  import torch

  from bench import tv_cpu
  pth = work / f"{args.arch}.pth"
  if not pth.exists():
    torch.manual_seed(0)
    net = getattr(tv_cpu.torchvision_models(), args.arch)(weights=None)
    torch.save(net.state_dict(), pth)
  source = work / f"{args.arch}-source"
  py = sys.executable
  wall = run([py, "-m", "experiments.convert_weights", "--arch", args.arch, "--weights",
              str(pth), "--out", str(source), "--input-shape", "224,224,3"]) \
      if not (source / "meta.json").exists() else 0.0
  print(f"2. {args.arch} state dict converted: {wall:.0f} s", flush=True)

  cmd = [py, "-m", "experiments.fewshot", "--arch", args.arch, "--source", f"ckpt:{source}",
         "--target", f"folder:{work / 'images'}", "--strategies", args.strategies, "--shots",
         args.shots, "--repeats", "1", "--tune-repeats", "0", "--lrs", "1e-4", "--steps",
         str(args.steps), "--patience", "0", "--batch-size", "16", "--val-per-class", "2",
         "--test-per-class", "10", "--augment", "rrc+flip", "--stored-size", "256",
         "--no-paper-grid", "--out", str(work / "out"), "--overwrite", *args.extra.split()]
  wall = run(cmd)
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
  print(f"3. fewshot: {wall:.0f} s wall, peak resident memory of a child process {peak:.2f} GB",
        flush=True)
  print((work / "out" / "report.md").read_text()[:1500])


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  main()
