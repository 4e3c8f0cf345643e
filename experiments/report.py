"""Shared report pieces: results files written run by run, summaries, markdown, plots."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from jtransfer.errors import InputError
from jtransfer.protocol import outdir


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


class ResultsDir:
  """An experiment's output directory with one JSON record per finished run.

  Records are appended to `results.jsonl` as each run ends (a killed grid keeps them);
  `results.json` is rewritten from them. Opening follows `jtransfer.protocol.outdir`: a folder
  holding anything is refused unless `resume` (same module and settings: skip finished runs)
  or `overwrite` (the old folder is moved aside, never deleted).
  """

  def __init__(self, path: str, *, resume: bool = False, overwrite: bool = False,
               writer: bool = True, settings: outdir.Settings | None = None,
               legacy: Callable[[dict], outdir.Settings] | None = None,
               log: Callable[[str], None] | None = None):
    """Opens `path` (see the class docstring).

    Args:
      settings: the module and result-changing flags of the command (stored on first open,
        compared on resume); None = a tool reopening a folder it reads or fills (publish,
        a sub-folder of a grid), which only checks that a non-empty folder is resumed.
      legacy: run.json -> settings, for folders made before settings.json existed.
      writer: False (a multi-host process other than the first): the same checks, but
        nothing is created, moved or written; records are read (`reload` after the writer has
        opened the directory) and `add` keeps them in memory only.
      log: where `--overwrite` says where the old folder went.
    """
    self.writer = writer
    self.path = os.path.abspath(path)
    self.jsonl = os.path.join(self.path, "results.jsonl")
    if settings is None:
      self._open_plain(resume, overwrite, writer, log)
    else:
      self.opened = outdir.open_outdir(
          self.path, settings, resume=resume, overwrite=overwrite, writer=writer,
          legacy=legacy, log=log,
          resumable=lambda p: os.path.exists(os.path.join(p, "results.jsonl")))
    if writer:
      self._drop_cut_line()
    self.reload()

  def _open_plain(self, resume: bool, overwrite: bool, writer: bool, log) -> None:
    """Opens a folder whose settings are not checked (see __init__): the same refusal of a
    non-empty folder without a flag and the same move-aside on overwrite."""
    if resume and overwrite:
      raise InputError("--resume and --overwrite conflict: choose one")
    held = outdir.contents(self.path)
    if held and overwrite:
      self.opened = outdir.open_outdir(self.path, None, overwrite=True, writer=writer, log=log)
      return
    if held and not resume:
      raise InputError(f"{self.path} already holds {len(held)} entries: choose a new or empty "
                       "folder")
    if writer:
      try:
        os.makedirs(self.path, exist_ok=True)
      except OSError as e:
        raise InputError(f"--out {self.path} is not writable: {e.strerror}") from None
    self.opened = outdir.Opened(self.path, bool(held), None)

  def _drop_cut_line(self) -> None:
    """Truncates results.jsonl after its last newline: a line a kill cut mid-write holds no
    whole record, and the next append would otherwise join it and be lost with it."""
    if not os.path.exists(self.jsonl):
      return
    with open(self.jsonl, "rb+") as f:
      data = f.read()
      if data and not data.endswith(b"\n"):
        f.truncate(data.rfind(b"\n") + 1)

  def reload(self) -> None:
    """(Re)reads the records of results.jsonl."""
    self.records: list[dict[str, Any]] = []
    if os.path.exists(self.jsonl):
      with open(self.jsonl) as f:
        for line in f:
          line = line.strip()
          if line:
            try:
              self.records.append(json.loads(line))
            except json.JSONDecodeError:
              pass  # a line cut by a kill mid-write: that run is simply redone

  def done(self, key_fields: Sequence[str]) -> set[tuple]:
    return {tuple(r[k] for k in key_fields) for r in self.records}

  def add(self, record: dict[str, Any]) -> None:
    self.add_many([record])

  def add_many(self, records: Sequence[dict[str, Any]]) -> None:
    """Appends records in one write: the records of a draw whose models were timed together
    land together (a kill mid-write can cut only the last line, which opening the directory
    again drops)."""
    self.records.extend(records)
    if not self.writer or not records:
      return
    with open(self.jsonl, "a") as f:
      f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
      f.flush()
      os.fsync(f.fileno())

  def write_json(self, name: str, obj: Any) -> str:
    path = os.path.join(self.path, name)
    if not self.writer:
      return path
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return path

  def write_text(self, name: str, text: str) -> str:
    path = os.path.join(self.path, name)
    if not self.writer:
      return path
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
    return path


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
  to at an edge (`tuned`: cell -> Tuned.to_dict(), cell[3] the strategy)."""
  parts = []
  for s in strategies:
    base = [float(v) for v in lrs[s]]
    seen = {float(v) for cell, t in tuned.items() if cell[3] == s
            for v in t.get("grid", {}).get("lr", ())}
    text = f"{s}: {', '.join(f'{v:g}' for v in base)}"
    extra = sorted(seen - set(base))
    if extra:
      text += f" (extended by tuning to {', '.join(f'{v:g}' for v in extra)})"
    parts.append(text)
  return "LR grids: " + "; ".join(parts)
