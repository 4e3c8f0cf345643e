"""torchvision's model code for equivalence tests (see bench/tv_cpu.py); skips without it."""
from __future__ import annotations

import pytest


def torchvision_models():
  """`torchvision.models`, importable on the CPU torch wheel; skips the test without it."""
  pytest.importorskip("torch")
  from bench import tv_cpu
  try:
    return tv_cpu.torchvision_models()
  except ImportError as e:
    pytest.skip(str(e))
