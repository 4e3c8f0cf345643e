"""THE command-line edge of a study: argparse built from the typed configuration.

`parser(study)` adds a flag for every field of `jtransfer.study.config` that the study uses
(the groups in `Study.groups`) and every field of its `extra` dataclass, with the study's own
defaults (`Study.defaults`, by destination). `parse(study, argv)` parses, converts each value
(`flag(parse=...)`), checks it (`flag(check=...)`, then the cross-flag rules below), and
returns a `Config`. Nothing else in the library sees argparse; every bad value is one
`InputError` sentence naming the flag.

The DELTA family's settings come from the JTRANSFER_DELTA_ALPHA / _BETA / _SCHEDULE
environment variables; they are read here, only when the study runs a DELTA-family arm.

--bn: `parse` reads argv as a stored folder holds it, where an absent --bn means the study's
`bn_before` (folders made before the flag); a new command line states it first
(`stated_argv`, called by `edge.main`), so its run.json and settings hold it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
from typing import Any, Mapping, Optional, Sequence

from jtransfer.errors import InputError
from jtransfer.study import config as cfg

# (read-only: no module-level mutable configuration)
GROUPS = types.MappingProxyType({"cells": cfg.Cells, "protocol": cfg.Protocol,
                                 "source": cfg.Source, "output": cfg.Output})
DELTA_ENV = types.MappingProxyType({"alpha": float, "beta": float, "schedule": str})


def _add(p: argparse.ArgumentParser, m: Mapping[str, Any], default: Any) -> None:
  kw: dict = dict(dest=m["dest"], help=m["help"])
  if m["action"] == "store_true":
    kw.update(action="store_true", default=bool(default))
  elif m["action"] == "bool":
    kw.update(action=argparse.BooleanOptionalAction, default=default)
  else:
    if m["action"] == "append":
      kw["action"] = "append"
    elif m["parse"] is None and isinstance(m["cli"], (int, float)) and \
        not isinstance(m["cli"], bool):
      kw["type"] = type(m["cli"])
    kw["default"] = default
    if m["choices"] is not None:
      kw["choices"] = m["choices"]
    if m["metavar"] is not None:
      kw["metavar"] = m["metavar"]
    if m.get("required"):
      kw["required"] = True
  p.add_argument(m["flag"], **kw)


def _refuse(p: argparse.ArgumentParser, study, m: Mapping[str, Any]) -> None:
  """Adds a flag the study fixes (`Study.hidden`) so that, given, it is one sentence and exit 2
  (argparse's `error`) rather than argparse's bare "unrecognized arguments"; absent, it leaves
  nothing in the parsed namespace."""
  # A value the study declares is the one it runs with; otherwise the study runs its own way.
  fixed = study.defaults.get(m["dest"])
  why = "does not use it" if fixed is None else f"fixes it to {fixed}"

  class Fixed(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
      parser.error(f"{option_string} is not a flag of {study.module}, which {why}; "
                   f"drop {option_string}")

  # a boolean flag has its --no- form too (argparse.BooleanOptionalAction)
  names = [m["flag"]] + (["--no-" + m["flag"][2:]] if m["action"] == "bool" else [])
  p.add_argument(*names, action=Fixed, nargs="?", dest=m["dest"], default=argparse.SUPPRESS,
                 help=argparse.SUPPRESS)


def _classes(study) -> list[type]:
  return [GROUPS[g] for g in study.groups] + ([study.extra] if study.extra else [])


def parser(study) -> argparse.ArgumentParser:
  """The study's argparse parser (its docstring's first paragraph as description)."""
  doc = (study.doc or study.title or "").strip()
  p = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  defaults = dict(study.defaults)
  own = {f.metadata["flag"] for f in cfg.flag_fields(study.extra)} if study.extra else set()
  for cls in _classes(study):
    for f in cfg.flag_fields(cls):
      if f.metadata["dest"] in study.hidden and cls is not study.extra:
        if f.metadata["flag"] not in own:  # the study's own flag of that name takes its place
          _refuse(p, study, f.metadata)
        continue
      _add(p, f.metadata, defaults.get(f.metadata["dest"], f.metadata["cli"]))
  return p


def raw_flags(study, argv: Optional[Sequence[str]]) -> dict:
  """argv -> {dest: value as argparse gives it} (argparse exits 2 on a malformed flag or a flag
  the study fixes)."""
  return vars(parser(study).parse_args(argv))


def settings_flags(study, raw: Mapping[str, Any]) -> dict:
  """The flags of the settings fingerprint: `raw` less the flags added after folders were
  published (`config.flag(added=True)`) while at their default, so those folders resume; an
  absent --bn (a stored folder's argv) as the mode it means (`Study.bn_before`)."""
  drop = {f.metadata["dest"] for cls in _classes(study) for f in cfg.flag_fields(cls)
          if f.metadata["added"] and raw.get(f.metadata["dest"]) == f.metadata["cli"]}
  out = {k: v for k, v in raw.items() if k not in drop}
  if offers_bn(study) and out.get("bn") is None:
    out["bn"] = study.bn_before
  return out


def default_of(study, dest: str) -> Any:
  """The value flag `dest` takes when absent, as a settings fingerprint holds it (a tuple as a
  list), None when it has no declared default."""
  for cls in _classes(study):
    for f in cfg.flag_fields(cls):
      if f.metadata["dest"] == dest and f.default is not dataclasses.MISSING:
        return list(f.default) if isinstance(f.default, tuple) else f.default
  return None


def offers_bn(study) -> bool:
  """Whether the study's command line offers --bn (the protocol's flags, --bn not hidden)."""
  return "protocol" in study.groups and "bn" not in study.hidden


def stated_argv(study, argv: Sequence[str]) -> list[str]:
  """A new command line's argv with --bn stated (the study's default, else train, appended
  when absent), so the folder it makes records its mode and a stored argv without --bn
  always means a folder made before the flag."""
  argv = list(argv)
  if not offers_bn(study) or any(a == "--bn" or a.startswith("--bn=") for a in argv):
    return argv
  return argv + ["--bn", str(study.defaults.get("bn", cfg.Protocol.bn))]


def _value(m: Mapping[str, Any], v: Any) -> Any:
  """A flag's argparse value parsed (`flag(parse=...)`) and checked (`flag(check=...)`)."""
  if m["parse"] is not None and (v is not None or m["action"] == "append"):
    v = m["parse"](v)
  if m["check"] is not None and v is not None:
    m["check"](v)
  return v


def _build(cls, raw: Mapping[str, Any]):
  values = {}
  for f in dataclasses.fields(cls):
    m = f.metadata
    if "offered" in m:  # a composed dataclass (`config.offered`): its offered flags from raw
      values[f.name] = m["group"](**{**m["defaults"], **{
          name: _value(o, raw[o["dest"]]) for name, o in m["offered"].items()
          if o["dest"] in raw}})
    elif "flag" in m and m["dest"] in raw:
      values[f.name] = _value(m, raw[m["dest"]])
  return cls(**values)


def command_parser(cls, doc: str) -> argparse.ArgumentParser:
  """The argparse parser of a command that is not a study (experiments.pretrain,
  experiments.convert_weights): the flag fields of one frozen dataclass, its docstring's
  first paragraph as description."""
  p = argparse.ArgumentParser(description=doc.strip().split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  for m in cfg.command_flags(cls):
    _add(p, m, m["cli"])
  return p


def command_config(cls, argv: Optional[Sequence[str]], doc: str = ""):
  """argv -> the command's typed `cls` (argparse exits 2 on a malformed flag; a bad value
  raises `InputError`, one sentence naming its flag)."""
  return _build(cls, vars(command_parser(cls, doc).parse_args(argv)))


def delta_env() -> dict:
  """The DELTA settings named by JTRANSFER_DELTA_* environment variables ({} when none).

  Raises:
    InputError: a value that is not a number (alpha, beta) or not a schedule name.
  """
  from jtransfer.methods import delta
  out = {}
  for field, cast in DELTA_ENV.items():
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


def config_of(study, raw: Mapping[str, Any]) -> cfg.Config:
  """The typed `Config` of parsed flags, every value and rule checked.

  Raises:
    InputError: one sentence naming the first bad flag.
  """
  # A hidden shared flag takes the study's default for it (as the command line writes it), and
  # its destination may be a flag of the study's own (`extra`); the hidden defaults stay out of
  # `raw`, so the settings fingerprint holds the flags the command line offers.
  shared = {**{d: v for d, v in study.defaults.items() if d in study.hidden},
            **{d: v for d, v in raw.items() if d not in study.hidden}}
  parts = {g: _build(GROUPS[g], shared) for g in GROUPS if g in study.groups}
  parts = {g: parts.get(g, GROUPS[g]()) for g in GROUPS}
  extra = _build(study.extra, {**shared, **raw}) if study.extra else None
  config = cfg.Config(cells=parts["cells"], protocol=parts["protocol"], output=parts["output"],
                      source=parts["source"], extra=extra, flags=dict(raw))
  if "protocol" in study.groups:
    config = _check_protocol(study, _bn_of(study, config))
  if study.check is not None:
    study.check(config)
  return config


def _bn_of(study, config: cfg.Config) -> cfg.Config:
  """The protocol's BN mode: as stated; absent from a stored argv, the study's `bn_before`
  (a folder made before --bn: `bn_stated` False, its report says nothing of BN); hidden, the
  study's default (not stated: the study pins its arms' modes itself)."""
  p = config.protocol
  if offers_bn(study) and p.bn is not None:
    return config
  bn = study.bn_before if offers_bn(study) else p.bn or cfg.Protocol.bn
  return dataclasses.replace(config, protocol=dataclasses.replace(p, bn=bn, bn_stated=False))


def _check_protocol(study, config: cfg.Config) -> cfg.Config:
  """The few-shot protocol's cross-flag rules and names (before any data is loaded)."""
  from jtransfer import models
  from jtransfer.data import augment, parse_spec
  from jtransfer.methods import delta
  c, p = config.cells, config.protocol
  for a in c.archs:
    if a not in models.names():
      raise InputError(f"--arch {a!r} is unknown; expected one of {', '.join(models.names())}")
  for name in c.arms:
    study.arm(name)  # an unknown arm raises
  for t in c.targets:
    parse_spec(t, flag="--target")
  if not config.source.spec.startswith("ckpt:"):
    parse_spec(config.source.spec, flag="--source")
  for name, value in (("--patience", p.patience), ("--tune-repeats", p.tune_draws)):
    if value and not p.val_per_class:
      raise InputError(f"{name} needs validation images: set --val-per-class >= 1 or "
                       f"{name} 0")
  if augment.parse(p.augment).kind == "pad" and p.stored_size:
    raise InputError(f"--augment {p.augment} crops back to the stored size, so it cannot "
                     "be combined with --stored-size: use crop or rrc")
  if p.stream_workers and not p.stream_threads:
    raise InputError("--stream-workers needs --stream-threads")
  if any(n in delta.CONFIG_STRATEGIES for n in c.arms):
    config = dataclasses.replace(config, protocol=dataclasses.replace(p, delta_env=delta_env()))
  return config


def parse(study, argv: Optional[Sequence[str]] = None) -> cfg.Config:
  """argv -> the study's checked `Config` (argparse exits 2 on a malformed flag; a bad value
  raises `InputError`)."""
  return config_of(study, raw_flags(study, argv))
