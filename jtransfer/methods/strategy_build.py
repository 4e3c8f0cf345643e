"""What a `transfer.Strategy` derives at construction: its docstring and its checked `build`.

Apart from `jtransfer.methods.transfer` so that module stays within the size rule; both take
the strategy duck-typed (name, description, build, knobs, bn_modes, ...), so nothing here
imports it.
"""
from __future__ import annotations

import inspect
import sys
from typing import Callable, Optional

from jtransfer.errors import InputError
from jtransfer.methods import bn_rule


def strategy_doc(strategy) -> str:
  """The docstring of a registered strategy: its prose, then its grids, knobs and defaults."""
  lines = [f"Transfer strategy {strategy.name!r}: {strategy.description}."]
  module = sys.modules.get(getattr(strategy.build, "__module__", ""), None)
  doc = strategy.doc or getattr(module, "__doc__", "") or ""
  if doc:
    source = "" if strategy.doc else f"From {module.__name__}:\n"
    lines += ["", source + inspect.cleandoc(doc)]
  lines += ["", f"LR grid of --lrs paper: {', '.join(f'{v:g}' for v in strategy.paper_lrs)}."]
  if strategy.head_only:
    lines.append("Head only: backbone features are computed once per target and cached.")
  if strategy.knobs:
    lines.append("Knobs (build keyword, validation grid, default):")
    lines += [f"  {k}: grid {', '.join(f'{v:g}' for v in grid)}; default "
              f"{strategy.knob_defaults.get(k, 'the build default')}"
              for k, grid in strategy.knobs.items()]
    lines.append(f"Knobs chosen by {strategy.cv_folds}-fold cross-validation on the training "
                 "pool." if strategy.cv_folds else "Knobs chosen on the validation split.")
  else:
    lines.append("Knobs: none besides the learning rate.")
  lines.append(f"BatchNorm modes (bn=): {', '.join(strategy.bn_modes)}; without bn: "
               f"{strategy.recipe_bn}.")
  lines.append("Build: strategy.build(source, num_classes, total_steps, bn=None, **knobs) "
               "-> Setup.")
  return "\n".join(lines)


def checked_build(strategy, build: Callable) -> Callable:
  """`build` taking the reserved keyword `bn` (passed on as `bn_train` to the builds of
  strategies that follow it) and refusing keyword arguments it does not accept with one
  sentence."""
  if getattr(build, "_checked_knobs", False):
    return build
  name, knobs = strategy.name, strategy.knobs
  try:
    params = inspect.signature(build).parameters
  except (TypeError, ValueError):
    params = None
  open_ended = params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD
                                     for p in params.values())
  # after (source, num_classes, total_steps); `bn_train` is reached through `bn` only
  accepted = [p for p in list(params or ())[3:] if p != "bn_train"]

  def checked(source, num_classes, total_steps, bn: Optional[str] = None, **kwargs):
    unknown = sorted(set(kwargs) - set(accepted)) if not open_ended else []
    if "bn_train" in kwargs:
      unknown = ["bn_train"]
    if unknown:
      known = ", ".join(sorted(set(knobs) | set(accepted))) or "none"
      raise InputError(f"strategy {name!r} has no knob {', '.join(map(repr, unknown))}; its "
                       f"knobs: {known} (BatchNorm's mode: bn='train' or 'frozen')")
    mode = strategy.bn_mode(bn)
    if bn_rule.follows(strategy.bn_modes) and bn is not None:
      kwargs["bn_train"] = mode == bn_rule.TRAIN
    return build(source, num_classes, total_steps, **kwargs)

  checked._checked_knobs = True
  checked.__doc__ = build.__doc__
  return checked
