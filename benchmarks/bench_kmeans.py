"""Times picie_jax.core.kmeans (jitted) against numpy and scipy on N x D points with K centroids.

Three operations, each in three implementations on the same float32 points and centroids:
  assign     nearest centroid of every point
  lloyd      one Lloyd iteration: assign, per-cluster sums and counts, new means
  minibatch  one online update: assign, sums, counts, mu <- (1 - n/N) mu + (n/N) batch mean
Implementations: picie_jax (`assign_to_nearest`, `lloyd`, `minibatch_update` on a data mesh
over all devices), numpy (||x||^2 - 2 x.mu + ||mu||^2 by one matmul, np.add.at sums,
np.bincount counts) and scipy (scipy.cluster.vq.vq, then the same numpy sums).
`lloyd` runs --lloyd-iters iterations plus its final assignment pass in one call; its time
per iteration is the call's time / (iters + 1). Repeats are interleaved across
implementations and the median is reported. Also checks that the three agree and reports
the peak distance buffer of the chunked search.

  python benchmarks/bench_kmeans.py --n 200000 --d 128 --k 27
"""
import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.cluster.vq
from jax.sharding import NamedSharding, PartitionSpec as P

from picie_jax.core import kmeans

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
IMPLEMENTATIONS = ("picie_jax", "numpy", "scipy")


def clustered_points(rng, n, d, k):
  """(n, d) float32 unit vectors scattered around k random directions (cosine-metric-like
  features), and k of the points as initial centroids."""
  centres_kd = rng.standard_normal((k, d)).astype(np.float32)
  points_nd = centres_kd[rng.integers(0, k, n)] + 0.7 * rng.standard_normal((n, d)).astype(
      np.float32)
  points_nd /= np.linalg.norm(points_nd, axis=1, keepdims=True)
  return points_nd, points_nd[rng.choice(n, k, replace=False)].copy()


def numpy_assign(points_nd, centroids_kd):
  """Nearest centroid by ||x||^2 - 2 x.mu + ||mu||^2 (one float32 matmul) and argmin."""
  sq_nk = (np.sum(points_nd * points_nd, axis=1, keepdims=True) - 2.0 * points_nd @ centroids_kd.T
           + np.sum(centroids_kd * centroids_kd, axis=1))
  return np.argmin(sq_nk, axis=1)


def scipy_assign(points_nd, centroids_kd):
  return scipy.cluster.vq.vq(points_nd, centroids_kd, check_finite=False)[0]


def sums_and_counts(points_nd, labels_n, k):
  """(K, D) per-cluster sums by np.add.at and (K,) counts by np.bincount."""
  sums_kd = np.zeros((k, points_nd.shape[1]), np.float32)
  np.add.at(sums_kd, labels_n, points_nd)
  return sums_kd, np.bincount(labels_n, minlength=k)


def host_lloyd_iteration(assign, points_nd, centroids_kd):
  """One Lloyd iteration with a host `assign`; empty clusters keep their centroid."""
  sums_kd, counts_k = sums_and_counts(points_nd, assign(points_nd, centroids_kd),
                                      len(centroids_kd))
  return np.where(counts_k[:, None] > 0, sums_kd / np.maximum(counts_k, 1)[:, None],
                  centroids_kd)


def host_minibatch_update(assign, points_nd, centroids_kd, running_counts_k):
  """The same online update as kmeans.minibatch_update, with a host `assign`."""
  sums_kd, counts_k = sums_and_counts(points_nd, assign(points_nd, centroids_kd),
                                      len(centroids_kd))
  running_counts_k = running_counts_k + counts_k
  lr_k = (counts_k / np.maximum(running_counts_k, 1))[:, None]
  means_kd = sums_kd / np.maximum(counts_k, 1)[:, None]
  return np.where(counts_k[:, None] > 0, (1 - lr_k) * centroids_kd + lr_k * means_kd,
                  centroids_kd), running_counts_k


def median_ms(times_s):
  return 1e3 * statistics.median(times_s)


def time_interleaved(fns, repeats):
  """{name: [seconds]}: one warm-up (compile) call each, then `repeats` rounds, each timing
  every fn once in turn so machine noise hits all of them alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--n", type=int, default=200_000, help="points")
  parser.add_argument("--d", type=int, default=128, help="feature dimension")
  parser.add_argument("--k", type=int, default=27, help="centroids")
  parser.add_argument("--chunk-size", type=int, default=65536,
                      help="rows per distance chunk of picie_jax (config.kmeans.chunk_size)")
  parser.add_argument("--lloyd-iters", type=int, default=4,
                      help="Lloyd iterations per timed picie_jax lloyd call")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "kmeans.json"))
  args = parser.parse_args()
  if args.repeats < 1 or args.lloyd_iters < 1:
    raise SystemExit(f"--repeats={args.repeats} and --lloyd-iters={args.lloyd_iters} must be >= 1")

  n, d, k, iters = args.n, args.d, args.k, args.lloyd_iters
  points_nd, init_kd = clustered_points(np.random.default_rng(args.seed), n, d, k)
  mesh = kmeans.data_mesh()
  points_dev, mask_dev = jax.device_put(
      kmeans.pad_to_multiple(jnp.asarray(points_nd), np.ones(n, bool), mesh.size),
      NamedSharding(mesh, P(kmeans.DATA_AXIS)))
  init_dev = jax.device_put(init_kd, NamedSharding(mesh, P()))
  start_counts_k = np.zeros(k, np.float32)
  state_dev = kmeans.MiniBatchState(init_dev, jnp.asarray(start_counts_k))
  host_assign = {"numpy": numpy_assign, "scipy": scipy_assign}

  def jax_lloyd():
    return kmeans.lloyd(points_dev, mask_dev, init_dev, iters, mesh=mesh,
                        chunk_size=args.chunk_size).centroids

  fns = {
      ("assign", "picie_jax"): lambda: kmeans.assign_to_nearest(points_dev, init_dev,
                                                                args.chunk_size)[0],
      ("lloyd", "picie_jax"): jax_lloyd,
      ("minibatch", "picie_jax"): lambda: kmeans.minibatch_update(
          state_dev, points_dev, mask_dev, mesh=mesh, chunk_size=args.chunk_size)[0],
  }
  for name, assign in host_assign.items():
    fns[("assign", name)] = lambda assign=assign: assign(points_nd, init_kd)
    fns[("lloyd", name)] = lambda assign=assign: host_lloyd_iteration(assign, points_nd, init_kd)
    fns[("minibatch", name)] = lambda assign=assign: host_minibatch_update(
        assign, points_nd, init_kd, start_counts_k)
  times = time_interleaved(fns, args.repeats)
  ms = {key: median_ms(t) for key, t in times.items()}
  for key in ms:
    if key == ("lloyd", "picie_jax"):
      ms[key] /= iters + 1  # iters iterations + the final assignment pass

  labels = {"picie_jax": np.asarray(kmeans.assign_to_nearest(points_dev, init_dev,
                                                             args.chunk_size)[0]),
            **{name: assign(points_nd, init_kd) for name, assign in host_assign.items()}}
  agreement = {name: 100.0 * float(np.mean(labels[name] == labels["numpy"]))
               for name in IMPLEMENTATIONS}
  one_iter_kd = np.asarray(kmeans.lloyd(points_dev, mask_dev, init_dev, 1, mesh=mesh,
                                        chunk_size=args.chunk_size).centroids)
  centroid_diff = {name: float(np.abs(one_iter_kd - host_lloyd_iteration(
      assign, points_nd, init_kd)).max()) for name, assign in host_assign.items()}
  chunk = min(args.chunk_size, n)
  buffers = {"chunk_rows": chunk, "chunked_bytes": chunk * k * 4, "unchunked_bytes": n * k * 4}

  ops = ("assign", "lloyd", "minibatch")
  print(f"k-means: N={n} D={d} K={k}, {jax.default_backend()} ({jax.devices()[0].device_kind}, "
        f"{jax.device_count()} device(s)), {os.cpu_count()} host cores, median of "
        f"{args.repeats}")
  print(f"{'operation':<11}" + "".join(f"{impl + ' ms':>14}" for impl in IMPLEMENTATIONS)
        + f"{'numpy/picie_jax':>17}{'numpy/scipy':>13}")
  for op in ops:
    row = [ms[(op, impl)] for impl in IMPLEMENTATIONS]
    print(f"{op:<11}" + "".join(f"{v:>14.1f}" for v in row)
          + f"{row[1] / row[0]:>16.2f}x{row[1] / row[2]:>12.2f}x")
  print("assignment agreement with numpy: "
        + ", ".join(f"{name} {agreement[name]:.3f}%" for name in IMPLEMENTATIONS))
  print("max |centroid difference| after one Lloyd iteration, picie_jax vs: "
        + ", ".join(f"{name} {v:.2e}" for name, v in centroid_diff.items()))
  print(f"distance buffer (rows x K x 4 bytes): chunked ({chunk} rows) "
        f"{buffers['chunked_bytes']:,} B = {buffers['chunked_bytes'] / 2**20:.1f} MiB, "
        f"unchunked {buffers['unchunked_bytes']:,} B = {buffers['unchunked_bytes'] / 2**20:.1f} MiB")

  result = {
      "args": vars(args),
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(), "host_cores": os.cpu_count(),
      "machine": platform.platform(),
      "ms_per_call": {op: {impl: ms[(op, impl)] for impl in IMPLEMENTATIONS} for op in ops},
      "speedup_vs_numpy": {op: {impl: ms[(op, "numpy")] / ms[(op, impl)]
                                for impl in IMPLEMENTATIONS} for op in ops},
      "raw_seconds_per_call": {f"{op}/{impl}": times[(op, impl)] for op, impl in times},
      "assignment_agreement_pct": agreement,
      "centroid_max_abs_diff_one_iteration": centroid_diff,
      "distance_buffer": buffers,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
