"""What every benchmark script does with its report."""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence


def command(module: str, argv: Optional[Sequence[str]]) -> str:
  """The command line that reproduces a run: `python -m bench.<module> <args>`."""
  args = list(sys.argv[1:] if argv is None else argv)
  return " ".join(["python -m", f"bench.{module}", *args])


def emit(text: str, out: Optional[str]) -> None:
  """Prints the report and writes it to `out` (creating its folder) when given."""
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text)
