"""A persistent XLA compilation cache shared by every process of a checkout.

Each test, experiment module and resumed grid compiles the same train steps again (8% of a
table's wall time). jax can keep compiled executables on disk, keyed by the lowered program,
the jaxlib and backend versions, the XLA_FLAGS in the environment and the compile options
(jax/_src/cache_key.py), so that a second process loads instead of compiling.

Called at the CLI edge (each module's `if __name__ == "__main__"`, tests/conftest.py), never
on import: a library user decides where their executables go.

  JTRANSFER_COMPILATION_CACHE=0   off
  JTRANSFER_CACHE_DIR=PATH        the directory (default: <repository>/.cache/jax for a
                                  checkout, else ./.cache/jax)
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

# jax writes only compilations slower than 1 s by default: on the CPU most train steps of the
# small models compile in 0.2-1 s, so the default would skip them. Below ~0.1 s a disk read
# and deserialisation costs about what compiling does, and caching every tiny op only fills
# the directory.
MIN_COMPILE_SECS = 0.1
# The cache grows without bound unless capped; capping also makes jax take a file lock around
# each read and write (lru_cache.LRUCache), which concurrent processes (pytest-xdist workers,
# parallel grids) need: without it an entry is written in place and may be read half-written.
MAX_SIZE_BYTES = 4 << 30


def default_cache_dir() -> pathlib.Path:
  """$JTRANSFER_CACHE_DIR, else `.cache/jax` in the repository holding this package (a
  checkout has pyproject.toml beside it), else in the working directory."""
  env = os.environ.get("JTRANSFER_CACHE_DIR")
  if env:
    return pathlib.Path(env).expanduser()
  root = pathlib.Path(__file__).resolve().parents[1]
  if not (root / "pyproject.toml").is_file():
    root = pathlib.Path.cwd()
  return root / ".cache" / "jax"


def enable_compilation_cache(path: Optional[str] = None) -> Optional[str]:
  """Turns on jax's persistent compilation cache, unless JTRANSFER_COMPILATION_CACHE=0.

  Must run before the process's first compilation (jax opens the cache once, at its first
  compile); later calls after that have no effect on the open cache.

  Args:
    path: the cache directory; None = `default_cache_dir()`.

  Returns:
    The directory in use, or None when turned off.
  """
  if os.environ.get("JTRANSFER_COMPILATION_CACHE", "1") == "0":
    return None
  import jax
  directory = str(path or default_cache_dir())
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
  # -1: no minimum entry size, and no backend-chosen override of it.
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  jax.config.update("jax_compilation_cache_max_size", MAX_SIZE_BYTES)
  return directory
