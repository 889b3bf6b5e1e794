"""The benchmark harness's smallest path (k-means at 20,000 points) end to end, the epoch
projection by hand, gpu.sh's commands, and the PyTorch peer's loss against picie_jax's."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import projection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_kmeans_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "tiny.json"
  subprocess.run(
      [
          sys.executable,
          "-m",
          "benchmarks.run",
          "--only",
          "kmeans",
          "--tiny",
          "--threads",
          "1",
          "--max-foreign-load",
          "off",
          "--out",
          str(out),
      ],
      cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO},
      check=True,
      capture_output=True,
      text=True,
  )
  return json.loads(out.read_text())


def test_tiny_kmeans_run_records_machine_timings_and_agreeing_inertias(tiny_kmeans_results):
  r = tiny_kmeans_results
  assert r["machine"]["cpu_model"] and r["machine"]["cores"] >= 1
  assert r["versions"]["jax"] and r["threads"]["threads"] == 1
  assert r["threads"]["OMP_NUM_THREADS"] == "1"
  row = r["kmeans"]["20000"]
  present = set(row["inertia"])
  # A peer that is not installed is reported, not silently dropped.
  assert present | set(row["skipped"]) == {"picie_jax", "scikit-learn", "faiss-cpu"}
  assert all("pip install" in why for why in row["skipped"].values())
  assert "picie_jax" in present
  ref = row["inertia"]["picie_jax"]
  assert ref < row["inertia_of_init"]  # 20 iterations lowered it
  for impl in present:
    assert abs(row["inertia"][impl] / ref - 1) < 1e-3, (impl, row["inertia"])
    stats = row["timing"]["fns"][impl]
    assert stats["n"] == 2 and stats["min_s"] <= stats["median_s"] <= stats["max_s"]
    assert row["peak_memory"][impl]["peak_rss_bytes"] > row["points_bytes"]
    assert f"kmeans_20000/{impl}" in r["rows"]
  assert all(
      len(x["seconds"]) == len(present) and x["foreign_cores"] >= 0 for x in row["timing"]["rounds"]
  )


def test_projection_multiplies_per_image_time_by_passes_and_images():
  rows = {
      "a/cluster": {"median_s": 2.0, "batch_size": 8},  # 0.25 s per image
      "a/train": {"median_s": 1.0, "batch_size": 4},
  }
  phases = {
      "a": {
          "cluster": {"row": "a/cluster", "passes": 2, "images": "train"},
          "train": {"row": "a/train", "passes": 1, "images": "train"},
      },
      "b": {"train": {"row": "b/train", "passes": 1, "images": "train"}},
  }
  out = projection.project(rows, images={"train": 240, "val": 0}, phases=phases)
  assert out["minutes"]["a"] == {"cluster": 2.0, "train": 1.0, "epoch": 3.0}
  assert out["missing"] == {"b": ["b/train"]}


def test_gpu_script_dry_run_prints_every_benchmark_command():
  proc = subprocess.run(
      ["bash", os.path.join(REPO, "benchmarks", "gpu.sh"), "--dry-run"],
      env={**os.environ, "PYTHONPATH": REPO, "PYTHON": sys.executable},
      check=True,
      capture_output=True,
      text=True,
  )
  commands = [line for line in proc.stdout.splitlines() if line.startswith("+ ")]
  assert any("--coco-batch 128" in c and "--flops" in c for c in commands)
  assert any("--kmeans-sizes 32768000" in c and "--bandwidth-tbs 4.8" in c for c in commands)
  assert any("model.dtype=bfloat16" in c for c in commands) or "no model.dtype field" in proc.stdout


def test_torch_peer_loss_is_picie_jax_loss():
  torch = pytest.importorskip("torch")
  from benchmarks import torch_picie  # pylint: disable=import-outside-toplevel
  from picie_jax.core import losses  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  b, h, w, c, k = 2, 3, 4, 5, 6
  z1, z2 = (rng.standard_normal((b, h, w, c)).astype(np.float32) for _ in range(2))
  y1, y2 = (rng.integers(0, k, (b, h, w)) for _ in range(2))
  mu1, mu2 = (rng.standard_normal((k, c)).astype(np.float32) for _ in range(2))
  w1, w2 = (rng.uniform(0.1, 1.0, k).astype(np.float32) for _ in range(2))
  want = losses.picie_loss(*map(jnp.asarray, (z1, z2, y1, y2, mu1, mu2, w1, w2)))

  def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

  got = torch_picie.picie_loss(
      nchw(z1),
      nchw(z2),
      torch.from_numpy(y1),
      torch.from_numpy(y2),
      *map(torch.from_numpy, (mu1, mu2, w1, w2)),
  )
  for key in ("within", "cross", "total"):
    np.testing.assert_allclose(float(got[key]), float(want[key]), rtol=1e-5)
