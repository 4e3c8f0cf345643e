"""Strategy knobs at the CLI edge: what a plan passes to `Strategy.build`, and its knob grids.

Nothing below the CLI keeps configuration in a module: a plan carries
  * plan['options']: strategy -> extra keyword arguments of `build` (DELTA's `config`, a
    `delta.Config`), handed to `fewshot.TargetRuns`;
  * plan['knobs']: strategy -> (knob grids, knob defaults) replacing the registered ones (e.g.
    delta_table's --alpha), read through `strategy_of`.
The JTRANSFER_DELTA_ALPHA / _BETA / _SCHEDULE environment variables are read here, and only
when the plan runs a DELTA-family strategy: a bad value is one sentence and exit 2 then, and
nothing at import.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping, Sequence

from jtransfer.errors import InputError
from jtransfer.methods import delta, transfer

ENV = {"alpha": float, "beta": float, "schedule": str}


def delta_env() -> dict:
  """The DELTA settings named by JTRANSFER_DELTA_* environment variables ({} when none).

  Raises:
    InputError: a value that is not a number (alpha, beta) or not a schedule name.
  """
  out = {}
  for field, cast in ENV.items():
    name = f"JTRANSFER_DELTA_{field.upper()}"
    value = os.environ.get(name)
    if value is None:
      continue
    try:
      out[field] = cast(value)
    except ValueError:
      raise InputError(f"{name}={value!r} is not a number") from None
  try:
    delta.Config(**out).validate()
  except InputError as e:
    raise InputError(f"JTRANSFER_DELTA_* environment: {e}") from None
  return out


def plan_knobs(strategies: Sequence[str], delta_changes: Mapping | None = None
               ) -> tuple[dict, dict]:
  """(options, knobs) for a plan running `strategies`: DELTA-family strategies get
  `config=delta.Config(environment, then delta_changes)`, and the environment's alpha as the
  default alpha of the strategies it sets (their paper rows)."""
  family = [s for s in strategies if s in delta.CONFIG_STRATEGIES]
  if not family:
    return {}, {}
  env = delta_env()
  config = dataclasses.replace(delta.Config(**env), **dict(delta_changes or {})).validate()
  options = {s: {"config": config} for s in family}
  knobs = {}
  if "alpha" in env:
    for s in family:
      strategy = transfer.get_strategy(s)
      if "alpha" in strategy.knob_defaults and s != "delta_noatt":
        knobs[s] = (dict(strategy.knobs), {**strategy.knob_defaults, "alpha": env["alpha"]})
  return options, knobs


def strategy_of(plan: Mapping, name: str) -> transfer.Strategy:
  """The registered strategy `name` with the plan's knob grids and defaults in place of its own
  (plan['knobs'], absent or empty: the registered ones)."""
  strategy = transfer.get_strategy(name)
  override = (plan.get("knobs") or {}).get(name)
  if override is None:
    return strategy
  grids, defaults = override
  return dataclasses.replace(strategy, knobs=dict(grids), knob_defaults=dict(defaults))
