"""A study with its own run loop on the runner (`Study.run` with `plan`, `record_key`,
`additive`): main, the settings fingerprint, resume, and publish check, with a toy study that
trains nothing."""
import dataclasses
import json

from jtransfer import study
from jtransfer.study import edge, flags, publish
from jtransfer.study import records as rec
from jtransfer.study.config import flag
from jtransfer.study.draws import Draw


@dataclasses.dataclass(frozen=True)
class ToyFlags:
  n: int = flag("--n", 3, "how many records")
  extra_one: bool = flag("--extra-one", False, "add one more record", action="store_true")


def _run(_, config, results):
  done = {rec.key(r) for r in results.records}
  for i in range(config.extra.n + config.extra.extra_one):
    r = rec.make(f"arm{i}", {"target": "t"}, Draw("eval", 0), {}, {"test_acc": i / 10})
    if rec.key(r) not in done:
      results.add(r)
  return results.records


def _report(plan, records, folder):
  accs = [r["outcome"]["test_acc"] for r in records]
  return f"# Toy\n\n{plan['n']} planned, {len(accs)} recorded\n", {"accs": accs}


TOY = study.Study(
    module="tests.test_study_own_run", title="# Toy", cell_fields=("target",),
    groups=("output",), hidden=frozenset({"shard"}), extra=ToyFlags,
    plan=lambda c: {"n": c.extra.n}, run=_run, report=_report,
    record_key=lambda r: (r["arm"],), additive=frozenset({"extra_one"}))
PUBLISHER = study.publisher(TOY)  # what `publish check` imports by run.json's module


def test_own_run_saves_resumes_and_checks(tmp_path, capsys):
  out = str(tmp_path / "out")
  assert study.main(TOY, ["--n", "2", "--out", out, "--quiet"]) == 0
  records = json.load(open(f"{out}/results.json"))
  assert [r["arm"] for r in records] == ["arm0", "arm1"]          # sorted by record_key
  run = json.load(open(f"{out}/run.json"))
  assert run["complete"] and run["grid"]["eval_runs"] == 2      # counted when main finished
  assert publish.check(out) == []
  # An additive flag may change on --resume; another flag may not.
  assert edge.settings(TOY, flags.raw_flags(TOY, ["--n", "2"])) == edge.settings(
      TOY, flags.raw_flags(TOY, ["--n", "2", "--extra-one"]))
  assert study.main(TOY, ["--n", "2", "--out", out, "--quiet", "--resume", "--extra-one"]) == 0
  assert len(json.load(open(f"{out}/results.json"))) == 3
  assert publish.check(out) == []
  capsys.readouterr()
  assert study.main(TOY, ["--n", "5", "--out", out, "--quiet", "--resume"]) == 2
  assert "--n 5 != 2" in capsys.readouterr().err
