"""Checkpoints with orbax: training runs (resumable) and saved models (params + config).

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves either a complete checkpoint or one that `latest_step` ignores.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jtransfer.errors import InputError


class RunCheckpointer:
  """Saves and restores a `TrainState` every `every` steps (keeps the last `keep`)."""

  def __init__(self, directory: str, every: int, keep: int = 2):
    self.every = max(1, int(every))
    self._mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def maybe_save(self, step: int, state, force: bool = False) -> bool:
    if not force and step % self.every:
      return False
    if self._mngr.latest_step() == step:
      return False
    self._mngr.save(step, args=ocp.args.StandardSave(state))
    return True

  def restore(self, like, step: Optional[int] = None):
    """Restores the state saved at `step` (default: latest) with the structure of `like`."""
    step = self._mngr.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
      return self._mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # orbax raises many types for corrupt or foreign checkpoints
      raise InputError(f"checkpoint step {step} in {self._mngr.directory} cannot be restored "
                       f"into this run ({type(e).__name__}: {str(e)[:300]})") from None

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()


def save_model(directory: str, variables: dict[str, Any], meta: dict[str, Any]) -> None:
  """Saves model variables and their JSON `meta` (arch, model config, input spec...).

  Written to `directory.tmp` then renamed, so an existing model is replaced only by a complete
  one.
  """
  directory = os.path.abspath(directory)
  tmp = directory + ".tmp"
  if os.path.exists(tmp):
    _rmtree(tmp)
  os.makedirs(tmp)
  host = jax.tree.map(np.asarray, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(tmp, "variables"), host)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  if os.path.exists(directory):
    _rmtree(directory)
  os.replace(tmp, directory)


def load_model(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Loads what `save_model` wrote: (variables as numpy trees, meta)."""
  directory = os.path.abspath(directory)
  meta_path = os.path.join(directory, "meta.json")
  if not os.path.isdir(directory):
    raise InputError(f"model checkpoint directory {directory} does not exist")
  if not os.path.isfile(meta_path):
    raise InputError(f"{directory} is not a jtransfer model checkpoint (no meta.json)")
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    with ocp.StandardCheckpointer() as ckptr:
      variables = ckptr.restore(os.path.join(directory, "variables"))
  except Exception as e:
    raise InputError(f"model checkpoint {directory} is corrupt or unreadable "
                     f"({type(e).__name__}: {str(e)[:300]})") from None
  return jax.tree.map(np.asarray, variables), meta


def _rmtree(path: str) -> None:
  import shutil
  shutil.rmtree(path)
