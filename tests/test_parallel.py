"""Data-parallel training: 8 simulated CPU devices follow the 1-device loss trajectory."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jtransfer.errors import InputError
from jtransfer.train import parallel

# Runs in a fresh process: the device count is fixed when the CPU backend starts.
_PROBE = r"""
import json, sys
import jax, numpy as np
from jtransfer import models
from jtransfer.methods import transfer
from jtransfer.train import init_state, make_optimizer, make_train_step, parallel, sgd
assert jax.device_count() == 8, jax.devices()
model = models.get_model("resnet_s", num_classes=10)
v = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
rng = np.random.default_rng(0)
batches = [{"image": rng.integers(0, 256, (16, 28, 28, 1), dtype=np.uint8),
            "label": rng.integers(0, 10, (16,)).astype(np.int32)} for _ in range(4)]
loss_fn = transfer.ce_loss_fn(model, 0.5, 0.25, bn_train=True)  # BN stats from the batch
out = {}
for n in (1, 8):
  opt = make_optimizer(v["params"], [(".*", "all")], {"all": sgd(0.01, momentum=0.9)})
  step = make_train_step(loss_fn, opt, mesh=parallel.make_mesh(n))
  state = init_state(v["params"], v["batch_stats"], opt, seed=0)
  losses = []
  for b in batches:
    state, m = step(state, b)
    losses.append(float(m["loss"]))
  leaf = state.params["head"]["kernel"]
  out[n] = {"losses": losses, "head": np.asarray(leaf).ravel()[:50].tolist(),
            "stats": np.asarray(jax.tree.leaves(state.batch_stats)[0]).tolist(),
            "devices": len(leaf.sharding.device_set)}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow  # 33 s, 8 simulated devices; run with -m slow
def test_eight_devices_follow_one_device_trajectory_with_bn_averaged():
  env = dict(os.environ, JAX_PLATFORMS="cpu",  # simulated host devices, also on a GPU machine
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  one, eight = out["1"], out["8"]
  assert eight["devices"] == 8 and one["devices"] == 1
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=5e-4)
  np.testing.assert_allclose(eight["head"], one["head"], rtol=1e-3, atol=1e-5)
  # Running BN statistics were updated from the global batch, not from 1/8 of it.
  np.testing.assert_allclose(eight["stats"], one["stats"], rtol=1e-4, atol=2e-5)
  assert one["losses"][-1] != one["losses"][0]  # it trained


def test_make_mesh_rejects_more_devices_than_present():
  with pytest.raises(InputError, match="device"):
    parallel.make_mesh(jax.device_count() + 1)


def test_batch_that_does_not_divide_is_replicated_with_warning():
  mesh = parallel.make_mesh(1)
  x = {"image": np.zeros((5, 2)), "label": np.zeros(5)}
  assert parallel.batch_divides(x, mesh)
  placed = parallel.shard_batch(x, mesh)
  assert placed["image"].shape == (5, 2)


_CLI_PROBE = r"""
import json, sys, tempfile, os
import jax
from experiments import fewshot
from jtransfer.methods import transfer
from jtransfer.sources import pretrain
assert jax.device_count() == 2
tmp = tempfile.mkdtemp()
src = pretrain("vgg_s", "fmnist:0,2,3,4,6", epochs=0.02, max_train=256, batch_size=64,
               progress=False)
transfer.save_source(os.path.join(tmp, "src"), src)
accs = {}
for n in (1, 2):
  out = os.path.join(tmp, f"out{n}")
  code = fewshot.main(["--arch", "vgg_s", "--source", "ckpt:" + os.path.join(tmp, "src"),
                       "--target", "fmnist:1,5", "--shots", "2", "--repeats", "1", "--steps", "4",
                       "--strategies", "finetune", "--lrs", "0.001", "--test-per-class", "20",
                       "--val-per-class", "2", "--quiet", "--devices", str(n), "--out", out])
  assert code == 0
  accs[n] = [r["outcome"]["test_acc"]
             for r in json.load(open(os.path.join(out, "results.json")))]
print("RESULT" + json.dumps(accs))
"""


@pytest.mark.slow  # 35 s; the 8-device trajectory test covers the mesh
def test_devices_flag_gives_the_one_device_results():
  env = dict(os.environ, JAX_PLATFORMS="cpu",  # simulated host devices, also on a GPU machine
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", _CLI_PROBE], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads([l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1][6:])
  assert out["1"] and out["1"] == out["2"]


def test_devices_flag_rejects_missing_devices(capsys):
  from experiments import fewshot
  assert fewshot.main(["--devices", str(jax.device_count() + 1), "--out", "/nonexistent/x"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "device" in err and "Traceback" not in err
  assert not os.path.exists("/nonexistent/x")
