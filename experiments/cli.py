"""Flags every experiment module shares."""
from __future__ import annotations

import argparse
import sys

from jtransfer.errors import InputError
from jtransfer.train import parallel


def add_devices_flag(p: argparse.ArgumentParser) -> None:
  """--devices N: data-parallel train steps over N devices (default 1)."""
  p.add_argument("--devices", type=int, default=1,
                 help="data-parallel training over this many devices (jax.sharding mesh, "
                      "batch split, params replicated); multi-host: see README")


def apply_devices(args: argparse.Namespace) -> None:
  """Sets the default training mesh from args.devices; exits 2 with a message if impossible."""
  try:
    parallel.set_default_mesh(parallel.make_mesh(args.devices) if args.devices != 1 else None)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from e
