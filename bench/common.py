"""What every benchmark script does with its report."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable, Mapping, Optional, Sequence


@contextlib.contextmanager
def native_kernels(on: bool):
  """Steps traced inside use (on) or skip (off) the native kernel gradient
  (jtransfer.models.ffi_conv, via JTRANSFER_NATIVE, read when a step is traced); the
  variable is put back after."""
  before = os.environ.get("JTRANSFER_NATIVE")
  os.environ["JTRANSFER_NATIVE"] = "1" if on else "0"
  try:
    yield
  finally:
    if before is None:
      os.environ.pop("JTRANSFER_NATIVE", None)
    else:
      os.environ["JTRANSFER_NATIVE"] = before


def command(module: str, argv: Optional[Sequence[str]]) -> str:
  """The command line that reproduces a run: `python -m bench.<module> <args>`."""
  args = list(sys.argv[1:] if argv is None else argv)
  return " ".join(["python -m", f"bench.{module}", *args])


def emit(text: str, out: Optional[str]) -> None:
  """Prints the report and writes it to `out` (creating its folder) when given."""
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text)


def round_robin_medians(calls: Mapping[str, Callable[[], object]], repeats: int,
                        warmup: int = 1) -> dict[str, float]:
  """Median wall time (seconds) of each call, timed round-robin so load changes hit all
  alike (`jtransfer.train.evaluate.interleaved_latency_ms`)."""
  from jtransfer.train.evaluate import interleaved_latency_ms
  return {k: v / 1000 for k, v in interleaved_latency_ms(calls, repeats, warmup).items()}
