"""Device meshes and shardings for data-parallel (and FSDP) training.

One mesh axis, `data`, spans every device of every process. Batches are split
along it; parameters are replicated, or with FSDP each array is split along its
largest axis that the device count divides (XLA inserts the all-gathers).
The same code runs on 1 CPU, 8 fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=8`), a GPU box, or a TPU pod
slice after `jax.distributed.initialize()`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins a multi-process run (`jax.distributed.initialize`).

  On TPU pods and managed GPU clusters the arguments are detected and may be
  left out; on CPU hosts name the coordinator ("host:port"), the process count
  and this process's id. CPU processes exchange data through gloo. Call it
  before any other JAX work.
  """
  # Only CPU devices use this setting; it must be set before backends start.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh named `data` over `devices` (default: all global devices)."""
  devices = list(devices) if devices is not None else jax.devices()
  return Mesh(np.asarray(devices), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Splits the leading (batch) axis over the mesh."""
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], n: int) -> P:
  """Shards the largest axis that `n` divides; replicates small or odd arrays."""
  axes = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in axes:
    if shape[i] % n == 0 and shape[i] >= n:
      spec = [None] * len(shape)
      spec[i] = AXIS
      return P(*spec)
  return P()


def param_shardings(tree: Any, mesh: Mesh, fsdp: bool) -> Any:
  """A sharding per array of `tree`: replicated, or FSDP-split when `fsdp`."""
  n = mesh.devices.size
  def one(x: Any) -> NamedSharding:
    if not fsdp or not hasattr(x, "shape"):
      return replicated(mesh)
    return NamedSharding(mesh, fsdp_spec(x.shape, n))
  return jax.tree_util.tree_map(one, tree)


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless the global batch splits evenly over processes and devices."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"batch_size={batch_size} must be a multiple of the "
                     f"{n} devices of the mesh")


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Host-local numpy batch arrays -> global jax arrays split over `data`.

  Each process passes its own slice of the global batch (the whole batch with
  one process).
  """
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def to_host(tree: Any) -> Any:
  """Every array of `tree` as a whole numpy array on this host.

  Arrays sharded over other processes' devices (FSDP across hosts) are
  all-gathered first (`multihost_utils.process_allgather`, a collective: every
  process must call this together); local ones are copied.
  """
  def one(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree_util.tree_map(one, tree)


def is_writer() -> bool:
  """True in the one process that writes shared files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op alone)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
