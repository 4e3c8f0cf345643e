"""Margins from test-set resolution and the 'not tested' detectors the entries share."""
from __future__ import annotations

from jtransfer.protocol.registry import Untested
from jtransfer.study import records as rec

DIGITS, FMNIST = 898, 1500  # test images of the digits and fmnist:* targets (records' n_test)


def one_image(n: int, what: str) -> tuple[float, str]:
  """(margin, reason): one image of an n-image test set, as accuracy."""
  return 1.0 / n, (f"test-set resolution: one image of the {n}-image test set ({what}), "
                   f"{100 / n:.3f} points")


def _wise_alpha1(records: list) -> set:
  # records of either version (a grown folder holds version 2) as flat rows: arm, cell, draw
  return {(frozenset(dict(arch=r["arch"], target=r["target"], shots=r["shots"]).items()),
           r["repeat"]) for r in rec.rows(records)
          if r.get("arm") == "wise_ft" and r.get("role") == "eval" and r.get("hp") == "alpha=1"}


WISE_ALPHA1 = Untested("validation chose alpha = 1, so WiSE-FT is its fine-tuned end itself",
                       _wise_alpha1)


def _nothing_pruned(records: list) -> set:
  base = {r.get("repeat", 0): r["params"] for r in records if r.get("tau") is None}
  return {(frozenset({("tau", r["tau"])}), r.get("repeat", 0)) for r in records
          if r.get("tau") is not None and r["params"] == base.get(r.get("repeat", 0))}


NOTHING_PRUNED = Untested("this tau prunes no parameter (the pruned model is the unpruned one)",
                          _nothing_pruned)


def _no_neuron_removed(records: list) -> set:
  return {(frozenset({("target", r["target"])}), r["seed"]) for r in records
          if r.get("kind") == "neuron" and all(
              r["table"][l]["neurons"][0] == r["table"][l]["neurons"][1] for l in ("fc6", "fc7")
              if l in r["table"])}


NO_NEURON_REMOVED = Untested("the stopping rule kept no pruning iteration (no fc neuron removed)",
                             _no_neuron_removed)
