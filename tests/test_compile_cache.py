"""The persistent compilation cache (jtransfer/compile_cache.py): where it goes, the off
switch, and that its key separates processes whose XLA flags differ."""
import os
import pathlib
import subprocess
import sys

import jaxlib
import pytest

from jtransfer import compile_cache

_PROBE = """
import sys
import jtransfer, jax, jax.numpy as jnp
from jtransfer.compile_cache import enable_compilation_cache
print(enable_compilation_cache(sys.argv[1]))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache this small program
x = jnp.arange(12.0).reshape(3, 4)
print(float(jax.jit(lambda a: jnp.tanh(a @ a.T).sum())(x)))
"""


def _run(cache, **env_extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JTRANSFER_XLA_DEFAULTS", "JTRANSFER_COMPILATION_CACHE")}
  env.update(env_extra)
  out = subprocess.run([sys.executable, "-c", _PROBE, str(cache)], env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  return out.stdout.split()


def _entries(cache: pathlib.Path) -> set:
  """The cache files of the probe's program (jax also caches its iota and reshape)."""
  return set(cache.glob("jit__lambda-*-cache")) if cache.exists() else set()


def test_default_dir_and_env(monkeypatch, tmp_path):
  monkeypatch.delenv("JTRANSFER_CACHE_DIR", raising=False)
  repo = pathlib.Path(compile_cache.__file__).resolve().parents[1]
  assert compile_cache.default_cache_dir() == repo / ".cache" / "jax"
  monkeypatch.setenv("JTRANSFER_CACHE_DIR", str(tmp_path / "c"))
  assert compile_cache.default_cache_dir() == tmp_path / "c"


def test_off_switch_touches_nothing(monkeypatch, tmp_path):
  import jax
  before = jax.config.jax_compilation_cache_dir
  monkeypatch.setenv("JTRANSFER_COMPILATION_CACHE", "0")
  assert compile_cache.enable_compilation_cache(str(tmp_path)) is None
  assert jax.config.jax_compilation_cache_dir == before


def test_second_process_hits_and_xla_flags_split_the_key(tmp_path):
  if not jaxlib.__version__.startswith("0.10."):
    pytest.skip("jtransfer's CPU XLA flags are set only on the tested jaxlib")
  cache = tmp_path / "jax"
  first = _run(cache)
  assert first[0] == str(cache)
  written = _entries(cache)
  assert len(written) == 1
  # same program, same flags: the entry is reused (no new key), same value
  assert _run(cache)[1] == first[1] and _entries(cache) == written
  # without jtransfer's XLA flag the compiler may choose other kernels: a separate entry
  assert _run(cache, JTRANSFER_XLA_DEFAULTS="0")[1] == first[1]
  assert len(_entries(cache)) == 2
  # off: nothing written
  off = tmp_path / "off"
  assert _run(off, JTRANSFER_COMPILATION_CACHE="0")[0] == "None"
  assert not _entries(off)
