"""Mini-batch k-means over a pass of the dataset (DESIGN §1 phase 1), for any feature function.

One pass feeds every view's k-means at once (independent states, one per view). The first
`num_init_batches` batches fill a preallocated init buffer that seeds a full Lloyd k-means;
every later batch moves the centroids online with lr_k = n_k / N_k. Running counts N_k start
at the cluster sizes of the init's final assignment, as in the reference (it adds the init's
counts before the first online batch).
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from picie_jax import parallel
from picie_jax.core import kmeans

BUFFER_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def init_buffer_bytes(
    *, num_sets, num_init_batches, batch_size, points_per_image, channels, dtype, num_devices
):
  """Bytes per device of the init buffers: every point set's (view's, or PiCIE + H's
  overclustering's of a view) points of `num_init_batches` batches (C values of `dtype` and a
  1-byte mask each), rows sharded evenly over `num_devices`."""
  points = num_sets * num_init_batches * batch_size * points_per_image
  return -(-points * (channels * jnp.dtype(dtype).itemsize + 1) // num_devices)


def device_memory_bytes(mesh):
  """(bytes one of this process's devices in `mesh` can hold, where the number comes from): the
  accelerator's `bytes_limit`, or on CPU the host's available RAM shared by its mesh devices."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  device = local[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{device.platform} bytes_limit"
  available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  if os.path.exists("/proc/meminfo"):
    with open("/proc/meminfo") as f:
      fields = dict(line.split(":", 1) for line in f)
    available = int(fields["MemAvailable"].split()[0]) * 1024
  return available // len(local), "available host RAM / local devices"


def check_init_buffer(config, *, mesh, num_sets, points_per_image, channels, say):
  """Prints the init buffers' size per device and fails, before any batch is read, when it
  exceeds what a device of `mesh` can hold, naming the config fields that shrink it."""
  k = config.kmeans
  if k.init_pixels_per_image > points_per_image:
    raise ValueError(
        f"config.kmeans.init_pixels_per_image={k.init_pixels_per_image} exceeds "
        f"the {points_per_image} pixels of a feature map: lower it (0 = all)"
    )
  needed = init_buffer_bytes(
      num_sets=num_sets,
      num_init_batches=k.num_init_batches,
      batch_size=k.batch_size,
      points_per_image=k.init_pixels_per_image or points_per_image,
      channels=channels,
      dtype=BUFFER_DTYPES[k.buffer_dtype],
      num_devices=mesh.size,
  )
  limit, source = device_memory_bytes(mesh)
  say(
      f"k-means init buffer: {needed / 2**30:.2f} GiB per device ({num_sets} point set(s), "
      f"{mesh.size} device(s); {source}: {limit / 2**30:.2f} GiB)"
  )
  if needed > limit:
    raise MemoryError(
        f"the k-means init buffer needs {needed / 2**30:.2f} GiB per device but {source} is "
        f"{limit / 2**30:.2f} GiB: lower config.kmeans.init_pixels_per_image (now "
        f"{k.init_pixels_per_image}; 0 = all {points_per_image}), config.kmeans.num_init_batches "
        f"(now {k.num_init_batches}) or config.kmeans.batch_size (now {k.batch_size}), set "
        f"config.kmeans.buffer_dtype='bfloat16' (now {k.buffer_dtype!r}), or use more devices"
    )
  return needed


@functools.partial(jax.jit, static_argnames="per_image")
def sample_pixels(points_nd, mask_n, indices_b, key, per_image):
  """`per_image` points of each image's h*w rows: a random subset fixed by (key, image index),
  so any device count draws the same one. Returns (points (B*per_image, C), mask)."""
  b = indices_b.shape[0]
  hw = points_nd.shape[0] // b
  if not 0 < per_image <= hw:
    raise ValueError(
        f"config.kmeans.init_pixels_per_image={per_image} must be in 1..{hw} "
        "(the feature map's pixels), or 0 for all"
    )
  rows_bp = jax.vmap(lambda i: jax.random.permutation(jax.random.fold_in(key, i), hw)[:per_image])(
      indices_b
  )
  rows = (jnp.arange(b)[:, None] * hw + jnp.sort(rows_bp, axis=1)).reshape(-1)
  return points_nd[rows], mask_n[rows]


def init_subset(views, indices_b, key, per_image):
  """The views' (points, mask) as the init buffer keeps them: `per_image` pixels of each image
  (`sample_pixels`), or all of them when per_image is 0 (config.kmeans.init_pixels_per_image)."""
  if not per_image:
    return views
  return [sample_pixels(points, mask, indices_b, key, per_image) for points, mask in views]


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _fill(buffer_bnd, buffer_mask_bn, points_nd, mask_n, batch_number):
  """Writes one batch's rows into slot `batch_number` of the buffer, in place (donated); the
  buffer is sharded along its rows as the batch is, so every device writes its own rows."""
  return (
      buffer_bnd.at[batch_number].set(points_nd.astype(buffer_bnd.dtype)),
      buffer_mask_bn.at[batch_number].set(mask_n),
  )


def _empty_buffer(num_batches, rows, channels, dtype, mesh):
  """Zero (num_batches, rows, channels) points and a False mask, sharded along the rows."""
  sharding = parallel.rows_sharded(mesh, axis=1)
  return jax.jit(
      lambda: (
          jnp.zeros((num_batches, rows, channels), dtype),
          jnp.zeros((num_batches, rows), bool),
      ),
      out_shardings=(sharding, sharding),
  )()


def minibatch_kmeans(
    batches,
    features_fn,
    *,
    k,
    num_init_batches,
    iters,
    init,
    keys,
    mesh,
    chunk_size,
    buffer_dtype="float32",
    progress=None,
):
  """Runs one mini-batch k-means per point set (a view, or PiCIE + H's overclustering of a view)
  over `batches`, all from one read of the data.

  `features_fn(batch, for_init) -> [(points (N, C), mask (N,)) per set]` on device, already
  in the metric's space (L2-normalised for cosine); `for_init` is True for the batches that go
  into the init buffer (the caller may subsample them). keys[s] seeds set s's init; `k` is the
  number of clusters of every set, or a sequence of one per set. Returns ([centroids (K, C) per
  set], [stats per set]): the init loss, the online loss (mean squared distance over the online
  batches, before each update), the reference's logged loss (the unweighted mean of the init
  loss and each online batch's mean, its AverageMeter) and the init buffer's bytes.
  """
  initialise = functools.partial(
      _initialise_all,
      num_init_batches=num_init_batches,
      ks=[k] * len(keys) if isinstance(k, int) else list(k),
      iters=iters,
      init=init,
      keys=keys,
      mesh=mesh,
      chunk_size=chunk_size,
  )
  buffers, states = None, None
  filled = 0
  online = None
  for batch in batches:
    views = features_fn(batch, states is None)
    if states is None:
      if buffers is None:
        buffers = [
            _empty_buffer(
                num_init_batches, p.shape[0], p.shape[1], BUFFER_DTYPES[buffer_dtype], mesh
            )
            for p, _ in views
        ]
      buffers = [_fill(*buf, p, m, filled) for buf, (p, m) in zip(buffers, views)]
      filled += 1
      if filled == num_init_batches:
        states, stats = initialise(buffers, filled)
        buffers = None
        online = [_OnlineLoss() for _ in views]
    else:
      for view, (points, mask) in enumerate(views):
        states[view], sq_sum, count = kmeans.minibatch_update(
            states[view], points, mask, mesh=mesh, chunk_size=chunk_size
        )
        online[view].add(sq_sum, count)
    if progress is not None:
      progress.update(1)
  if states is None:  # fewer batches than num_init_batches: the init sees all of them
    if not filled:
      raise ValueError("k-means got no batches: the dataset split is empty")
    states, stats = initialise(buffers, filled)
    online = [_OnlineLoss() for _ in states]
  for view_stats, view_online in zip(stats, online):
    sq_sum, count, batch_means = view_online.totals()
    view_stats["online_loss"] = sq_sum / count if count else float("nan")
    view_stats["reference_loss"] = float(np.mean([view_stats["init_loss"], *batch_means]))
  return [s.centroids for s in states], stats


class _OnlineLoss:
  """One set's online squared distances, kept on device through the pass (reading them per
  batch would make the host wait for every update) and summed at its end: (their sum, their
  count, each batch's mean (what the reference's AverageMeter averages))."""

  def __init__(self):
    self.batches = []

  def add(self, sq_sum, count):
    self.batches.append((sq_sum, count))

  def totals(self):
    sq_sum, count, batch_means = 0.0, 0, []
    for batch_sq_sum, batch_count in jax.device_get(self.batches):
      sq_sum += float(batch_sq_sum)
      count += int(batch_count)
      if batch_count:
        batch_means.append(float(batch_sq_sum) / int(batch_count))
    return sq_sum, count, batch_means


def _initialise_all(buffers, filled, *, num_init_batches, ks, iters, init, keys, mesh, chunk_size):
  """Lloyd init of every set from its buffer's first `filled` batches: (states, stats)."""
  if len(ks) != len(keys) or len(buffers) != len(keys):
    raise ValueError(
        f"k-means got {len(buffers)} point sets, {len(keys)} keys and {len(ks)} cluster counts"
    )
  states, stats = [], []
  for (points, mask), key, k in zip(buffers, keys, ks):
    nbytes = points.nbytes + mask.nbytes
    if filled < num_init_batches:  # a short pass: the unfilled slots are left out
      points, mask = points[:filled], mask[:filled]
    state, init_loss = _initialise(points, mask, k, iters, init, key, mesh, chunk_size)
    states.append(state)
    stats.append({"init_loss": init_loss, "init_buffer_bytes": nbytes})
  return states, stats


def _initialise(points, mask, k, iters, init, key, mesh, chunk_size):
  num_valid = int(parallel.to_host(jnp.sum(mask)))
  if num_valid < k:
    raise ValueError(
        f"k-means init has {num_valid} valid points for k={k} clusters: "
        "raise kmeans.num_init_batches or lower the number of clusters"
    )
  if init == "random":
    init_kd = kmeans.random_init_from_batches(key, points, mask, k, mesh=mesh)
  else:  # kmeans++ reads every row: it sees the batches concatenated (resharded on a mesh)
    init_kd = kmeans.init_centroids(
        key, points.reshape(-1, points.shape[-1]), mask.reshape(-1), k, method=init
    )
  result = kmeans.lloyd(points, mask, init_kd, iters, mesh=mesh, chunk_size=chunk_size)
  state = kmeans.MiniBatchState(
      centroids=result.centroids, running_counts=result.counts.astype(jnp.float32)
  )
  return state, float(np.asarray(result.loss))
