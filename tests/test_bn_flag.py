"""The study runner's `--bn {train,frozen}` (default train) and the folders made before it, for
which an absent --bn means frozen (DELTA's table: train, its DELTA-family arms' recipe): new
folders state it, old ones resume only under it and regenerate their reports unchanged."""
import json
import os
import shutil

import pytest

from experiments import bn_mode, delta_table, fewshot
from jtransfer.errors import InputError
from jtransfer.study import edge, flags, grid
from jtransfer.study import records as records_lib
from jtransfer.study.report import bn_text

ROOT = os.path.join(os.path.dirname(__file__), "..", "published")
TINY = ["--shots", "1", "--repeats", "1", "--steps", "2", "--test-per-class", "3",
        "--val-per-class", "2", "--lrs", "0.001", "--quiet", "--target", "digits:0,1,2"]


def _copy(name, tmp_path):
  out = tmp_path / name
  shutil.copytree(os.path.join(ROOT, name), out)
  return out, json.loads((out / "run.json").read_text())["argv"]


def _without_out(argv):
  i = argv.index("--out")
  return argv[:i] + argv[i + 2:]


def test_new_folder_states_bn_and_frozen_only_arms_run_frozen(tiny_source_dir, tmp_path,
                                                              capsys):
  out = tmp_path / "new"
  argv = ["--arch", "resnet_s", "--source", f"ckpt:{tiny_source_dir('resnet_s')}",
          "--strategies", "freeze,finetune", "--out", str(out), *TINY]
  assert fewshot.main(argv) == 0
  run = json.loads((out / "run.json").read_text())
  assert run["argv"][-2:] == ["--bn", "train"]  # the default, written into the folder
  assert json.loads((out / "settings.json").read_text())["flags"]["--bn"] == "train"
  rows = records_lib.rows(json.loads((out / "results.json").read_text()))
  assert {(r["arm"], r["bn"]) for r in rows} == {("freeze", "frozen"), ("finetune", "train")}
  report = (out / "report.md").read_text()
  assert ("BatchNorm (--bn train): train mode (batch statistics while training, running "
          "averages updated and used at evaluation, PyTorch's model.train()) for finetune; "
          "the others keep the source's running statistics (freeze)") in report
  # a snapshot given the command line without --bn publishes the mode its settings.json holds
  from jtransfer.study import publish
  publish.snapshot(str(out), "experiments.fewshot", argv)
  assert json.loads((out / "run.json").read_text())["argv"][-2:] == ["--bn", "train"]
  assert (out / "report.md").read_text() == report
  capsys.readouterr()
  # the folder's mode is a setting: resuming it under the other one is refused
  assert fewshot.main([*argv, "--resume", "--bn", "frozen"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "--bn frozen != train" in err


def test_a_published_folder_resumes_only_under_bn_frozen(tmp_path, capsys):
  out, argv = _copy("bn_mode_resnet_s_k10", tmp_path)  # experiments.fewshot, before --bn
  argv = [*_without_out(argv), "--out", str(out), "--resume"]
  assert fewshot.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "--bn train != frozen" in err and "pass --bn frozen" in err
  assert sorted(os.listdir(out)) == sorted(os.listdir(os.path.join(ROOT, out.name)))
  raw = flags.raw_flags(fewshot.STUDY, [*argv, "--bn", "frozen"])
  config = flags.config_of(fewshot.STUDY, raw)
  edge.bn_check(fewshot.STUDY, config, str(out))
  opened = edge.open_results(fewshot.STUDY, config, edge.settings(fewshot.STUDY, raw))
  assert opened.opened.resumed
  # the fingerprint a resume stores states the mode the folder ran
  assert json.loads((out / "settings.json").read_text())["flags"]["--bn"] == "frozen"


def test_old_delta_table_folders_mean_train(tmp_path):
  """DELTA's table ran its DELTA-family arms in train mode before --bn (delta.Config's
  default): there an absent --bn means train, and a resume with the default is accepted."""
  out, argv = _copy("delta_table_k10", tmp_path)
  config = flags.parse(delta_table.STUDY, argv)
  assert (config.protocol.bn, config.protocol.bn_stated) == ("train", False)
  assert delta_table.delta_config(config).bn_train is True
  argv = flags.stated_argv(delta_table.STUDY, [*_without_out(argv), "--out", str(out),
                                               "--resume"])
  raw = flags.raw_flags(delta_table.STUDY, argv)
  config = flags.config_of(delta_table.STUDY, raw)
  edge.bn_check(delta_table.STUDY, config, str(out))
  assert edge.open_results(delta_table.STUDY, config,
                           edge.settings(delta_table.STUDY, raw)).opened.resumed


def test_published_reports_gain_no_bn_sentence():
  for name in sorted(os.listdir(ROOT)):
    path = os.path.join(ROOT, name, "run.json")
    module = json.load(open(path))["module"] if os.path.exists(path) else ""
    study = {"experiments.fewshot": fewshot.STUDY, "experiments.delta_table":
             delta_table.STUDY}.get(module)
    if study is None:
      continue
    argv = json.load(open(path))["argv"]
    config = flags.parse(study, argv)
    report = open(os.path.join(ROOT, name, "report.md")).read()
    if "--bn" in argv:  # made since --bn (e.g. delta_table_k10_converged): it says its mode
      assert config.protocol.bn_stated and "BatchNorm (--bn" in report, name
      continue
    assert not config.protocol.bn_stated
    assert bn_text(grid.plan(study, config)) == ""
    assert "BatchNorm (--bn" not in report


def test_a_folder_no_bn_reproduces_is_refused(tmp_path, capsys):
  """Before --bn, finetune kept the source's statistics and l2sp trained them (its recipe):
  no --bn resumes such a folder without changing one of them."""
  out, argv = _copy("bn_mode_resnet_s_k10", tmp_path)
  run = json.loads((out / "run.json").read_text())
  i = run["argv"].index("--strategies")
  run["argv"][i + 1] = "finetune,l2sp"
  (out / "run.json").write_text(json.dumps(run))
  argv = [*_without_out(run["argv"]), "--out", str(out), "--resume", "--bn", "frozen"]
  assert fewshot.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and "was made before --bn" in err and "l2sp (train, now frozen)" \
      in err


def test_bad_bn_and_bn_mode_pins_frozen(tmp_path, capsys):
  assert fewshot.main(["--bn", "eval", "--out", str(tmp_path / "o"), "--quiet"]) == 2
  assert capsys.readouterr().err.strip() == (
      "error: --bn 'eval': expected 'train' (batch statistics while fine-tuning, the default) "
      "or 'frozen' (the source's running statistics)")
  assert not (tmp_path / "o").exists()
  # experiments.bn_mode compares the modes itself: no --bn, its finetune arm frozen
  with pytest.raises(SystemExit) as e:
    flags.parse(bn_mode.STUDY, ["--bn", "train"])
  assert e.value.code == 2
  config = flags.parse(bn_mode.STUDY, [])
  plan = grid.plan(bn_mode.STUDY, config)
  assert {a.name: a.strategy.bn_mode(config.protocol.bn) for a in plan.arms} == {
      "finetune": "frozen", "finetune_bn": "train"}
  assert flags.stated_argv(bn_mode.STUDY, []) == [] and bn_text(plan) == ""
  with pytest.raises(InputError):
    from jtransfer.methods import bn_rule
    bn_rule.check("eval")


def test_rerun_commands_state_the_old_mode(tmp_path):
  """publish draws' commands for folders made before --bn state the mode they ran: frozen for
  cwl_tables, train for DELTA's table (read from draw_audit itself, not from docs/reruns.md,
  whose list shrinks as folders reach 10 draws)."""
  from jtransfer.study import draw_audit
  pub = os.path.join(ROOT, "..", "published")
  for folder, mode in (("baselines_k10", "frozen"), ("delta_table_k10", "train")):
    assert "--bn" not in json.load(open(os.path.join(pub, folder, "run.json")))["argv"]
    command = draw_audit.rerun(os.path.join(pub, folder), "repeat", 5).command
    assert f" --bn {mode} " in command, command
    # a folder still short grows in place with its mode stated: a 5-draw copy of the folder
    short = tmp_path / folder
    shutil.copytree(os.path.join(pub, folder), short)
    run = json.loads((short / "run.json").read_text())
    run["argv"][run["argv"].index("--repeats") + 1] = "5"  # as the folder was before growing
    (short / "run.json").write_text(json.dumps(run))
    grown = draw_audit.grow(str(short), "repeat", 5)
    assert grown is not None and grown.command.endswith(f"--bn {mode} --resume"), grown
