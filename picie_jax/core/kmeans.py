"""K-means on device: chunked nearest-centroid search, sharded Lloyd, mini-batch updates.

The points stay on device, sharded along N over the mesh axis "data". Every step is one
local pass over a device's points in chunks of rows (distances ‖x‖² − 2x·μ + ‖μ‖² by one
matmul, per-cluster sums by a segment sum on CPU and a one-hot matmul elsewhere), a `psum` of
the (K, D) sums and (K,) counts, and an update that every device computes identically. The
metric is squared L2 as in the reference (faiss IndexFlatL2); for "cosine" the points are
L2-normalised first and the centroids stay plain means (not renormalised), as in the reference.
"""

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from picie_jax import parallel
from picie_jax import platform as platform_lib
from picie_jax.parallel import DATA_AXIS

_HIGHEST = lax.Precision.HIGHEST
# faiss's relative perturbation of the two halves of a split cluster.
_SPLIT_EPS = 1.0 / 1024.0


class KMeansResult(NamedTuple):
  """Outcome of Lloyd k-means.

  centroids: (K, D) float32. assignments: (N,) int32 nearest centroid, -1 where masked.
  loss: mean squared distance of the valid points to their nearest centroid.
  counts: (K,) int32 valid points per cluster in `assignments`.
  """

  centroids: jax.Array
  assignments: jax.Array
  loss: jax.Array
  counts: jax.Array


class MiniBatchState(NamedTuple):
  """centroids: (K, D) float32; running_counts: (K,) float32 points credited per cluster."""

  centroids: jax.Array
  running_counts: jax.Array


class _PassStats(NamedTuple):
  labels_n: jax.Array  # (N,) int32 nearest centroid of every point (masked ones too)
  sq_dist_n: jax.Array  # (N,) float32 squared distance to it
  sums_kd: jax.Array  # (K, D) float32 sum of the valid points per cluster
  counts_k: jax.Array  # (K,) int32 valid points per cluster
  sq_dist_sum: jax.Array  # () float32 sum of sq_dist_n over the valid points


def normalize_features(x, axis=-1, eps=1e-10):
  """L2-normalises `x` along `axis` (x / max(‖x‖, eps), like torch's F.normalize)."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def pad_to_multiple(points, mask, multiple):
  """Pads the rows of `points` (N, D) and `mask` (N,) with zeros / False up to a multiple."""
  n = points.shape[0]
  if points.ndim != 2 or mask.shape != (n,):
    raise ValueError(f"points {points.shape} and mask {mask.shape}: expected (N, D) and (N,)")
  mask = jnp.asarray(mask, dtype=bool)
  pad = -n % multiple
  if pad == 0:
    return points, mask
  return jnp.pad(points, ((0, pad), (0, 0))), jnp.pad(mask, (0, pad))


def _cluster_sums(x_cd, labels_c, counted_c, k, platform):
  """(K, D) sums and (K,) int32 counts of the counted points per cluster.

  A segment sum on CPU (`platform`, the platform compiled for) (about 20% less work than the one-hot matmul there: 1 M x 128, K 27);
  elsewhere the one-hot matmul, which runs on the matrix units instead of scattering.
  """
  if platform_lib.uses_cpu_forms(platform):
    segment_c = jnp.where(counted_c, labels_c, k)  # ids >= k are dropped
    return (
        jax.ops.segment_sum(x_cd, segment_c, k),
        jax.ops.segment_sum(jnp.ones_like(segment_c), segment_c, k),
    )
  onehot_ck = (labels_c[:, None] == jnp.arange(k)) & counted_c[:, None]
  return (
      jnp.einsum("ck,cd->kd", onehot_ck.astype(jnp.float32), x_cd, precision=_HIGHEST),
      jnp.sum(onehot_ck, axis=0, dtype=jnp.int32),
  )


def default_chunk_size(platform):
  """Rows per distance chunk where `chunk_size` is 0: 4096 on CPU (`platform`), where a chunk's points
  (2 MB at 128-d) stay in cache from the distance matmul to the cluster sums (1 M x 128,
  K 27: 25% faster than 65536 on a 2-core EPYC), and 65536 on GPU/TPU, whose matmuls want rows.
  """
  return 4096 if platform_lib.uses_cpu_forms(platform) else 65536


def _chunked_pass(points_nd, centroids_kd, chunk_size, platform, mask_n=None):
  """Nearest centroid of every point, in chunks of rows so at most chunk_size*K distances exist.

  With `mask_n` the pass also sums the valid points, their count and squared distance per
  cluster (otherwise those stay zero). Chunk i starts at min(i*chunk, N - chunk): the last chunk
  overlaps its predecessor instead of padding a copy of the points, and the rows it repeats are
  left out of the sums. Works on local arrays, also inside shard_map.
  """
  n, d = points_nd.shape
  k = centroids_kd.shape[0]
  if n == 0:
    raise ValueError("points_nd has no rows: k-means needs at least one point per device")
  chunk = min(chunk_size or default_chunk_size(platform), n)
  centroid_sq_k = jnp.sum(jnp.square(centroids_kd), axis=1)

  def one_chunk(i, stats):
    start = jnp.minimum(i * chunk, n - chunk)
    x_cd = lax.dynamic_slice_in_dim(points_nd, start, chunk).astype(jnp.float32)
    sq_ck = (
        jnp.sum(jnp.square(x_cd), axis=1, keepdims=True)
        - 2.0 * jnp.dot(x_cd, centroids_kd.T, precision=_HIGHEST)
        + centroid_sq_k
    )
    labels_c = jnp.argmin(sq_ck, axis=1).astype(jnp.int32)
    sq_c = jnp.maximum(jnp.min(sq_ck, axis=1), 0.0)
    stats = stats._replace(
        labels_n=lax.dynamic_update_slice_in_dim(stats.labels_n, labels_c, start, 0),
        sq_dist_n=lax.dynamic_update_slice_in_dim(stats.sq_dist_n, sq_c, start, 0),
    )
    if mask_n is None:
      return stats
    counted_c = lax.dynamic_slice_in_dim(mask_n, start, chunk) & (
        start + jnp.arange(chunk) >= i * chunk
    )
    sums_kd, counts_k = _cluster_sums(x_cd, labels_c, counted_c, k, platform)
    return stats._replace(
        sums_kd=stats.sums_kd + sums_kd,
        counts_k=stats.counts_k + counts_k,
        sq_dist_sum=stats.sq_dist_sum + jnp.sum(jnp.where(counted_c, sq_c, 0.0)),
    )

  # zeros_like(points) keeps the points' varying-over-mesh type, as shard_map's loops require.
  zeros = functools.partial(jnp.zeros_like, points_nd)
  init = _PassStats(
      zeros(shape=(n,), dtype=jnp.int32),
      zeros(shape=(n,), dtype=jnp.float32),
      zeros(shape=(k, d), dtype=jnp.float32),
      zeros(shape=(k,), dtype=jnp.int32),
      zeros(shape=(), dtype=jnp.float32),
  )
  return lax.fori_loop(0, -(-n // chunk), one_chunk, init)


@functools.partial(jax.jit, static_argnames=("mesh", "chunk_size"))
def assign_to_nearest(points_nd, centroids_kd, *, mesh, chunk_size=0):
  """Nearest centroid (int32 (N,)) and its squared L2 distance (float32 (N,)) for every point.

  Each device searches its own rows (N sharded over the mesh axis 'data', padded here to a
  multiple of the mesh size): under plain jit the chunk loop's slices of a row-sharded array
  made GSPMD all-gather every point to every device inside the loop.
  """
  n = points_nd.shape[0]
  points_nd = jnp.pad(points_nd.astype(jnp.float32), ((0, -n % mesh.size), (0, 0)))

  def local(points_nd, centroids_kd):
    stats = _chunked_pass(points_nd, centroids_kd, chunk_size, platform_lib.platform_of(mesh))
    return stats.labels_n, stats.sq_dist_n

  rows = parallel.rows_spec()
  labels_n, sq_dist_n = jax.shard_map(
      local, mesh=mesh, in_specs=(rows, P()), out_specs=(rows, rows)
  )(points_nd, centroids_kd.astype(jnp.float32))
  return labels_n[:n], sq_dist_n[:n]


def _distinct_valid_indices(key, valid_n, k):
  """k distinct indices drawn uniformly among the valid points."""
  scores_n = jnp.where(valid_n, jax.random.uniform(key, valid_n.shape), -1.0)
  return lax.top_k(scores_n, k)[1]


def _kmeans_plus_plus(key, points_nd, valid_n, k):
  """k-means++ seeding: each next centroid is a valid point drawn ∝ its squared distance
  to the nearest centroid chosen so far."""
  first_key, key = jax.random.split(key)
  first_d = points_nd[_distinct_valid_indices(first_key, valid_n, 1)[0]]

  def sq_dist_to(centroid_d):
    return jnp.where(valid_n, jnp.sum(jnp.square(points_nd - centroid_d), axis=1), 0.0)

  def pick(i, carry):
    centroids_kd, min_sq_n = carry
    index = jax.random.categorical(jax.random.fold_in(key, i), jnp.log(min_sq_n))
    centroid_d = points_nd[index]
    return centroids_kd.at[i].set(centroid_d), jnp.minimum(min_sq_n, sq_dist_to(centroid_d))

  init = (jnp.zeros((k, points_nd.shape[1]), jnp.float32).at[0].set(first_d), sq_dist_to(first_d))
  return lax.fori_loop(1, k, pick, init)[0]


@functools.partial(jax.jit, static_argnames=("k", "method"))
def init_centroids(key, points_nd, valid_n, k, method="random"):
  """Initial (k, D) centroids from the points where `valid_n` (N,) is True.

  "random": k distinct valid points drawn uniformly, the reference's (faiss) seeding.
  "kmeans++": D²-weighted seeding (Arthur & Vassilvitskii, 2007).
  Needs at least k valid points (k distinct ones for "kmeans++"). Points may be stored in
  bfloat16; the centroids are float32.
  """
  valid_n = jnp.asarray(valid_n, dtype=bool)
  if method == "random":
    return points_nd[_distinct_valid_indices(key, valid_n, k)].astype(jnp.float32)
  if method == "kmeans++":
    return _kmeans_plus_plus(key, points_nd.astype(jnp.float32), valid_n, k)
  raise ValueError(f"k-means init method {method!r}: expected 'random' or 'kmeans++'")


@functools.partial(jax.jit, static_argnames=("k", "mesh"))
def random_init_from_batches(key, points_bnd, valid_bn, k, *, mesh):
  """init_centroids(method='random') of batches of rows (B, N_b, D), sharded along N_b, read
  in batch order (the same draw as for their concatenation), without gathering the batches:
  each device contributes the chosen rows it holds (a psum of k rows)."""
  index = _distinct_valid_indices(key, valid_bn.reshape(-1), k)
  batch_k, row_k = jnp.divmod(index, points_bnd.shape[1])

  def local(points_bnd, batch_k, row_k):
    local_rows = points_bnd.shape[1]
    start = lax.axis_index(DATA_AXIS) * local_rows
    here_k = (row_k >= start) & (row_k < start + local_rows)
    rows_kd = points_bnd[batch_k, jnp.clip(row_k - start, 0, local_rows - 1)].astype(jnp.float32)
    return lax.psum(jnp.where(here_k[:, None], rows_kd, 0.0), DATA_AXIS)

  return jax.shard_map(local, mesh=mesh, in_specs=(parallel.rows_spec(1), P(), P()), out_specs=P())(
      points_bnd, batch_k, row_k
  )


def _split_empty_clusters(centroids_kd, counts_k):
  """Re-seeds every empty cluster by splitting the currently largest one, as faiss does.

  For empty clusters in index order: copy the largest cluster's centroid, scale it by
  1 ± 1/1024 (+ on even dims for the new one, − for the old one, and the reverse on odd dims)
  and give the new one half (rounded down) of the count. faiss draws the cluster to split at
  random ∝ size; taking the largest keeps this deterministic. Returns (centroids, counts).
  """
  d = centroids_kd.shape[1]
  shift_d = jnp.where(jnp.arange(d) % 2 == 0, _SPLIT_EPS, -_SPLIT_EPS)

  def split_into(empty_index, carry):
    centroids, counts = carry
    largest = jnp.argmax(counts)
    donor_d = centroids[largest]
    half = counts[largest] // 2
    split = (
        centroids.at[empty_index]
        .set(donor_d * (1.0 + shift_d))
        .at[largest]
        .set(donor_d * (1.0 - shift_d)),
        counts.at[empty_index].set(half).at[largest].set(counts[largest] - half),
    )
    is_empty = counts[empty_index] == 0
    return jax.tree.map(lambda new, old: jnp.where(is_empty, new, old), split, carry)

  return lax.fori_loop(0, centroids_kd.shape[0], split_into, (centroids_kd, counts_k))


def _global_pass(points_nd, mask_n, centroids_kd, chunk_size, platform):
  """Inside shard_map: the local chunked pass, with sums, counts and distance total psum'd."""
  stats = _chunked_pass(points_nd, centroids_kd, chunk_size, platform, mask_n)
  sums_kd, counts_k, sq_dist_sum = lax.psum(
      (stats.sums_kd, stats.counts_k, stats.sq_dist_sum), DATA_AXIS
  )
  return stats._replace(sums_kd=sums_kd, counts_k=counts_k, sq_dist_sum=sq_dist_sum)


def _on_mesh(points, mask, mesh):
  """float32 (or bfloat16, kept as stored: distances are float32 per chunk) points (N, D) or
  (B, N_b, D) and their bool mask, rows padded to a multiple of the mesh size and sharded."""
  points = jnp.asarray(points)
  if points.dtype != jnp.bfloat16:
    points = points.astype(jnp.float32)
  mask = jnp.asarray(mask, dtype=bool)
  pad = -mask.shape[-1] % mesh.size
  if pad:
    points = jnp.pad(points, [(0, 0)] * (points.ndim - 2) + [(0, pad), (0, 0)])
    mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, pad)])
  return jax.device_put((points, mask), parallel.rows_sharded(mesh, mask.ndim - 1))


def _float32(tree):
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


@functools.partial(jax.jit, static_argnames=("num_iters", "mesh", "chunk_size"))
def _lloyd_on_mesh(points, mask, centroids_kd, num_iters, mesh, chunk_size):
  platform = platform_lib.platform_of(mesh)

  def local(points, mask, centroids_kd):
    points_nd, mask_n = points.reshape(-1, points.shape[-1]), mask.reshape(-1)

    def iteration(_, centroids_kd):
      stats = _global_pass(points_nd, mask_n, centroids_kd, chunk_size, platform)
      means_kd = jnp.where(
          stats.counts_k[:, None] > 0,
          stats.sums_kd / jnp.maximum(stats.counts_k, 1)[:, None],
          centroids_kd,
      )
      return _split_empty_clusters(means_kd, stats.counts_k)[0]

    centroids_kd = lax.fori_loop(0, num_iters, iteration, centroids_kd)
    stats = _global_pass(points_nd, mask_n, centroids_kd, chunk_size, platform)
    loss = stats.sq_dist_sum / jnp.maximum(jnp.sum(stats.counts_k), 1)
    return KMeansResult(
        centroids_kd,
        jnp.where(mask_n, stats.labels_n, -1).reshape(mask.shape),
        loss,
        stats.counts_k,
    )

  rows = parallel.rows_spec(mask.ndim - 1)
  return jax.shard_map(
      local, mesh=mesh, in_specs=(rows, rows, P()), out_specs=KMeansResult(P(), rows, P(), P())
  )(points, mask, centroids_kd)


def lloyd(points_nd, mask_n, init_centroids_kd, num_iters, *, mesh, chunk_size=0):
  """`num_iters` Lloyd iterations from `init_centroids_kd` over the points where `mask_n`.

  Each iteration assigns every point to its nearest centroid, replaces each centroid by the
  mean of its points, then re-seeds empty clusters by splitting the largest one (faiss style).
  The returned assignments, counts and loss come from one more assignment pass against the
  returned (final) centroids, as the reference's search after faiss training does; the counts
  are what the reference starts the mini-batch running counts from.
  Points are sharded over the mesh axis "data" (any N: padded with masked rows here). Points
  may also come as batches (B, N_b, D) sharded along N_b (the init buffer): each device then
  works on its own rows in place, and the assignments are (B, N_b).
  """
  n = mask_n.shape[-1]
  points_nd, mask_n = _on_mesh(points_nd, mask_n, mesh)
  result = _lloyd_on_mesh(
      points_nd,
      mask_n,
      parallel.replicate(_float32(init_centroids_kd), mesh),
      num_iters,
      mesh,
      chunk_size,
  )
  return result._replace(assignments=result.assignments[..., :n])


def kmeans(
    key, points_nd, mask_n, k, num_iters=20, *, mesh, metric="cosine", init="random", chunk_size=0
):
  """k-means of the points where `mask_n`: normalise (metric 'cosine'), seed, run Lloyd.

  metric 'l2' uses the points as given. Centroids are plain means in either case.
  """
  if metric == "cosine":
    points_nd = normalize_features(jnp.asarray(points_nd, jnp.float32))
  elif metric != "l2":
    raise ValueError(f"k-means metric {metric!r}: expected 'cosine' or 'l2'")
  init_kd = init_centroids(key, points_nd, mask_n, k, method=init)
  return lloyd(points_nd, mask_n, init_kd, num_iters, mesh=mesh, chunk_size=chunk_size)


@functools.partial(jax.jit, static_argnames=("mesh", "chunk_size"))
def _minibatch_on_mesh(state, points_nd, mask_n, mesh, chunk_size):
  platform = platform_lib.platform_of(mesh)

  def local(state, points_nd, mask_n):
    stats = _global_pass(points_nd, mask_n, state.centroids, chunk_size, platform)
    batch_counts_k = stats.counts_k.astype(jnp.float32)
    running_counts_k = state.running_counts + batch_counts_k
    has_points_k = batch_counts_k > 0
    lr_k = jnp.where(
        has_points_k, batch_counts_k / jnp.where(has_points_k, running_counts_k, 1.0), 0.0
    )[:, None]
    batch_means_kd = stats.sums_kd / jnp.maximum(batch_counts_k, 1.0)[:, None]
    centroids_kd = jnp.where(
        has_points_k[:, None],
        (1.0 - lr_k) * state.centroids + lr_k * batch_means_kd,
        state.centroids,
    )
    return (
        MiniBatchState(centroids_kd, running_counts_k),
        stats.sq_dist_sum,
        jnp.sum(stats.counts_k),
    )

  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(P(), parallel.rows_spec(), parallel.rows_spec()),
      out_specs=(P(), P(), P()),
  )(state, points_nd, mask_n)


def minibatch_update(state, points_nd, mask_n, *, mesh, chunk_size=0):
  """One online k-means update from a batch of points (the valid ones where `mask_n`).

  With n_k batch points nearest to centroid k: N_k += n_k, lr_k = n_k / N_k and
  μ_k ← (1 − lr_k) μ_k + lr_k · mean(batch points of k); clusters without points keep μ_k.
  Starting running_counts at zero makes the first update replace a centroid by its batch
  mean; the reference starts them at the counts of the initial k-means (KMeansResult.counts).
  Returns (new state, sum of the valid points' squared distances to the centroids before the
  update, number of valid points); their ratio is the reference's per-batch k-means loss.
  """
  points_nd, mask_n = _on_mesh(points_nd, mask_n, mesh)
  return _minibatch_on_mesh(
      parallel.replicate(_float32(state), mesh), points_nd, mask_n, mesh, chunk_size
  )
