"""`jtransfer.study.flags.command_config`: one flag dataclass parsed alone (a benchmark's flags)."""
import dataclasses
from typing import Optional

import pytest

from jtransfer.errors import InputError
from jtransfer.study import flag, flags
from jtransfer.study import Protocol
from jtransfer.study.config import at_least, comma_list, json_object, number, offered


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


def test_number_parses_one_number_or_names_the_flag():
  assert number("--x")("2.5") == 2.5 and number("--n", int)("3") == 3
  assert type(number("--n", int)("3")) is int
  with pytest.raises(InputError, match=r"^--n '2.5': expected an integer$"):
    number("--n", int)("2.5")
  with pytest.raises(InputError, match=r"^--x 'abc': expected a number$"):
    number("--x")("abc")
  # an optional flag: absent stays None (never parsed), given is parsed
  P = dataclasses.make_dataclass(
      "P", [("k", Optional[int], flag("--k", None, "optional", parse=number("--k", int)))],
      frozen=True)
  assert flags.command_config(P, []).k is None and flags.command_config(P, ["--k", "4"]).k == 4


def test_json_object_parses_an_object_or_names_the_flag():
  assert json_object("--config")('{"stem_width": 8}') == {"stem_width": 8}
  with pytest.raises(InputError, match=r"^--config '\[1\]': expected a JSON object$"):
    json_object("--config")("[1]")
  with pytest.raises(InputError, match=r"^--config '\{bad' is not valid JSON \(Expecting "):
    json_object("--config")("{bad")
