"""Device mesh, shardings and multi-host set-up: one data-parallel axis named 'data'.

The home of the mesh and its shardings for every module (k-means included); it imports only
jax and numpy, so core modules can depend on it.
"""

import collections
import os

import jax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


def maybe_initialize_distributed():
  """Joins a multi-process run when PICIE_COORDINATOR is set, or with PICIE_DISTRIBUTED=1 lets
  jax detect the cluster (TPU pods).

  With PICIE_COORDINATOR, jax's cluster detection is off: under SLURM it would otherwise keep
  only GPU SLURM_LOCALID (one process per node would drive one GPU). A process keeps every
  device it sees, or those of JAX_LOCAL_DEVICE_IDS (launch/slurm.sh sets it per GPU).
  """
  coordinator = os.environ.get("PICIE_COORDINATOR")
  if coordinator:
    jax.distributed.initialize(
        coordinator,
        num_processes=int(os.environ["PICIE_NUM_PROCESSES"]),
        process_id=int(os.environ["PICIE_PROCESS_ID"]),
        cluster_detection_method="deactivate",
    )
  elif os.environ.get("PICIE_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh with axis 'data' (AxisType.Auto) over `devices`, default every device of every
  process."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(
      (len(devices),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,), devices=devices
  )


def rows_spec(axis=0):
  """PartitionSpec splitting dimension `axis` over 'data': a batch (B, ...) along 0, batches
  of rows (B, N_b, ...) along 1."""
  return P(*(None,) * axis, DATA_AXIS)


def rows_sharded(mesh, axis=0):
  return NamedSharding(mesh, rows_spec(axis))


def replicated(mesh):
  return NamedSharding(mesh, P())


def shard_host_batch(host_batch, mesh):
  """Assembles each host's numpy batch (local slice of the global batch) into global arrays."""
  sharding = rows_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
  )


def prefetch_to_device(host_batches, mesh, size=2):
  """Yields the batches as global arrays, with the next `size - 1` already sent to the
  devices, so the transfer overlaps the step running on the current one."""
  queue = collections.deque()
  for host_batch in host_batches:
    queue.append(shard_host_batch(host_batch, mesh))
    if len(queue) == size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def padded_batch_size(batch_size, num_devices):
  """`batch_size` rounded up to a multiple of `num_devices`, for passes whose results do not
  depend on the batch (evaluation, segmentation): the pipeline masks the padding, so a slice
  with more chips than config.eval.batch_size still evaluates, one image or padding per chip."""
  return -(-batch_size // num_devices) * num_devices


def replicate(tree, mesh):
  return jax.device_put(tree, replicated(mesh))


def to_host(x):
  """Fetches a (possibly multi-host, sharded) array to numpy on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def local_rows(x):
  """This process's rows of a batch-sharded array, in order (the host batch it loaded)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  rows, seen = [], set()
  for shard in shards:
    start = shard.index[0].start or 0
    if start not in seen:  # replicas of the same rows on several local devices
      seen.add(start)
      rows.append(np.asarray(shard.data))
  return np.concatenate(rows)


class DeviceCounts:
  """Per-batch int32 counts (label counts, confusion histograms) summed on device, since reading
  them per batch would make the host wait for every batch; moved into int64 host totals before
  an int32 sum could overflow (`counts_per_batch`: the most any batch adds to one entry)."""

  def __init__(self, shapes, counts_per_batch):
    self.batches_per_flush = max(1, (2**31 - 1) // counts_per_batch)
    self.host = [np.zeros(shape, np.int64) for shape in shapes]
    self.device, self.pending = None, 0

  def add(self, batch_counts):
    self.device = (
        batch_counts
        if self.device is None
        else [total + batch for total, batch in zip(self.device, batch_counts)]
    )
    self.pending += 1
    if self.pending == self.batches_per_flush:
      self._flush()

  def _flush(self):
    self.host = [h + to_host(d).astype(np.int64) for h, d in zip(self.host, self.device)]
    self.device, self.pending = None, 0

  def to_host(self):
    """[int64 totals, one per shape] of every batch added."""
    if self.pending:
      self._flush()
    return self.host
