"""LEGACY: the progress printer experiments/sparse_transfer.py (not yet on the study runner)
still imports; delete it with that module. Studies on the runner print through
`jtransfer.study.runner.emitter`, the counting and line formats are `jtransfer.protocol.progress`.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def stderr_or_quiet(args: argparse.Namespace) -> Callable[[str], None] | None:
  """A stderr line printer, or None under --quiet."""
  if args.quiet:  # (every caller's parser has add_results_flags' --quiet)
    return None
  return lambda line: print(line, file=sys.stderr, flush=True)
