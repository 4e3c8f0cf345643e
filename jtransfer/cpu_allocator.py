"""The CPU step's memory allocator: tcmalloc, which keeps freed buffers for the next step.

Why: XLA:CPU allocates each executable run's temporaries through malloc and frees them at the
end of the run. glibc serves every block over its mmap threshold (at most 32 MiB) by mmap and
returns it with munmap, so every train step faults all of its large temporaries in again, page
by page, each zeroed by the kernel. tcmalloc keeps them. `python -m bench.bench_malloc`
(bench/MALLOC.md) measured, idle, in two runs: minor page faults down from 2.1 M to 0.6 M,
vit_s28's forward+backward 1.40-1.56x faster and vgg_s's finetune step 1.11-1.13x with tcmalloc
preloaded (resnet_s's moved within the host's noise); ViT-B/16's train step 2.6x
(bench/VIT.md). Telling glibc itself to keep freed memory (mallopt M_MMAP_MAX = 0 at the CLI
edge) gained nothing in one run, so it is not done. The results are bit for bit the same: only
where buffers live changes (tests/test_cpu_allocator.py).

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
import sysconfig
from typing import Mapping, Optional, Sequence

CACHING = ("tcmalloc", "jemalloc")  # allocators that keep freed pages for reuse
TCMALLOC_GLOB = "/usr/lib/*/libtcmalloc_minimal.so.4"
# tcmalloc reports every allocation over 1 GiB on stderr; ViT-B/16's steps make such.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
OFF = "system"  # JTRANSFER_MALLOC's value that keeps the C library's malloc


def tcmalloc_path() -> Optional[str]:
  """The installed tcmalloc of this interpreter's architecture (Debian's
  libtcmalloc-minimal4 under /usr/lib/<multiarch>/), or None."""
  arch = sysconfig.get_config_var("MULTIARCH")
  found = sorted(glob.glob(TCMALLOC_GLOB.replace("*", arch) if arch else TCMALLOC_GLOB))
  return found[0] if found else None


def preloaded(environ: Mapping[str, str] = os.environ) -> Optional[str]:
  """The caching allocator named in LD_PRELOAD ('tcmalloc', 'jemalloc'), or None."""
  preload = environ.get("LD_PRELOAD", "")
  return next((name for name in CACHING if name in preload), None)


def command_of(argv: Sequence[str]) -> Optional[tuple[str, str]]:
  """('module', name) for `python [options] -m name ...`, ('script', path) for `python
  [options] path ...`, None for `-c`, stdin or an interactive interpreter."""
  i = 1
  while i < len(argv):
    arg = argv[i]
    if arg == "-m":
      return ("module", argv[i + 1]) if i + 1 < len(argv) else None
    if arg.startswith("-m"):
      return "module", arg[2:]
    if arg.startswith("-c") or arg == "-":
      return None
    if arg in ("-W", "-X", "--check-hash-based-pycs"):  # options that take a value
      i += 2
      continue
    if arg.startswith("-"):
      i += 1
      continue
    return "script", arg
  return None


def running_main() -> Optional[tuple[str, str]]:
  """What `__main__` is: ('module', its name) when run by -m, ('script', its path), or None."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is not None and spec.name:
    return "module", spec.name
  path = getattr(main, "__file__", None)
  return ("script", path) if path else None


def _same(command: Optional[tuple[str, str]], running: Optional[tuple[str, str]]) -> bool:
  if command is None or running is None or command[0] != running[0]:
    return False
  if command[0] == "module":
    return command[1] == running[1]
  return os.path.abspath(command[1]) == os.path.abspath(running[1])


def restart_with_tcmalloc(environ: Mapping[str, str], argv: Sequence[str],
                          library: Optional[str],
                          running: Optional[tuple[str, str]]) -> Optional[dict]:
  """The environment to restart `argv` (the interpreter's `sys.orig_argv`) with tcmalloc
  preloaded, or None to go on as is: off by JTRANSFER_MALLOC=system, already preloaded (or
  restarted once), no tcmalloc installed, or `argv` not the command that runs `running`
  (`running_main()`): a `-c` or interactive process, or a host (IPython, a Jupyter kernel,
  pytest) that runs a module's CLI in-process, is never restarted."""
  if environ.get("JTRANSFER_MALLOC") == OFF or preloaded(environ) or not library:
    return None
  if not _same(command_of(argv), running):
    return None
  preload = " ".join(p for p in (environ.get("LD_PRELOAD", ""), library) if p)
  return {**environ, **QUIET, "LD_PRELOAD": preload}


def configure(environ: Mapping[str, str] = os.environ) -> str:
  """The allocator this process steps with: 'tcmalloc' / 'jemalloc' when preloaded, else
  'system'; restarts the command with tcmalloc first where `restart_with_tcmalloc` says so."""
  env = restart_with_tcmalloc(environ, getattr(sys, "orig_argv", []), tcmalloc_path(),
                              running_main())
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  return preloaded(environ) or "system"


if __name__ == "__main__":  # prints the allocator a module's CLI edge ends up with
  print(configure())
  if "--maps" in sys.argv[1:]:  # and the loaded allocator libraries (tests)
    with open("/proc/self/maps") as f:
      print(" ".join(sorted({line.split()[-1] for line in f if "malloc" in line})))
