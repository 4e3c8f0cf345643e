"""The study runner's CLI edge (jtransfer.study.flags, config): flags built from the typed
configuration keep the modules' old flags and defaults (so settings fingerprints and published
argv read the same), convert to typed values, and refuse bad input in one sentence."""
import dataclasses

import pytest

from experiments import budget_study, cwl_tables, fewshot
from jtransfer.errors import InputError
from jtransfer.methods import delta
from jtransfer.study import config as cfg
from jtransfer.study import flags

# What experiments.fewshot's argparse parser gave for no flags before the runner (its
# settings fingerprint is computed from these destinations and values).
OLD_FEWSHOT_DEFAULTS = {
    "arch": "vgg_s,resnet_s", "source": "fmnist:0,2,3,4,6", "target": None, "shots": "1,5,10",
    "repeats": 2, "strategies": "freeze,finetune", "lrs": "reduced", "steps": 500,
    "patience": 100, "eval_every": 10, "val_per_class": 20, "tune_repeats": 1,
    "tune_extend": 2, "cv_folds": "auto", "augment": "none", "stored_size": 0,
    "stream_threads": 0, "stream_workers": 0, "shard": None, "paper_grid": True,
    "batch_size": 64, "test_per_class": 300, "data_dir": None, "source_epochs": 2.0,
    "seed": 0, "batch_runs": "auto", "no_feature_cache": False, "out": "results/fewshot",
    "resume": False, "overwrite": False, "quiet": False, "devices": 1, "num_processes": 1,
    "process_id": 0, "coordinator": None}


# The embedded demo grid (`make demo`) changed these defaults of experiments.fewshot since.
DEMO_CHANGES = {"arch": "resnet_s", "shots": "1", "repeats": 5, "paper_grid": False}


def test_flags_and_defaults_are_the_old_parsers():
  raw = flags.raw_flags(fewshot.STUDY, [])
  # argv read as a stored folder holds it: without --bn, a folder made before the flag, which
  # ran BN frozen (a new command line states --bn: tests/test_bn_flag.py)
  assert flags.settings_flags(fewshot.STUDY, raw) == {**OLD_FEWSHOT_DEFAULTS, **DEMO_CHANGES,
                                                      "bn": "frozen"}
  assert fewshot.DEMO_DEFAULTS == DEMO_CHANGES
  # flags added since (issue 29) stay out of the fingerprint at their defaults only
  assert {k: raw[k] for k in set(raw) - set(OLD_FEWSHOT_DEFAULTS)} == {
      "tuning": "shared", "disjoint_tuning": False, "cap_share": "off", "bn": None}
  nested = flags.raw_flags(fewshot.STUDY, ["--tuning", "nested"])
  assert flags.settings_flags(fewshot.STUDY, nested)["tuning"] == "nested"
  # a study's defaults replace the shared ones, by destination
  cwl = flags.settings_flags(cwl_tables.STUDY, flags.raw_flags(cwl_tables.STUDY, []))
  assert {k: v for k, v in cwl.items() if OLD_FEWSHOT_DEFAULTS.get(k, "x") != v} == {
      "shots": "1,3,5,10", "repeats": 10, "lrs": "paper", "steps": 1000, "patience": 200,
      "tune_repeats": 2, "out": "results/cwl_tables",
      "strategies": "freeze,freeze_cwl,finetune,finetune_cwl", "bn": "frozen"}
  budget = flags.raw_flags(budget_study.STUDY, [])
  assert budget["factors"] == "1,2,4" and budget["cv_folds"] == "0"
  assert budget["paper_grid"] is False


def test_config_is_typed():
  c = flags.parse(fewshot.STUDY, ["--shots", "1,3", "--target", "digits;fmnist:1,2",
                                  "--target", "digits:0,1", "--cv-folds", "0",
                                  "--batch-runs", "4", "--shard", "1/3", "--no-paper-grid"])
  assert c.cells == cfg.Cells(archs=("resnet_s",),  # the demo grid's arch
                              targets=("digits", "fmnist:1,2", "digits:0,1"), shots=(1, 3),
                              arms=("freeze", "finetune"))
  p = c.protocol
  assert (p.cv_folds, p.batch_runs, p.paper_grid, p.tune_draws) == (0, 4, False, 1)
  assert c.output.shard == (1, 3) and c.output.out == "results/fewshot"
  assert c.flags["shots"] == "1,3"  # the flags as given, for the fingerprint
  # 'auto' is None: resolved where it is used (by strategy, by backend)
  auto = flags.parse(fewshot.STUDY, [])
  assert auto.protocol.cv_folds is None and auto.protocol.batch_runs is None
  # a study's own flags build its `extra` dataclass
  b = flags.parse(budget_study.STUDY, ["--factors", "1,3"])
  assert b.extra == budget_study.Knobs(factors=(1, 3))
  assert dataclasses.is_dataclass(b) and b.protocol.cv_folds == 0


@pytest.mark.parametrize("study,argv,message", [
    (fewshot.STUDY, ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (fewshot.STUDY, ["--shots", "2,x"], "--shots '2,x': expected a comma list of integers"),
    (fewshot.STUDY, ["--cv-folds", "1"], "--cv-folds must be 'auto', 0 or an integer >= 2"),
    (fewshot.STUDY, ["--batch-runs", "0"], "--batch-runs must be 'auto' or an int >= 1"),
    (fewshot.STUDY, ["--shard", "2/2"], "--shard '2/2': needs N >= 1 and 0 <= I < N"),
    (fewshot.STUDY, ["--target", ""], "names no dataset"),
    (fewshot.STUDY, ["--arch", "vgg_s,nope"], "--arch 'nope' is unknown"),
    (fewshot.STUDY, ["--stream-workers", "2"], "--stream-workers needs --stream-threads"),
    (fewshot.STUDY, ["--augment", "pad2", "--stored-size", "36"], "cannot be combined"),
    (budget_study.STUDY, ["--factors", "2,4"], "expected increasing values starting at 1"),
    (cwl_tables.STUDY, ["--strategies", "freeze,magic"], "unknown strategy 'magic'"),
])
def test_bad_values_are_one_sentence(study, argv, message):
  with pytest.raises(InputError) as e:
    flags.parse(study, argv)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_delta_environment_is_read_only_for_the_delta_family(monkeypatch):
  monkeypatch.setenv("JTRANSFER_DELTA_ALPHA", "0.2")
  assert flags.parse(fewshot.STUDY, ["--strategies", "freeze"]).protocol.delta_env == {}
  c = flags.parse(fewshot.STUDY, ["--strategies", "freeze,l2sp"])
  assert c.protocol.delta_env == {"alpha": 0.2}
  assert delta.Config(**c.protocol.delta_env) == delta.Config(alpha=0.2)


def test_parser_refuses_what_argparse_refuses(capsys):
  with pytest.raises(SystemExit) as e:
    flags.raw_flags(fewshot.STUDY, ["--repeats", "two"])
  assert e.value.code == 2 and "--repeats" in capsys.readouterr().err


def _names(argv, dest):
  flag = "--" + dest.replace("_", "-")
  return any(a in (flag, f"--no-{flag[2:]}") or a.startswith(flag + "=") for a in argv)


def test_demo_defaults_leave_published_folders_unchanged():
  """Every published experiments.fewshot folder names each flag whose default the demo grid
  changed, so its argv parses (and its report regenerates) as when it ran; and only the demo
  grid's report carries the full grid's command."""
  import glob
  import json
  import os
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "published")
  runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(root, "*", "run.json")))]
  argvs = [r["argv"] for r in runs if r.get("module") == "experiments.fewshot"]
  assert argvs  # (bn_mode_resnet_s_k10)
  for argv in argvs:
    assert all(_names(argv, dest) for dest in fewshot.DEMO_DEFAULTS), argv
  assert fewshot.is_demo(flags.parse(fewshot.STUDY, ["--out", "x", "--overwrite", "--quiet"]))
  assert not fewshot.is_demo(flags.parse(fewshot.STUDY, ["--shots", "1,5"]))
  assert not fewshot.is_demo(flags.parse(fewshot.STUDY, argvs[0]))
  full = flags.parse(fewshot.STUDY, fewshot.FULL_GRID.split()[3:])
  assert (full.cells.archs, full.cells.shots, full.protocol.repeats,
          full.protocol.paper_grid) == (("vgg_s", "resnet_s"), (1, 5, 10), 2, True)
