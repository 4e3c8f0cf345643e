"""jtransfer: transfer pretrained CNNs to few-label tasks, in JAX/Flax, functional style.

Layers (imports point down only): experiments -> methods -> train -> models/surgery -> data,
weights.
"""
import os as _os
import sys as _sys

__version__ = "0.1.0"

# XLA CPU flags measured to pay on the pinned jaxlib (docs/decisions.md, "Performance"). jaxlib
# 0.10 sends every convolution to a YNNPACK fusion that runs on one thread here; with it off,
# forward and backward-data convolutions go to XLA's multi-threaded convolution and run 2x
# faster on 2 cores. Flags are read when the CPU backend starts, so they must be set before
# the first computation; a flag XLA does not know aborts the process, hence the version gate.
# Set JTRANSFER_XLA_DEFAULTS=0, or pass your own --xla_cpu_experimental_ynn_fusion_type, to
# opt out. XLA_FLAGS as the process sees it is part of the persistent compilation cache's key
# (jtransfer/compile_cache.py): so it is left alone once a backend has started (the flag
# would not apply, and the key would claim it did).
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
_TESTED_JAXLIB = ("0.10.",)


def _set_cpu_xla_flags() -> None:
  if _os.environ.get("JTRANSFER_XLA_DEFAULTS", "1") == "0":
    return
  try:
    import jaxlib
  except ImportError:
    return
  if not jaxlib.__version__.startswith(_TESTED_JAXLIB):
    return
  if "jax" in _sys.modules:
    from jax._src import xla_bridge
    if xla_bridge.backends_are_initialized():
      return
  flags = _os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_XLA_FLAGS if f.split("=")[0] not in flags]
  if extra:
    _os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


_set_cpu_xla_flags()
