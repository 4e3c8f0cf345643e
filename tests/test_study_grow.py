"""Growing a folder's evaluation draws in place (issue 29, item 9): `--repeats N --resume` on a
folder made with fewer draws keeps every finished run and runs only the new draws, because the
first N draws of a bigger grid are the draws of a grid of N. Shrinking, and growth under
--disjoint-tuning (whose tuning draws depend on the count), are refused with the folder left
byte for byte as it was; a published folder (settings from run.json) grows the same way."""
import json
import os
import shutil

import numpy as np
import pytest

from experiments import (cwl_pruning, cwl_retrieval, cwl_tables, fewshot, sparse_transfer,
                         truncation)
from jtransfer.data import load_spec
from jtransfer.errors import InputError
from jtransfer.protocol import outdir
from jtransfer.study import draws, edge, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = ["--arch", "vgg_s", "--target", "digits:0,1,2", "--strategies", "freeze", "--shots", "1",
        "--steps", "3", "--test-per-class", "5", "--val-per-class", "2",
        "--lrs", "0.001,0.01", "--tune-repeats", "1", "--patience", "0", "--no-paper-grid",
        "--tune-extend", "0", "--quiet"]


def _digest(path) -> dict:
  """Every file under `path` -> its bytes: what a refusal must leave unchanged."""
  out = {}
  for folder, _, files in os.walk(path):
    for f in files:
      with open(os.path.join(folder, f), "rb") as fh:
        out[os.path.relpath(os.path.join(folder, f), path)] = fh.read()
  return out


def _records(path) -> list[dict]:
  with open(os.path.join(path, "results.json")) as f:
    return json.load(f)


def _by_draw(records) -> dict:
  """(role, index) -> that draw's records (results.json's order)."""
  out: dict = {}
  for r in records:
    out.setdefault((r["draw"]["role"], r["draw"]["index"]), []).append(r)
  return out


def _open(study, argv):
  """Opens a study's --out as its main does (--bn stated, `flags.stated_argv`)."""
  raw = flags.raw_flags(study, flags.stated_argv(study, argv))
  return edge.open_results(study, flags.config_of(study, raw), edge.settings(study, raw))


def test_growth_rule_by_hand():
  s = lambda **f: outdir.Settings("m", {"--seed": 0, **f})
  assert outdir.growth(s(**{"--repeats": 2}), s(**{"--repeats": 3}), {"--repeats"}) == [
      "--repeats 2 -> 3"]
  assert outdir.growth(s(**{"--repeats": 3}), s(**{"--repeats": 2}), {"--repeats"}) is None
  assert outdir.growth(s(**{"--repeats": 2}), s(**{"--repeats": 3}), ()) is None
  # another flag changing beside the growth is refused
  assert outdir.growth(s(**{"--repeats": 2}), outdir.Settings("m", {"--seed": 1, "--repeats": 3}),
                       {"--repeats"}) is None
  # comma lists: a strict superset grows (text or JSON list); a reordering or swap does not
  assert outdir.grows("0,1,2,3,4", "0,1,2,3,4,5,6,7,8,9") and outdir.grows([0, 1], [0, 1, 2])
  assert not outdir.grows("0,1", "1,0") and not outdir.grows("0,1", "0,2,3")
  assert not outdir.grows(True, 2) and not outdir.grows(2, "3")


@pytest.fixture(scope="module")
def digit_labels():
  return load_spec("digits", (28, 28, 1)).train.labels


def test_first_draws_do_not_depend_on_the_count(digit_labels):
  """The property growth rests on: draws 0..N-1 and the shared tuning draws of a grid of N+M
  are those of a grid of N; under --disjoint-tuning the tuning draws change with the count."""
  two = draws.cell_draws(digit_labels, 10, 1, 0, 2, 1, 20)
  three = draws.cell_draws(digit_labels, 10, 1, 0, 3, 1, 20)
  for r in (-1, 0, 1):
    assert two[r][0] == three[r][0]
    assert all(np.array_equal(a, b) for a, b in zip(two[r][1:], three[r][1:]))
  d2 = draws.cell_draws(digit_labels, 10, 1, 0, 2, 1, 20, disjoint=True)
  d3 = draws.cell_draws(digit_labels, 10, 1, 0, 3, 1, 20, disjoint=True)
  assert all(np.array_equal(a, b) for a, b in zip(d2[0][1:], d3[0][1:]))  # eval unchanged
  assert not np.array_equal(np.sort(d2[-1][1]), np.sort(d3[-1][1]))       # tuning moved


def test_grow_two_draws_to_three_in_place(tiny_source_dir, tmp_path, capsys):
  src = ["--source", f"ckpt:{tiny_source_dir('vgg_s')}"]
  grown, fresh = str(tmp_path / "grown"), str(tmp_path / "fresh")
  assert fewshot.main([*GRID, *src, "--repeats", "2", "--out", grown]) == 0
  two = _records(grown)
  assert fewshot.main([*GRID, *src, "--repeats", "3", "--out", fresh]) == 0
  capsys.readouterr()
  assert fewshot.main([*[a for a in GRID if a != "--quiet"], *src, "--repeats", "3",
                       "--out", grown, "--resume"]) == 0
  err = capsys.readouterr().err
  assert "--resume: growing --repeats 2 -> 3" in err
  with open(os.path.join(grown, outdir.SETTINGS_FILE)) as f:
    assert json.load(f)["flags"]["--repeats"] == 3
  with open(os.path.join(grown, "results.jsonl")) as f:
    lines = [json.loads(l) for l in f if l.strip()]
  assert len(lines) == len(two) + 1  # only the new draw's one evaluation run was trained
  old, new, ref = _by_draw(two), _by_draw(_records(grown)), _by_draw(_records(fresh))
  assert sorted(old) == [("eval", 0), ("eval", 1), ("tune", 0)]
  for draw in old:  # the finished runs, bit for bit
    assert new[draw] == old[draw]
  assert new[("eval", 2)] == ref[("eval", 2)]  # the new draw = a fresh 3-draw grid's third
  assert sorted(new) == sorted(ref)
  with open(os.path.join(grown, "run.json")) as f:
    run = json.load(f)
  assert run["complete"] is True and "--repeats 3" in run["command"]

  # Shrinking is refused by name, exit 2, nothing changed.
  before = _digest(grown)
  assert fewshot.main([*GRID, *src, "--repeats", "2", "--out", grown, "--resume"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--repeats 2 != 3" in err[0] and "never shrink" in err[0]
  assert _digest(grown) == before


def test_growth_under_disjoint_tuning_is_refused(tmp_path, capsys):
  out = str(tmp_path / "o")
  argv = [*GRID, "--disjoint-tuning", "--out", out]
  _open(fewshot.STUDY, [*argv, "--repeats", "2"])
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.write('{"a": 1}\n')
  before = _digest(out)
  assert fewshot.main([*argv, "--repeats", "3", "--resume"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --resume cannot grow --repeats 2 -> 3 "
                                             "under --disjoint-tuning")
  assert _digest(out) == before
  # nested tuning draws no tuning draws, so --disjoint-tuning changes nothing there: it grows
  nested = str(tmp_path / "n")
  argv = [*GRID, "--disjoint-tuning", "--tuning", "nested", "--out", nested]
  _open(fewshot.STUDY, [*argv, "--repeats", "2"])
  with open(os.path.join(nested, "results.jsonl"), "w") as f:
    f.write('{"a": 1}\n')
  assert _open(fewshot.STUDY, [*argv, "--repeats", "3", "--resume"]).opened.resumed


def test_published_folder_grows_from_its_run_json(tmp_path):
  """A published folder has no settings.json: its settings come from run.json's argv, and a
  larger --repeats grows it the same way (settings.json written with the new count)."""
  d = tmp_path / "cwl"
  shutil.copytree(os.path.join(ROOT, "published", "cwl_tables"), d)
  run = json.loads((d / "run.json").read_text())
  argv = [a for a in run["argv"] if a not in ("--resume",)]
  i = argv.index("--out")
  argv[i + 1] = str(d)
  n = int(argv[argv.index("--repeats") + 1])
  before = _digest(d)
  # made before --bn: it grows only under the mode it ran (docs/reruns.md states it)
  with pytest.raises(InputError, match=r"--bn train != frozen.*pass --bn frozen"):
    _open(cwl_tables.STUDY, [*argv, "--repeats", str(n + 2), "--resume"])
  argv += ["--bn", "frozen"]
  with pytest.raises(InputError, match=rf"--repeats {n - 1} != {n}.*never shrink"):
    _open(cwl_tables.STUDY, [*argv, "--repeats", str(n - 1), "--resume"])
  assert _digest(d) == before
  results = _open(cwl_tables.STUDY, [*argv, "--repeats", str(n + 2), "--resume"])
  assert results.opened.resumed and len(results.records) == run["records"]
  after = _digest(d)
  assert json.loads(after.pop(outdir.SETTINGS_FILE))["flags"]["--repeats"] == n + 2
  assert after == before


def test_sparse_transfer_seeds_grow_as_a_superset(tmp_path):
  assert set(edge.growable(sparse_transfer.STUDY)) == {"--seeds"}
  assert set(edge.growable(cwl_tables.STUDY)) == {"--repeats"}
  # own loops whose draw r is seeded by r alone opt in; truncation grows its targets
  assert set(edge.growable(cwl_pruning.STUDY)) == set(edge.growable(cwl_retrieval.STUDY)) == {
      "--repeats"}
  # its draws are the targets; a folder made with the default list grows from it
  assert edge.growable(truncation.STUDY) == {"--target": list(truncation.DEFAULT_TARGETS)}
  out = str(tmp_path / "s")
  argv = ["--target", "digits", "--out", out, "--quiet"]
  _open(sparse_transfer.STUDY, [*argv, "--seeds", "0,1"])
  with open(os.path.join(out, "results.jsonl"), "w") as f:
    f.write('{"a": 1}\n')
  before = _digest(out)
  for seeds in ("0,2", "0"):  # not a superset
    with pytest.raises(InputError, match=f"--seeds {seeds} != 0,1"):
      _open(sparse_transfer.STUDY, [*argv, "--seeds", seeds, "--resume"])
  assert _digest(out) == before
  assert _open(sparse_transfer.STUDY, [*argv, "--seeds", "0,1,2", "--resume"]).opened.resumed
  with open(os.path.join(out, outdir.SETTINGS_FILE)) as f:
    assert json.load(f)["flags"]["--seeds"] == "0,1,2"


COMPACT = ["--arch", "vgg_s", "--target", "digits", "--shots", "2", "--teacher-steps", "4",
           "--student-steps", "3", "--patience", "2", "--eval-every", "1", "--val-per-class", "2",
           "--tune-repeats", "1", "--tune-extend", "0", "--teacher-lr", "1e-3",
           "--student-lr", "1e-3,1e-2", "--temperature", "4", "--lam", "0.7",
           "--latency-batches", "1", "--latency-runs", "1", "--test-per-class", "3",
           "--strategies", "teacher,scratch,distill", "--quiet"]
DELTA = ["--arch", "vgg_s", "--target", "digits", "--shots", "2", "--steps", "4",
         "--patience", "2", "--eval-every", "2", "--test-per-class", "5", "--val-per-class", "3",
         "--tune-repeats", "1", "--cv-folds", "0", "--no-curves", "--alpha", "0.02",
         "--alpha-noatt", "1e-4", "--quiet"]


def _timeless(records) -> list[dict]:
  """Records less their measured latencies (wall-clock, not determined by the seed)."""
  return [dict(r, outcome={k: v for k, v in r["outcome"].items() if k != "latency_ms"})
          for r in records]


@pytest.mark.slow
@pytest.mark.parametrize("name,argv", [("compact_transfer", COMPACT), ("delta_table", DELTA)])
def test_runner_studies_with_their_own_arms_grow_alike(name, argv, tiny_source_dir, tmp_path):
  """compact_transfer (students after their draw's teacher) and delta_table (the runner inside
  its own run) grow 2 -> 3 draws as fewshot does, and the grown folder passes publish check."""
  import importlib
  from jtransfer.study import publish
  module = importlib.import_module(f"experiments.{name}")
  argv = [*argv, "--source", f"ckpt:{tiny_source_dir('vgg_s')}"]
  grown, fresh = str(tmp_path / "grown"), str(tmp_path / "fresh")
  assert module.main([*argv, "--repeats", "2", "--out", grown]) == 0
  two = _by_draw(_timeless(_records(grown)))
  assert module.main([*argv, "--repeats", "3", "--out", fresh]) == 0
  assert module.main([*argv, "--repeats", "3", "--out", grown, "--resume"]) == 0
  new, ref = _by_draw(_timeless(_records(grown))), _by_draw(_timeless(_records(fresh)))
  for draw in two:
    assert new[draw] == two[draw]
  assert new[("eval", 2)] == ref[("eval", 2)] and sorted(new) == sorted(ref)
  assert publish.check(grown) == []


def test_truncation_folder_of_the_default_targets_grows_to_a_superset(tmp_path):
  """A truncation folder made with the default --target list (run.json without --target, as
  the published ones were before their growth): a resume naming those targets plus more grows
  it; one dropping a target is refused with the folder left as it was."""
  d = str(tmp_path / "tr")
  shutil.copytree(os.path.join(ROOT, "published", "truncation_resnet_s"), d)
  # as published before its growth to six targets: run.json's argv without --target
  with open(os.path.join(d, "run.json")) as f:
    run = json.load(f)
  argv = run["argv"]
  run["argv"] = [a for i, a in enumerate(argv)
                 if a != "--target" and (i == 0 or argv[i - 1] != "--target")]
  assert "--target" not in run["argv"] and "--arch" in run["argv"]
  with open(os.path.join(d, "run.json"), "w") as f:
    json.dump(run, f)
  before = _digest(d)
  base = ["--arch", "resnet_s", "--tune-extend", "1", "--out", d, "--resume", "--quiet"]
  with pytest.raises(InputError, match="--target"):
    _open(truncation.STUDY, [*base, "--target", "digits", "--target", "digits:0,1,2,3,4"])
  assert _digest(d) == before
  grown = ["digits", "fmnist:1,5,7,8,9", "digits:0,1,2,3,4"]
  assert _open(truncation.STUDY, [*base, *[a for t in grown for a in ("--target", t)]]
               ).opened.resumed
  with open(os.path.join(d, outdir.SETTINGS_FILE)) as f:
    assert json.load(f)["flags"]["--target"] == grown
