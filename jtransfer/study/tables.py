"""Summaries and table cells shared by study reports: comma-list flags, mean (std) cells,
the paper's best-over-LR figure, the validation/test split clause, the LR-grid line."""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np

from jtransfer.errors import InputError


def positive_ints(text: str, flag: str) -> list[int]:
  """A comma list of integers >= 1 from flag `flag`, or InputError naming it."""
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise InputError(f"{flag} {text!r}: expected a comma list of integers") from None
  if not values or any(v < 1 for v in values):
    raise InputError(f"{flag} {text!r}: values must be integers >= 1")
  return values


def float_list(text: str, flag: str, ok: Callable[[float], bool] = lambda v: True,
               what: str = "values must be finite numbers") -> list[float]:
  """A non-empty comma list of finite numbers, each passing `ok`, from flag `flag`.

  Raises:
    InputError: one sentence naming the flag, its text and `what` was expected.
  """
  try:
    values = [float(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    raise InputError(f"{flag} {text!r}: expected a comma list of numbers") from None
  if not values:
    raise InputError(f"{flag} {text!r}: expected at least one number")
  if not all(np.isfinite(v) and ok(v) for v in values):
    raise InputError(f"{flag} {text!r}: {what}")
  return values


def positive_floats(text: str, flag: str) -> list[float]:
  """A comma list of finite numbers > 0 from flag `flag`, or InputError naming it."""
  return float_list(text, flag, lambda v: v > 0, "values must be finite and > 0")


def mean_std(values: Iterable[float]) -> tuple[float, float]:
  """(mean, population std) of the values."""
  v = np.asarray(list(values), np.float64)
  return float(v.mean()), float(v.std())


def best_over_lr(records: list[dict], group: Sequence[str]) -> dict[tuple, dict]:
  """Per group: the LR with the best mean test accuracy over repeats (the paper's figure),
  and the validation-selected figure (per repeat, the LR with the best validation accuracy).

  Returns:
    group key -> {'best_lr', 'test_mean', 'test_std', 'val_sel_mean', 'val_sel_std', 'n'}.
  """
  by_group: dict[tuple, list[dict]] = defaultdict(list)
  for r in records:
    # Tuning draws (role 'tune') are never tested: they only choose hyper-parameters.
    if r.get("status", "ok") == "ok" and r.get("role", "eval") == "eval":
      by_group[tuple(r[k] for k in group)].append(r)
  out = {}
  for key, rs in by_group.items():
    by_lr: dict[float, list[float]] = defaultdict(list)
    by_repeat: dict[int, list[dict]] = defaultdict(list)
    for r in rs:
      by_lr[r["lr"]].append(r["test_acc"])
      by_repeat[r["repeat"]].append(r)
    best_lr = max(sorted(by_lr), key=lambda lr: np.mean(by_lr[lr]))
    m, s = mean_std(by_lr[best_lr])
    # Ties in validation accuracy go to the smaller LR (sorted order, first max).
    chosen = [max(sorted(rr, key=lambda r: r["lr"]), key=lambda r: r["val_acc"])["test_acc"]
              for rr in by_repeat.values()]
    vm, vs = mean_std(chosen)
    out[key] = dict(best_lr=best_lr, test_mean=m, test_std=s, val_sel_mean=vm, val_sel_std=vs,
                    n=len(by_lr[best_lr]))
  return out


def pct(mean: float, std: float) -> str:
  """A table cell 'mean (std)' in %, one decimal."""
  return f"{100 * mean:.1f} ({100 * std:.1f})"


def split_text(val_per_class: int, test_per_class: int, records: Sequence[dict]) -> str:
  """The report's 'Validation: ...; test: ...' clause from the split the runs actually used
  (each record's n_train, n_val, n_test), not from the flags alone: a small target holds
  fewer images than the flags ask for. The flags' wording is kept where every target's counts
  match it; otherwise each target's counts are given.

  Classes of a target = n_train / shots of its evaluation runs (k images per class).
  """
  by_target: dict = defaultdict(list)
  for r in records:
    if r.get("role", "eval") == "eval" and r.get("shots") and \
        all(k in r for k in ("n_train", "n_val", "n_test")) and r["n_train"] % r["shots"] == 0:
      by_target[r.get("target", "")].append(r)
  val_parts, test_parts, val_ok, test_ok = [], [], True, True
  for target, runs in by_target.items():
    classes = {r["n_train"] // r["shots"] for r in runs}
    if len(classes) != 1:
      continue
    c = classes.pop()
    n_val = sorted({r["n_val"] for r in runs})
    n_test = sorted({r["n_test"] for r in runs})
    name = f"{target} " if len(by_target) > 1 else ""
    if n_val == [val_per_class * c]:
      val_parts.append(f"{name}{val_per_class}/class")
    else:
      val_ok = False
      val_parts.append(f"{name}{_span(n_val)} images per draw "
                       f"({_span([v / c for v in n_val])}/class over {c} classes)")
    if not test_per_class or n_test == [test_per_class * c]:
      test_parts.append(f"{name}{'all' if not test_per_class else f'{test_per_class}/class'}")
    else:
      test_ok = False
      test_parts.append(f"{name}{_span(n_test)} images ({_span([v / c for v in n_test])}/class "
                        f"over {c} classes)")
  val = f"{val_per_class}/class"
  if not val_ok:
    val = (", ".join(val_parts) + f" (--val-per-class {val_per_class} asked for more than the "
           "labelled pool held)")
  test = "all" if not test_per_class else f"<= {test_per_class}/class"
  if not test_ok:
    test = ", ".join(test_parts) + f" (the cap is {test_per_class}/class)"
  return (f"Validation: {val}, disjoint from the k-shot set and from test; test: {test} of "
          "the target's test split")


def _span(values: Sequence[float]) -> str:
  """'5' or '4.5-6' (a range when the draws differ)."""
  lo, hi = min(values), max(values)
  f = lambda v: f"{v:g}" if float(v).is_integer() else f"{v:.1f}"
  return f(lo) if lo == hi else f"{f(lo)}-{f(hi)}"


def lr_grid_text(strategies: Sequence[str], lrs: dict, tuned: dict) -> str:
  """The report's 'LR grids' line: each strategy's grid, plus the values tuning extended it
  to at an edge (`tuned`: cell -> Tuned.to_dict(), cell[-1] the strategy)."""
  parts = []
  for s in strategies:
    base = [float(v) for v in lrs[s]]
    seen = {float(v) for cell, t in tuned.items() if cell[-1] == s
            for v in t.get("grid", {}).get("lr", ())}
    text = f"{s}: {', '.join(f'{v:g}' for v in base)}"
    extra = sorted(seen - set(base))
    if extra:
      text += f" (extended by tuning to {', '.join(f'{v:g}' for v in extra)})"
    parts.append(text)
  return "LR grids: " + "; ".join(parts)


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
