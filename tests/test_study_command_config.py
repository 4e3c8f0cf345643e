"""`jtransfer.study.flags.command_config`: one flag dataclass parsed alone (a benchmark's flags)."""
import dataclasses
from typing import Optional

import pytest

from jtransfer.errors import InputError
from jtransfer.study import flag, flags
from jtransfer.study.config import at_least, comma_list


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
