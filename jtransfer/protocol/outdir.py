"""The one rule for output folders: nothing a user saved is ever lost.

Every command that writes a folder (an experiment's `--out`, a pretrained or converted source
model) opens it through `open_outdir`:

  * a folder that does not exist, or is empty, is created and used;
  * a folder holding anything is refused (`InputError`, one sentence) unless
    - `resume`: allowed only when the folder was made by the same module with the same
      settings. The settings (every flag that changes results) are stored in `settings.json`
      when the folder is opened, before any run; a resume compares them and names each flag
      that differs ("--seed 1 != 0"). Folders made before that file existed carry `run.json`
      (module and argv, `experiments.publish`): the caller's `legacy` function derives their
      settings from it. One difference is a supported resume: a flag the caller names as
      `growable` whose value grows (a larger count, e.g. --repeats 5 -> 10, or a comma list
      growing to a superset, e.g. --seeds) adds runs beside the finished ones, once the caller's
      `check_growth` agrees; settings.json is then rewritten with the new value (only after
      every check passed, so a refusal changes nothing). Shrinking stays refused. A flag added
      after folders were made whose absence has a meaning (`absent`: --bn, absent = frozen)
      takes that value in a stored folder that lacks it, and a refusal over it says which
      value to pass;
    - `overwrite`: the old folder is renamed, whole, to `DIR.replaced-<UTC time>` beside it
      (never deleted) and a fresh `DIR` is made;
  * a multi-host process other than the writer makes the same checks and changes nothing.

Flags that change how a command runs but not what it computes (`NOT_SETTINGS`: --out,
--resume, --overwrite, --quiet, --devices, the multi-host and thread flags) are outside the
settings, so a grid started on one machine may be resumed on another.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Callable, Collection, Mapping

from jtransfer.errors import InputError

SETTINGS_FILE = "settings.json"
# Flag destinations (argparse `dest`) that do not change what a command computes.
NOT_SETTINGS = frozenset({
    "out", "resume", "overwrite", "quiet", "devices", "num_processes", "process_id",
    "coordinator", "threads", "torch_threads", "stream_workers", "stream_threads"})


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a folder was made by: the module's import name and its result-changing flags.

  Attributes:
    module: e.g. 'experiments.fewshot'.
    flags: '--flag' -> value (JSON values), `NOT_SETTINGS` left out.
  """
  module: str
  flags: Mapping[str, Any]

  def to_json(self) -> dict:
    """The JSON form written to `settings.json`."""
    return {"module": self.module, "flags": dict(sorted(self.flags.items()))}

  @classmethod
  def from_json(cls, obj: Mapping[str, Any]) -> "Settings":
    """Reads the form `to_json` wrote."""
    return cls(str(obj["module"]), dict(obj["flags"]))


def settings_of(module: str, flags: Mapping[str, Any]) -> Settings:
  """The `Settings` of parsed flags (e.g. `vars(argparse.Namespace)`, keyed by dest).

  Values pass through JSON (tuples become lists, other objects their str) so that stored and
  fresh settings compare equal.
  """
  kept = {"--" + k.replace("_", "-"): v for k, v in flags.items() if k not in NOT_SETTINGS}
  return Settings(module, json.loads(json.dumps(kept, default=str)))


def differences(old: Settings, new: Settings) -> list[str]:
  """Each way `new` differs from `old`, as 'module X != Y' or '--flag new != old'."""
  if old.module != new.module:
    return [f"module {new.module} != {old.module}"]
  out = []
  for flag in sorted(set(old.flags) | set(new.flags)):
    a, b = new.flags.get(flag, "(unset)"), old.flags.get(flag, "(unset)")
    if a != b:
      out.append(f"{flag} {_text(a)} != {_text(b)}")
  return out


def grows(old: Any, new: Any) -> bool:
  """Whether flag value `new` grows `old`: a larger integer count, or a comma list (text as the
  command line writes it, or a JSON list) whose items are a strict superset of the old ones."""
  if isinstance(old, int) and isinstance(new, int) and not isinstance(old, bool) \
      and not isinstance(new, bool):
    return new > old
  items = lambda v: ({str(x).strip() for x in v} if isinstance(v, list) else
                     {x.strip() for x in v.split(",") if x.strip()} if isinstance(v, str)
                     else None)
  a, b = items(old), items(new)
  return a is not None and b is not None and a < b


def growth(old: Settings, new: Settings,
           growable: Collection[str] | Mapping[str, Any]) -> list[str] | None:
  """The growing flags when the only ways `new` differs from `old` are flags of `growable`
  ('--repeats') whose values grow (`grows`), as '--repeats 5 -> 10'; None when anything else
  differs (or a growable flag shrinks or changes otherwise), [] when nothing differs.
  `growable` may map each flag to the value it stands for when stored as None (left at its
  default), so that a default --target list grows to an explicit superset."""
  if old.module != new.module:
    return None
  unset = growable if isinstance(growable, Mapping) else {}
  out = []
  for flag in sorted(set(old.flags) | set(new.flags)):
    a, b = old.flags.get(flag), new.flags.get(flag)
    a, b = (unset.get(flag) if v is None else v for v in (a, b))
    if a == b:
      continue
    if flag not in growable or not grows(a, b):
      return None
    out.append(f"{flag} {_text(a)} -> {_text(b)}")
  return out


def _text(v: Any) -> str:
  if isinstance(v, list):
    return ",".join(map(str, v))
  return str(v)


@dataclasses.dataclass(frozen=True)
class Opened:
  """What `open_outdir` did.

  Attributes:
    path: the folder (absolute).
    resumed: it held results of the same settings, kept for a resume.
    moved_to: where `overwrite` moved the old contents, or None.
  """
  path: str
  resumed: bool
  moved_to: str | None


def contents(path: str) -> list[str]:
  """The entries of folder `path` (sorted), [] when it does not exist."""
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


def stored_settings(path: str, legacy: Callable[[dict], Settings] | None = None,
                    absent: Mapping[str, Any] | None = None) -> Settings | None:
  """The settings folder `path` was made with: `settings.json`, else `legacy(run.json)`, else
  None; each flag of `absent` ('--bn' -> 'frozen') the stored settings lack takes its value
  there (a flag added since, whose absence means that value).

  Raises:
    InputError: settings.json or run.json is unreadable.
  """
  for name, read in ((SETTINGS_FILE, Settings.from_json), ("run.json", legacy)):
    f = os.path.join(path, name)
    if read is None or not os.path.isfile(f):
      continue
    try:
      with open(f) as fh:
        stored = read(json.load(fh))
      return Settings(stored.module, {**dict(absent or {}), **stored.flags})
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise InputError(f"{f} is unreadable ({type(e).__name__}: {e}), so its settings cannot "
                       "be checked for --resume: pass --overwrite or another --out") from None
  return None


def open_outdir(path: str, settings: Settings | None, *, resume: bool = False,
                overwrite: bool = False, writer: bool = True,
                legacy: Callable[[dict], Settings] | None = None,
                resumable: Callable[[str], bool] | None = None,
                log: Callable[[str], None] | None = None, create: bool = True,
                growable: Collection[str] = (),
                check_growth: Callable[[list[str]], None] | None = None,
                absent: Mapping[str, Any] | None = None) -> Opened:
  """Opens output folder `path` under the rule of this module's docstring.

  Args:
    path: the folder.
    settings: what the caller will write there; None = a command without --resume (a model
      folder): nothing is stored and only `overwrite` may replace a non-empty folder.
    resume, overwrite: the flags.
    writer: False on a multi-host process other than the writer: check only.
    legacy: run.json -> Settings, for folders made before settings.json existed.
    resumable: folder -> whether it holds results a resume may continue when it has neither
      settings.json nor run.json (a grid killed before this rule existed); None = never.
    log: where to say what was moved aside (one line); None = silent.
    create: make the folder (False: a model folder, which its saver makes whole at the end).
    growable: flags ('--repeats') a resume may grow (`growth`): the folder's finished runs are
      kept and settings.json takes the new values.
    check_growth: the growing flags ('--repeats 5 -> 10') -> None, raising `InputError` when
      this folder's runs cannot grow (e.g. tuning draws that depend on the draw count);
      called before anything is written.
    absent: flag -> the value a stored folder lacking it was made with (`stored_settings`).

  Returns:
    `Opened`.

  Raises:
    InputError: one sentence: both flags, a non-empty folder without either, a resume of
      another module or other settings, a file in the way, or a folder that is not writable.
  """
  if resume and overwrite:
    raise InputError("--resume and --overwrite conflict: choose one")
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"--out {path} is a file, not a folder: pass another --out")
  # Our own transient files (a multi-host writer may be writing them now) are not contents.
  held = [e for e in contents(path) if e not in (".write-test", SETTINGS_FILE + ".tmp")]
  if held and settings is not None and held == [SETTINGS_FILE]:
    # Opened before (or just now by the multi-host writer) but no run finished: as empty
    # when the settings agree.
    if stored_settings(path, absent=absent) == settings:
      held = []
  moved_to = None
  resumed = False
  if held and not (resume or overwrite):
    what = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
    how = ("pass --resume to continue it (same command and settings) or --overwrite to move "
           "it aside" if settings is not None else "pass --overwrite to move it aside")
    kind = "results" if {"results.jsonl", "results.json"} & set(held) else "files"
    count = f"{len(held)} {'entry' if len(held) == 1 else 'entries'}"
    raise InputError(f"--out {path} already holds {kind} ({count}: {what}); {how}, or choose "
                     "another --out")
  if held and resume:
    if settings is None:
      raise InputError(f"--out {path} cannot be resumed; pass --overwrite to move it aside")
    old = stored_settings(path, legacy, absent)
    if old is None and not (resumable is not None and resumable(path)):
      raise InputError(f"--out {path} holds no results of {settings.module} to resume "
                       "(no settings.json, run.json or results); pass --overwrite or another "
                       "--out")
    if old is None and log is not None:
      log(f"--resume: {path} records no settings (made before settings.json existed); "
          "resumed without checking them")
    grown = growth(old, settings, growable) if old is not None else []
    if grown is None:
      diff = differences(old, settings)
      shrunk = [f for f in sorted(growable) if f in old.flags and f in settings.flags
                and grows(settings.flags[f], old.flags[f])]
      hint = [f"{', '.join(shrunk)} may grow on --resume, never shrink"] if shrunk else []
      # A flag folders may predate: name the value that resumes it (its absence means it).
      hint += [f"pass {f} {_text(v)} to resume it (a folder made before {f} ran {_text(v)})"
               for f, v in sorted((absent or {}).items())
               if old.flags.get(f) == v and settings.flags.get(f) != v]
      raise InputError(f"--resume refused: --out {path} was made with other settings "
                       f"({'; '.join(diff + hint)}); rerun with the same flags, or pass "
                       "--overwrite or another --out")
    if grown:
      if check_growth is not None:
        check_growth(grown)
      if writer:
        _write_settings(path, settings)
      if log is not None:
        log(f"--resume: growing {', '.join(grown)}; the finished runs are kept and only the "
            "new ones run")
    resumed = True
  if held and overwrite and writer:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    moved_to = f"{path}.replaced-{stamp}"
    try:
      os.rename(path, moved_to)
    except OSError as e:
      raise InputError(f"--overwrite could not move {path} aside to {moved_to}: "
                       f"{e.strerror}") from None
    if log is not None:
      log(f"--overwrite: moved the old contents of {path} to {moved_to} (nothing deleted)")
  if writer and create:
    try:
      os.makedirs(path, exist_ok=True)
      probe = os.path.join(path, ".write-test")
      with open(probe, "w"):
        pass
      os.remove(probe)
      if settings is not None and not os.path.exists(os.path.join(path, SETTINGS_FILE)):
        _write_settings(path, settings)
    except OSError as e:
      raise InputError(f"--out {path} is not writable: {e.strerror}") from None
  return Opened(path, resumed, moved_to)


def _write_settings(path: str, settings: Settings) -> None:
  """settings.json, written whole (a temporary file renamed over it).

  Raises:
    InputError: the folder is not writable.
  """
  tmp = os.path.join(path, SETTINGS_FILE + ".tmp")
  try:
    with open(tmp, "w") as f:
      json.dump(settings.to_json(), f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(path, SETTINGS_FILE))
  except OSError as e:
    raise InputError(f"--out {path} is not writable: {e.strerror}") from None
