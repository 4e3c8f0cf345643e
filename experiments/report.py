"""Report pieces the experiment modules share; the results folder and the summaries moved to
`jtransfer.study` (re-exported here for the modules not yet declared on the runner)."""
from __future__ import annotations

from typing import Iterable

# (re-exported: modules not yet on the runner import them from here)
from jtransfer.study.results import ResultsDir  # noqa: F401
from jtransfer.study.tables import (best_over_lr, float_list, lr_grid_text,  # noqa: F401
                                    mean_std, pct, positive_floats, positive_ints, split_text)


# `latency_timing` of a record whose model was timed round-robin with the other models of its
# draw (jtransfer.train.evaluate.interleaved_latency_ms); after a resume, the models a draw
# reran were timed among themselves only, not with the ones recorded before the kill.
TIMED_TOGETHER = "interleaved"
TIMED_AFTER_RESUME = "interleaved, resumed draw"


def timing_text(records: Iterable[dict], together: str) -> str:
  """A report's latency-timing clause: `together` where records were timed together, with a
  note when a resumed draw's models were timed only among themselves."""
  labels = {r.get("latency_timing") for r in records}
  text = together if labels & {TIMED_TOGETHER, TIMED_AFTER_RESUME} else ""
  if TIMED_AFTER_RESUME in labels:
    text += ", except the models a draw reran after a resume, timed only among themselves"
  return text
