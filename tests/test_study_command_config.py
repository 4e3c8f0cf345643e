"""`jtransfer.study.flags.command_config`: one flag dataclass parsed alone (a benchmark's flags)."""
import dataclasses
from typing import Optional

import pytest

from jtransfer.errors import InputError
from jtransfer.study import flag, flags
from jtransfer.study import Protocol
from jtransfer.study.config import at_least, comma_list, offered


@dataclasses.dataclass(frozen=True)
class Knobs:
  names: tuple = flag("--names", ("a", "b"), "comma list", cli="a,b", parse=comma_list("--names"))
  steps: int = flag("--steps", 10, "steps", check=at_least(1, "--steps"))
  rate: float = flag("--rate", 0.5, "a rate")
  fast: bool = flag("--fast", True, "on by default", action="bool")
  quiet: bool = flag("--quiet", False, "off by default", action="store_true")
  note: Optional[str] = flag("--note", None, "optional text")


def test_defaults_are_the_dataclass_defaults():
  assert flags.command_config(Knobs, []) == Knobs()


def test_values_are_parsed_typed_and_checked():
  k = flags.command_config(Knobs, ["--names", "x,,y", "--steps", "3", "--rate", "2e-3",
                                 "--no-fast", "--quiet", "--note", "hi"])
  assert k == Knobs(names=("x", "y"), steps=3, rate=0.002, fast=False, quiet=True, note="hi")
  assert type(k.steps) is int and type(k.rate) is float
  with pytest.raises(InputError, match=r"^--steps must be >= 1, got 0$"):
    flags.command_config(Knobs, ["--steps", "0"])


def test_a_malformed_flag_exits_2_as_argparse_does(capsys):
  with pytest.raises(SystemExit) as e:
    flags.command_config(Knobs, ["--steps", "three"])
  assert e.value.code == 2 and "--steps: invalid int value" in capsys.readouterr().err


@dataclasses.dataclass(frozen=True)
class Composed:
  """A benchmark's flags composing the library's `Protocol`: three of its flags offered (one
  renamed, one with its own default and check), one field fixed, the rest Protocol's."""
  arch: str = flag("--arch", "vgg_s", "an own flag")
  protocol: Protocol = offered(Protocol, {
      "repeats": dict(name="--draws", default=10, help="draws per cell"),
      "val_per_class": dict(check=at_least(1, "--val-per-class")),
      "steps": {}}, fixed={"patience": 0})


def test_offered_flags_compose_the_library_dataclass(capsys):
  # defaults: the offered and fixed ones the command's, the rest Protocol's
  assert Composed() == flags.command_config(Composed, []) == Composed(
      protocol=Protocol(repeats=10, patience=0))
  c = flags.command_config(Composed, ["--draws", "3", "--steps", "7", "--val-per-class", "2"])
  assert c.protocol == Protocol(repeats=3, steps=7, val_per_class=2, patience=0)
  assert type(c.protocol.steps) is int
  # the offered flags' checks: the library's (--steps) or the command's own
  with pytest.raises(InputError, match=r"^--steps must be >= 1, got 0$"):
    flags.command_config(Composed, ["--steps", "0"])
  with pytest.raises(InputError, match=r"^--val-per-class must be >= 1, got 0$"):
    flags.command_config(Composed, ["--val-per-class", "0"])
  assert flags.command_config(dataclasses.make_dataclass(
      "P", [("p", Protocol, offered(Protocol, {"val_per_class": {}}))], frozen=True),
      ["--val-per-class", "0"]).p.val_per_class == 0  # Protocol's own check allows 0
  # only the offered flags exist, under their names and help
  for gone in ("--repeats", "--patience", "--seed"):
    with pytest.raises(SystemExit):
      flags.command_config(Composed, [gone, "1"])
  help_text = flags.command_parser(Composed, "").format_help()
  assert "--draws DRAWS" in help_text and "draws per cell" in help_text
  assert "step cap of a run" in help_text  # --steps' help as Protocol declares it
  capsys.readouterr()


def test_offered_refuses_what_it_cannot_offer():
  with pytest.raises(ValueError, match="'nope'"):
    offered(Protocol, {"nope": {}})
  with pytest.raises(ValueError, match="'steps'"):
    offered(Protocol, {"steps": dict(parse=int)})
