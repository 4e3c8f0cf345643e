"""Published results: every committed folder parses, matches its grid and regenerates its
report byte for byte; the check catches each way a folder can go wrong; RESULTS.md's generated
table is rebuilt without touching the written verdicts."""
import json
import os
import shutil

import pytest

from experiments import cwl_tables, fewshot
from experiments import publish as command
from jtransfer.study import grid, publish, results_page
from jtransfer.study.results_page import TABLE_BEGIN

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PUBLISHED = os.path.join(REPO, "published")


def test_every_committed_results_folder_checks_out():
  found = publish.folders(PUBLISHED)
  assert found, "published/ holds no results folder"
  for path in found:
    assert publish.check(path) == [], path
    run = publish.read_run(path)
    # The command in run.json is the one at the top of the report.
    with open(os.path.join(path, "report.md")) as f:
      assert f"Command: `{run['command']}`" in f.read().split("\n")[2]


def test_results_page_is_current():
  """RESULTS.md's generated table equals the one built from published/ now."""
  with open(os.path.join(REPO, "RESULTS.md")) as f:
    page = f.read()
  cwd = os.getcwd()
  os.chdir(REPO)  # folder links in the table are relative to the repository root
  try:
    assert command.results_page(page, "published") == page
  finally:
    os.chdir(cwd)
  assert TABLE_BEGIN in page


def test_command_line_leaves_out_resumption_flags():
  cmd = publish.command_line("experiments.fewshot", ["--target", "fmnist:1,5", "--resume",
                                                     "--target", "a b", "--quiet"])
  assert cmd == "python -m experiments.fewshot --target fmnist:1,5 --target 'a b'"
  assert publish.with_command("# T\n\nbody\n", "x") == "# T\n\nCommand: `x`\n\nbody\n"


@pytest.fixture(scope="module")
def folder(tiny_source_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("pub") / "f"
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1,2", "--shots", "2", "--repeats", "2", "--steps", "6", "--eval-every",
          "3", "--patience", "3", "--test-per-class", "4", "--val-per-class", "2",
          "--strategies", "freeze,freeze_cwl", "--lrs", "1e-3,1e-2", "--tune-extend", "0",
          "--no-paper-grid", "--out", str(out), "--quiet"]
  assert cwl_tables.main(argv + ["--tune-repeats", "1"]) == 0
  return str(out)


def _copy(folder, tmp_path):
  dst = str(tmp_path / "copy")
  shutil.copytree(folder, dst)
  return dst


def _edit_records(path, edit):
  with open(os.path.join(path, "results.json")) as f:
    records = json.load(f)
  records = edit(records)
  with open(os.path.join(path, "results.json"), "w") as f:
    json.dump(records, f)


def test_fresh_folder_is_sound(folder):
  assert publish.check(folder) == []
  run = publish.read_run(folder)
  # 2 strategies x 2 LRs on the tuning draw, then 2 strategies x 2 evaluation draws.
  assert run["records"] == 8 and run["complete"] and run["module"] == "experiments.cwl_tables"
  assert "--quiet" not in run["command"] and run["wall_s"] > 0


def test_check_catches_a_missing_run(folder, tmp_path):
  path = _copy(folder, tmp_path)
  _edit_records(path, lambda rs: [r for r in rs if r["draw"]["index"] != 1 or
                                  r["draw"]["role"] != "eval" or r["arm"] != "freeze"])
  problems = publish.check(path)
  assert any("marked complete but 1 run(s)" in p for p in problems)
  assert any("run.json counts 8 records" in p for p in problems)
  assert any("report.md differs" in p for p in problems)


def test_check_catches_a_stray_and_a_duplicate_run(folder, tmp_path):
  path = _copy(folder, tmp_path)
  _edit_records(path, lambda rs: rs + [dict(rs[-1], knobs=dict(rs[-1]["knobs"], lr=0.5)),
                                       rs[0]])
  problems = publish.check(path)
  assert any("1 record(s) outside the grid" in p for p in problems)
  assert any("1 duplicate run record(s)" in p for p in problems)


def test_check_catches_an_edited_report_and_a_corrupt_file(folder, tmp_path):
  path = _copy(folder, tmp_path)
  with open(os.path.join(path, "report.md"), "a") as f:
    f.write("hand edit\n")
  assert publish.check(path) == ["report.md differs from the report regenerated from "
                                 "results.json"]
  assert command.main(["regenerate", path]) == 0 and publish.check(path) == []
  with open(os.path.join(path, "results.json"), "w") as f:
    f.write('[{"arch": ')
  assert "results.json is missing or corrupt" in publish.check(path)[0]
  os.remove(os.path.join(path, "run.json"))
  assert "has no run.json" in publish.check(path)[0]


def test_a_tuning_choice_read_from_a_changed_record_is_caught(folder, tmp_path):
  """Lowering the chosen LR's validation score moves the choice: the evaluation runs on disk
  are then at the wrong LR, so the grid check fails."""
  path = _copy(folder, tmp_path)
  _, _, _, plan, records = publish.load(path)
  tuned = grid.choices(records, plan)
  lr = tuned[("vgg_s", "digits:0,1,2", 2, "freeze")]["choice"]["lr"]
  _edit_records(path, lambda rs: [dict(r, outcome=dict(r["outcome"], val_acc=-1.0))
                                  if r["draw"]["role"] == "tune" and r["arm"] == "freeze" and
                                  r["knobs"]["lr"] == lr else r for r in rs])
  assert any("outside the grid" in p for p in publish.check(path))


def test_results_page_keeps_written_text(folder, tmp_path):
  root = tmp_path / "root"
  shutil.copytree(folder, root / "f")
  page = command.results_page("# Results\n\nwritten above\n", str(root))
  assert page.startswith("# Results\n\nwritten above\n" + TABLE_BEGIN)
  row = [line for line in page.split("\n") if "beats frozen convolutions" in line]
  assert len(row) == 1 and "freeze_cwl > freeze" in row[0] and "/2 |" in row[0]
  edited = page.replace("written above", "changed above") + "\nwritten below\n"
  again = command.results_page(edited, str(root))
  assert again == edited  # rebuilding changes nothing when published/ did not change
  assert "python -m experiments.cwl_tables" in page and "8 runs" in page


def test_snapshot_publishes_a_stopped_grid_as_incomplete(folder, tmp_path):
  path = _copy(folder, tmp_path)
  argv = publish.read_run(path)["argv"]
  for name in ("run.json", "report.md", "summary.json", "results.json"):
    os.remove(os.path.join(path, name))
  with open(os.path.join(path, "results.jsonl")) as f:
    lines = f.readlines()
  with open(os.path.join(path, "results.jsonl"), "w") as f:
    f.writelines(lines[:-3])  # the grid stopped three runs before its end
  assert command.main(["snapshot", path, "--module", "experiments.cwl_tables", "--", *argv]) == 0
  run = publish.read_run(path)
  assert run["records"] == 5 and not run["complete"]
  assert publish.check(path) == []
  # a killed run records no wall time: shown as a lower bound ('+') unless --wall-s says it
  assert "(0+ min, 5 runs, partial grid)" in command.results_page("", str(tmp_path))
  # the same stopped run snapshotted again, now with its logged time: replaced, not added
  assert command.main(["snapshot", path, "--module", "experiments.cwl_tables", "--wall-s", "150",
                       "--wall-source", "its log", "--", *argv]) == 0
  run = publish.read_run(path)
  assert run["wall_s"] == 150 and len(run["invocations"]) == 1
  assert run["invocations"][0]["wall_source"] == "its log"
  assert "(2 min, 5 runs, partial grid)" in command.results_page("", str(tmp_path))
  # a resume that was stopped again (more records) is a new invocation: both times count
  with open(os.path.join(path, "results.jsonl"), "a") as f:
    f.writelines(lines[-3:-2])
  assert command.main(["snapshot", path, "--module", "experiments.cwl_tables", "--wall-s", "60",
                       "--", *argv]) == 0
  run = publish.read_run(path)
  assert run["wall_s"] == 210 and len(run["invocations"]) == 2 and run["records"] == 6
  assert command.main(["snapshot", path, "--module", "experiments.cwl_tables", "--wall-s", "-1",
                       "--", *argv]) == 2


def test_shards_merge_into_the_whole_grid(tiny_source_dir, tmp_path):
  """--shard 0/2 and 1/2 run disjoint cells; merged, they are the unsharded grid byte for byte
  (records, report, summary), and a shard alone checks out as a complete shard."""
  whole = str(tmp_path / "whole")
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "digits:0,1,2", "--shots", "2,3", "--repeats", "2", "--steps", "6", "--eval-every",
          "3", "--patience", "3", "--test-per-class", "4", "--val-per-class", "2",
          "--strategies", "freeze", "--lrs", "1e-3,1e-2", "--tune-extend", "0",
          "--no-paper-grid", "--quiet", "--out", whole]
  assert fewshot.main(argv) == 0
  shards = [str(tmp_path / f"s{i}") for i in range(2)]
  for i, s in enumerate(shards):
    assert fewshot.main(argv[:-1] + [s, "--shard", f"{i}/2"]) == 0
    assert publish.check(s) == [] and publish.read_run(s)["complete"]
  got = [{r["cell"]["shots"] for r in json.load(open(os.path.join(s, "results.json")))}
         for s in shards]
  assert got == [{2}, {3}]
  merged = str(tmp_path / "merged")
  assert command.main(["merge", merged, *shards, "--module", "experiments.fewshot", "--",
                       *argv]) == 0
  for name in ("results.json", "report.md", "summary.json"):
    assert open(os.path.join(merged, name)).read() == open(os.path.join(whole, name)).read()
  assert publish.check(merged) == []
  # flags still holding --shard, a merged folder that exists, a missing shard: refused
  assert command.main(["merge", str(tmp_path / "m2"), *shards, "--module",
                       "experiments.fewshot", "--", *argv, "--shard", "0/2"]) == 2
  assert command.main(["merge", merged, *shards, "--module", "experiments.fewshot", "--",
                       *argv]) == 2
  assert command.main(["merge", str(tmp_path / "m3"), str(tmp_path / "nope"), "--module",
                       "experiments.fewshot", "--", *argv]) == 2
  assert fewshot.main(argv[:-1] + [str(tmp_path / "bad"), "--shard", "2/2"]) == 2


def test_merge_refuses_shards_that_disagree_about_a_run(folder, tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  shutil.copytree(folder, a)
  shutil.copytree(folder, b)
  with open(os.path.join(b, "results.jsonl")) as f:
    lines = f.readlines()
  first = json.loads(lines[0])
  first["outcome"]["val_acc"] = -1.0  # the same run, another outcome
  lines[0] = json.dumps(first) + "\n"
  with open(os.path.join(b, "results.jsonl"), "w") as f:
    f.writelines(lines)
  argv = publish.read_run(folder)["argv"]
  assert command.main(["merge", str(tmp_path / "m"), a, b, "--module", "experiments.cwl_tables",
                       "--", *argv]) == 2
  # the same runs twice (a shard copied) merge into the grid itself
  assert command.main(["merge", str(tmp_path / "m2"), a, a, "--module", "experiments.cwl_tables",
                       "--", *argv]) == 0
  assert publish.check(str(tmp_path / "m2")) == []


def test_every_committed_folder_is_counted_against_its_grid():
  """Issue 29 item 10: every published folder says whether it is complete (a grid published
  while it runs says false, and RESULTS.md marks its rows) and has a grid `check` counts its
  records against: its module's grid keys, or run.json's evaluation-run count."""
  page = open(os.path.join(os.path.dirname(PUBLISHED), "RESULTS.md")).read()
  for path in publish.folders(PUBLISHED):
    publisher, run, _, _, _ = publish.load(path)
    assert isinstance(run["complete"], bool), path
    if not run["complete"]:
      assert f"a partial grid ({run['records']} runs so far)" in page, path
    assert (publisher.grid_keys is not None and publisher.key is not None) or \
        run["grid"]["eval_runs"] > 0, path


def test_a_folder_with_grid_keys_must_say_whether_it_is_complete(folder, tmp_path):
  """With 'complete': null a folder missing runs of its grid passed the check unseen."""
  path = _copy(folder, tmp_path)
  _edit_records(path, lambda records: records[:-1])
  with open(os.path.join(path, "run.json")) as f:
    run = json.load(f)
  run["complete"] = None
  run["records"] -= 1
  with open(os.path.join(path, "run.json"), "w") as f:
    json.dump(run, f)
  assert any("does not say whether the grid is complete" in p for p in publish.check(path))


def test_folders_without_grid_keys_are_counted():
  """A module without grid keys is counted against run.json's hand-written grid count."""
  recs = [dict(role="eval")] * 3 + [dict(role="tune")] + [dict(seed=100)]
  grid = {"eval_runs": 4, "from": "2 x 2"}
  assert publish.evaluation_runs(recs, {"tune_seeds": [100]}) == 3
  assert publish.evaluation_runs(recs, {}) == 4
  assert "not recorded" in publish._count_problems(dict(complete=None), recs, {})[0]
  assert publish._count_problems(dict(complete=True, grid=grid), recs, {}) == []
  assert "3 evaluation run(s)" in publish._count_problems(
      dict(complete=True, grid=grid), recs, {"tune_seeds": [100]})[0]
  assert publish._count_problems(dict(complete=False, grid=grid), recs,
                                 {"tune_seeds": [100]}) == []
  assert "incomplete" in publish._count_problems(dict(complete=False, grid=grid), recs, {})[0]


def test_a_grown_hand_counted_grid_is_complete_when_its_main_finishes(tmp_path):
  """sparse_transfer grown from 5 to 10 --seeds under --resume: its main finishing means the
  whole (grown) grid ran, so run.json says complete with the new count, not 'incomplete'
  against the stale hand-written one; a snapshot (wall_s given) is still held to the count."""
  from jtransfer.study import results as results_mod
  out = tmp_path / "grown"
  out.mkdir()
  (out / "run.json").write_text(json.dumps(dict(
      module="m", argv=[], command="", invocations=[], wall_s=0.0, complete=True, records=4,
      grid={"eval_runs": 4, "from": "2 x 2"})))
  pub = publish.Publisher("experiments.m", lambda a: a, lambda a: {},
                          lambda recs, plan, args, folder: ("# report\n", {}))
  recs = [dict(role="eval", i=i) for i in range(6)]
  res = results_mod.ResultsDir(str(out), resume=True)
  publish.save(res, pub, ["--seeds", "0,1,2"], recs, {}, {}, t0=0.0)
  run = json.loads((out / "run.json").read_text())
  assert run["complete"] is True and run["grid"]["eval_runs"] == 6
  assert "grown grid" in run["grid"]["from"] and "count was 4: 2 x 2" in run["grid"]["from"]
  (out / "run.json").write_text(json.dumps(dict(run, grid={"eval_runs": 8, "from": "2 x 4"})))
  publish.save(res, pub, ["--seeds", "0,1,2,3"], recs, {}, {}, t0=0.0, wall_s=0.0)
  assert json.loads((out / "run.json").read_text())["complete"] is False


def test_a_partial_grid_decides_no_registered_claim(tmp_path):
  """A folder published from a stopped grid (run.json complete: false) still shows its rows as
  evidence, but the claims whose primary evidence it is read 'not tested yet', saying why."""
  from experiments.claims_registry import cwl as cwl_claims
  entries = [e for e in cwl_claims.CLAIMS if e.primary.folders == ("cwl_tables",)]
  assert entries
  shutil.copytree(os.path.join(PUBLISHED, "cwl_tables"), tmp_path / "cwl_tables")
  whole = results_page.generated(str(tmp_path), entries)
  assert not any("partial grid: the verdict waits" in l for l in whole)
  run = json.loads((tmp_path / "cwl_tables" / "run.json").read_text())
  (tmp_path / "cwl_tables" / "run.json").write_text(json.dumps(dict(run, complete=False)))
  lines = results_page.generated(str(tmp_path), entries)
  first = lines[lines.index("### One row per registered claim"):
                lines.index("### Margins and their reasons (fixed before the verdicts were computed)")]
  rows = [l for l in first if l.startswith(tuple(f"| {e.id} |" for e in entries))]
  assert len(rows) == len(entries)
  assert all("**not tested yet**" in r and "cwl_tables is a partial grid" in r for r in rows)
  # its per-folder evidence rows stay, and the command list says it is partial
  assert any("cwl_tables/report.md" in l and "partial grid" in l for l in lines)
