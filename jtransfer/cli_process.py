"""What every command-line process of jtransfer sets up before its first compilation and step.

`prepare()` is the one call at the CLI edge (each module's `if __name__ == "__main__"`,
`jtransfer.study.edge.script`), never made on import: a library user's
process and disk are theirs to tune. It turns on jax's persistent compilation cache
(`jtransfer.compile_cache`) and steps with tcmalloc, restarting the command once with it
preloaded where it is installed and not loaded (`jtransfer.cpu_allocator`; off with
JTRANSFER_MALLOC=system).
"""
from __future__ import annotations

from jtransfer import compile_cache, cpu_allocator


def prepare() -> str:
  """CPU allocator configured (which may restart the process), then the compilation cache
  on; the allocator's name (`cpu_allocator.configure`)."""
  allocator = cpu_allocator.configure()
  compile_cache.enable_compilation_cache()
  return allocator
