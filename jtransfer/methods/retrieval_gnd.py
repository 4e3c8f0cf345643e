"""Ground-truth files of the revisited Oxford/Paris benchmarks: JSON, or the official pickle read
by a restricted unpickler (only plain containers, numbers, strings and numpy arrays), converted
once with `gnd_pickle_to_json`. `jtransfer.methods.retrieval` re-exports every name.
"""
from __future__ import annotations

import io
import json
import os
import pickle
from typing import Any

import numpy as np

from jtransfer.errors import InputError


# ----------------------------------------------------------------------------------------------
# Ground-truth files.

_GND_KEYS = ("easy", "hard", "junk")


def _numpy_globals() -> dict[tuple[str, str], Any]:
  """The numpy reconstruct functions an ndarray pickle names, under old and new module paths."""
  try:  # numpy >= 2; the same functions also serve pickles that name numpy.core.*
    from numpy._core import multiarray, numeric
  except ImportError:  # numpy 1.x
    from numpy.core import multiarray, numeric
  found = {}
  for prefix in ("numpy._core", "numpy.core"):
    found[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
    found[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
    found[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
  found[("numpy", "ndarray")] = np.ndarray
  found[("numpy", "dtype")] = np.dtype
  return found


_BUILTINS = {name: getattr(__import__("builtins"), name) for name in (
    "list", "dict", "tuple", "set", "frozenset", "int", "float", "complex", "str", "bytes",
    "bytearray", "bool")}


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
  """Stand-in for `_codecs.encode`, which protocol 0-2 pickles use to rebuild bytes.

  Only the latin-1 codec pickle itself emits is accepted, so no other codec module is looked up;
  `errors` is accepted for signature compatibility and always treated as 'strict'.
  """
  if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
    raise pickle.UnpicklingError(f"_codecs.encode is only allowed with latin1, got {encoding!r}")
  return text.encode("latin1", errors="strict")


class _GndUnpickler(pickle.Unpickler):
  """Unpickler that resolves only an allow-list of globals; nothing is ever imported by name."""

  _allowed = {**{(m, n): f for n, f in _BUILTINS.items() for m in ("builtins", "__builtin__")},
              ("_codecs", "encode"): _latin1_encode,
              **_numpy_globals()}

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def _to_plain(x: Any) -> Any:
  """numpy arrays/scalars -> lists/Python numbers, recursively (what JSON can hold)."""
  if isinstance(x, np.ndarray):
    return _to_plain(x.tolist())
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, dict):
    return {str(k): _to_plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_plain(v) for v in x]
  return x


def _index_list(value: Any, where: str) -> list[int]:
  values = np.asarray(_to_plain(value) if value is not None else [])
  if values.size and (values.ndim != 1 or not np.issubdtype(values.dtype, np.integer)):
    raise InputError(f"{where} must be a flat list of integer database indices")
  return [int(v) for v in values.ravel()]


def _names(values: Any) -> list[str]:
  # Python 2 pickles read with encoding='latin1' may hold bytes names.
  return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in _to_plain(values)]


def _canonical_gnd(data: Any, source: str) -> dict:
  """Validates a ground-truth dict and returns it with plain Python types only."""
  if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
    raise InputError(f"{source}: expected a dict with keys 'imlist', 'qimlist', 'gnd'")
  if not all(isinstance(data[k], (list, tuple, np.ndarray)) for k in ("imlist", "qimlist", "gnd")):
    raise InputError(f"{source}: 'imlist', 'qimlist' and 'gnd' must be lists")
  imlist, qimlist = _names(data["imlist"]), _names(data["qimlist"])
  if len(data["gnd"]) != len(qimlist):
    raise InputError(f"{source}: 'gnd' has {len(data['gnd'])} entries but 'qimlist' has "
                     f"{len(qimlist)}")
  gnd = []
  for i, g in enumerate(data["gnd"]):
    if not isinstance(g, dict) or not set(_GND_KEYS) <= set(g):
      raise InputError(f"{source}: gnd entry {i} must be a dict with 'easy', 'hard', 'junk'")
    entry = {k: _index_list(g[k], f"{source}: gnd[{i}][{k!r}]") for k in _GND_KEYS}
    bad = [v for k in _GND_KEYS for v in entry[k] if not 0 <= v < len(imlist)]
    if bad:
      raise InputError(f"{source}: gnd entry {i} has indices outside the {len(imlist)}-image "
                       f"database, e.g. {bad[0]}")
    bbx = g.get("bbx")
    entry["bbx"] = None if bbx is None else [float(v) for v in np.ravel(_to_plain(bbx))]
    gnd.append(entry)
  return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def _read_bytes(path: str | os.PathLike) -> bytes:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise InputError(f"cannot read ground-truth file {os.fspath(path)!r}: {e.strerror}") from e


def load_gnd_pickle(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
  """Reads revisitop's `gnd_roxford5k.pkl` / `gnd_rparis6k.pkl`, only with explicit opt-in.

  Even with `allow_pickle=True` the unpickler admits only builtins containers, numbers and
  strings and numpy arrays (their reconstruct functions); any other global, e.g. `os.system`,
  makes it raise before anything is called.

  Args:
    path: the .pkl file.
    allow_pickle: must be True to read a pickle at all.

  Returns:
    {'imlist': [str], 'qimlist': [str], 'gnd': [{'bbx': [float] | None, 'easy': [int],
    'hard': [int], 'junk': [int]}]} with plain Python types.

  Raises:
    InputError: if pickles are not allowed, the file names a forbidden global, is not a valid
      pickle, or does not hold revisited ground truth.
  """
  if not allow_pickle:
    raise InputError(
        f"refusing to unpickle {os.fspath(path)!r}: reading a pickle can run arbitrary code; pass "
        f"allow_pickle=True if you trust the file, or convert it once with "
        f"gnd_pickle_to_json(pkl, json, allow_pickle=True) and read the JSON with load_gnd_json")
  raw = _read_bytes(path)
  try:
    data = _GndUnpickler(io.BytesIO(raw), encoding="latin1").load()
  except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
          IndexError, KeyError, OverflowError) as e:
    raise InputError(f"{os.fspath(path)!r} is not an acceptable ground-truth pickle: {e}") from e
  return _canonical_gnd(data, os.fspath(path))


def load_gnd_json(path: str | os.PathLike) -> dict:
  """Reads ground truth written by `gnd_pickle_to_json` (the safe default path).

  Args:
    path: the .json file.

  Returns:
    The same structure as `load_gnd_pickle`.

  Raises:
    InputError: if the file is missing, not JSON, or not revisited ground truth.
  """
  try:
    data = json.loads(_read_bytes(path).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(f"{os.fspath(path)!r} is not valid JSON: {e}") from e
  return _canonical_gnd(data, os.fspath(path))


def save_gnd_json(gnd: dict, path: str | os.PathLike) -> None:
  """Writes ground truth (as returned by the loaders) to JSON after validating it.

  Args:
    gnd: {'imlist', 'qimlist', 'gnd'} ground truth.
    path: output .json file.
  """
  data = _canonical_gnd(_to_plain(gnd), "ground truth")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f)


def gnd_pickle_to_json(pkl_path: str | os.PathLike, json_path: str | os.PathLike,
                       allow_pickle: bool = False) -> dict:
  """Converts a revisitop ground-truth pickle to JSON, behind the same opt-in as the loader.

  Args:
    pkl_path: the .pkl file.
    json_path: the .json file to write.
    allow_pickle: must be True (see `load_gnd_pickle`).

  Returns:
    The ground truth that was written.
  """
  gnd = load_gnd_pickle(pkl_path, allow_pickle=allow_pickle)
  save_gnd_json(gnd, json_path)
  return gnd


def load_gnd(path: str | os.PathLike, allow_pickle: bool = False) -> dict:
  """Reads ground truth from .json (default) or .pkl/.pickle (needs `allow_pickle=True`).

  Args:
    path: the file.
    allow_pickle: passed to `load_gnd_pickle` for pickle files.

  Returns:
    The ground-truth dict (see `load_gnd_pickle`).
  """
  suffix = os.path.splitext(os.fspath(path))[1].lower()
  if suffix in (".pkl", ".pickle"):
    return load_gnd_pickle(path, allow_pickle=allow_pickle)
  if suffix == ".json":
    return load_gnd_json(path)
  raise InputError(f"ground-truth file {os.fspath(path)!r} must end in .json, .pkl or .pickle")
