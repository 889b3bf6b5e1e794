"""The epoch loop end to end on a tiny synthetic config: outputs, labels, resume, NaN, CLI."""
import json
import os
import signal
import subprocess
import sys
import time

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_OVERRIDES
from picie_jax import checkpoint
from picie_jax import config_check
from picie_jax import steps
from picie_jax import train
from picie_jax.core import transforms as T
from picie_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def test_loop_writes_every_output(tiny_config, tmp_path):
  final = train.train_and_evaluate(tiny_config, str(tmp_path))
  records = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["epoch"] for r in records] == [0, 1]
  for key in ("kmeans_online_loss_view1", "kmeans_init_loss_view2", "train_loss_within",
              "train_loss_cross", "train_loss_total", "acc", "miou", "thing_miou"):
    assert np.isfinite(records[-1][key]), key
  assert records[-1]["step"] == 2 * 3  # 48 images / batch 16, two epochs
  assert set(final) == {"fresh"} and 0 <= final["fresh"]["acc"] <= 100
  with open(tmp_path / "final.json") as f:
    assert json.load(f)["fresh"]["acc"] == final["fresh"]["acc"]
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["res1"] == 32
  with open(tmp_path / "matching.json") as f:
    matching = json.load(f)
  assert matching["epoch"] == 1 and sorted(matching["cluster_to_class"]) == list(range(8))
  for name in ("vis/epoch001_segmentation.png", "vis/epoch001_confusion.png",
               "final_fresh_segmentation.png", "final_fresh_confusion.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


def test_counting_pass_counts_the_labels_the_train_step_uses(tiny_config):
  """Label counts (balance weights) against labels recomputed independently: a plain
  eval-mode apply of the frozen model and a float64 numpy nearest-centroid search."""
  run = train.Run(tiny_config, "/tmp/unused")
  state, _ = train.initial_state(run)
  state, centroids, _ = train.cluster_phase(run, state, epoch=0)
  targets, counts, cache = train.label_phase(run, state, centroids, epoch=0)
  expect = np.zeros_like(counts)
  for host_batch in pipeline.pass_batches(run.train_source, 16, tiny_config.res2):
    (v1, v2), geo = steps.view_images(jnp.asarray(host_batch["image"]),
                                      jnp.asarray(host_batch["index"]), 0, run.augment_key,
                                      run.method)
    variables = targets.frozen
    z1 = run.model.apply(variables, v1, train=False)
    z2 = run.model.apply(variables, v2, train=False)
    z2 = T.apply_geometric(z2, geo, z2.shape[1])
    for view, z in enumerate((z1, z2)):
      z = np.asarray(z, np.float64)
      z /= np.linalg.norm(z, axis=-1, keepdims=True)
      mu = np.asarray(centroids[view], np.float64)
      labels = np.argmin(((z[..., None, :] - mu) ** 2).sum(-1), axis=-1)
      labels = labels[host_batch["mask"]]
      np.testing.assert_array_equal(cache[host_batch["index"][host_batch["mask"]], view], labels)
      expect[view] += np.bincount(labels.ravel(), minlength=run.k)
  np.testing.assert_array_equal(counts, expect)
  np.testing.assert_allclose(targets.weights, expect / expect.sum(1, keepdims=True), rtol=1e-6)


def test_nan_loss_stops_with_step_and_checkpoint(tiny_config, tmp_path, monkeypatch):
  real_step = steps.train_step

  def nan_step(*args, **kwargs):
    state, out = real_step(*args, **kwargs)
    return state, {**out, "total": jnp.float32(jnp.nan)}

  monkeypatch.setattr(steps, "train_step", nan_step)
  with pytest.raises(FloatingPointError, match=r"train step 1 .*checkpoints/1"):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_config_errors_name_the_key(tiny_config):
  tiny_config.kmeans.metric = "cos"
  tiny_config.augment.hflip_p = 1.5
  with pytest.raises(ValueError) as e:
    config_check.validate(tiny_config)
  assert "config.kmeans.metric='cos'" in str(e.value)
  assert "config.augment.hflip_p=1.5" in str(e.value)


def _cli(*args, workdir):
  overrides = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]
  return [sys.executable, "-m", "picie_jax.main", *args,
          f"--config={os.path.join(ROOT, 'configs', 'synthetic.py')}", *overrides,
          f"--workdir={workdir}"]


def test_cli_rejects_a_mistyped_field(tmp_path):
  cmd = [sys.executable, "-m", "picie_jax.main", "train", "--config=configs/synthetic.py",
         "--config.train.lrr=0.1", f"--workdir={tmp_path}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "lrr" in out.stderr


def _latest_meta(workdir):
  ckpts = os.path.join(workdir, "checkpoints")
  steps_done = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if os.path.isdir(
      ckpts) else []
  for step in reversed(steps_done):
    meta = os.path.join(ckpts, str(step), "meta", "metadata")
    if os.path.exists(meta):
      with open(meta) as f:
        return json.load(f)
  return None


def _strip_timing(records):
  return [{k: v for k, v in r.items() if k != "train_images_per_s"} for r in records]


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
  """Also the CLI test: train, kill, train again (resumes), then `eval` the finished run.

  Workdirs are relative paths, as a user types them.
  """
  clean, killed = tmp_path / "clean", tmp_path / "killed"
  subprocess.run(_cli("train", workdir="clean"), cwd=tmp_path, check=True, timeout=600,
                 capture_output=True)

  proc = subprocess.Popen(_cli("train", workdir="killed"), cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:
    meta = _latest_meta(killed)
    if meta and meta["epoch"] == 1 and (meta.get("next_batch") or 0) >= 1:
      break  # epoch 1 is mid-training: past its cluster phase and its first batch
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "final.json").exists()

  out = subprocess.run(_cli("train", workdir="killed"), cwd=tmp_path, check=True, timeout=600,
                       capture_output=True, text=True)
  assert "resuming from" in out.stdout + out.stderr
  assert _strip_timing(_read_jsonl(killed / "metrics.jsonl")) == _strip_timing(
      _read_jsonl(clean / "metrics.jsonl"))
  with open(clean / "final.json") as a, open(killed / "final.json") as b:
    assert json.load(a) == json.load(b)

  out = subprocess.run([sys.executable, "-m", "picie_jax.main", "eval", f"--workdir={killed}",
                        "--overcluster_k=12"], cwd=ROOT, check=True, timeout=600,
                       capture_output=True, text=True)
  with open(killed / "eval.json") as f:
    evaluated = json.load(f)
  assert set(evaluated) == {"epoch_clusters", "fresh", "overcluster"}
  assert evaluated["overcluster"]["k"] == 12
  assert "fresh (K=8)" in out.stdout


def test_corrupt_latest_checkpoint_falls_back_to_previous(tiny_config, tmp_path, caplog):
  """Runs MDC with the parametric classifier (one view, learned 1x1 conv) to get checkpoints."""
  tiny_config.num_epochs = 1
  tiny_config.method = "mdc"
  tiny_config.train.classifier = "parametric"
  tiny_config.train.cross_view_loss = False
  train.train_and_evaluate(tiny_config, str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  latest = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
  for dirpath, _, files in os.walk(ckpts / str(latest) / "tree"):
    for f in files:
      with open(os.path.join(dirpath, f), "wb") as fh:
        fh.write(b"garbage")
  run = train.Run(tiny_config, str(tmp_path))
  state, targets = train.initial_state(run)
  restored = checkpoint.Checkpointer(str(ckpts)).restore_latest(
      {"state": state, "targets": targets})
  assert restored is not None
  assert restored[1]["epoch"] == 0  # the save before the end of epoch 0
  epoch_start_classifier = train._new_classifier(run, state, epoch=0).classifier
  assert restored[0]["state"].classifier.shape == (1, 8, 17)
  assert not np.allclose(restored[0]["state"].classifier, epoch_start_classifier)  # trained
  assert f"checkpoints/{latest} is unreadable" in caplog.text


def test_init_checkpoint_loads_and_rejects_a_different_model(tiny_config, tmp_path):
  run = train.Run(tiny_config, str(tmp_path))
  state, _ = train.initial_state(run)
  variables = {"params": jax.tree.map(lambda x: x + 1.0, state.params),
               "batch_stats": state.batch_stats}
  path = tmp_path / "init.msgpack"
  path.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(variables)))
  tiny_config.model.init = "checkpoint"
  tiny_config.model.init_checkpoint = str(path)
  loaded, _ = train.initial_state(train.Run(tiny_config, str(tmp_path)))
  for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(variables["params"])):
    np.testing.assert_array_equal(a, b)
  tiny_config.model.fpn_channels = 8
  with pytest.raises(ValueError, match="init_checkpoint.*does not fit config.model"):
    train.initial_state(train.Run(tiny_config, str(tmp_path)))


def test_resuming_with_a_different_config_is_refused(tiny_config, tmp_path):
  tiny_config.num_epochs = 0
  tiny_config.method = "pixel_kmeans"
  tiny_config.kmeans.metric = "l2"
  train.train_and_evaluate(tiny_config, str(tmp_path))
  os.makedirs(tmp_path / "checkpoints", exist_ok=True)  # as after a first save
  tiny_config.progress = True  # display-only fields may change
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.kmeans.k_train = 5
  with pytest.raises(ValueError, match=r"config.kmeans.k_train: 8 -> 5"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
