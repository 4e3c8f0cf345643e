"""Smoke test: experiments.sparse_transfer main() end to end with tiny flags."""
import json
import os

import pytest

from experiments import sparse_transfer
from jtransfer.methods import sparsity, transfer


def _argv(source_dir, out):
  return ["--source", f"ckpt:{source_dir}", "--target", "digits", "--train-per-class", "3",
          "--val-per-class", "2", "--test-per-class", "3", "--steps", "2", "--batch-size", "16",
          "--source-rounds", "2", "--source-sparsity", "0.6", "--source-steps", "2",
          "--source-max-train", "64", "--source-test-per-class", "5", "--target-rates",
          "0.7,0.9", "--target-steps", "2", "--neuron-frac", "0.5", "--neuron-steps", "1",
          "--neuron-images-per-class", "2", "--neuron-layers", "fc6", "--out", out, "--quiet"]


@pytest.fixture(scope="module")
def small_source_dir(tmp_path_factory):
  """A tiny vgg_s source (pretrain(..., epochs=0.02, max_train=256)) with one conv per stage
  and narrow layers: fewer ops, so each of the run's few XLA compiles is quicker."""
  from experiments import pretrain
  path = str(tmp_path_factory.mktemp("src-small") / "model")
  source = pretrain.pretrain("vgg_s", "fmnist:0,2,3,4,6", epochs=0.02, max_train=256,
                             batch_size=64, progress=False,
                             model_config={"conv_widths": ((8,), (16,), (16,)),
                                           "dense_widths": (32, 32)})
  transfer.save_source(path, source)
  return path


@pytest.mark.slow  # ~30 CPU-s: four XLA compiles of vgg_s train steps
def test_main_tiny(small_source_dir, tmp_path):
  src = small_source_dir
  out = str(tmp_path / "s")
  assert sparse_transfer.main(_argv(src, out)) == 0
  for name in ("report.md", "results.json", "results.jsonl", "source_sparsity.png",
               "fig3_pruning.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  records = json.load(open(os.path.join(out, "results.json")))
  kinds = [r["kind"] for r in records]
  assert kinds.count("source") == 3 and kinds.count("transfer") == 4
  assert kinds.count("target_prune") == 4 and kinds.count("neuron") == 1
  src_recs = [r for r in records if r["kind"] == "source"]
  assert [r["target"] for r in src_recs[1:]] == pytest.approx(
      sparsity.round_sparsities(0.6, 2))
  assert src_recs[-1]["sparsity"] == pytest.approx(0.6, abs=1e-3)
  by_variant = {r["variant"]: r for r in records if r["kind"] == "transfer"}
  assert by_variant["standard"]["rate"] == 0.0 and by_variant["S-K+"]["rate"] == 0.0
  assert by_variant["hybrid"]["rate"] > 0.3  # inherits the source's zeros below fc7
  for r in records:
    if r["kind"] == "target_prune":
      assert r["sparsity"] >= r["rate"] - 1e-3
  neuron = next(r for r in records if r["kind"] == "neuron")
  assert neuron["table"]["fc6"]["neurons"][0] == 32 and neuron["rate"] >= neuron["rate_before"]
  report = open(os.path.join(out, "report.md")).read()
  for part in ("Sparse-SourceNet", "Table 1", "Table 2", "Table 3", "Hybrid-TransferNet(S+K-)",
               "Sparse-TargetNet_N", "claims"):
    assert part in report, part
  # the saved Sparse-SourceNet has the recorded sparsity
  saved = transfer.load_source(os.path.join(out, "models", "sparse_source"))
  rep = sparsity.sparsity_report(saved.variables["params"])
  assert rep["sparsity"] == pytest.approx(src_recs[-1]["sparsity"])
  # resume: nothing left to do, same records; without --resume the directory is refused
  assert sparse_transfer.main(_argv(src, out) + ["--resume"]) == 0
  assert len(json.load(open(os.path.join(out, "results.json")))) == len(records)
  assert sparse_transfer.main(_argv(src, out)) == 2


def test_bad_flags(tmp_path):
  base = ["--out", str(tmp_path / "x"), "--quiet"]
  assert sparse_transfer.main(base + ["--variants", "hybrid"]) == 2
  assert sparse_transfer.main(base + ["--target-rates", "0.5,1.5"]) == 2
  assert sparse_transfer.main(base + ["--neuron-from", "0.3"]) == 2
  assert sparse_transfer.main(base + ["--neuron-layers", "fc8"]) == 2
  assert not os.path.exists(tmp_path / "x")


def _records():
  t = "digits"
  recs = [dict(kind="source", round=0, target=0.0, sparsity=0.0, acc_pruned=None, acc=0.9,
               layers={}),
          dict(kind="source", round=1, target=0.5, sparsity=0.5, acc_pruned=0.7, acc=0.88,
               layers={"fc6/kernel": 0.6})]
  for seed, shift in ((0, 0.0), (1, 0.02)):
    for v, acc, rate in (("standard", 0.75, 0.0), ("S+K-", 0.77, 0.7), ("S-K+", 0.74, 0.0),
                         ("hybrid", 0.80, 0.7)):
      recs.append(dict(kind="transfer", variant=v, test_acc=acc + shift, val_acc=acc,
                       rate=rate, target=t, seed=seed))
    for k, accs in (("K+", (0.82, 0.78)), ("K-", (0.79, 0.79))):
      for rate, acc in zip((0.8, 0.9), accs):
        recs.append(dict(kind="target_prune", knowledge=k, rate=rate, sparsity=rate,
                         test_acc=acc + shift, val_acc=acc, acc_pruned=0.5, target=t,
                         seed=seed))
    recs.append(dict(kind="neuron", target=t, seed=seed, from_rate=0.8, level=0.75,
                     stop_metric="val_acc", history=[{"accepted": True}], rate=0.85,
                     test_acc=0.76, start={"test_acc": 0.82}, table={
                         "fc6": {"neurons": [256, 128], "weights": [1000, 500]},
                         "fc7": {"neurons": [256, 256], "weights": [800, 700]},
                         "head": {"neurons": [10, 10], "weights": [300, 300]},
                         "total": {"neurons": [522, 394], "weights": [2100, 1500]}}))
  return recs


def test_report_from_records(tmp_path):
  args = sparse_transfer.parse_args(["--target", "digits", "--seeds", "0,1"])
  plan = sparse_transfer.validate(args)
  text = sparse_transfer.make_report(_records(), args, plan)
  # Table 1: mean (std) over the two seeds (shift 0 and 2 points)
  assert "| Hybrid-TransferNet | 81.0 (1.0) | 70.0% |" in text
  assert "| Standard-TransferNet | 76.0 (1.0) | 0.0% |" in text
  assert "| 1 | 50.0% | 50.0% | 70.0 | 88.0 |" in text  # Sparse-SourceNet round
  assert "| fc6 | 256/128 | 1000/500 | 50.0% | 50.0% |" in text  # Table 2
  assert "| Sparse-TargetNet_C80 | 83.0 (1.0) | 80.0% |" in text  # Table 3
  assert "Hybrid-TransferNet(S-K+) does not beat Standard (-1.0 pts)" in text
  assert "Hybrid-TransferNet beats Standard (+5.0 pts)" in text and "Hybrid is the best" in text
  assert "K+ >= K- at 1/2 rates" in text and "rates ['80%', '90%']" in text
  sparse_transfer.plot(_records(), plan, str(tmp_path / "a.png"), str(tmp_path / "b.png"))
  assert os.path.getsize(tmp_path / "b.png") > 0
