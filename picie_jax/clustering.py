"""Mini-batch k-means over a pass of the dataset (DESIGN §1 phase 1), for any feature function.

The first `num_init_batches` batches seed a full Lloyd k-means; every later batch moves the
centroids online with lr_k = n_k / N_k. Running counts N_k start at the cluster sizes of the
init's final assignment, as in the reference (it adds the init's counts before the first
online batch).
"""
import jax.numpy as jnp
import numpy as np

from picie_jax import parallel
from picie_jax.core import kmeans


def minibatch_kmeans(batches, features_fn, *, k, num_init_batches, iters, init, key,
                     mesh, chunk_size, progress=None):
  """Runs mini-batch k-means over `batches`.

  `features_fn(batch) -> (points (N, C), mask (N,))` on device, already in the metric's space
  (L2-normalised for cosine), so the points are clustered as given. Returns
  (centroids (K, C), stats) where stats has the init loss, the online loss (mean squared
  distance over the online batches, before each update) and the number of points seen.
  """
  buffer = []
  state = None
  init_loss = float("nan")
  online_sq_sum, online_count = 0.0, 0
  for batch in batches:
    points, mask = features_fn(batch)
    if state is None:
      buffer.append((points, mask))
      if len(buffer) == num_init_batches:
        state, init_loss = _initialise(buffer, k, iters, init, key, mesh, chunk_size)
        buffer = []
    else:
      state, sq_sum, count = kmeans.minibatch_update(state, points, mask, mesh=mesh,
                                                     chunk_size=chunk_size)
      online_sq_sum += float(sq_sum)
      online_count += int(count)
    if progress is not None:
      progress.update(1)
  if state is None:  # fewer batches than num_init_batches: the init sees all of them
    if not buffer:
      raise ValueError("k-means got no batches: the dataset split is empty")
    state, init_loss = _initialise(buffer, k, iters, init, key, mesh, chunk_size)
  stats = {
      "init_loss": init_loss,
      "online_loss": online_sq_sum / online_count if online_count else float("nan"),
  }
  return state.centroids, stats


def _initialise(buffer, k, iters, init, key, mesh, chunk_size):
  points = jnp.concatenate([p for p, _ in buffer])
  mask = jnp.concatenate([m for _, m in buffer])
  num_valid = int(parallel.to_host(jnp.sum(mask)))
  if num_valid < k:
    raise ValueError(f"k-means init has {num_valid} valid points for k={k} clusters: "
                     "raise kmeans.num_init_batches or lower the number of clusters")
  result = kmeans.lloyd(points, mask, kmeans.init_centroids(key, points, mask, k, method=init),
                        iters, mesh=mesh, chunk_size=chunk_size)
  state = kmeans.MiniBatchState(centroids=result.centroids,
                                running_counts=result.counts.astype(jnp.float32))
  return state, float(np.asarray(result.loss))
