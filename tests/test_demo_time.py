"""bench.demo_time's table of runs (the breakdown of `make demo` in BUILD_NOTES.md)."""
import json

from bench import demo_time


def test_runs_table_groups_and_averages(tmp_path):
  def rec(arm, role, k, seconds, steps):
    return {"arm": arm, "cell": {"arch": "resnet_s", "target": "digits", "shots": k},
            "draw": {"role": role, "index": 0, "fold": -1}, "seconds": seconds,
            "outcome": {"steps": steps}}
  rows = [rec("finetune", "tune", 1, 10.0, 100), rec("finetune", "tune", 1, 20.0, 300),
          rec("finetune", "eval", 1, 6.0, 150), rec("freeze", "eval", 1, 0.5, 40)]
  path = tmp_path / "results.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  table = demo_time.runs_table(str(path))
  assert table[0].startswith("| arch | arm | role | k | runs |")
  # by hand: the two finetune tuning runs average 15 s and 200 steps, 30 s in all
  assert "| resnet_s | finetune | tune | 1 | 2 | 15.00 | 30.0 | 200 |" in table
  assert "| resnet_s | finetune | eval | 1 | 1 | 6.00 | 6.0 | 150 |" in table
  assert "| resnet_s | freeze | eval | 1 | 1 | 0.50 | 0.5 | 40 |" in table
  assert len(table) == 2 + 3


def test_wrap_times_a_phase_and_restores_it():
  from jtransfer.study import fewshot as hooks
  original = hooks.plot_accuracy
  totals = {"plots": 0.0}
  undo = demo_time._wrap(totals, "jtransfer.study.fewshot", "plot_accuracy", "plots")
  assert hooks.plot_accuracy is not original
  undo()
  assert hooks.plot_accuracy is original and totals == {"plots": 0.0}
