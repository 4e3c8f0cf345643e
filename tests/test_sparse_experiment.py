"""Smoke test: experiments.sparse_transfer main() end to end with tiny flags."""
import json
import os
import re

import pytest

from experiments import sparse_tables, sparse_transfer
from jtransfer.study import sparse_pipeline as sparse_runs
from jtransfer.methods import sparsity, transfer
from jtransfer.study import flags, publish


def _config(argv):
  config = flags.parse(sparse_transfer.STUDY, argv)
  return config, sparse_runs.plan_of(config)


def _argv(source_dir, out):
  return ["--source", f"ckpt:{source_dir}", "--target", "digits", "--train-per-class", "3",
          "--val-per-class", "2", "--test-per-class", "3", "--steps", "6", "--patience", "3",
          "--eval-every", "3", "--lrs", "1e-4,1e-3", "--lam", "1", "--tune-seeds", "7",
          "--seeds", "0", "--batch-size", "16",
          "--source-rounds", "2", "--source-sparsity", "0.6", "--source-steps", "2",
          "--source-max-train", "64", "--source-test-per-class", "5", "--target-rates",
          "0.7,0.9", "--target-steps", "2", "--neuron-frac", "0.5", "--neuron-steps", "1",
          "--neuron-images-per-class", "2", "--neuron-layers", "fc6", "--out", out, "--quiet"]


@pytest.fixture(scope="module")
def small_source_dir(tmp_path_factory):
  """A tiny vgg_s source (pretrain(..., epochs=0.02, max_train=256)) with one conv per stage
  and narrow layers: fewer ops, so each of the run's few XLA compiles is quicker."""
  from jtransfer import sources
  path = str(tmp_path_factory.mktemp("src-small") / "model")
  source = sources.pretrain("vgg_s", "fmnist:0,2,3,4,6", epochs=0.02, max_train=256,
                             batch_size=64, progress=False,
                             model_config={"conv_widths": ((8,), (16,), (16,)),
                                           "dense_widths": (32, 32)})
  transfer.save_source(path, source)
  return path


@pytest.mark.slow  # ~25 CPU-s: a few XLA compiles of vgg_s train steps
def test_main_tiny(small_source_dir, tmp_path, capsys):
  src = small_source_dir
  out = str(tmp_path / "s")
  assert sparse_transfer.main(_argv(src, out)[:-1]) == 0  # not --quiet: progress on stderr
  err = capsys.readouterr().err
  # the plan by kind (4 nets x 2 LRs on one tuning seed; one unit), done/total after each run
  assert "sparse_transfer: 9 runs planned (8 tuning runs, 1 eval units (targets x seeds))" in err
  assert "[1/9, ETA" in err and re.search(r"\[\d+/\d+.*, last run\] eval unit digits seed 0", err)
  for name in ("report.md", "results.json", "results.jsonl", "summary.json",
               "source_sparsity.png", "fig3_pruning.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  saved = json.load(open(os.path.join(out, "results.json")))
  assert {r["version"] for r in saved} == {2}
  records = sparse_runs.rows(saved)
  kinds = [r["kind"] for r in records if r.get("role", "eval") == "eval"]
  assert kinds.count("source") == 3 and kinds.count("transfer") == 4
  assert kinds.count("target_prune") == 4 and kinds.count("neuron") == 1
  # tuning: every net's LR grid on tuning seed 7 only, validation only, never tested
  tune = [r for r in records if r.get("role") == "tune"]
  assert {r["variant"] for r in tune} == set(sparse_transfer.VARIANTS)
  assert all(r["seed"] == 7 and r["test_acc"] is None and r["val_acc"] is not None
             for r in tune)
  assert {r["lr"] for r in tune} >= {1e-4, 1e-3}
  assert all((r["lam"] is None) == (r["variant"] in ("standard", "S+K-")) for r in tune)
  # converged runs: steps, best step and why each stopped are recorded
  for r in records:
    if r["kind"] == "transfer" and r.get("status", "ok") == "ok":
      assert r["stopped"] in ("patience", "cap") and r["cap"] == 6
      assert r["best_step"] % 3 == 0 and r["best_step"] <= r["steps"] <= 6
  # each evaluation net ran at its tuned choice (the tuning table's)
  tuned = sparse_runs.choose(records, _config(_argv(src, out))[1], 1)
  for r in records:
    if r["kind"] == "transfer" and r["role"] == "eval":
      assert tuned[("digits", r["variant"])]["choice"]["lr"] == r["lr"]
  src_recs = [r for r in records if r["kind"] == "source"]
  assert [r["target"] for r in src_recs[1:]] == pytest.approx(
      sparsity.round_sparsities(0.6, 2))
  assert src_recs[-1]["sparsity"] == pytest.approx(0.6, abs=1e-3)
  by_variant = {r["variant"]: r for r in records if r["kind"] == "transfer"}
  assert by_variant["standard"]["rate"] == 0.0 and by_variant["S-K+"]["rate"] == 0.0
  assert by_variant["hybrid"]["rate"] > 0.3  # inherits the source's zeros below fc7
  for r in records:
    if r["kind"] == "target_prune":  # retrained by the protocol's rule, within the cap
      assert r["sparsity"] >= r["rate"] - 1e-3 and 1 <= r["retrain_steps"] <= 2
  neuron = next(r for r in records if r["kind"] == "neuron")
  assert neuron["table"]["fc6"]["neurons"][0] == 32 and neuron["rate"] >= neuron["rate_before"]
  report = open(os.path.join(out, "report.md")).read()
  for part in ("Sparse-SourceNet", "Table 1", "Table 2", "Table 3", "Hybrid-TransferNet(S+K-)",
               "Sparse-TargetNet_N", "## Tuning", "## Claims", "Only 1 evaluation seed",
               "Connection pruning retrains each rate until validation accuracy"):
    assert part in report, part
  # the report regenerates from results.json alone, byte for byte
  assert publish.check(out) == []
  # the saved Sparse-SourceNet has the recorded sparsity
  model = transfer.load_source(os.path.join(out, "models", "sparse_source"))
  rep = sparsity.sparsity_report(model.variables["params"])
  assert rep["sparsity"] == pytest.approx(src_recs[-1]["sparsity"])
  # resume: nothing left to do, same records; without --resume the directory is refused
  assert sparse_transfer.main(_argv(src, out)[:-1] + ["--resume"]) == 0
  tuned_runs = sum(r.get("role") == "tune" for r in records)
  assert f"; {tuned_runs + 1} already saved, skipped" in capsys.readouterr().err
  assert len(json.load(open(os.path.join(out, "results.json")))) == len(records)
  assert sparse_transfer.main(_argv(src, out)) == 2


def test_bad_flags(tmp_path):
  base = ["--out", str(tmp_path / "x"), "--quiet"]
  assert sparse_transfer.main(base + ["--variants", "hybrid"]) == 2
  assert sparse_transfer.main(base + ["--target-rates", "0.5,1.5"]) == 2
  assert sparse_transfer.main(base + ["--neuron-from", "0.3"]) == 2
  assert sparse_transfer.main(base + ["--neuron-layers", "fc8"]) == 2
  assert sparse_transfer.main(base + ["--seeds", "0,1", "--tune-seeds", "1"]) == 2  # overlap
  assert sparse_transfer.main(base + ["--lrs", "0,1e-3"]) == 2
  assert sparse_transfer.main(base + ["--tau", "0"]) == 2
  assert sparse_transfer.main(base + ["--val-per-class", "0"]) == 2  # patience needs validation
  assert not os.path.exists(tmp_path / "x")


def _records():
  t = "digits"
  recs = [dict(kind="source", round=0, target=0.0, sparsity=0.0, acc_pruned=None, acc=0.9,
               layers={}),
          dict(kind="source", round=1, target=0.5, sparsity=0.5, acc_pruned=0.7, acc=0.88,
               layers={"fc6/kernel": 0.6})]
  # tuning seed 9: lr 1e-3 best on validation for every net (test accuracy never recorded)
  for v in ("standard", "S+K-", "S-K+", "hybrid"):
    k = v in ("S-K+", "hybrid")
    for lr, val in ((1e-4, 0.5), (1e-3, 0.7)):
      recs.append(dict(kind="transfer", role="tune", variant=v, lr=lr, lam=1.0 if k else None,
                       tau=4.0 if k else None, val_acc=val, test_acc=None, target=t, seed=9,
                       steps=40, best_step=20, stopped="patience", rate=0.0))
  for seed, shift in ((0, 0.0), (1, 0.02)):
    for v, acc, rate in (("standard", 0.75, 0.0), ("S+K-", 0.77, 0.7), ("S-K+", 0.74, 0.0),
                         ("hybrid", 0.80, 0.7)):
      recs.append(dict(kind="transfer", role="eval", variant=v, test_acc=acc + shift,
                       val_acc=acc, rate=rate, target=t, seed=seed, lr=1e-3,
                       steps=100 + 20 * seed, best_step=50, stopped="patience" if seed else "cap"))
    for k, accs in (("K+", (0.82, 0.78)), ("K-", (0.79, 0.79))):
      for rate, acc in zip((0.8, 0.9), accs):
        recs.append(dict(kind="target_prune", knowledge=k, rate=rate, sparsity=rate,
                         test_acc=acc + shift, val_acc=acc, acc_pruned=0.5, target=t,
                         seed=seed))
    recs.append(dict(kind="neuron", target=t, seed=seed, from_rate=0.8, level=0.75,
                     stop_metric="val_acc", history=[{"accepted": True}], rate=0.85,
                     test_acc=0.76 + shift / 2, start={"test_acc": 0.82}, table={
                         "fc6": {"neurons": [256, 128], "weights": [1000, 500]},
                         "fc7": {"neurons": [256, 64], "weights": [800, 700]},
                         "head": {"neurons": [10, 10], "weights": [300, 300]},
                         "total": {"neurons": [522, 202], "weights": [2100, 1500]}}))
  return recs


def _claim(summary, text):
  return next(c for c in summary if c["claim"]["text"].startswith(text))


def test_report_from_records(tmp_path):
  argv = ["--target", "digits", "--seeds", "0,1", "--tune-seeds", "9", "--lrs", "1e-4,1e-3",
          "--lam", "1", "--tune-extend", "0"]
  config, plan = _config(argv)
  text = sparse_tables.make_report(_records(), config, plan)
  # Table 1: mean (std) over the two seeds (shift 0 and 2 points); steps and early stops
  assert "| Hybrid-TransferNet | 81.0 (1.0) | 70.0% | 110 (1/2 early) |" in text
  assert "| Standard-TransferNet | 76.0 (1.0) | 0.0% | 110 (1/2 early) |" in text
  assert "| 1 | 50.0% | 50.0% | 70.0 | 88.0 |" in text  # Sparse-SourceNet round
  assert "| fc6 | 256/128 | 1000/500 | 50.0% | 50.0% |" in text  # Table 2
  assert "| Sparse-TargetNet_C80 | 83.0 (1.0) | 80.0% |" in text  # Table 3
  # tuning table: lr 1e-3 chosen on validation, on the grid's upper edge (no extension)
  assert "| digits | Hybrid-TransferNet | 0.001 | 1 | 4 | 70.0 | 2 | lr:high |" in text
  assert "| digits | Standard-TransferNet | 0.001 | - | - | 70.0 | 2 | lr:high |" in text
  res = sparse_tables.claim_results(_records(), plan)
  # Table 1: hybrid - standard = +5 points on both seeds
  c = _claim(res, "Hybrid-TransferNet (S+K+)")
  assert c["pooled"]["paired"]["mean"] == pytest.approx(0.05)
  assert c["pooled"]["paired"]["wins"] == 2 and c["pooled"]["verdict"] == "reproduced"
  assert _claim(res, "model sparsity contributes")["pooled"]["paired"]["mean"] == \
      pytest.approx(0.06)
  # Fig. 3 vs the dense Hybrid: +2 at 0.8, -2 at 0.9 (margin 1 point: refuted there)
  fig3 = _claim(res, "Sparse-TargetNet keeps")
  cells = {c["cell"]["rate"]: c for c in fig3["cells"]}
  assert cells[0.8]["paired"]["mean"] == pytest.approx(0.02)
  assert cells[0.8]["verdict"] == "reproduced" and cells[0.9]["verdict"] == "refuted"
  # neuron pruning vs Standard: 0.76 + s/2 - (0.75 + s) = +1.0, +0.0 points
  neuron = _claim(res, "neuron pruning keeps accuracy")
  assert neuron["pooled"]["paired"]["mean"] == pytest.approx(0.005)
  # neurons removed: (128 + 192) of 512 = 62.5% on both seeds, +12.5 points over half
  removed = _claim(res, "neuron pruning removes almost half")
  assert removed["pooled"]["paired"]["mean"] == pytest.approx(0.125)
  assert removed["pooled"]["verdict"] == "reproduced"  # >= half - 10 points, no spread
  assert "## Claims" in text and "Only 1 evaluation seed" not in text
  assert "- digits: 62.5% of fc6 + fc7 neurons removed on average" in text
  sparse_tables.plot(_records(), plan, str(tmp_path / "a.png"), str(tmp_path / "b.png"))
  assert os.path.getsize(tmp_path / "b.png") > 0


def test_choice_reads_validation_only():
  """Tuning records carry no test accuracy; rewriting any test accuracy changes no choice,
  and a record of an evaluation seed never enters selection."""
  argv = ["--target", "digits", "--seeds", "0,1", "--tune-seeds", "9", "--lrs", "1e-4,1e-3",
          "--lam", "0.5,1", "--tune-extend", "0"]
  plan = _config(argv)[1]
  recs = _records()
  recs += [dict(r, lam=0.5, val_acc=0.9 if r["lr"] == 1e-4 else 0.1)  # K+ nets at lam 0.5
           for r in recs if r.get("role") == "tune" and r["lam"] is not None]
  tuned = sparse_runs.choose(recs, plan, 0)
  assert tuned[("digits", "hybrid")]["choice"] == dict(lr=1e-4, lam=0.5, tau=4.0)
  assert tuned[("digits", "standard")]["choice"] == dict(lr=1e-3, lam=None, tau=None)
  poisoned = [dict(r, test_acc=1.0 - (r.get("test_acc") or 0.0)) for r in recs] + [
      dict(r, val_acc=1.0, lr=1e-4) for r in recs if r.get("role") == "eval"
      and r["kind"] == "transfer"]
  assert sparse_runs.choose(poisoned, plan, 0) == tuned


@pytest.mark.parametrize("folder", ["sparse_transfer", "sparse_transfer_swapped"])
def test_records_version2_read_as_published(folder):
  """Every published record (version 1, and version 2 for those written since: the folder
  grown to 10 seeds mixes both) survives the version-2 form, and the report made from
  version-2 records is the one made from the published ones."""
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "published", folder)
  published = json.load(open(os.path.join(path, "results.json")))
  v1 = sparse_runs.rows(published)
  assert all("version" not in r for r in v1)
  assert [r for r in published if "version" not in r] == [
      r for r, p in zip(v1, published) if "version" not in p]  # flat records read as they are
  v2 = [sparse_runs.to_record(r) for r in v1]
  assert all(r["version"] == 2 for r in v2)
  assert sparse_runs.rows(v2) == v1
  assert [p for p in published if "version" in p] == [
      r for r, p in zip(v2, published) if "version" in p]  # and version 2 round-trips
  keys = {sparse_transfer.PUBLISHER.key(r) for r in v1}
  assert len(keys) == len(v1) and keys == {sparse_transfer.PUBLISHER.key(r) for r in v2}
  argv = json.load(open(os.path.join(path, "run.json")))["argv"]
  plan = _config(argv)[1]
  report = sparse_tables.report(plan, v2, path)
  assert report == sparse_tables.report(plan, v1, path)
  assert report == sparse_tables.report(plan, published, path)


@pytest.mark.parametrize("flag", [["--tuning", "nested"], ["--disjoint-tuning"],
                                  ["--cap-share", "0.1"], ["--no-paper-grid"]])
def test_runner_only_protocol_flags_are_refused(flag, capsys):
  """The pipeline runs its own grid: the grid runner's protocol flags would be ignored, so the
  parser refuses them (exit 2, one sentence naming the flag) rather than accept them silently."""
  with pytest.raises(SystemExit) as e:
    flags.raw_flags(sparse_transfer.STUDY, flag)
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert e.value.code == 2 and err.endswith(
      f"{flag[0]} is not a flag of experiments.sparse_transfer, which does not use it; "
      f"drop {flag[0]}")


def test_flags_are_the_old_parsers():
  """The flags and defaults of the module's parser before the study runner (a folder's
  settings fingerprint, checked on --resume, is made of exactly these)."""
  # (less the runner's flags added since, which stay out of the fingerprint at their default)
  raw = flags.raw_flags(sparse_transfer.STUDY, [])
  assert flags.settings_flags(sparse_transfer.STUDY, raw) == {
      "source": "fmnist:0,2,3,4,6", "source_epochs": 2.0, "source_data": None,
      "source_sparsity": 0.85, "source_rounds": 4, "source_schedule": "polynomial",
      "source_steps": 100, "source_lr": 0.01, "source_batch_size": 128,
      "source_max_train": 6000, "source_test_per_class": 500, "scope": "erk", "target": None,
      "train_per_class": 100, "val_per_class": 20, "test_per_class": 300,
      "seeds": "0,1,2,3,4", "variants": "standard,S+K-,S-K+,hybrid", "steps": 1000,
      "patience": 100, "eval_every": 10, "batch_size": 64, "lrs": "1e-4,3e-4,1e-3",
      "lam": "0.5,1,2", "tau": "4", "tune_seeds": "100", "tune_extend": 1, "n_m": 2, "n_e": 2,
      "target_rates": "0.8,0.9,0.95,0.975", "target_steps": 300, "neuron_from": None,
      "neuron_frac": 0.125, "neuron_steps": 50, "neuron_images_per_class": 50,
      "neuron_layers": "fc6,fc7", "data_dir": None, "out": "results/sparse_transfer",
      "resume": False, "overwrite": False, "quiet": False, "devices": 1}
  config, plan = _config(["--lam", "2,0.5,2", "--target-rates", "0.9,0.8"])
  assert config.extra.lams == (0.5, 2.0) and plan["rates"] == [0.8, 0.9]
  assert config.extra.lrs == (1e-4, 3e-4, 1e-3) and plan["lrs"] == [1e-4, 3e-4, 1e-3]
  assert config.cells.arms == sparse_transfer.VARIANTS and config.protocol.tune_draws == 0
