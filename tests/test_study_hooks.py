"""Study hooks a module declares: `arm_plan` (its own knobs applied to each resolved arm)
and `keys` (the run keys of a study with its own run function, for `publish check`)."""
import dataclasses

from jtransfer import study
from jtransfer.study import flags, grid
from jtransfer.study import records as rec
from jtransfer.study.draws import Draw


def test_arm_plan_is_applied_to_every_resolved_arm():
  seen = []

  def arm_plan(config, arm):
    seen.append(arm.name)
    if arm.name != "l2sp":
      return arm
    return dataclasses.replace(arm, knobs={"alpha": (0.5,)}, defaults={"alpha": 0.5})

  s = study.Study(module="x", title="# x", arm_plan=arm_plan)
  argv = ["--arch", "vgg_s", "--strategies", "freeze,l2sp"]
  plan = grid.plan(s, flags.parse(s, argv))
  assert seen == ["freeze", "l2sp"]
  assert plan.arm("l2sp").grid == {"lr": plan.arm("l2sp").lrs, "alpha": (0.5,)}
  plain = grid.plan(study.Study(module="x", title="# x"), flags.parse(s, argv))
  assert plain.arm("l2sp").knobs != {"alpha": (0.5,)}
  assert plain.arm("freeze") == plan.arm("freeze")


def test_keys_of_a_study_with_its_own_run():
  def keys(records, plan):
    assert all(r["version"] == 2 for r in records)  # version-1 records arrive converted
    return {rec.run_key("a", {}, Draw("eval", i), {"lr": 0.1}) for i in range(2)}

  own = study.Study(module="x", title="# x", cell_fields=(), run=lambda *a: [], keys=keys)
  pub = study.publisher(own)
  v1 = [dict(strategy="a", repeat=0, lr=0.1, map=0.5)]
  assert pub.grid_keys(v1, None, None) - {pub.key(r) for r in v1} == {
      rec.run_key("a", {}, Draw("eval", 1), {"lr": 0.1})}
  # without keys: nothing enumerable, the folder is counted instead
  assert study.publisher(study.Study(module="x", title="# x", run=lambda *a: [])
                         ).grid_keys is None


def test_keys_of_a_study_with_its_own_plan():
  # One hook for both kinds of own-run study: with its own plan, `keys` gets that plan and
  # the records read as version 2, like a study on the grid's plan.
  seen = []

  def keys(records, plan):
    seen.append((plan, [r["version"] for r in records]))
    return {rec.run_key("a", {}, Draw("eval", i), {"lr": plan["lr"]}) for i in range(2)}

  own = study.Study(module="x", title="# x", cell_fields=(), run=lambda *a: [],
                    plan=lambda c: {"lr": 0.1}, keys=keys)
  pub = study.publisher(own)
  v1 = [dict(strategy="a", repeat=1, lr=0.1, map=0.5)]
  missing = pub.grid_keys(v1, pub.validate(None), None) - {pub.key(r) for r in v1}
  assert missing == {rec.run_key("a", {}, Draw("eval", 0), {"lr": 0.1})}
  assert seen == [({"lr": 0.1}, [2])]
  assert study.publisher(dataclasses.replace(own, keys=None)).grid_keys is None
