"""DELTA's configuration at the CLI edge (jtransfer.study.flags): environment read only where a
DELTA strategy runs, one sentence for a bad value, knobs carried by the plan, nothing global."""
import subprocess
import sys

import pytest

from experiments import delta_table, fewshot
from jtransfer.errors import InputError
from jtransfer.methods import delta, transfer
from jtransfer.study import flags, grid


def _plan(strategies: str):
  """The plan of a new command line (--bn stated, as `edge.main` does)."""
  argv = flags.stated_argv(fewshot.STUDY, ["--strategies", strategies, "--arch", "vgg_s"])
  return grid.plan(fewshot.STUDY, flags.parse(fewshot.STUDY, argv))


def _options(plan) -> dict:
  return {a.name: dict(a.options) for a in plan.arms if a.options}


def test_bad_environment_fails_only_where_delta_runs(monkeypatch):
  monkeypatch.setenv("JTRANSFER_DELTA_ALPHA", "abc")
  assert _options(_plan("freeze")) == {}
  with pytest.raises(InputError, match=r"^JTRANSFER_DELTA_ALPHA='abc' is not a number$"):
    _plan("freeze,delta")
  monkeypatch.setenv("JTRANSFER_DELTA_ALPHA", "0.1")
  monkeypatch.setenv("JTRANSFER_DELTA_SCHEDULE", "cosine")
  with pytest.raises(InputError, match="schedule 'cosine'"):
    _plan("l2sp")


def test_bad_environment_does_not_break_import_and_exits_2():
  env = {"JTRANSFER_DELTA_ALPHA": "abc", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  code = ("import jtransfer.methods.delta, experiments.delta_table, experiments.fewshot\n"
          "from experiments import fewshot\n"
          "import sys; sys.exit(fewshot.main(['--strategies', 'delta', '--arch', 'vgg_s', "
          "'--out', '/nonexistent/x']))")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 2, r.stderr
  assert r.stderr.strip().splitlines()[-1] == "error: JTRANSFER_DELTA_ALPHA='abc' is not a number"


def test_environment_becomes_the_plans_knobs(monkeypatch):
  monkeypatch.setenv("JTRANSFER_DELTA_ALPHA", "0.05")
  monkeypatch.setenv("JTRANSFER_DELTA_BETA", "0.2")
  plan = _plan("freeze,l2sp,delta_noatt")
  assert set(_options(plan)) == {"l2sp", "delta_noatt"}
  assert _options(plan)["l2sp"]["config"] == delta.Config(alpha=0.05, beta=0.2)
  # alpha is l2sp's paper value now (delta_noatt has its own grid); the registry is untouched
  assert plan.arm("l2sp").defaults == {"alpha": 0.05}
  assert plan.arm("l2sp").strategy.knob_defaults == {"alpha": 0.05}
  assert plan.arm("delta_noatt").defaults == transfer.get_strategy("delta_noatt").knob_defaults
  assert plan.arm("delta_noatt").knobs == transfer.get_strategy("delta_noatt").knobs
  assert transfer.get_strategy("l2sp").knob_defaults == {"alpha": 0.01}


def test_delta_table_flags_travel_in_the_plan():
  study = delta_table.STUDY
  plan = grid.plan(study, flags.parse(study, ["--arch", "vgg_s", "--beta", "0.3", "--schedule",
                                              "step", "--alpha", "0.5", "--no-curves"]))
  config = delta.Config(beta=0.3, schedule="step")
  assert all(dict(a.options) == {"config": config} for a in plan.arms)
  assert {a.name for a in plan.arms} == set(delta_table.STRATEGIES)
  assert plan.arm("delta").knobs == {"alpha": (0.5,)}
  assert plan.arm("delta").strategy.knobs == {"alpha": (0.5,)}
  assert transfer.get_strategy("delta").knobs == {"alpha": delta.ALPHAS}
  assert delta.Config() == delta.Config(alpha=0.01, beta=0.01, schedule="exp")
