"""The benchmark harness's smallest paths (k-means at 20,000 points; the backbones rows with
one ViT block) end to end, the epoch projection by hand, gpu.sh's commands, and the PyTorch
peer's loss against picie_jax's."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import projection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_harness(*args):
  """benchmarks.run with `args` in a fresh process (threads are pinned before jax loads)."""
  return subprocess.run(
      [sys.executable, "-m", "benchmarks.run", *args],
      cwd=REPO,
      env={**os.environ, "PYTHONPATH": REPO},
      check=True,
      capture_output=True,
      text=True,
  ).stdout


# One thread, every round kept (the test machine is shared).
TIMING_ARGS = ("--threads", "1", "--max-foreign-load", "off")


@pytest.fixture(scope="module")
def tiny_kmeans_results(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "tiny.json"
  run_harness("--only", "kmeans", "--tiny", *TIMING_ARGS, "--out", str(out))
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


def test_tiny_backbones_run_records_parameters_compiled_memory_and_attention(tmp_path):
  out = tmp_path / "backbones.json"
  variants = ("vit_s8_stego", "vit_s8_stego_frozen")
  run_harness(
      "--only",
      "backbones",
      "--tiny",
      "--backbones-variants",
      ",".join(variants),
      *TIMING_ARGS,
      "--out",
      str(out),
  )
  r = json.loads(out.read_text())
  rows = r["rows"]
  steps = ("train_step", "cluster_step", "eval_step")
  assert set(rows) == {f"backbones/{v}/{s}" for v in variants for s in steps}
  assert len(r["groups"]["backbones"]["rounds"]) == 2  # one interleaved group
  for row in rows.values():
    assert row["n"] == 2 and row["batch_size"] == 2
    assert row["images_per_s"] == pytest.approx(2 / row["median_s"])
    assert row["feature_side"] == 64 // 8  # the demo's res1 64, patch 8
  trained = rows["backbones/vit_s8_stego/train_step"]
  frozen = rows["backbones/vit_s8_stego_frozen/train_step"]
  assert trained["params"] == frozen["params"] == trained["trained_params"]
  # Only STEGO's head trains: 1x1 projection 384 -> 64 plus MLP 384 -> 384 -> 64, with biases.
  assert frozen["trained_params"] == 2 * (384 * 64 + 64) + 384 * 384 + 384
  # A frozen backbone keeps no Adam moments (arguments) and no weight gradients (temp).
  for key in ("argument_bytes", "temp_bytes"):
    assert 0 < frozen["memory"][key] < trained["memory"][key]
  assert rows["backbones/vit_s8_stego/eval_step"]["memory"]["temp_bytes"] > 0
  assert rows["backbones/vit_s8_stego/cluster_step"]["memory"] is None  # not one jitted call
  a = r["attention"]
  assert a["tokens"] == (320 // 8) ** 2 + 1 and a["heads"] == 6
  assert a["naive_bytes_per_block"] == 2 * 6 * 1601**2 * 4
  # XLA's CPU attention materialises the (B, heads, T, T) logits.
  assert a["attention_op_forward_temp_bytes"] >= a["naive_bytes_per_block"]
  one, two = a["vit_temp_bytes"]["1"], a["vit_temp_bytes"]["2"]
  assert a["vit_grad_temp_bytes_per_block"] == two["grad"] - one["grad"] > 0
  shown = run_harness("--show", str(out))
  assert "backbones/vit_s8_stego_frozen/train_step" in shown and "naive" in shown


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
  assert any("--only backbones" in c and "--backbones-shape coco" in c for c in commands)
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
