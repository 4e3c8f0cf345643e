"""The CPU XLA defaults set on import (jtransfer/__init__.py) reach the compiler."""
import os
import subprocess
import sys

import pytest

_PROBE = """
import jtransfer, jax, jax.numpy as jnp
from jax import lax
conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                              dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
hlo = jax.jit(conv).lower(jnp.zeros((8, 16, 16, 32)), jnp.zeros((3, 3, 32, 32))).compile().as_text()
print('YNN' if '__ynn_fusion' in hlo else 'PLAIN')
"""


def _probe(env_extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JTRANSFER_XLA_DEFAULTS")}
  env.update(env_extra)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  return out.stdout.strip().splitlines()[-1]


def test_import_turns_off_single_threaded_conv_fusion():
  import jaxlib
  if not jaxlib.__version__.startswith("0.10."):
    pytest.skip("flag set only on the tested jaxlib")
  assert _probe({}) == "PLAIN"


def test_opt_out_keeps_xla_default():
  import jaxlib
  if not jaxlib.__version__.startswith("0.10."):
    pytest.skip("flag set only on the tested jaxlib")
  assert _probe({"JTRANSFER_XLA_DEFAULTS": "0"}) == "YNN"
