"""jtransfer.cpu_allocator: when the CLI edge restarts a command with tcmalloc, that it does so
once, and that a step computes bit for bit the same values under either allocator."""
import os
import subprocess
import sys

import pytest

from jtransfer import cpu_allocator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIB = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
needs_tcmalloc = pytest.mark.skipif(cpu_allocator.tcmalloc_path() is None,
                                    reason="libtcmalloc-minimal4 is not installed")


FEWSHOT = ("module", "experiments.fewshot")


@pytest.mark.parametrize("environ,argv,library,running,restart", [
    ({}, ["python", "-m", "experiments.fewshot"], LIB, FEWSHOT, True),
    ({}, ["python", "-u", "-X", "dev", "-m", "experiments.fewshot"], LIB, FEWSHOT, True),
    ({}, ["python", "-mexperiments.fewshot"], LIB, FEWSHOT, True),
    ({}, ["python", "bench/run.py", "--tiny"], LIB, ("script", "bench/run.py"), True),
    ({"LD_PRELOAD": "/opt/libfoo.so"}, ["python", "-m", "experiments.fewshot"], LIB, FEWSHOT,
     True),  # the caller's preload kept, then ours
    ({}, ["python", "-m", "experiments.fewshot"], None, FEWSHOT, False),  # not installed
    ({"JTRANSFER_MALLOC": "system"}, ["python", "-m", "experiments.fewshot"], LIB, FEWSHOT,
     False),  # turned off
    ({"LD_PRELOAD": LIB}, ["python", "-m", "experiments.fewshot"], LIB, FEWSHOT,
     False),  # already there: never twice
    ({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, ["python", "-m", "experiments.fewshot"], LIB,
     FEWSHOT, False),
    ({}, ["python", "-c", "print(1)"], LIB, None, False),  # not a module or script command
    ({}, ["python"], LIB, None, False),  # interactive
    # a host running a module's CLI in-process is not the module: never restart the host
    ({}, ["python", "-m", "IPython"], LIB, FEWSHOT, False),
    ({}, ["python", "-m", "pytest", "tests"], LIB, ("module", "bench.demo_time"), False),
])
def test_restart_rule(environ, argv, library, running, restart):
  env = cpu_allocator.restart_with_tcmalloc(environ, argv, library, running)
  assert (env is not None) == restart
  if restart:
    assert env["LD_PRELOAD"].split()[-1] == LIB and cpu_allocator.preloaded(env) == "tcmalloc"
    assert env["LD_PRELOAD"].startswith(environ.get("LD_PRELOAD", LIB))
    assert env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == str(1 << 40)


def _child(args, **env):
  base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "JTRANSFER_MALLOC")}
  out = subprocess.run([sys.executable, *args], env={**base, "JAX_PLATFORMS": "cpu", **env},
                       cwd=REPO, capture_output=True, text=True, check=True, timeout=120)
  return out.stdout.strip().splitlines()


@needs_tcmalloc
def test_cli_edge_restarts_once_with_tcmalloc():
  """The restarted process has tcmalloc mapped (not only named in its environment)."""
  assert _child(["-m", "jtransfer.cpu_allocator"]) == ["tcmalloc"]
  maps = _child(["-m", "jtransfer.cpu_allocator", "--maps"])
  assert maps[0] == "tcmalloc" and "libtcmalloc" in maps[1]
  assert _child(["-m", "jtransfer.cpu_allocator"], JTRANSFER_MALLOC="system") == ["system"]


GRADIENTS = """
import hashlib, jax, numpy as np, optax
from jtransfer import models
digest = hashlib.sha1()
for arch, kw in [("resnet_s", dict(stage_widths=(8, 8, 16), stem_width=8)),
                 ("vit_s28", dict(dim=16, depth=2, heads=2))]:
  m = models.get_model(arch, 10, **kw)
  v = models.init_model(m, jax.random.PRNGKey(0), (28, 28, 1))
  x = np.random.default_rng(0).normal(size=(32, 28, 28, 1)).astype(np.float32)
  loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      models.apply_model(m, p, v.get("batch_stats"), x, train=False)[0], np.arange(32) % 10).mean()
  for leaf in jax.tree.leaves(jax.jit(jax.grad(loss))(v["params"])):
    digest.update(np.asarray(leaf).tobytes())
print(digest.hexdigest())
"""


@needs_tcmalloc
def test_gradients_are_bit_identical_under_either_allocator():
  system = _child(["-c", GRADIENTS], JTRANSFER_MALLOC="system")
  tcmalloc = _child(["-c", GRADIENTS], LD_PRELOAD=cpu_allocator.tcmalloc_path())
  assert len(system) == 1 and system == tcmalloc
