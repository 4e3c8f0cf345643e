"""Multi-host experiment modules (issue 18 item 4): `experiments.fewshot` run as 2 local
processes (jax.distributed, gloo collectives) x 4 simulated CPU devices each gives the
single-process results; only process 0 writes."""
import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")


@pytest.mark.slow  # 40 s: two processes under gloo; run with -m slow
def test_two_processes_equal_one(tiny_source_dir, tmp_path):
  argv = [sys.executable, "-m", "experiments.fewshot", "--arch", "vgg_s", "--source",
          f"ckpt:{tiny_source_dir('vgg_s')}", "--target", "digits:0,1,2,3",
          "--strategies", "freeze,finetune", "--shots", "4", "--repeats", "1", "--steps", "4",
          "--eval-every", "2", "--patience", "2", "--val-per-class", "2",
          "--test-per-class", "10", "--lrs", "1e-3", "--tune-repeats", "0", "--batch-size", "16",
          "--no-paper-grid", "--quiet"]
  single = tmp_path / "single"
  subprocess.run(argv + ["--out", str(single), "--devices", "8"], check=True, env=_env(8),
                 cwd=ROOT, capture_output=True, timeout=600)
  multi = tmp_path / "multi"
  port = _free_port()
  procs = [subprocess.Popen(argv + ["--out", str(multi), "--num-processes", "2", "--process-id",
                                    str(i), "--coordinator", f"localhost:{port}"],
                            env=_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
  from jtransfer.study.records import flat
  want = [flat(r) for r in json.loads((single / "results.json").read_text())]
  got = [flat(r) for r in json.loads((multi / "results.json").read_text())]
  assert len(got) == len(want) == 2
  for g, w in zip(got, want):
    assert {k: v for k, v in g.items() if not k.endswith("_acc") and k != "filter_distance"} \
        == {k: v for k, v in w.items() if not k.endswith("_acc") and k != "filter_distance"}
    # the same program split over processes: sums in another order, so float tolerance
    for k in ("test_acc", "val_acc"):
      assert g[k] == pytest.approx(w[k], abs=1.01 / 40), k
    if "filter_distance" in w:
      assert g["filter_distance"] == pytest.approx(w["filter_distance"], rel=2e-3)
  # process 1 wrote nothing of its own: one results.jsonl line per run
  assert len((multi / "results.jsonl").read_text().splitlines()) == 2
