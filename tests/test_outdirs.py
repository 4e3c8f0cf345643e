"""The output-folder rule (jtransfer.protocol.outdir): a folder holding anything is refused
unless --resume (same module and settings) or --overwrite (moved aside, never deleted); the
refusals leave every file byte-identical. Also progress lines and the Ctrl-C line."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from experiments import cwl_tables, fewshot
from jtransfer.errors import InputError
from jtransfer.protocol import outdir, progress
from jtransfer.study import edge, flags
from jtransfer.study.target import TargetRuns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(ROOT, "published", "cwl_tables")


def _digest(path) -> dict:
  """Every file under `path` -> its sha256: what a refusal must leave unchanged."""
  out = {}
  for folder, _, files in os.walk(path):
    for f in files:
      p = os.path.join(folder, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, path)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def _holding(tmp_path, name="out"):
  d = tmp_path / name
  d.mkdir()
  (d / "results.jsonl").write_text('{"a": 1}\n')
  (d / "report.md").write_text("# mine\n")
  return d


SETTINGS = outdir.Settings("experiments.fewshot", {"--seed": 0, "--lrs": "paper"})


def test_fresh_folder_is_created_with_its_settings(tmp_path):
  opened = outdir.open_outdir(str(tmp_path / "new"), SETTINGS)
  assert not opened.resumed and opened.moved_to is None
  stored = json.loads((tmp_path / "new" / outdir.SETTINGS_FILE).read_text())
  assert outdir.Settings.from_json(stored) == SETTINGS
  # Opened but nothing ran: the same command may open it again without a flag...
  outdir.open_outdir(str(tmp_path / "new"), SETTINGS)
  # ...but not another one.
  with pytest.raises(InputError, match="already holds files"):
    outdir.open_outdir(str(tmp_path / "new"), outdir.Settings("experiments.fewshot", {}))


def test_folder_holding_anything_is_refused_and_kept(tmp_path):
  d = tmp_path / "out"
  d.mkdir()
  (d / "notes.txt").write_text("my notes")
  before = _digest(d)
  with pytest.raises(InputError, match=r"already holds files \(1 entry: notes.txt\); pass "
                                       r"--resume .* or --overwrite"):
    outdir.open_outdir(str(d), SETTINGS)
  with pytest.raises(InputError, match="holds no results of experiments.fewshot to resume"):
    outdir.open_outdir(str(d), SETTINGS, resume=True)
  with pytest.raises(InputError, match="--resume and --overwrite conflict"):
    outdir.open_outdir(str(d), SETTINGS, resume=True, overwrite=True)
  assert _digest(d) == before


def test_overwrite_moves_the_old_folder_aside(tmp_path):
  d = _holding(tmp_path)
  before = _digest(d)
  said = []
  opened = outdir.open_outdir(str(d), SETTINGS, overwrite=True, log=said.append)
  assert opened.moved_to and os.path.basename(opened.moved_to).startswith("out.replaced-")
  assert _digest(opened.moved_to) == before          # nothing deleted
  assert sorted(os.listdir(d)) == [outdir.SETTINGS_FILE]
  assert said == [f"--overwrite: moved the old contents of {d} to {opened.moved_to} "
                  "(nothing deleted)"]


def test_overwrite_on_a_non_writer_process_changes_nothing(tmp_path):
  d = _holding(tmp_path)
  before = _digest(d)
  assert outdir.open_outdir(str(d), SETTINGS, overwrite=True, writer=False).moved_to is None
  assert _digest(d) == before and len(os.listdir(tmp_path)) == 1
  assert not outdir.open_outdir(str(tmp_path / "x"), SETTINGS, writer=False).resumed
  assert not (tmp_path / "x").exists()


def test_resume_needs_the_same_module_and_settings(tmp_path):
  d = tmp_path / "out"
  outdir.open_outdir(str(d), SETTINGS)
  (d / "results.jsonl").write_text('{"a": 1}\n')
  before = _digest(d)
  assert outdir.open_outdir(str(d), SETTINGS, resume=True).resumed
  other = outdir.Settings("experiments.fewshot", {"--seed": 1, "--lrs": "paper"})
  with pytest.raises(InputError, match=r"other settings \(--seed 1 != 0\)"):
    outdir.open_outdir(str(d), other, resume=True)
  with pytest.raises(InputError, match="module experiments.cwl_tables != experiments.fewshot"):
    outdir.open_outdir(str(d), outdir.Settings("experiments.cwl_tables", SETTINGS.flags),
                       resume=True)
  assert _digest(d) == before


def test_flags_that_do_not_change_results_are_outside_the_settings():
  a = outdir.settings_of("m", dict(seed=0, quiet=False, out="a", resume=False, devices=1,
                                   num_processes=1, process_id=0, coordinator=None, threads=2))
  b = outdir.settings_of("m", dict(seed=0, quiet=True, out="b", resume=True, devices=8,
                                   num_processes=2, process_id=1, coordinator="h:1", threads=8))
  assert a == b and a.flags == {"--seed": 0}
  assert outdir.differences(a, outdir.settings_of("m", dict(seed=0, tune_extend=2))) == [
      "--tune-extend 2 != (unset)"]


def test_a_file_in_the_way_is_named(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(InputError, match="is a file, not a folder"):
    outdir.open_outdir(str(tmp_path / "f"), SETTINGS)


@pytest.fixture
def published_copy(tmp_path):
  """A copy of published/cwl_tables: no settings.json, a run.json with module and argv."""
  d = tmp_path / "cwl"
  shutil.copytree(PUBLISHED, d)
  assert not (d / outdir.SETTINGS_FILE).exists()
  return d


def _open(study, argv):
  """Opens a study's --out as its main does (settings fingerprint of the parsed flags)."""
  raw = flags.raw_flags(study, argv)
  return edge.open_results(study, flags.config_of(study, raw), edge.settings(study, raw))


def test_published_folder_resumes_with_its_own_module_and_flags(published_copy, capsys):
  run = json.loads((published_copy / "run.json").read_text())
  argv = [a for a in run["argv"] if a not in ("--out", "results/cwl_tables10", "--resume")]
  argv += ["--out", str(published_copy), "--resume", "--devices", "1"]
  before = _digest(published_copy)
  results = _open(cwl_tables.STUDY, argv)
  assert results.opened.resumed and len(results.records) == int(run["records"])
  assert f"{len(results.records)} runs already saved" in capsys.readouterr().err
  # Derived from run.json, the settings are now stored; nothing else changed.
  after = _digest(published_copy)
  assert after.pop(outdir.SETTINGS_FILE) and after == before
  # A changed seed is refused by name.
  with pytest.raises(InputError, match=r"--seed 1 != 0"):
    _open(cwl_tables.STUDY, argv + ["--seed", "1"])


def test_published_folder_refuses_a_changed_flag_before_settings_exist(published_copy):
  run = json.loads((published_copy / "run.json").read_text())
  argv = [a if a != "1,3,5,10" else "1,3" for a in run["argv"] if a != "--out"
          and a != "results/cwl_tables10"] + ["--out", str(published_copy)]
  before = _digest(published_copy)
  with pytest.raises(InputError, match=r"--shots 1,3 != 1,3,5,10"):
    _open(cwl_tables.STUDY, argv)
  assert _digest(published_copy) == before


def test_fewshot_resume_on_a_published_cwl_tables_folder_is_refused(published_copy):
  """The filed case: fewshot --resume replaced a cwl_tables folder's report and run.json."""
  before = _digest(published_copy)
  proc = subprocess.run([sys.executable, "-m", "experiments.fewshot", "--arch", "vgg_s",
                         "--out", str(published_copy), "--resume", "--quiet"],
                        env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: --resume refused")
  assert "module experiments.fewshot != experiments.cwl_tables" in lines[0]
  assert _digest(published_copy) == before


def test_fewshot_resume_with_another_seed_is_refused(tmp_path, capsys):
  argv = ["--arch", "vgg_s", "--target", "digits:0,1", "--strategies", "freeze",
          "--out", str(tmp_path / "o"), "--quiet"]
  _open(fewshot.STUDY, argv)
  (tmp_path / "o" / "results.jsonl").write_text('{"a": 1}\n')
  before = _digest(tmp_path / "o")
  assert fewshot.main([*argv, "--seed", "1", "--resume"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--seed 1 != 0" in err[0]
  assert fewshot.main(argv) == 2                   # neither flag
  assert "already holds results" in capsys.readouterr().err
  assert _digest(tmp_path / "o") == before


@pytest.mark.parametrize("module,extra", [
    ("experiments.pretrain", ["--arch", "vgg_s", "--source", "digits", "--quiet"]),
    pytest.param("experiments.convert_weights",
                 ["--arch", "resnet18", "--weights", "/nonexistent.pth"],
                 marks=pytest.mark.slow),  # main() is tested below; the subprocess is pretrain's
])
def test_model_writers_refuse_a_folder_holding_results(tmp_path, module, extra):
  d = _holding(tmp_path)
  before = _digest(d)
  proc = subprocess.run([sys.executable, "-m", module, *extra, "--out", str(d)], env=_env(),
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: --out {d} already holds results")
  assert "--overwrite" in lines[0]
  assert _digest(d) == before


def test_grid_progress_counts_and_eta():
  clock = iter([0.0, 10.0, 30.0, 60.0, 90.0]).__next__
  said = []
  g = progress.GridProgress({"tuning-draw runs": 2, "tuned-point eval runs": 2}, saved=1,
                            emit=said.append, clock=clock)
  assert g.announce() == ("grid: 4 runs planned (2 tuning-draw runs, 2 tuned-point eval runs);"
                          " 1 already saved, skipped")
  assert g.finished("a") == "[2/4, ETA 20s] a"      # 10 s per run, 2 left
  assert g.finished("b") == "[3/4, ETA 15s] b"      # 30 s / 2 runs, 1 left
  assert g.finished("c") == "[4/4, last run] c"
  assert g.finished("d") == "[5/5 (grid extended), last run] d"
  assert len(said) == 5


def test_step_ticker_is_rate_limited_by_time():
  times = iter([0.0, 1.0, 4.9, 5.0, 6.0, 10.5]).__next__
  said = []
  t = progress.StepTicker("run", said.append, every_s=5.0, clock=times)
  for step in range(1, 6):
    t.tick(step, 100, 0.5 if step > 2 else None)
  assert said == ["  run: step 3/100, val acc 0.5000, 5s elapsed",
                  "  run: step 5/100, val acc 0.5000, 10s elapsed"]
  assert progress.ticker("x", None) is None          # --quiet


def test_draw_labels_name_tuning_draws():
  assert progress.draw_label(-1, 2, 5) == "tuning draw 1/2"
  assert progress.draw_label(-2, 2, 5, fold=4, folds=5) == "tuning draw 2/2 CV fold 5/5"
  assert progress.draw_label(0, 2, 5) == "eval draw 1/5"
  assert progress.duration(3725) == "1h02m" and progress.duration(65) == "1m05s"


def test_interrupted_line_gives_the_resume_command(tmp_path):
  d = _holding(tmp_path)
  argv = ["--arch", "vgg_s", "--out", str(d), "--overwrite", "--quiet"]
  line = edge.interrupted_line(fewshot.STUDY, argv)
  assert line == (f"interrupted: 1 runs saved in {d}; continue with: python -m "
                  f"experiments.fewshot --arch vgg_s --out {d} --quiet --resume")


def test_split_text_reports_the_counts_the_runs_used():
  from jtransfer.study.tables import split_text
  asked = [dict(role="eval", shots=2, n_train=6, n_val=60, n_test=900)]   # 3 classes
  assert split_text(20, 300, asked) == ("Validation: 20/class, disjoint from the k-shot set "
                                        "and from test; test: <= 300/class of the target's "
                                        "test split")
  # A flat folder of 30 images per class split 24/6: k=5 leaves ~5 validation images a class.
  small = [dict(role="eval", shots=5, n_train=15, n_val=v, n_test=18) for v in (15, 14)]
  small.append(dict(role="tune", shots=5, n_train=15, n_val=3, n_test=18))  # not counted
  assert split_text(20, 300, small) == (
      "Validation: 14-15 images per draw (4.7-5/class over 3 classes) (--val-per-class 20 "
      "asked for more than the labelled pool held), disjoint from the k-shot set and from "
      "test; test: 18 images (6/class over 3 classes) (the cap is 300/class) of the target's "
      "test split")
  two = [dict(r, target="a") for r in asked] + [dict(r, target="b", n_test=30) for r in asked]
  assert "test: a 300/class, b 30 images (10/class over 3 classes) (the cap is 300/class)" in \
      split_text(20, 300, two)


def test_lr_grid_text_includes_the_values_tuning_extended_to():
  from jtransfer.study.tables import lr_grid_text
  tuned = {("vgg_s", "digits", 1, "freeze"): {"grid": {"lr": [0.002, 0.01, 0.05]}},
           ("vgg_s", "digits", 5, "freeze"): {"grid": {"lr": [0.01, 0.05, 0.25]}},
           ("vgg_s", "digits", 1, "finetune"): {"grid": {"lr": [1e-4, 1e-3]}}}
  assert lr_grid_text(["freeze", "finetune"], {"freeze": [0.01, 0.05],
                                               "finetune": [1e-4, 1e-3]}, tuned) == (
      "LR grids: freeze: 0.01, 0.05 (extended by tuning to 0.002, 0.25); "
      "finetune: 0.0001, 0.001")


def test_published_report_lists_the_extended_lr_grid():
  report = open(os.path.join(PUBLISHED, "report.md")).read()
  assert "freeze: 0.01, 0.05 (extended by tuning to" in report


GRID = ["--arch", "vgg_s", "--target", "digits:0,1,2", "--strategies", "freeze", "--shots", "1",
        "--repeats", "2", "--steps", "3", "--test-per-class", "5", "--val-per-class", "2",
        "--lrs", "0.001,0.01", "--tune-repeats", "1", "--patience", "0", "--no-paper-grid",
        "--tune-extend", "0"]


def test_grid_announces_its_plan_and_names_tuning_draws(tiny_source_dir, tmp_path, capsys):
  argv = [*GRID, "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--out", str(tmp_path / "o")]
  assert fewshot.main(argv) == 0
  err = capsys.readouterr().err
  lines = [l for l in err.splitlines() if l.startswith(("grid:", "["))]
  assert lines[0] == "grid: 4 runs planned (2 tuning-draw runs, 2 tuned-point eval runs)"
  assert lines[1].startswith("[1/4, ETA ") and "k=1 tuning draw 1/1 freeze lr=0.001" in lines[1]
  assert lines[-1].startswith("[4/4, last run]") and "eval draw 2/2" in lines[-1]
  assert "r=-1" not in err
  # Resume says what it skips; --quiet prints no progress.
  assert fewshot.main([*argv, "--resume", "--quiet"]) == 0
  err = capsys.readouterr().err
  assert "grid:" not in err and "[" not in err
  assert fewshot.main([*argv, "--resume"]) == 0
  err = capsys.readouterr().err
  assert "--resume: 4 runs already saved" in err and "4 already saved, skipped" in err


def test_ctrl_c_ends_with_the_resume_command(tiny_source_dir, tmp_path, capsys, monkeypatch):
  out = tmp_path / "o"
  argv = [*GRID, "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--out", str(out), "--quiet"]
  real, calls = TargetRuns.run, []

  def run_then_interrupt(self, *a, **k):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt  # Ctrl-C during the third run
    return real(self, *a, **k)

  monkeypatch.setattr(TargetRuns, "run", run_then_interrupt)
  assert fewshot.main(argv) == 130
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"interrupted: 2 runs saved in {out}; continue with: python -m "
                 f"experiments.fewshot {' '.join(argv)} --bn train --resume"]  # stated
  before = _digest(out)
  monkeypatch.setattr(TargetRuns, "run", real)
  assert fewshot.main([*argv, "--resume"]) == 0
  after = _digest(out)
  assert after["results.jsonl"] != before["results.jsonl"]
  with open(out / "results.jsonl") as f:
    assert sum(1 for _ in f) == 4


@pytest.mark.slow
def test_sigint_subprocess_exits_130_without_traceback(tiny_source_dir, tmp_path):
  import signal
  import time
  out = tmp_path / "o"
  cmd = [sys.executable, "-m", "experiments.fewshot", *GRID, "--repeats", "50", "--source",
         f"ckpt:{tiny_source_dir('vgg_s')}", "--out", str(out), "--quiet"]
  proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not (
      (out / "results.jsonl").exists() and (out / "results.jsonl").read_text().count("\n") >= 2):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"interrupted: ") and "Traceback" not in err
  assert lines[0].endswith("--resume") and "python -m experiments.fewshot" in lines[0]


def test_interrupted_line_of_pretrain_and_of_unparsable_flags(tmp_path):
  from experiments import pretrain
  argv = ["--arch", "vgg_s", "--out", str(tmp_path / "m"), "--ckpt-dir", str(tmp_path / "c")]
  assert edge.model_interrupted_line(pretrain.parse_flags, argv) == (
      f"interrupted: no model saved in {tmp_path / 'm'}; the same command continues from the "
      f"checkpoints in {tmp_path / 'c'}")
  # unparsable, --arch missing (argparse exits), or a bad value (InputError)
  for bad in (["--bogus"], argv[2:], argv + ["--image-shape", "x"]):
    assert edge.model_interrupted_line(pretrain.parse_flags, bad) == (
        "interrupted before --out was opened; nothing saved")


def test_model_command_exit_codes_and_lines(tmp_path, capsys):
  """pretrain's and convert_weights' one main: the body's code, 2 after one error sentence,
  130 after Ctrl-C with the model-folder line (a Ctrl-C during the body, not a traceback)."""
  from experiments import pretrain
  argv = ["--arch", "vgg_s", "--out", str(tmp_path / "m")]

  def raise_(e):
    raise e
  assert edge.model_command(pretrain.parse_flags, lambda f: 7 if f.arch == "vgg_s" else 0,
                            argv) == 7
  assert edge.model_command(pretrain.parse_flags,
                            lambda f: raise_(InputError("--lr is bad")), argv) == 2
  assert capsys.readouterr().err == "error: --lr is bad\n"
  assert edge.model_command(pretrain.parse_flags, lambda f: raise_(KeyboardInterrupt()),
                            argv) == edge.INTERRUPTED
  assert capsys.readouterr().err == f"interrupted: no model saved in {tmp_path / 'm'}\n"
  with pytest.raises(SystemExit) as e:  # argparse: --out is required
    edge.model_command(pretrain.parse_flags, lambda f: 0, argv[:2])
  assert e.value.code == 2 and "--out" in capsys.readouterr().err


def test_model_selection_resume_may_add_scratch_but_not_change_a_score_flag():
  from experiments import model_selection as ms
  from jtransfer.study import edge, flags
  base = ["--tiny", "--out", "x"]
  made = edge.settings(ms.STUDY, flags.raw_flags(ms.STUDY, base))
  assert made == edge.settings(ms.STUDY, flags.raw_flags(ms.STUDY, base + ["--scratch"]))
  other = edge.settings(ms.STUDY, flags.raw_flags(ms.STUDY, base + ["--logme", "exact"]))
  assert outdir.differences(made, other) == ["--logme exact != published"]


def test_convert_weights_onto_an_existing_source(tmp_path, capsys):
  """The filed case: converting onto an existing source replaced it. Now refused; with
  --overwrite the old source is moved aside whole, the new one saved in its place."""
  import torch
  from experiments import convert_weights
  from test_weights import random_state_dict, resnet_shapes
  pth = tmp_path / "r18.pth"
  torch.save(random_state_dict(resnet_shapes("resnet18")), pth)
  argv = ["--arch", "resnet18", "--weights", str(pth), "--input-shape", "32,32,3",
          "--out", str(tmp_path / "src")]
  assert convert_weights.main(argv) == 0
  before = _digest(tmp_path / "src")
  capsys.readouterr()
  assert convert_weights.main(argv + ["--seed", "1", "--drop-head"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "already holds files" in err[0] and "meta.json" in err[0]
  assert _digest(tmp_path / "src") == before
  assert convert_weights.main(argv + ["--drop-head", "--overwrite"]) == 0
  (moved,) = [p for p in os.listdir(tmp_path) if p.startswith("src.replaced-")]
  assert _digest(tmp_path / moved) == before
  assert _digest(tmp_path / "src") != before
  assert "--overwrite: moved the old contents" in capsys.readouterr().err
