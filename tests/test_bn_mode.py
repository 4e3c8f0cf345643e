"""experiments.bn_mode on tiny settings: both BN modes run under nested tuning, the report
carries the registered claim (registered before any run) and the not-converged check."""
import json

import pytest

from experiments import bn_mode
from experiments.claims_registry import ALL
from jtransfer.study import records


def test_claim_is_registered_before_the_run():
  entry = next(e for e in ALL if e.id == "bn.train_mode_gt_frozen_stats")
  assert entry.text == bn_mode.CLAIM_TEXT and entry.margin == 0.0 and entry.margin_reason
  assert entry.primary.folders == ("bn_mode",)  # "not tested yet" until it is published


@pytest.mark.slow  # 26 s alone (two full fine-tuning steps compile), 80 s on a loaded box
def test_bn_mode_smoke(tiny_source_dir, tmp_path):
  out = tmp_path / "bn"
  argv = ["--arch", "resnet_s", "--source", f"ckpt:{tiny_source_dir('resnet_s')}", "--target",
          "digits:0,1,2", "--shots", "1", "--repeats", "2", "--steps", "4", "--eval-every", "2",
          "--patience", "2", "--test-per-class", "3", "--val-per-class", "2", "--quiet",
          "--tune-extend", "0", "--out", str(out)]
  assert bn_mode.main(argv) == 0
  rows = records.rows(json.loads((out / "results.json").read_text()))
  # per arm: 2 LRs x 2 draws of nested tuning (no test accuracy), 1 evaluation run per draw
  for arm in bn_mode.ARMS:
    mine = [r for r in rows if r["arm"] == arm]
    assert sorted((r["role"], r["repeat"]) for r in mine) == [
        ("eval", 0), ("eval", 1), ("nested", 0), ("nested", 0), ("nested", 1), ("nested", 1)]
    assert all(r["test_acc"] is None for r in mine if r["role"] == "nested")
  text = (out / "report.md").read_text()
  assert bn_mode.LABELS["finetune_bn"] in text and "tuned on its own labelled pool" in text
  summary = json.loads((out / "summary.json").read_text())
  assert [c["claim"]["text"] for c in summary["claims"]] == [bn_mode.CLAIM_TEXT]
  assert "not_converged" in summary  # --cap-share 0.1 is this study's default


@pytest.mark.parametrize("argv", [["--bn", "train"], ["--bn=frozen"], ["--bn"]])
def test_bn_flag_is_refused_by_name(argv, tmp_path, capsys):
  """The study's arms are the two modes, so it fixes --bn: any --bn is one sentence naming the
  flag and the mode the study runs, exit 2, and no folder is made."""
  out = str(tmp_path / "out")
  with pytest.raises(SystemExit) as e:
    bn_mode.main(argv + ["--out", out])
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert e.value.code == 2 and err.endswith(
      "--bn is not a flag of experiments.bn_mode, which fixes it to frozen; drop --bn")
  assert not (tmp_path / "out").exists()
