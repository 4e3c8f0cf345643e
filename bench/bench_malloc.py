"""The train step under each CPU allocator (jtransfer/cpu_allocator.py): glibc's malloc and
tcmalloc preloaded; JAX and PyTorch in the same processes.

  python -m bench.bench_malloc [--rounds 2] [--out bench/MALLOC.md]

Each round runs, once per allocator (the order rotating between rounds), two child processes:
`bench.run --archs resnet_s,vgg_s --strategies finetune` (JAX img/s and the PyTorch
reference's, batch 128) and `bench.bench_vit` (vit_s28's forward+backward, JAX and timm, batch
128), plus the minor page faults and system CPU seconds of each child (`resource.getrusage` of
the children, the kernel's share: fresh pages faulted in show there). The table gives each
figure's median over rounds. An allocator is chosen by the child's environment:
JTRANSFER_MALLOC=system (glibc's malloc; the CLI edge does not restart the child) or
LD_PRELOAD=libtcmalloc_minimal.so.4. The tcmalloc column is left out where it is not
installed.
"""
from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import numpy as np

from bench.common import command, emit
from jtransfer import cpu_allocator

RUN = ["-m", "bench.run", "--archs", "resnet_s,vgg_s", "--strategies", "finetune",
       "--windows", "5", "--steps", "3", "--warmup", "3"]
VIT = ["-m", "bench.bench_vit", "--repeats", "5"]


def settings() -> dict[str, dict]:
  """{allocator: environment changes}, tcmalloc only where installed."""
  base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JTRANSFER_MALLOC")}
  out = {"glibc": {**base, "JTRANSFER_MALLOC": cpu_allocator.OFF}}
  path = cpu_allocator.tcmalloc_path()
  if path:
    out["tcmalloc"] = {**base, **cpu_allocator.QUIET, "LD_PRELOAD": path}
  return out


def _child(args: list[str], env: dict, out: str) -> tuple[str, float, float]:
  """(the child's report, its minor page faults, its system seconds)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  done = subprocess.run([sys.executable, *args, "--out", out],
                        env={**env, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
  if done.returncode:
    raise RuntimeError(f"{' '.join(args)} exited with {done.returncode}: "
                       f"{done.stderr.strip()[-2000:]}")
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  with open(out) as f:
    return f.read(), after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime


def parse_run(text: str) -> dict[str, float]:
  """bench.run's table -> {'<arch> jax': img/s, '<arch> torch': best torch img/s}."""
  out = {}
  for m in re.finditer(r"^\| (\w+) \| finetune \| ([\d.]+) \|(?:[^|]*\|){3} ([\d.na]+) \| "
                       r"([\d.na]+) \|", text, re.M):
    arch, jax_rate = m.group(1), float(m.group(2))
    torch_rates = [float(v) for v in m.group(3, 4) if v != "nan"]
    out[f"{arch} jax"], out[f"{arch} torch"] = jax_rate, max(torch_rates)
  return out


def parse_vit(text: str) -> dict[str, float]:
  """bench_vit's table -> {'vit_s28 jax': img/s, 'vit_s28 torch': img/s}."""
  rates = dict(re.findall(r"^\| (jax|timm) \| [\d.]+ \| (\d+) \|", text, re.M))
  return {"vit_s28 jax": float(rates["jax"]), "vit_s28 torch": float(rates["timm"])}


def measure(rounds: int) -> dict[str, dict[str, float]]:
  """{allocator: {figure: median over rounds}} (figures: img/s per arch and framework, and
  the children's faults and system seconds per round)."""
  envs = settings()
  names, seen = list(envs), {k: {} for k in envs}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(rounds):
      for name in names[r % len(names):] + names[:r % len(names)]:
        run, f1, s1 = _child(RUN, envs[name], os.path.join(tmp, "run.md"))
        vit, f2, s2 = _child(VIT, envs[name], os.path.join(tmp, "vit.md"))
        row = {**parse_run(run), **parse_vit(vit), "minor faults (M)": (f1 + f2) / 1e6,
               "system s": s1 + s2}
        for k, v in row.items():
          seen[name].setdefault(k, []).append(v)
  return {name: {k: float(np.median(v)) for k, v in fig.items()} for name, fig in seen.items()}


def report(rounds: int, argv: Optional[Sequence[str]]) -> str:
  rows = measure(rounds)
  names = list(rows)
  figures = list(rows[names[0]])
  lines = [f"# The train step under each CPU allocator (median of {rounds} rounds)", "",
           f"`{command('bench_malloc', argv)}`", "",
           "| figure | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for fig in figures:
    lines.append(f"| {fig} | " + " | ".join(f"{rows[n][fig]:.1f}" for n in names) + " |")
  for arch in ("resnet_s", "vgg_s", "vit_s28"):
    lines.append(f"| {arch} JAX / torch | " + " | ".join(
        f"{rows[n][f'{arch} jax'] / rows[n][f'{arch} torch']:.2f}" for n in names) + " |")
  return "\n".join(lines + [""])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  emit(report(args.rounds, argv), args.out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
