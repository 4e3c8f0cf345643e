"""Smoke test of experiments.delta_table end to end, on a tiny pretrained source.

The source is conftest's session-wide vgg_s (pretrain(..., epochs=0.02, max_train=256) saved
with transfer.save_source): vgg_s has no BN, so its train steps compile faster than
resnet_s's; BN paths are tested in test_delta.py.
"""

import json
import os

import numpy as np
import pytest

from experiments import delta_table
from jtransfer.errors import InputError
from jtransfer.methods import delta

TINY = ["--arch", "vgg_s", "--curve-arch", "vgg_s", "--target", "digits", "--shots", "2",
        "--repeats", "1", "--steps", "2", "--test-per-class", "5", "--val-per-class", "0",
        "--curve-steps", "2", "--curve-every", "1", "--curve-shots", "2",
        "--curve-schedules", "exp", "--curve-test-per-class", "5", "--quiet"]


def test_delta_table_smoke(tiny_source_dir, tmp_path):
  out = str(tmp_path / "d")
  before = delta.get_config()
  argv = TINY + ["--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--out", out, "--alpha", "0.02"]
  assert delta_table.main(argv) == 0
  assert delta.get_config() == before  # flags do not leak into the module defaults
  for name in ("results.json", "results.jsonl", "summary.json", "curves.json", "report.md",
               "accuracy_vs_shots.png", "learning_curves.png", "filter_distance.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "results.json")) as f:
    records = json.load(f)
  assert sorted(r["strategy"] for r in records) == sorted(delta_table.STRATEGIES)
  assert all(r["status"] == "ok" and 0.0 <= r["test_acc"] <= 1.0 for r in records)
  report = open(os.path.join(out, "report.md")).read()
  assert "| digits | 2 |" in report and "DELTA w/o ATT" in report and "alpha 0.02" in report
  with open(os.path.join(out, "curves.json")) as f:
    curves = json.load(f)
  assert set(curves["curves"]) == {"exp|l2sp", "exp|delta"}
  assert all(len(c["test_acc"]) == 2 for c in curves["curves"].values())
  # Fig. 3: every conv filter once, per stage, sorted.
  d = curves["distances"]["delta"]
  assert {k: len(v) for k, v in d.items()} == {"stage1": 64, "stage2": 128, "stage3": 256}
  assert all(np.diff(d["stage3"]) <= 0) and d["stage3"][0] > 0
  # --resume finds every run done (and reuses the curves) and rewrites the same report.
  assert delta_table.main(argv + ["--resume"]) == 0
  assert open(os.path.join(out, "report.md")).read() == report


def test_delta_table_flag_errors(tmp_path, capsys):
  out = str(tmp_path / "e")
  assert delta_table.main(["--taps", "resnet_s", "--out", out]) == 2
  assert "--taps" in capsys.readouterr().err
  assert delta_table.main(["--alpha", "-1", "--out", out]) == 2
  assert delta_table.main(["--curve-schedules", "cosine", "--out", out]) == 2
  assert not os.path.exists(os.path.join(out, "results.jsonl"))


def test_filter_distances_by_hand():
  w0 = {"conv2_1": {"conv": {"kernel": np.zeros((1, 1, 2, 3)), "bias": np.zeros(3)}},
        "stage1/block0": {"conv1": {"conv": {"kernel": np.zeros((1, 1, 1, 2))}}}}
  w = {"conv2_1": {"conv": {"kernel": np.zeros((1, 1, 2, 3)), "bias": np.ones(3)}},
       "stage1/block0": {"conv1": {"conv": {"kernel": np.zeros((1, 1, 1, 2))}}}}
  w["conv2_1"]["conv"]["kernel"][0, 0, :, 1] = [3.0, 4.0]   # filter 1 moved by 5
  w["stage1/block0"]["conv1"]["conv"]["kernel"][0, 0, 0, 0] = -2.0
  got = delta_table.filter_distances(w, w0)
  assert got == {"stage2": [5.0, 0.0, 0.0], "stage1": [2.0, 0.0]}
  assert delta_table.stage_of("stem") == "stem"


@pytest.mark.parametrize("value", ["resnet_s=", "=a,b", "resnet_s"])
def test_parse_taps_rejects(value):
  with pytest.raises(InputError):
    delta_table.parse_taps([value])
