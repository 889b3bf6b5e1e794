"""k-means rows: picie_jax `kmeans.lloyd` against scikit-learn and faiss-cpu, same points, same
initial centroids, same number of Lloyd iterations.

Times come from one process with the three interleaved; inertia is computed here, the same
way for all three (float64, from the returned centroids); peak memory comes from a fresh
subprocess per implementation (`python -m benchmarks.kmeans_rows --impl ...`) that builds the
points and runs one fit, reading its VmHWM (peak resident set, /proc/self/status): it counts
native allocations (XLA, BLAS, OpenMP), which tracemalloc does not, and includes the points.
"""

import argparse
import json
import subprocess
import sys

import numpy as np

from benchmarks import timing

IMPLEMENTATIONS = ("picie_jax", "scikit-learn", "faiss-cpu")


def clustered_points(n, d, k, seed):
  """(n, d) float32 unit vectors scattered around k random directions (cosine-metric-like
  features, as k-means sees them in PiCIE), and k distinct points as initial centroids."""
  rng = np.random.default_rng(seed)
  centres_kd = rng.standard_normal((k, d)).astype(np.float32)
  points_nd = centres_kd[rng.integers(0, k, n)]
  points_nd += 0.7 * rng.standard_normal((n, d), dtype=np.float32)
  points_nd /= np.linalg.norm(points_nd, axis=1, keepdims=True)
  return points_nd, points_nd[rng.choice(n, k, replace=False)].copy()


def inertia(points_nd, centroids_kd, chunk=262144):
  """Mean squared distance of every point to its nearest centroid, in float64 (chunked)."""
  mu = centroids_kd.astype(np.float64)
  mu_sq = np.sum(mu * mu, axis=1)
  total = 0.0
  for start in range(0, len(points_nd), chunk):
    x = points_nd[start : start + chunk].astype(np.float64)
    sq = np.sum(x * x, axis=1, keepdims=True) - 2 * x @ mu.T + mu_sq
    total += float(np.sum(np.maximum(sq.min(axis=1), 0.0)))
  return total / len(points_nd)


def fitters(points_nd, init_kd, iters, impls=IMPLEMENTATIONS):
  """{impl: fn() -> (K, D) centroids after `iters` Lloyd iterations from init_kd}. A peer that
  is not installed raises timing.MissingPeer when its fitter is built."""
  n, d = points_nd.shape
  k = len(init_kd)
  fns = {}
  if "picie_jax" in impls:
    import jax  # pylint: disable=import-outside-toplevel

    from picie_jax import parallel  # pylint: disable=import-outside-toplevel
    from picie_jax.core import kmeans  # pylint: disable=import-outside-toplevel

    mesh = parallel.make_mesh()
    points_dev = jax.device_put(points_nd)
    mask_dev = jax.device_put(np.ones(n, bool))

    def picie_jax_fit():
      # 20 iterations + the final assignment pass (counts/loss for the mini-batch start).
      return kmeans.lloyd(points_dev, mask_dev, init_kd, iters, mesh=mesh).centroids

    fns["picie_jax"] = picie_jax_fit
  if "scikit-learn" in impls:
    cluster = timing.require("sklearn.cluster", "the scikit-learn k-means row")

    def sklearn_fit():
      km = cluster.KMeans(k, init=init_kd, n_init=1, algorithm="lloyd", max_iter=iters, tol=0)
      return km.fit(points_nd).cluster_centers_

    fns["scikit-learn"] = sklearn_fit
  if "faiss-cpu" in impls:
    faiss = timing.require("faiss", "the faiss-cpu k-means row")

    def faiss_fit():
      # No subsampling (max_points_per_centroid), no warning for small clusters, one run.
      km = faiss.Kmeans(
          d,
          k,
          niter=iters,
          nredo=1,
          verbose=False,
          seed=1,
          min_points_per_centroid=1,
          max_points_per_centroid=n // k + 1,
      )
      km.train(points_nd, init_centroids=init_kd)
      return km.centroids

    fns["faiss-cpu"] = faiss_fit
  return fns


def peak_memory(impl, n, d, k, iters, seed):
  """Peak resident memory of a fresh process that builds the points and fits once."""
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "benchmarks.kmeans_rows",
          "--impl",
          impl,
          "--n",
          str(n),
          "--d",
          str(d),
          "--k",
          str(k),
          "--iters",
          str(iters),
          "--seed",
          str(seed),
      ],
      capture_output=True,
      text=True,
      check=False,
  )
  if proc.returncode:
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
  return json.loads(proc.stdout.strip().splitlines()[-1])


def kmeans_row(
    n,
    d,
    k,
    iters,
    seed,
    repeats,
    warmup,
    max_foreign_cores,
    max_extra_rounds,
    measure_memory=True,
    impls=IMPLEMENTATIONS,
):
  """One N x D x K row: interleaved times, our inertia of each result, fresh-process memory."""
  points_nd, init_kd = clustered_points(n, d, k, seed)
  fns, skipped = {}, {}
  for impl in impls:
    try:
      fns.update(fitters(points_nd, init_kd, iters, impls=(impl,)))
    except timing.MissingPeer as e:
      skipped[impl] = str(e)
  timed = timing.time_interleaved(fns, repeats, warmup, max_foreign_cores, max_extra_rounds)
  inertias = {impl: inertia(points_nd, np.asarray(fn())) for impl, fn in fns.items()}
  memory = {
      impl: peak_memory(impl, n, d, k, iters, seed) if measure_memory else None for impl in fns
  }
  return {
      "n": n,
      "d": d,
      "k": k,
      "iters": iters,
      "seed": seed,
      "points_bytes": points_nd.nbytes,
      "timing": timed,
      "inertia": inertias,
      "inertia_of_init": inertia(points_nd, init_kd),
      "peak_memory": memory,
      "skipped": skipped,
  }


def _vm_status_bytes(field):
  with open("/proc/self/status") as f:
    return 1024 * int(next(line for line in f if line.startswith(field)).split()[1])


def main():
  parser = argparse.ArgumentParser(
      description="One k-means fit in a fresh process; prints "
      "its peak memory as JSON (used by benchmarks.run)."
  )
  parser.add_argument("--impl", choices=IMPLEMENTATIONS, required=True)
  for name, default in (("n", 1_000_000), ("d", 128), ("k", 27), ("iters", 20), ("seed", 0)):
    parser.add_argument(f"--{name}", type=int, default=default)
  args = parser.parse_args()
  points_nd, init_kd = clustered_points(args.n, args.d, args.k, args.seed)
  fit = fitters(points_nd, init_kd, args.iters, impls=(args.impl,))[args.impl]
  with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM: the points' generation
    f.write("5")  # peak (temporaries) is not the fit's
  before_fit = _vm_status_bytes("VmRSS")
  timing.block(fit())
  peak = _vm_status_bytes("VmHWM")
  print(
      json.dumps(
          {
              "peak_rss_bytes": peak,
              "rss_before_fit_bytes": before_fit,
              "source": "VmHWM of /proc/self/status in a fresh process, reset "
              "(clear_refs 5) once the points were built (points included)",
          }
      )
  )


if __name__ == "__main__":
  main()
