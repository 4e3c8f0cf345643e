"""A study that runs its own pipeline (`Study.run`, `Study.plan`) and offers only some shared
flags (`Study.hidden` with defaults): what the runner gives it (experiments.sparse_transfer is
one)."""
import dataclasses

import pytest

from jtransfer.study import Arm, Study, flag, flags, publisher
from jtransfer.study import publish as publish_lib
from jtransfer.study import records as rec
from jtransfer.study.draws import Draw



@dataclasses.dataclass(frozen=True)
class Own:
  """A study's own --lrs, in place of the shared one it hides."""
  lrs: tuple = flag("--lrs", (0.1,), "comma list", cli="0.1",
                    parse=lambda t: tuple(float(v) for v in t.split(",")))


STUDY = Study(
    module="tests.own", title="# own", arms=(Arm("a", run=lambda ctx, point: {}),),
    any_strategy=False, defaults={"strategies": "a", "tune_repeats": 0, "steps": 7},
    hidden=frozenset({"strategies", "tune_repeats", "arch", "shots", "lrs"}), extra=Own,
    plan=lambda config: {"steps": config.protocol.steps, "tune_seeds": [9]},
    run=lambda study, config, results: [])


def test_hidden_flags_take_the_study_defaults_and_stay_out_of_the_fingerprint():
  raw = flags.raw_flags(STUDY, [])
  assert not {"strategies", "tune_repeats", "arch", "shots"} & set(raw)
  assert raw["steps"] == 7  # an offered flag's default
  config = flags.config_of(STUDY, raw)
  assert config.cells.arms == ("a",) and config.protocol.tune_draws == 0
  # the shared default where the study gives none (a hidden flag, not offered)
  assert config.cells.shots == (1, 5, 10)
  with pytest.raises(SystemExit):
    flags.raw_flags(STUDY, ["--tune-repeats", "1"])
  # the study's own flag of a hidden shared destination
  config = flags.parse(STUDY, ["--lrs", "0.5,0.2"])
  assert config.extra.lrs == (0.5, 0.2) and config.protocol.lrs == "reduced"


def test_publisher_of_an_own_run_study():
  pub = publisher(STUDY)
  config = pub.parse_args(["--steps", "3"])
  assert pub.validate(config) == {"steps": 3, "tune_seeds": [9]}  # the study's plan
  # no enumerable grid: publish check counts evaluation runs against run.json's 'grid'
  assert pub.grid_keys is None
  r = rec.make("a", {"target": "t"}, Draw("eval", 0), {"lr": 0.1}, {"test_acc": 0.5})
  assert pub.key(r) == rec.key(r)  # the default run key
  own = publisher(dataclasses.replace(STUDY, record_key=lambda r: ("mine",)))
  assert own.key(r) == ("mine",)


def test_evaluation_runs_count_both_record_versions():
  v2 = [rec.make("a", {"target": "t"}, Draw(role, i), {"lr": 0.1}, {"test_acc": 0.5})
        for role, i in (("tune", 9), ("eval", 0), ("eval", 1))]
  v1 = [{"role": "tune", "seed": 9}, {"role": "eval", "seed": 0}, {"seed": 1}]
  plan = {"tune_seeds": [9]}
  assert publish_lib.evaluation_runs(v2, plan) == 2
  assert publish_lib.evaluation_runs(v1, plan) == 2
  assert publish_lib.evaluation_runs(v1 + v2, {}) == 4
