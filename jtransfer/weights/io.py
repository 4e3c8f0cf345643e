"""Reading checkpoints as flat {name: numpy array} state dicts, without unpickling objects.

Formats are recognised by their content (the suffix only appears in messages):
- PyTorch `.pth` / `.pt` / `.bin` (zip or legacy pickle): `torch.load(weights_only=True)`, whose
  restricted unpickler accepts tensors and plain containers only; any other object (a class
  whose `__reduce__` runs code, an `argparse.Namespace` in a training checkpoint) is refused.
  torch is imported only for these files.
- `.safetensors`: the safetensors numpy API (torch only for bfloat16 tensors, which numpy lacks).
- `.npz`: `np.load(allow_pickle=False)`.

Common wrappers are unwrapped: `{'state_dict': ...}`, `{'model': ...}` and the like, and the
`module.` (DataParallel) / `_orig_mod.` (torch.compile) prefixes when every key has them.
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import numpy as np

from jtransfer.errors import InputError

# Keys under which training scripts nest the weights, in order of preference.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network",
                "state_dict_ema", "model_ema")
STRIP_PREFIXES = ("module.", "_orig_mod.")
_EXPECTED = "a PyTorch .pth/.pt, .safetensors or .npz state dict"


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a checkpoint file as {parameter name: numpy array}.

  Args:
    path: a PyTorch (`torch.save`), safetensors or npz file.

  Returns:
    Floating tensors as float32 arrays, integer ones (e.g. `num_batches_tracked`) as int64,
    keys with wrapper levels and `module.` prefixes removed.

  Raises:
    InputError: the file is missing, not a checkpoint, corrupt or truncated, holds objects
      other than tensors, or holds no tensors; the message names the file.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise InputError(f"checkpoint {path!r} does not exist or is not a file")
  kind = sniff_format(path)
  reader = {"torch": _read_torch, "safetensors": _read_safetensors, "npz": _read_npz}[kind]
  return _clean(reader(path), path)


def sniff_format(path: str) -> str:
  """'torch', 'safetensors' or 'npz' from the file's first bytes; InputError otherwise."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(b"PK\x03\x04"):
    try:
      with zipfile.ZipFile(path) as z:
        names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
      raise InputError(f"checkpoint {path!r} is a corrupt or truncated zip file ({e})") from None
    if any(n.endswith("data.pkl") for n in names):
      return "torch"
    if names and all(n.endswith(".npy") for n in names):
      return "npz"
    raise InputError(f"checkpoint {path!r} is a zip file but neither a torch.save file nor an "
                     f"npz archive; expected {_EXPECTED}")
  if head[:1] == b"\x80":  # pickle protocol >= 2: torch's legacy (non-zip) format
    return "torch"
  if len(head) >= 9 and head[8:9] == b"{":  # 8-byte little-endian header size, then JSON
    size = int.from_bytes(head[:8], "little")
    if 0 < size < os.path.getsize(path):
      return "safetensors"
  raise InputError(f"{path!r} is not a checkpoint (unrecognised content); expected {_EXPECTED}")


def _read_torch(path: str) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise InputError(f"checkpoint {path!r} is a PyTorch file, which needs PyTorch to read "
                     "(pip install torch); or save it as .safetensors or .npz") from None
  try:
    obj = torch.load(path, weights_only=True, map_location="cpu")
  except pickle.UnpicklingError as e:
    # torch's message advises rerunning with weights_only=False, which would run whatever
    # code the file carries: name the blocked object only, and the safe ways out.
    blocked = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(e))
    name = blocked.group(1) if blocked else "the class it names"
    raise InputError(f"checkpoint {path!r} holds objects other than tensors and plain "
                     f"containers ({name}), which are refused for safety; if you trust its "
                     f"origin, allow just that class and keep only the tensors: with "
                     f"torch.serialization.safe_globals([{name}]): sd = torch.load(path, "
                     "weights_only=True)['state_dict'], then safetensors.torch.save_file(sd, "
                     "'weights.safetensors') and pass that file") from None
  except Exception as e:  # torch raises many types for corrupt or truncated files
    raise InputError(f"checkpoint {path!r} is corrupt, truncated or not a PyTorch file "
                     f"({type(e).__name__}: {str(e)[:200]})") from None
  return obj


def _read_safetensors(path: str) -> dict[str, Any]:
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except TypeError as e:  # a dtype numpy lacks (bfloat16 without ml_dtypes): go through torch
    dtype_error = str(e)
  except (SafetensorError, OSError, ValueError) as e:
    raise InputError(f"checkpoint {path!r} is a corrupt or truncated safetensors file "
                     f"({str(e)[:200]})") from None
  try:
    import safetensors.torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise InputError(f"checkpoint {path!r} has tensors numpy cannot hold ({dtype_error}); "
                     "reading them needs PyTorch (pip install torch)") from None
  return safetensors.torch.load_file(path)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except ValueError as e:  # object arrays need pickle: refused
    raise InputError(f"checkpoint {path!r} holds object arrays, which are refused for safety "
                     f"({e})") from None
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise InputError(f"checkpoint {path!r} is a corrupt or truncated npz file ({e})") from None


def _is_tensor(value: Any) -> bool:
  return isinstance(value, np.ndarray) or type(value).__module__.startswith("torch")


def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  """Descends through wrapper dicts until a mapping whose values are all tensors."""
  for _ in range(4):
    if not isinstance(obj, Mapping):
      raise InputError(f"checkpoint {path!r} holds a {type(obj).__name__}, not a state dict "
                       "(a mapping of parameter names to tensors)")
    if not obj:
      raise InputError(f"checkpoint {path!r} holds an empty state dict")
    if all(_is_tensor(v) for v in obj.values()):
      return obj
    inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if inner is None:
      others = [str(k) for k, v in obj.items() if not _is_tensor(v)][:8]
      raise InputError(f"checkpoint {path!r} is not a flat state dict: entries {others} are not "
                       f"tensors and none of {list(WRAPPER_KEYS)} holds the weights")
    obj = obj[inner]
  raise InputError(f"checkpoint {path!r} nests its state dict too deeply")


def _strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
  sd = dict(sd)
  changed = True
  while changed:
    changed = False
    for prefix in STRIP_PREFIXES:
      if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
        sd = {k[len(prefix):]: v for k, v in sd.items()}
        changed = True
  return sd


def _to_numpy(value: Any) -> np.ndarray:
  if not isinstance(value, np.ndarray):  # a torch tensor
    import torch  # pylint: disable=g-import-not-at-top
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.to(torch.float32)
    value = value.numpy()
  # ml_dtypes' bfloat16 (safetensors' numpy API uses it when installed) is not np.floating.
  if np.issubdtype(value.dtype, np.floating) or value.dtype.name.startswith(("bfloat", "float")):
    return np.asarray(value, np.float32)
  if np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
    return np.asarray(value, np.int64)
  raise InputError(f"tensor of dtype {value.dtype} is not a weight")


def _clean(obj: Any, path: str) -> dict[str, np.ndarray]:
  sd = _strip_prefixes(_unwrap(obj, path))
  bad = [k for k in sd if not isinstance(k, str)]
  if bad:
    raise InputError(f"checkpoint {path!r} has non-string keys {bad[:5]}")
  out = {}
  for k, v in sd.items():
    try:
      out[k] = _to_numpy(v)
    except InputError as e:
      raise InputError(f"checkpoint {path!r}: entry {k!r}: {e}") from None
  return out
