"""Data-parallel training on a `jax.sharding.Mesh` with one axis, 'data'.

The batch is split along its first axis across the mesh's devices; params, batch statistics
and optimiser state are replicated. Nothing in the models or methods knows about devices: the
train step is the same pure function, jit-compiled with shardings on its inputs and outputs, so
XLA's SPMD partitioner inserts the all-reduces. That includes BatchNorm in train mode: its batch
mean and variance are reductions over the (global) batch axis, so they are averaged across the
'data' axis, and a sharded step computes what one device computes on the whole batch (up to the
order of float additions). Tested on 8 simulated CPU devices (tests/test_parallel.py).

Multi-host (TPU pods, multi-GPU nodes, or local CPU processes with gloo collectives): call
`initialize_distributed()` first thing in every process; `make_mesh()` then spans every
process's devices, and `shard_batch` assembles the global batch from each process's local slice
(`jax.make_array_from_process_local_data`). Each process feeds its own, distinct
1/process_count of every global batch: either it passes that slice, or (the experiment modules,
`set_default_mesh(..., global_batches=True)`) every process holds the whole global batch and
`shard_batch` keeps its own contiguous share. Evaluation (`evaluate.predict_logits`) splits the
rows over processes, runs each share on local host copies of the replicated params
(`host_copy`) and gathers the logits; one process (`is_writer`) writes results.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtransfer.errors import InputError

DATA_AXIS = "data"
_default_mesh: Optional[Mesh] = None


_global_batches = False


def initialize_distributed(**kwargs) -> None:
  """`jax.distributed.initialize(**kwargs)` (auto-detects the cluster on TPU, SLURM, etc.).

  On CPU the cross-process collectives go through gloo (XLA:CPU has no other
  implementation), which must be chosen before the backend starts.
  """
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU client only
  jax.distributed.initialize(**kwargs)


def is_multiprocess() -> bool:
  return jax.process_count() > 1


def is_writer() -> bool:
  """Whether this process writes results (process 0; the only one without multi-host)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches `name` (a no-op with one process)."""
  if is_multiprocess():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def host_copy(tree: Any) -> Any:
  """numpy copies of `tree`'s arrays, including replicated arrays spanning other processes
  (read from this process's own replica)."""
  def copy(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.sharding.is_fully_replicated:
        raise InputError("host_copy: an array sharded across processes is not replicated; "
                         "gather it first")
      return np.asarray(x.addressable_data(0))
    return np.asarray(x) if isinstance(x, jax.Array) else x
  return jax.tree.map(copy, tree)


def gather_rows(fn, n: int) -> np.ndarray:
  """Rows 0..n-1 of `fn(start, stop)`, each process computing a contiguous share, gathered.

  With one process this is `fn(0, n)`. Otherwise process i computes rows
  [i*m, min((i+1)*m, n)) with m = ceil(n / processes), padded to m rows (copies of its last
  row, or of row 0 when its share is empty) so every process contributes one equal block.
  """
  if not is_multiprocess():
    return fn(0, n)
  from jax.experimental import multihost_utils
  p, i = jax.process_count(), jax.process_index()
  m = -(-n // p)
  start, stop = min(i * m, n), min((i + 1) * m, n)
  # An empty share (the last processes when n < processes * m) sends row 0 as padding.
  part = fn(start, stop) if stop > start else fn(0, 1)
  if len(part) < m:
    part = np.concatenate([part, np.repeat(part[-1:], m - len(part), axis=0)])
  gathered = np.asarray(multihost_utils.process_allgather(part, tiled=True))
  return gathered.reshape(p * m, *part.shape[1:])[:n]


def make_mesh(num_devices: Optional[int] = None,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh over `num_devices` of `jax.devices()` (all when None), axis 'data'.

  Raises:
    InputError: more devices asked for than there are, or fewer than one.
  """
  available = list(devices) if devices is not None else jax.devices()
  n = len(available) if num_devices is None else int(num_devices)
  if n < 1 or n > len(available):
    raise InputError(f"--devices {n}: this process sees {len(available)} "
                     f"{available[0].platform} device(s); on CPU, simulate more with "
                     "XLA_FLAGS=--xla_force_host_platform_device_count=N")
  return Mesh(np.array(available[:n]), (DATA_AXIS,))


def set_default_mesh(mesh: Optional[Mesh], global_batches: bool = False) -> None:
  """Mesh used by `make_train_step` when it is given none (None: single device).

  `global_batches`: multi-host, every process passes the whole global batch to the step and
  `shard_batch` keeps this process's share (the experiment modules, whose processes all hold
  the same small k-shot sets); otherwise each process passes its own slice.
  """
  global _default_mesh, _global_batches
  _default_mesh = mesh if (mesh is not None and mesh.size > 1) else None
  _global_batches = bool(global_batches)


def default_mesh() -> Optional[Mesh]:
  """The mesh set by `set_default_mesh` (None when training on one device)."""
  return _default_mesh


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """First axis split over 'data'."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf of `tree` on every device of `mesh`."""
  return jax.device_put(tree, replicated(mesh))


def batch_divides(batch: Any, mesh: Mesh) -> bool:
  """Whether every leaf's first axis splits evenly over the mesh (per process, multi-host)."""
  per = mesh.size // jax.process_count()
  return all(np.ndim(x) > 0 and np.shape(x)[0] % max(per, 1) == 0
             for x in jax.tree.leaves(batch))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Splits `batch` over the 'data' axis; replicates it when its size does not divide.

  Single process: `batch` is the global batch. Multi-host: each process passes its local
  slice and the global array is their concatenation in process order.

  A batch whose first axis does not split evenly (e.g. a 1-shot batch of 5 images on 8
  devices) is replicated instead, with a warning: every device then computes the whole batch,
  which is correct but not faster.
  """
  if jax.process_count() > 1 and _global_batches:
    p, i = jax.process_count(), jax.process_index()

    def own_share(x):
      if np.shape(x)[0] % p:
        raise InputError(f"global batch of {np.shape(x)[0]} does not split over {p} processes")
      m = np.shape(x)[0] // p
      return np.asarray(x)[i * m:(i + 1) * m]

    batch = jax.tree.map(own_share, batch)
  if batch_divides(batch, mesh):
    sharding = batch_sharded(mesh)
  else:
    if jax.process_count() > 1:
      raise InputError(f"batch leading sizes {[np.shape(x)[0] for x in jax.tree.leaves(batch)]}"
                       f" do not split over {mesh.size // jax.process_count()} local devices")
    warnings.warn(f"batch of {[np.shape(x)[0] for x in jax.tree.leaves(batch)][:1]} does not "
                  f"split over {mesh.size} devices; replicating it", stacklevel=2)
    sharding = replicated(mesh)
  if jax.process_count() > 1:
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
  return jax.device_put(batch, sharding)


def is_replicated_on(tree: Any, mesh: Mesh) -> bool:
  """Whether the leaves of `tree` are jax Arrays replicated over exactly `mesh`'s devices."""
  want = replicated(mesh)
  for x in jax.tree.leaves(tree):
    if not isinstance(x, jax.Array) or not x.sharding.is_equivalent_to(want, np.ndim(x)):
      return False
  return True
