"""One record schema (jtransfer.study.records, version 2) and the reader of published
version-1 records: the conversion by hand, keys that agree across versions, report rows."""
import json
import os

import pytest

from jtransfer.study import draws, records

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

V1 = {"strategy": "l2sp", "arch": "vgg_s", "target": "digits", "shots": 5, "repeat": -2,
      "lr": 0.01, "hp": "alpha=0.434783", "fold": 3, "role": "tune", "status": "ok",
      "test_acc": None, "val_acc": 0.5, "steps": 40, "best_step": 30, "stopped": "patience",
      "n_train": 50, "n_val": 200, "n_test": 3000, "cap": 500, "seconds": 1.5}


def test_version_1_record_converts_by_hand():
  (r,) = records.read([V1])
  assert r == {"version": 2, "arm": "l2sp",
               "cell": {"arch": "vgg_s", "target": "digits", "shots": 5},
               "draw": {"role": "tune", "index": 1, "fold": 3},
               "knobs": {"lr": 0.01, "alpha": 0.434783},
               "outcome": {"status": "ok", "test_acc": None, "val_acc": 0.5, "steps": 40,
                           "best_step": 30, "stopped": "patience"},
               "extra": {"n_train": 50, "n_val": 200, "n_test": 3000, "cap": 500},
               "seconds": 1.5}
  assert records.read([r]) == [r]  # version 2 passes through


def test_keys_agree_across_versions_at_six_digits():
  """Tuning extends a knob grid to 0.434782608696; version 1 kept '0.434783'."""
  point = {"lr": 0.01, "alpha": 0.434782608696}
  cell = {"arch": "vgg_s", "target": "digits", "shots": 5}
  key = records.run_key("l2sp", cell, draws.Draw("tune", 1, 3), point)
  assert records.key(records.read([V1])[0]) == key
  assert records.key(records.make("l2sp", cell, draws.Draw("tune", 1, 3), point, {})) == key
  assert records.run_key("l2sp", cell, draws.Draw("tune", 1, 3), {"lr": 0.01, "alpha": 0.43}) \
      != key
  assert records.canon(1e-4 / 3) == 3.33333e-05


def test_flat_rows_carry_what_reports_read():
  row = records.rows([V1])[0]
  assert (row["arm"], row["repeat"], row["role"], row["fold"]) == ("l2sp", -2, "tune", 3)
  assert (row["lr"], row["knobs"], row["hp"]) == (0.01, {"alpha": 0.434783}, "alpha=0.434783")
  assert (row["val_acc"], row["n_test"], row["shots"]) == (0.5, 3000, 5)
  assert records.hp_text({"lr": 1.0, "beta": 0.1, "alpha": 2e-5}) == "alpha=2e-05,beta=0.1"
  assert records.parse_hp("alpha=2e-05,beta=0.1") == {"alpha": 2e-5, "beta": 0.1}


def test_draw_repeat_round_trips():
  for repeat in (-3, -1, 0, 4):
    assert draws.Draw.of_repeat(repeat).repeat == repeat
  assert draws.Draw.of_repeat(-1) == draws.Draw("tune", 0)


@pytest.mark.parametrize("folder", ["cwl_tables", "budget_study_vgg_s_digits"])
def test_every_published_record_reads_with_a_distinct_key(folder):
  path = os.path.join(ROOT, "published", folder, "results.json")
  with open(path) as f:
    v1 = json.load(f)
  v2 = records.read(v1, ("arch", "target", "shots", "factor"))
  assert len({records.key(r) for r in v2}) == len(v1)
  # every field of a version-1 record lands somewhere
  for a, b in zip(v1, v2):
    row = records.flat(b)
    assert all(row[k] == v for k, v in a.items() if k not in ("strategy", "hp"))
    assert row["arm"] == a["strategy"]
