"""The CPU step's memory allocator: tcmalloc, which keeps freed buffers for the next step.

Why: XLA:CPU allocates each executable run's temporaries through malloc and frees them at the
end of the run. glibc serves every block over its mmap threshold (at most 32 MiB) by mmap and
returns it with munmap, so every train step faults all of its large temporaries in again, page
by page, each zeroed by the kernel. tcmalloc keeps them. `python -m bench.bench_malloc`
(bench/MALLOC.md) measured, idle, in one run: JAX's finetune step 1.23x faster on resnet_s,
1.09x on vgg_s and 1.83x on vit_s28's forward+backward with tcmalloc preloaded, and minor page
faults down from 2.1 M to 0.5 M; telling glibc itself to keep freed memory (mallopt M_MMAP_MAX
= 0 at the CLI edge) gained nothing there, so it is not done. The results are bit for bit the
same: only where buffers live changes (tests/test_cpu_allocator.py).

A preload must be in place when the process starts, so:
  * `make` sets LD_PRELOAD for the demo, the tests and the bench (`make setup` installs
    Debian's libtcmalloc-minimal4 when it can);
  * `jtransfer.cli_process.prepare()` (the CLI edge of every module) calls `configure()`, which
    restarts the command once (`os.execve`, the same argv) with tcmalloc preloaded when it is
    installed and not yet loaded;
  * `JTRANSFER_MALLOC=system` keeps the C library's malloc and never restarts.
Nothing here runs on import: a library user's process is theirs to start.
"""
from __future__ import annotations

import glob
import os
import sys
from typing import Mapping, Optional, Sequence

CACHING = ("tcmalloc", "jemalloc")  # allocators that keep freed pages for reuse
TCMALLOC_GLOB = "/usr/lib/*/libtcmalloc_minimal.so.4"
# tcmalloc reports every allocation over 1 GiB on stderr; ViT-B/16's steps make such.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
OFF = "system"  # JTRANSFER_MALLOC's value that keeps the C library's malloc


def tcmalloc_path() -> Optional[str]:
  """The installed tcmalloc (Debian's libtcmalloc-minimal4), or None."""
  found = sorted(glob.glob(TCMALLOC_GLOB))
  return found[0] if found else None


def preloaded(environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """The caching allocator named in LD_PRELOAD ('tcmalloc', 'jemalloc'), or None."""
  preload = environ.get("LD_PRELOAD", "")
  return next((name for name in CACHING if name in preload), None)


def restart_with_tcmalloc(environ: Mapping[str, str], argv: Sequence[str],
                          library: Optional[str]) -> Optional[dict]:
  """The environment to restart `argv` (the interpreter's `sys.orig_argv`) with tcmalloc
  preloaded, or None to go on as is: off by JTRANSFER_MALLOC=system, already preloaded (or
  restarted once), no tcmalloc installed, or not a `python -m module` / `python script.py`
  command (an interactive or `-c` process is never restarted)."""
  if environ.get("JTRANSFER_MALLOC") == OFF or preloaded(environ) or not library:
    return None
  if len(argv) < 2 or not (argv[1] == "-m" or argv[1].endswith(".py")):
    return None
  preload = " ".join(p for p in (environ.get("LD_PRELOAD", ""), library) if p)
  return {**environ, **QUIET, "LD_PRELOAD": preload}


def configure(environ: Mapping[str, str] = os.environ) -> str:
  """The allocator this process steps with: 'tcmalloc' / 'jemalloc' when preloaded, else
  'system'; restarts the command with tcmalloc first where `restart_with_tcmalloc` says so."""
  env = restart_with_tcmalloc(environ, getattr(sys, "orig_argv", []), tcmalloc_path())
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  return preloaded(environ) or "system"


if __name__ == "__main__":  # prints the allocator a module's CLI edge ends up with
  print(configure())
