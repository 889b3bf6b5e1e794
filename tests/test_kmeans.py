"""k-means against float64 numpy references written here (brute-force distances, loops)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picie_jax import clustering
from picie_jax import parallel
from picie_jax.core import kmeans as km

MESH = parallel.make_mesh()


def brute_force_nearest(points, centroids):
  """(labels, squared distances) from all N*K differences in float64."""
  sq = ((points[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
  return sq.argmin(1), sq.min(1)


def numpy_lloyd(points, init, num_iters):
  """Textbook Lloyd in float64 with faiss's empty-cluster split (largest cluster, 1 ± 1/1024).

  Returns (centroids, labels, loss) with labels and loss against the final centroids.
  """
  x = points.astype(np.float64)
  c = init.astype(np.float64).copy()
  k, d = c.shape
  shift = np.array([1.0 if j % 2 == 0 else -1.0 for j in range(d)]) / 1024
  for _ in range(num_iters):
    labels, _ = brute_force_nearest(x, c)
    counts = np.bincount(labels, minlength=k)
    for j in range(k):
      if counts[j]:
        c[j] = x[labels == j].mean(0)
    for empty in range(k):
      if counts[empty] == 0:
        largest = int(np.argmax(counts))
        c[empty], c[largest] = c[largest] * (1 + shift), c[largest] * (1 - shift)
        counts[empty] = counts[largest] // 2
        counts[largest] -= counts[empty]
  labels, sq = brute_force_nearest(x, c)
  return c, labels, sq.mean()


def gaussian_points(seed, n, d):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_assign_to_nearest_chunked_matches_brute_force():
  x = gaussian_points(0, 10000, 12)
  c = gaussian_points(1, 10, 12)
  want_labels, want_sq = brute_force_nearest(x, c)
  assert (
      km.default_chunk_size("cpu") == 4096
  )  # on CPU: 10000 points are 3 chunks, the last overlaps
  for chunk_size in (300, 0, 16384):  # 300 does not divide 10000 either; 0: the default
    labels, sq = km.assign_to_nearest(x, c, mesh=MESH, chunk_size=chunk_size)
    assert labels.dtype == jnp.int32 and sq.dtype == jnp.float32
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(sq, want_sq, rtol=1e-5, atol=1e-4)


def test_normalize_features_matches_numpy_and_keeps_zeros():
  x = gaussian_points(2, 6, 5)
  x[3] = 0.0
  want = x / np.maximum(np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True), 1e-10)
  np.testing.assert_allclose(km.normalize_features(x), want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(km.normalize_features(x.T, axis=0), want.T, rtol=1e-6, atol=1e-7)


def test_pad_to_multiple():
  x = gaussian_points(3, 10, 3)
  mask = np.arange(10) % 3 > 0
  padded, padded_mask = km.pad_to_multiple(x, mask, 8)
  assert padded.shape == (16, 3) and padded_mask.shape == (16,)
  np.testing.assert_array_equal(padded[:10], x)
  np.testing.assert_array_equal(padded[10:], 0.0)
  np.testing.assert_array_equal(padded_mask, np.concatenate([mask, np.zeros(6, bool)]))
  with pytest.raises(ValueError, match=r"mask \(9,\)"):
    km.pad_to_multiple(x, mask[:9], 8)


def test_lloyd_matches_numpy_float64():
  x = gaussian_points(4, 2000, 16)
  init = x[np.random.default_rng(5).choice(2000, 8, replace=False)]
  result = km.lloyd(x, np.ones(2000, bool), init, 10, mesh=MESH, chunk_size=300)
  want_c, want_labels, want_loss = numpy_lloyd(x, init, 10)
  np.testing.assert_array_equal(result.assignments, want_labels)
  np.testing.assert_allclose(result.centroids, want_c, atol=1e-5)
  np.testing.assert_allclose(result.loss, want_loss, rtol=1e-5)
  np.testing.assert_array_equal(result.counts, np.bincount(want_labels, minlength=8))
  assert result.assignments.dtype == jnp.int32 and result.counts.dtype == jnp.int32


def test_mask_excludes_points_from_centroids_counts_and_loss():
  rng = np.random.default_rng(6)
  x = gaussian_points(7, 503, 8)
  mask = rng.uniform(size=503) > 0.2
  x[~mask] = 100.0 + rng.normal(size=(int((~mask).sum()), 8))  # would drag any centroid away
  init = x[np.flatnonzero(mask)[:5]]
  result = km.lloyd(x, mask, init, 6, mesh=MESH, chunk_size=128)
  want_c, want_labels, want_loss = numpy_lloyd(x[mask], init, 6)
  np.testing.assert_allclose(result.centroids, want_c, atol=1e-5)
  np.testing.assert_array_equal(result.assignments[mask], want_labels)
  np.testing.assert_array_equal(result.assignments[~mask], -1)
  np.testing.assert_array_equal(result.counts, np.bincount(want_labels, minlength=5))
  np.testing.assert_allclose(result.loss, want_loss, rtol=1e-5)


def test_split_empty_clusters_hand_worked():
  e = 1 / 1024
  centroids = np.array(
      [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0], [0.5, 0.5, 0.5]], np.float32
  )
  # Clusters 1 and 2 are empty. 1 splits the largest (0, count 6): counts 3/3, and 0 is
  # perturbed; 2 then splits the first of the largest (0 again, count 3): counts 2/1.
  new_c, new_counts = km._split_empty_clusters(
      jnp.asarray(centroids), jnp.array([6, 0, 0, 3], jnp.int32)
  )
  up, down = np.array([1 + e, 1 - e, 1 + e]), np.array([1 - e, 1 + e, 1 - e])
  c0_after_first = centroids[0] * down
  want = np.stack([c0_after_first * down, centroids[0] * up, c0_after_first * up, centroids[3]])
  np.testing.assert_allclose(new_c, want, rtol=1e-6)
  np.testing.assert_array_equal(new_counts, [2, 3, 1, 3])


def test_lloyd_repairs_an_empty_cluster():
  x = gaussian_points(8, 600, 16)
  init = np.concatenate([x[:7], np.full((1, 16), 50.0, np.float32)])  # cluster 7 gets no point
  for iters in (1, 4):
    result = km.lloyd(x, np.ones(600, bool), init, iters, mesh=MESH)
    want_c, want_labels, _ = numpy_lloyd(x, init, iters)
    np.testing.assert_allclose(result.centroids, want_c, atol=1e-5)
    np.testing.assert_array_equal(result.assignments, want_labels)
    assert np.all(np.asarray(result.counts) > 0), result.counts
    assert np.abs(np.asarray(result.centroids[7])).max() < 5.0  # moved off the far point


def numpy_minibatch_update(centroids, running_counts, points, mask):
  """DESIGN §1: N_k += n_k, lr_k = n_k / N_k, mu_k <- (1 - lr_k) mu_k + lr_k mean_k."""
  c, counts = centroids.astype(np.float64).copy(), running_counts.astype(np.float64).copy()
  x = points[mask].astype(np.float64)
  labels, sq = brute_force_nearest(x, c)
  for k in range(len(c)):
    n_k = int((labels == k).sum())
    if n_k:
      counts[k] += n_k
      lr = n_k / counts[k]
      c[k] = (1 - lr) * c[k] + lr * x[labels == k].mean(0)
  return c, counts, sq.sum(), len(x)


def test_minibatch_update_matches_numpy_loop():
  rng = np.random.default_rng(9)
  centroids = gaussian_points(10, 6, 4)
  centroids[5] = 40.0  # gets no points: must stay unchanged
  state = km.MiniBatchState(jnp.asarray(centroids), jnp.array([0, 0, 30, 5, 100, 7], jnp.float32))
  want_c, want_counts = centroids.astype(np.float64), np.asarray(state.running_counts, np.float64)
  for step in range(3):
    points = gaussian_points(11 + step, 50, 4)
    mask = rng.uniform(size=50) > 0.3
    state, sq_sum, count = km.minibatch_update(state, points, mask, mesh=MESH, chunk_size=16)
    want_c, want_counts, want_sq, want_count = numpy_minibatch_update(
        want_c, want_counts, points, mask
    )
    np.testing.assert_allclose(state.centroids, want_c, atol=1e-5)
    np.testing.assert_array_equal(state.running_counts, want_counts)
    np.testing.assert_allclose(sq_sum, want_sq, rtol=1e-5)
    assert int(count) == want_count
  np.testing.assert_array_equal(state.centroids[5], centroids[5])


def one_to_one(labels_a, labels_b):
  """True when the two labelings are the same partition up to renaming."""
  pairs = set(zip(labels_a.tolist(), labels_b.tolist()))
  return len(pairs) == len(set(labels_a.tolist())) == len(set(labels_b.tolist()))


def test_kmeans_recovers_separated_blobs_euclidean():
  rng = np.random.default_rng(12)
  centers = rng.normal(size=(6, 8)) * 10
  truth = np.repeat(np.arange(6), 80)
  x = (centers[truth] + 0.3 * rng.normal(size=(480, 8))).astype(np.float32)
  result = km.kmeans(
      jax.random.key(0),
      x,
      np.ones(480, bool),
      6,
      num_iters=10,
      mesh=MESH,
      metric="l2",
      init="kmeans++",
  )
  assert one_to_one(truth, np.asarray(result.assignments))


def test_kmeans_cosine_clusters_directions_with_plain_mean_centroids():
  rng = np.random.default_rng(13)
  directions = rng.normal(size=(4, 8))
  truth = np.repeat(np.arange(4), 60)
  lengths = rng.uniform(0.1, 10.0, size=(240, 1))  # euclidean k-means would split by length
  x = (lengths * (directions[truth] + 0.05 * rng.normal(size=(240, 8)))).astype(np.float32)
  result = km.kmeans(
      jax.random.key(1), x, np.ones(240, bool), 4, num_iters=10, mesh=MESH, init="kmeans++"
  )
  labels = np.asarray(result.assignments)
  assert one_to_one(truth, labels)
  unit = x / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
  want = np.stack([unit[labels == k].mean(0) for k in range(4)])
  np.testing.assert_allclose(result.centroids, want, atol=1e-5)
  assert np.all(np.linalg.norm(want, axis=1) < 1.0)  # means of unit vectors, not renormalised


@pytest.mark.parametrize("method", ["random", "kmeans++"])
def test_init_centroids_picks_distinct_valid_points(method):
  x = gaussian_points(14, 300, 5)
  valid = np.arange(300) % 2 == 0
  chosen = np.asarray(km.init_centroids(jax.random.key(2), x, valid, 12, method=method))
  rows = [np.flatnonzero((x == c).all(1)) for c in chosen]
  assert all(len(r) == 1 for r in rows)
  indices = np.concatenate(rows)
  assert len(set(indices.tolist())) == 12 and valid[indices].all()


def test_bad_metric_or_init_names_the_value():
  x, mask = gaussian_points(15, 20, 3), np.ones(20, bool)
  with pytest.raises(ValueError, match="'manhattan'"):
    km.kmeans(jax.random.key(0), x, mask, 2, mesh=MESH, metric="manhattan")
  with pytest.raises(ValueError, match="'farthest'"):
    km.init_centroids(jax.random.key(0), x, mask, 2, method="farthest")


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import PartitionSpec as P
    from picie_jax import clustering, parallel
    from picie_jax.core import kmeans as km
    assert jax.device_count() == 8, jax.devices()
    one, eight = parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2003, 16)).astype(np.float32)  # 2003 = 8 * 250 + 3: padded and masked
    mask = rng.uniform(size=2003) > 0.1
    init = km.init_centroids(jax.random.key(0), x, mask, 8)
    r1 = km.lloyd(x, mask, init, 8, mesh=one, chunk_size=100)
    r8 = km.lloyd(x, mask, init, 8, mesh=eight, chunk_size=100)
    np.testing.assert_allclose(r8.centroids, r1.centroids, atol=1e-5)
    np.testing.assert_array_equal(r8.assignments, r1.assignments)
    np.testing.assert_array_equal(r8.counts, r1.counts)
    np.testing.assert_allclose(r8.loss, r1.loss, rtol=1e-5)
    assert r8.assignments.shape == (2003,)
    s1 = s8 = km.MiniBatchState(r1.centroids, r1.counts.astype(jnp.float32))
    for start in (0, 203):
      batch, batch_mask = x[start:start + 203], mask[start:start + 203]
      s1, sq1, n1 = km.minibatch_update(s1, batch, batch_mask, mesh=one, chunk_size=16)
      s8, sq8, n8 = km.minibatch_update(s8, batch, batch_mask, mesh=eight, chunk_size=16)
      np.testing.assert_allclose(s8.centroids, s1.centroids, atol=1e-5)
      np.testing.assert_array_equal(s8.running_counts, s1.running_counts)
      np.testing.assert_allclose(sq8, sq1, rtol=1e-5)
      assert int(n8) == int(n1) == int(batch_mask.sum())
    # Each device searches its own rows (2003 are padded to 2008), in chunks of 50 there.
    centroids = np.asarray(r1.centroids)
    for got, want in zip(km.assign_to_nearest(x, centroids, mesh=eight, chunk_size=50),
                         km.assign_to_nearest(x, centroids, mesh=one)):
      assert got.shape == (2003,)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # The init buffer's layout: batches of rows (B, N_b, D) sharded along N_b, read in batch
    # order; bfloat16 storage is clustered as its float32 values.
    buf = clustering._empty_buffer(3, 400, 16, jnp.bfloat16, eight)
    for i in range(3):
      rows = jax.device_put((x[400 * i:400 * (i + 1)], mask[400 * i:400 * (i + 1)]),
                            parallel.rows_sharded(eight))
      buf = clustering._fill(*buf, *rows, i)
    flat = x[:1200].astype(jnp.bfloat16).astype(np.float32), mask[:1200]
    start = km.random_init_from_batches(jax.random.key(2), *buf, 8, mesh=eight)
    np.testing.assert_array_equal(start, km.init_centroids(jax.random.key(2), *flat, 8))
    rb = km.lloyd(*buf, start, 8, mesh=eight, chunk_size=100)
    rf = km.lloyd(*flat, start, 8, mesh=one, chunk_size=100)
    np.testing.assert_allclose(rb.centroids, rf.centroids, atol=1e-5)
    np.testing.assert_array_equal(rb.assignments.reshape(-1), rf.assignments)
    print("OK")
""")


def test_eight_devices_match_one_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=300
  )
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_reference_loss_is_the_unweighted_mean_of_the_init_and_each_online_batch(monkeypatch):
  """The official AverageMeter: one update for the init loss and one per online batch, each
  of weight 1, whereas online_loss weights every point equally."""
  rng = np.random.default_rng(4)
  sizes = [40, 40, 40, 7, 33]  # valid points per batch: uneven, so the two means differ
  batches = []
  for b, size in enumerate(sizes):
    mask = np.zeros(40, bool)
    mask[rng.permutation(40)[:size]] = True
    batches.append((gaussian_points(20 + b, 40, 3) * (1 + b), mask))
  updates = []
  real_update = km.minibatch_update

  def recording_update(*args, **kwargs):
    out = real_update(*args, **kwargs)
    updates.append((float(out[1]), int(out[2])))
    return out

  monkeypatch.setattr(km, "minibatch_update", recording_update)
  _, (stats,) = clustering.minibatch_kmeans(
      batches,
      lambda batch, for_init: [batch],
      k=3,
      num_init_batches=2,
      iters=4,
      init="random",
      keys=[jax.random.PRNGKey(0)],
      mesh=MESH,
      chunk_size=0,
  )
  assert [count for _, count in updates] == sizes[2:]
  batch_means = [sq / count for sq, count in updates]
  np.testing.assert_allclose(
      stats["reference_loss"], np.mean([stats["init_loss"], *batch_means]), rtol=1e-6
  )
  online = sum(sq for sq, _ in updates) / sum(sizes[2:])
  np.testing.assert_allclose(stats["online_loss"], online, rtol=1e-6)
  assert abs(np.mean(batch_means) - online) > 1e-3 * online
