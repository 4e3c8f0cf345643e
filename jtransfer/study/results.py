"""An experiment's results folder, written run by run (`ResultsDir`).

Opening follows the output-folder rule of `jtransfer.protocol.outdir`; records are appended to
results.jsonl as each run ends, so a killed grid keeps them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Collection, Mapping, Sequence

from jtransfer.errors import InputError
from jtransfer.protocol import outdir


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
               log: Callable[[str], None] | None = None,
               growable: Collection[str] = (),
               check_growth: Callable[[list[str]], None] | None = None,
               absent: Mapping[str, Any] | None = None):
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
      growable, check_growth: the flags a resume may grow and the check of such a growth
        (`jtransfer.protocol.outdir.open_outdir`).
      absent: flag -> the value a stored folder lacking it was made with ('--bn' -> 'frozen').
    """
    self.writer = writer
    self.path = os.path.abspath(path)
    self.jsonl = os.path.join(self.path, "results.jsonl")
    if settings is None:
      self._open_plain(resume, overwrite, writer, log)
    else:
      self.opened = outdir.open_outdir(
          self.path, settings, resume=resume, overwrite=overwrite, writer=writer,
          legacy=legacy, log=log, growable=growable, check_growth=check_growth, absent=absent,
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
    return self.write_text(name, json.dumps(obj, indent=1, sort_keys=True))

  def write_text(self, name: str, text: str) -> str:
    path = os.path.join(self.path, name)
    if not self.writer:
      return path
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(text)
    os.replace(tmp, path)
    return path
