"""Data-parallel and multi-host runs against one device.

The training loop on 4 devices of one process against 1 device (global BatchNorm statistics
and sharded k-means make them agree up to float reduction order), and k-means on 2 processes x
2 devices joined by jax.distributed against a 1-device run in this process. Each run is a
subprocess so XLA_FLAGS and jax.distributed are set before jax starts.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

from conftest import TINY_OVERRIDES
from picie_jax.core import kmeans as km

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TIMEOUT_S = 180


def _cpu_env(num_devices):
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}")


def _run_together(commands, log_dir):
  """Runs the (argv, env) commands at once, logs in `log_dir`; kills them all as soon as one
  fails or after _TIMEOUT_S, and raises with every process's log tail."""
  procs, logs = [], []

  def report(what):
    tails = "".join(f"\n--- process {i} (exit {p.poll()}), {log}:\n{log.read_text()[-2000:]}"
                    for i, (p, log) in enumerate(zip(procs, logs)))
    return what + tails

  try:
    for i, (argv, env) in enumerate(commands):
      logs.append(log_dir / f"process{i}.log")
      with open(logs[-1], "w") as log:
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + _TIMEOUT_S
    while any(p.poll() is None for p in procs):
      assert all(p.poll() in (None, 0) for p in procs), report("a process failed")
      assert time.monotonic() < deadline, report(f"still running after {_TIMEOUT_S} s")
      time.sleep(0.2)
    assert all(p.returncode == 0 for p in procs), report("a process failed")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


_TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from configs import synthetic
    from picie_jax import parallel, train
    num_devices, overrides, workdir = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    assert jax.device_count() == parallel.make_mesh().size == num_devices, jax.devices()
    config = synthetic.get_config()
    config.update_from_flattened_dict(overrides)
    train.train_and_evaluate(config, workdir)
""")


def _records(workdir):
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def _assert_scores_agree(four, one, where):
  """k-means and train losses to 1e-3 relative, accuracies and mIoUs to 0.5 points."""
  assert set(four) == set(one), where
  for key, expect in one.items():
    if key in ("train_images_per_s", "per_class_iou", "iou_by_name"):
      continue
    if key in ("epoch", "step", "k"):
      assert four[key] == expect, (where, key)
    elif "loss" in key:
      np.testing.assert_allclose(four[key], expect, rtol=1e-3, err_msg=f"{where} {key}")
    else:
      np.testing.assert_allclose(four[key], expect, atol=0.5, err_msg=f"{where} {key}")


def test_four_devices_train_like_one_device(tmp_path):
  """One epoch of the real loop, batches sharded over 4 devices against 1 device."""
  overrides = json.dumps({**TINY_OVERRIDES, "num_epochs": 1})
  commands = [([sys.executable, "-c", _TRAIN_SCRIPT, str(n), overrides, str(tmp_path / f"d{n}")],
               _cpu_env(n)) for n in (4, 1)]
  _run_together(commands, tmp_path)
  four, one = _records(tmp_path / "d4"), _records(tmp_path / "d1")
  assert [r["epoch"] for r in four] == [r["epoch"] for r in one] == [0]
  for key in ("kmeans_init_loss_view1", "kmeans_online_loss_view2", "train_loss_total", "miou"):
    assert key in one[0], key
  _assert_scores_agree(four[0], one[0], "metrics.jsonl")
  finals = [json.loads((tmp_path / d / "final.json").read_text())["fresh"] for d in ("d4", "d1")]
  _assert_scores_agree(*finals, "final.json fresh")


def kmeans_outputs(data, rows, whole, mesh):
  """Init, 6 Lloyd iterations and one mini-batch update on `data`, and Lloyd on its first 1003
  points (no mesh size divides 1003: lloyd pads). `rows(a)` places an array row-sharded,
  `whole(a)` replicated; the 1-device reference passes numpy through."""
  x, mask = rows(data["x"]), rows(data["mask"])
  init = km.init_centroids(jax.random.key(0), x, mask, 8)
  result = km.lloyd(x, mask, init, 6, mesh=mesh, chunk_size=64)
  state = km.MiniBatchState(result.centroids, result.counts.astype(jnp.float32))
  state, sq_sum, count = km.minibatch_update(state, rows(data["batch"]),
                                             rows(data["batch_mask"]), mesh=mesh, chunk_size=16)
  odd = km.lloyd(whole(data["x"][:1003]), whole(data["mask"][:1003]), init, 6, mesh=mesh,
                 chunk_size=64)
  return dict(init=init, centroids=result.centroids, assignments=result.assignments,
              loss=result.loss, counts=result.counts, mb_centroids=state.centroids,
              mb_counts=state.running_counts, mb_sq_sum=sq_sum, mb_count=count,
              odd_centroids=odd.centroids, odd_assignments=odd.assignments)


_MULTI_HOST_SCRIPT = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    address, process_id, data_path, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jax.distributed.initialize(address, num_processes=2, process_id=process_id,
                               initialization_timeout=120)
    sys.path.insert(0, "tests")
    from test_multidevice import kmeans_outputs
    from picie_jax import parallel
    mesh = parallel.make_mesh()
    assert (jax.process_count(), jax.local_device_count(), mesh.size) == (2, 2, 4)

    def rows(a):  # this process holds its half, as the input pipeline loads it
      half = len(a) // 2
      local = a[process_id * half:(process_id + 1) * half]
      out = jax.make_array_from_process_local_data(parallel.batch_sharded(mesh), local)
      assert not out.is_fully_addressable
      return out

    def whole(a):  # every process holds all rows: a global array replicated over 4 devices
      return jax.device_put(a, NamedSharding(mesh, P()))

    out = kmeans_outputs(dict(np.load(data_path)), rows, whole, mesh)
    out = {k: parallel.to_host(v) for k, v in out.items()}  # a collective: both processes call it
    if process_id == 0:
      np.savez(out_path, **out)
""")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _unchanged(a):
  return a


def test_kmeans_on_two_processes_matches_one_device(tmp_path):
  """Lloyd and a mini-batch update on global arrays assembled from per-process halves."""
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(1024, 16)).astype(np.float32),
          "mask": rng.uniform(size=1024) > 0.1,
          "batch": rng.normal(size=(200, 16)).astype(np.float32),
          "batch_mask": rng.uniform(size=200) > 0.2}
  np.savez(tmp_path / "data.npz", **data)
  address = f"127.0.0.1:{_free_port()}"
  out_path = tmp_path / "out.npz"
  _run_together([([sys.executable, "-c", _MULTI_HOST_SCRIPT, address, str(i),
                   str(tmp_path / "data.npz"), str(out_path)], _cpu_env(2)) for i in (0, 1)],
                tmp_path)
  got = dict(np.load(out_path))
  expect = jax.tree.map(np.asarray, kmeans_outputs(data, _unchanged, _unchanged,
                                                   km.data_mesh(jax.devices()[:1])))
  assert set(got) == set(expect)
  for key in ("init", "centroids", "mb_centroids", "odd_centroids"):
    np.testing.assert_allclose(got[key], expect[key], atol=1e-5, err_msg=key)
  for key in ("assignments", "counts", "mb_counts", "mb_count", "odd_assignments"):
    np.testing.assert_array_equal(got[key], expect[key], err_msg=key)
  for key in ("loss", "mb_sq_sum"):
    np.testing.assert_allclose(got[key], expect[key], rtol=1e-5, err_msg=key)
  assert got["odd_assignments"].shape == (1003,)
  assert int(got["mb_count"]) == int(data["batch_mask"].sum())
