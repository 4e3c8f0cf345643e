"""What Tables 1-3 of Liu et al. (AAAI 2017) measure on a hybrid net's main branch.

* The connection pruning rate (Table 3): zero kernel entries of the main branch over the kernel
  entries of its *dense* counterpart. Biases are excluded (Han et al. prune weights), and a
  neuron removed by slicing counts as pruned: its entries are gone from the numerator's
  non-zeros but stay in the dense count.
* The share of fc neurons removed by neuron pruning (Table 2: "almost half" of fc6 + fc7), read
  from a `hybrid.fc_table`.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

from jtransfer import surgery

FC_LAYERS = ("fc6", "fc7")


def _kernels(params) -> dict[str, np.ndarray]:
  return {p: v for p, v in surgery.flatten(params["main"]).items() if p.endswith("kernel")}


def kernel_total(params) -> int:
  """Kernel entries of the main branch (zeros included): the dense count of `main_rate`."""
  return sum(int(np.size(v)) for v in _kernels(params).values())


def main_rate(params, dense_total: Optional[int] = None) -> float:
  """Connection pruning rate of the main branch: 1 - non-zero kernel entries / dense count.

  Args:
    params: hybrid params ({'main', ...}); only the main branch is measured.
    dense_total: kernel entries of the net before neuron pruning (`kernel_total` of it), so
      removed neurons count as pruned; default: this net's own count.
  """
  total = kernel_total(params) if dense_total is None else dense_total
  nonzero = sum(int(np.count_nonzero(v)) for v in _kernels(params).values())
  return 1.0 - nonzero / total


def fc_removed(table: Mapping[str, Mapping], layers: Sequence[str] = FC_LAYERS
               ) -> tuple[int, int]:
  """(neurons before, neurons after) of `layers` together, from a `hybrid.fc_table` (or its
  JSON form: {'layer': {'neurons': [before, after], ...}})."""
  rows = [table[l]["neurons"] for l in layers if l in table]
  return sum(int(b) for b, _ in rows), sum(int(a) for _, a in rows)


def removed_share(table: Mapping[str, Mapping], layers: Sequence[str] = FC_LAYERS) -> float:
  """The share of the `layers`' neurons that neuron pruning removed (0 when none)."""
  before, after = fc_removed(table, layers)
  return 1.0 - after / before
