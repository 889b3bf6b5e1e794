"""The epoch loop end to end on a tiny synthetic config: outputs, labels, resume, NaN, CLI."""

import copy
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import types

from conftest import TINY_OVERRIDES
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picie_jax import checkpoint
from picie_jax import clustering
from picie_jax import config_check
from picie_jax import evaluate
from picie_jax import parallel
from picie_jax import rundir
from picie_jax import steps
from picie_jax import train
from picie_jax.core import kmeans as km
from picie_jax.core import transforms as T
from picie_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
  """An uninterrupted tiny 2-epoch run: (workdir, final); its outputs are references."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config()
  config.update_from_flattened_dict(TINY_OVERRIDES)
  workdir = tmp_path_factory.mktemp("finished")
  return workdir, train.train_and_evaluate(config, str(workdir))


def test_loop_writes_every_output(finished_run):
  tmp_path, final = finished_run
  records = _read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["epoch"] for r in records] == [0, 1]
  for key in (
      "kmeans_online_loss_view1",
      "kmeans_init_loss_view2",
      "train_loss_within",
      "train_loss_cross",
      "train_loss_total",
      "acc",
      "miou",
      "thing_miou",
  ):
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
  for name in (
      "vis/epoch001_segmentation.png",
      "vis/epoch001_confusion.png",
      "final_fresh_segmentation.png",
      "final_fresh_confusion.png",
  ):
    assert (tmp_path / name).stat().st_size > 0, name
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))


class _NoCheckpoints:
  """A Checkpointer stand-in for phase-level tests: nothing is written."""

  def save(self, tree, meta):
    del tree, meta

  def latest_path(self):
    return None


@pytest.fixture(scope="module")
def phases():
  """One tiny run's epoch 0 phases, shared: (run, initial state, cluster phase output, label
  phase output)."""
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config()
  config.update_from_flattened_dict(TINY_OVERRIDES)
  run = rundir.Run(config, "/tmp/unused")
  state, _ = train.fresh_state(run)
  start = jax.tree.map(jnp.copy, state)
  clustered, ((centroids, view_stats),) = train.cluster_phase(run, state, epoch=0)
  labelled = train.label_phase(run, clustered, centroids, epoch=0)
  return run, start, (clustered, centroids, view_stats), labelled


def _two_pass_cluster_reference(run, state, epoch):
  """The reference's cluster phase: one pass per view, BN running averages moving through
  view 1's batches then view 2's (a plain train-mode apply per view)."""
  cfg = run.config

  @functools.partial(jax.jit, static_argnames="view")
  def view_pass(batch_stats, batch, view):
    images, geo = steps.view_images(
        batch["image"], batch["index"], epoch, run.augment_key, run.step_config
    )
    z, updates = run.model.apply(
        {**state.variables, "batch_stats": batch_stats},
        images[view],
        train=True,
        mutable=["batch_stats"],
    )
    if view == 1:
      z = T.apply_geometric(z, geo, z.shape[1])
    return steps.flatten_with_mask(km.normalize_features(z), batch["mask"]), updates["batch_stats"]

  batch_stats, centroids, losses = state.batch_stats, [], []
  for view in range(2):

    def features_fn(host_batch, for_init, view=view):
      nonlocal batch_stats
      points, batch_stats = view_pass(
          batch_stats, parallel.shard_host_batch(host_batch, run.mesh), view=view
      )
      return [points]

    mu, stats = clustering.minibatch_kmeans(
        # the epoch's cluster order, as the reference's reshuffled dataset
        pipeline.make_batches(
            run.train_source,
            pipeline.epoch_order(
                run.train_source.num_examples, cfg.seed, epoch, pipeline.CLUSTER_ORDER
            ).reshape(-1, cfg.kmeans.batch_size),
            cfg.res2,
        ),
        features_fn,
        k=run.k,
        num_init_batches=cfg.kmeans.num_init_batches,
        iters=cfg.kmeans.iters,
        init=cfg.kmeans.init,
        keys=[jax.random.fold_in(jax.random.fold_in(run.keys[rundir.KMEANS_STREAM], epoch), view)],
        mesh=run.mesh,
        chunk_size=cfg.kmeans.chunk_size,
    )
    centroids.append(mu[0])
    losses.append((stats[0]["init_loss"], stats[0]["online_loss"]))
  return batch_stats, np.stack(centroids), losses


def test_one_cluster_pass_equals_the_reference_two_passes(phases):
  """Centroids, k-means losses and the final BN running averages (m^N chain combination)."""
  run, start, (state, centroids, view_stats), (_, (counts,), _) = phases
  stats = rundir.ClusterStats.of(view_stats, counts).record()  # the metrics row's fields
  batch_stats, expect_centroids, expect_losses = _two_pass_cluster_reference(run, start, 0)
  np.testing.assert_allclose(centroids, expect_centroids, rtol=1e-5, atol=1e-6)
  for view, (init_loss, online_loss) in enumerate(expect_losses):
    np.testing.assert_allclose(stats[f"kmeans_init_loss_view{view + 1}"], init_loss, rtol=1e-5)
    np.testing.assert_allclose(stats[f"kmeans_online_loss_view{view + 1}"], online_loss, rtol=1e-5)
  moved = 0
  for got, want, before in zip(
      jax.tree.leaves(state.batch_stats),
      jax.tree.leaves(batch_stats),
      jax.tree.leaves(start.batch_stats),
  ):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    moved += not np.allclose(want, before)
  assert moved == len(jax.tree.leaves(batch_stats))  # every running average moved
  c = run.config
  assert stats["kmeans_init_buffer_bytes"] == clustering.init_buffer_bytes(
      num_sets=2,
      num_init_batches=c.kmeans.num_init_batches,
      batch_size=c.kmeans.batch_size,
      points_per_image=(c.res1 // 4) ** 2,
      channels=c.model.fpn_channels,
      dtype=jnp.float32,
      num_devices=1,
  )  # all devices together


def test_cached_labels_train_as_recomputed_labels(phases):
  """One epoch of train_phase fed by the label cache equals the train step recomputing them;
  a resume's label pass from the targets rebuilds the cache exactly."""
  run, _, (state, _, _), (targets, _, cache) = phases
  np.testing.assert_array_equal(train.resumed_labels(run, targets, 0), cache)
  recompute = copy.copy(run)
  recompute.step_config = run.step_config._replace(cached_labels=False)
  results = [
      train.train_phase(
          r,
          jax.tree.map(jnp.copy, state),
          targets,
          labels,
          0,
          _NoCheckpoints(),
          rundir.CheckpointMeta(epoch=0, next_batch=0),
      )
      for r, labels in ((run, cache), (recompute, None))
  ]
  (cached_state, cached_sums, _), (recomputed_state, recomputed_sums, _) = results
  assert cached_sums["batches"] == recomputed_sums["batches"] == 3
  for key in ("total", "within", "cross"):
    np.testing.assert_allclose(cached_sums[key], recomputed_sums[key], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(cached_state.params), jax.tree.leaves(recomputed_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_init_buffer_too_large_fails_before_the_first_batch(phases, monkeypatch):
  run, start, _, _ = phases
  monkeypatch.setattr(clustering, "device_memory_bytes", lambda mesh: (10_000, "test limit"))
  monkeypatch.setattr(steps, "cluster_features", lambda *a, **k: pytest.fail("a batch was read"))
  with pytest.raises(MemoryError) as e:
    train.cluster_phase(run, start, epoch=0)
  for field in (
      "config.kmeans.init_pixels_per_image",
      "config.kmeans.buffer_dtype",
      "config.kmeans.num_init_batches",
      "config.kmeans.batch_size",
  ):
    assert field in str(e.value)


def test_fresh_cluster_buffer_is_checked_and_subsampled(phases, monkeypatch):
  """The final evaluation's fresh k-means guards and subsamples its init buffer as the cluster
  phase does (one view, un-augmented eval-mode features)."""
  run, start, _, _ = phases
  variables = start.variables
  key = jax.random.PRNGKey(0)

  def fresh(config):
    return evaluate.fresh_centroids(
        run.model,
        variables,
        run.train_source,
        config,
        run.mesh,
        run.step_config,
        4,
        key,
        progress=False,
    )

  with monkeypatch.context() as patch:
    patch.setattr(clustering, "device_memory_bytes", lambda mesh: (10_000, "test limit"))
    patch.setattr(steps, "fresh_features", lambda *a, **k: pytest.fail("a batch was read"))
    with pytest.raises(MemoryError, match=r"config\.kmeans\.init_pixels_per_image"):
      fresh(run.config)
  config = copy.deepcopy(run.config)
  config.kmeans.init_pixels_per_image = 5
  side = config.res1 // run.step_config.feature_stride
  whole, subsampled = fresh(run.config)[1], fresh(config)[1]
  bytes_at = functools.partial(
      clustering.init_buffer_bytes,
      num_sets=1,
      num_init_batches=config.kmeans.num_init_batches,
      batch_size=config.kmeans.batch_size,
      channels=config.model.fpn_channels,
      dtype=jnp.float32,
      num_devices=jax.device_count(),
  )
  assert whole["init_buffer_bytes"] == bytes_at(points_per_image=side * side)
  assert subsampled["init_buffer_bytes"] == bytes_at(points_per_image=5)
  assert np.isfinite(subsampled["init_loss"]) and subsampled["init_loss"] != whole["init_loss"]


def test_sample_pixels_keeps_a_fixed_subset_per_image():
  """Each image keeps `per_image` distinct rows of its own, drawn from its index alone."""
  hw, channels = 12, 2
  indices = jnp.array([7, 3, 9])
  image_of_row = jnp.repeat(indices, hw)
  points = jnp.stack([image_of_row, jnp.tile(jnp.arange(hw), 3)], axis=1).astype(jnp.float32)
  mask = jnp.repeat(jnp.array([True, True, False]), hw)
  key = jax.random.PRNGKey(5)
  sampled, sampled_mask = clustering.sample_pixels(points, mask, indices, key, 4)
  assert sampled.shape == (3 * 4, channels)
  np.testing.assert_array_equal(sampled[:, 0], np.repeat(indices, 4))
  np.testing.assert_array_equal(sampled_mask, np.repeat([True, True, False], 4))
  for image in range(3):
    assert len(set(np.asarray(sampled[4 * image : 4 * image + 4, 1]).tolist())) == 4
  first_two_swapped = jnp.concatenate([points[hw : 2 * hw], points[:hw], points[2 * hw :]])
  swapped, _ = clustering.sample_pixels(
      first_two_swapped, mask, indices[jnp.array([1, 0, 2])], key, 4
  )
  np.testing.assert_array_equal(swapped[:4], sampled[4:8])  # image 3's subset, wherever it is


def test_counting_pass_counts_the_labels_the_train_step_uses(phases):
  """Label counts (balance weights) and the label cache against labels recomputed
  independently: a plain eval-mode apply of the frozen model and a float64 numpy
  nearest-centroid search."""
  run, _, (_, centroids, _), (targets, (counts,), cache) = phases
  tiny_config = run.config
  expect, expect_labels = np.zeros_like(counts), {}
  for host_batch in pipeline.pass_batches(run.train_source, 16, tiny_config.res2):
    (v1, v2), geo = steps.view_images(
        jnp.asarray(host_batch["image"]),
        jnp.asarray(host_batch["index"]),
        0,
        run.augment_key,
        run.step_config,
    )
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
      for index, image_labels in zip(host_batch["index"][host_batch["mask"]], labels):
        expect_labels.setdefault(int(index), {})[view] = image_labels
      expect[view] += np.bincount(labels.ravel(), minlength=run.k)
  np.testing.assert_array_equal(counts, expect)
  np.testing.assert_allclose(targets.weights, expect / expect.sum(1, keepdims=True), rtol=1e-6)
  # The cache feeds each train batch, in the train pass's own order, its images' labels.
  batches = pipeline.train_batches(
      run.train_source,
      tiny_config.train.batch_size,
      tiny_config.res2,
      seed=tiny_config.seed,
      epoch=0,
  )
  fed = 0
  for batch in train._with_cached_labels(batches, cache, tiny_config.train.batch_size, 0):
    for index, labels in zip(batch["index"][batch["mask"]], batch["labels"][batch["mask"]]):
      for view in (0, 1):
        np.testing.assert_array_equal(labels[view], expect_labels[int(index)][view])
      fed += 1
  assert fed == run.train_source.num_examples


def test_each_host_labels_exactly_the_examples_it_trains_on(phases):
  """Label-pass order per host against the train batches each host is fed (2 and 4 hosts)."""
  run = phases[0]
  config = run.config
  for num_hosts in (2, 4):
    seen = []
    for host_id in range(num_hosts):
      hosts = {"num_hosts": num_hosts, "host_id": host_id}
      host_run = types.SimpleNamespace(config=config, hosts=hosts, train_source=run.train_source)
      order = train._host_label_order(host_run, 3)
      assert order.shape[1] == config.kmeans.batch_size // num_hosts
      trained = pipeline.epoch_batch_indices(
          run.train_source.num_examples,
          config.train.batch_size,
          config.seed,
          3,
          pipeline.TRAIN_ORDER,
          **hosts,
      )
      np.testing.assert_array_equal(order.reshape(-1)[: trained.size], trained.reshape(-1))
      assert np.all(order.reshape(-1)[trained.size :] == -1)
      seen.extend(i for i in trained.reshape(-1) if i >= 0)
    assert sorted(seen) == list(range(run.train_source.num_examples))


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
  return [
      sys.executable,
      "-m",
      "picie_jax.main",
      *args,
      f"--config={os.path.join(ROOT, 'configs', 'synthetic.py')}",
      *overrides,
      f"--workdir={workdir}",
  ]


def test_cli_rejects_a_mistyped_field(tmp_path):
  cmd = [
      sys.executable,
      "-m",
      "picie_jax.main",
      "train",
      "--config=configs/synthetic.py",
      "--config.train.lrr=0.1",
      f"--workdir={tmp_path}",
  ]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "lrr" in out.stderr


def _latest_meta(workdir):
  ckpts = os.path.join(workdir, "checkpoints")
  steps_done = (
      sorted(int(s) for s in os.listdir(ckpts) if s.isdigit()) if os.path.isdir(ckpts) else []
  )
  for step in reversed(steps_done):
    meta = os.path.join(ckpts, str(step), "meta", "metadata")
    if os.path.exists(meta):
      with open(meta) as f:
        return json.load(f)
  return None


def _strip_timing(records):
  return [{k: v for k, v in r.items() if k != "train_images_per_s"} for r in records]


def _wait_for_checkpoint(proc, workdir, epoch, min_next_batch):
  """Polls until a checkpoint of `epoch` at train batch >= min_next_batch exists."""
  deadline = time.time() + 600
  while time.time() < deadline:
    meta = _latest_meta(workdir)
    if (
        meta
        and meta["epoch"] == epoch
        and meta.get("next_batch") is not None
        and (meta["next_batch"] >= min_next_batch)
    ):
      return
    assert proc.poll() is None, "the run ended before it could be stopped"
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint of epoch {epoch} in {workdir}")


def test_sigterm_then_double_sigint_then_resume_matches_uninterrupted_run(finished_run, tmp_path):
  """Also the CLI test: train, stop, train again (resumes), then `eval` the finished run.

  SIGTERM as epoch 0's train phase starts must exit 143 with the stop line (at once when no step
  finished since the last checkpoint, else after saving: test_faults.py makes each happen);
  two SIGINTs in epoch 1 exit at once (130) with no save, like a kill. The workdir is a
  relative path, as a user types it.
  """
  clean, killed = finished_run[0], tmp_path / "killed"
  command = _cli("train", workdir="killed")

  def stop(epoch, min_next_batch, *signals):
    """Starts the run, sends `signals` once it is past that checkpoint; (exit code, stderr)."""
    with open(tmp_path / "stderr.txt", "w+") as stderr:
      proc = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
      try:
        _wait_for_checkpoint(proc, killed, epoch, min_next_batch)
        for signum in signals:
          proc.send_signal(signum)
          time.sleep(0.1)
        proc.wait(timeout=300 if len(signals) == 1 else 30)
      finally:
        proc.kill()  # when the test failed before the run ended
      stderr.seek(0)
      return proc.returncode, stderr.read()

  code, stderr = stop(0, 0, signal.SIGTERM)
  assert code == 143, stderr
  assert "Traceback" not in stderr
  line = stderr.strip().splitlines()[-1]
  assert line.startswith("picie-jax: stopped by SIGTERM "), line
  assert line.endswith("; resume with: picie-jax " + shlex.join(command[3:])), line
  assert _latest_meta(killed)["epoch"] == 0
  assert not (killed / "train.lock").exists()

  code, stderr = stop(1, 1, signal.SIGINT, signal.SIGINT)
  assert code == 130, stderr
  # The first SIGINT exits at once too when it lands before the next step finished.
  assert "second SIGINT: exiting now" in stderr or "nothing to save" in stderr, stderr
  assert not (killed / "final.json").exists()

  out = subprocess.run(
      _cli("train", workdir="killed"),
      cwd=tmp_path,
      check=True,
      timeout=600,
      capture_output=True,
      text=True,
  )
  assert "resuming from" in out.stdout + out.stderr
  assert _strip_timing(_read_jsonl(killed / "metrics.jsonl")) == _strip_timing(
      _read_jsonl(clean / "metrics.jsonl")
  )
  with open(clean / "final.json") as a, open(killed / "final.json") as b:
    assert json.load(a) == json.load(b)

  out = subprocess.run(
      [sys.executable, "-m", "picie_jax.main", "eval", f"--workdir={killed}", "--overcluster_k=12"],
      cwd=ROOT,
      check=True,
      timeout=600,
      capture_output=True,
      text=True,
  )
  with open(killed / "eval.json") as f:
    evaluated = json.load(f)
  assert set(evaluated) == {"epoch_clusters", "fresh", "overcluster"}
  assert evaluated["overcluster"]["k"] == 12
  assert "fresh (K=8)" in out.stdout


def _corrupt(checkpoint_dir):
  for dirpath, _, files in os.walk(checkpoint_dir / "tree"):
    for f in files:
      with open(os.path.join(dirpath, f), "wb") as fh:
        fh.write(b"garbage")


def test_corrupt_latest_checkpoint_falls_back_to_previous(tiny_config, tmp_path, caplog, capsys):
  """Runs MDC with the parametric classifier (one view, learned 1x1 conv) to get checkpoints.

  The resumed run must name the checkpoint it used, keep it through the next save's garbage
  collection (max_to_keep=2), and stop with an error when no checkpoint is readable.
  """
  tiny_config.num_epochs = 1
  tiny_config.method = "mdc"
  tiny_config.train.classifier = "parametric"
  tiny_config.train.cross_view_loss = False
  train.train_and_evaluate(tiny_config, str(tmp_path))
  ckpts = tmp_path / "checkpoints"
  latest = max(int(s) for s in os.listdir(ckpts) if s.isdigit())
  _corrupt(ckpts / str(latest))
  run = rundir.Run(tiny_config, str(tmp_path))
  state, targets = rundir.initial_state(run)
  restored = checkpoint.Checkpointer(str(ckpts)).restore_latest(
      {"state": state, "targets": targets}
  )
  assert restored is not None
  assert restored[1]["epoch"] == 0  # the save before the end of epoch 0
  epoch_start_classifier = train._new_classifier(run, state, epoch=0).classifier
  assert restored[0]["state"].classifier.shape == (1, 8, 17)
  assert not np.allclose(restored[0]["state"].classifier, epoch_start_classifier)  # trained
  assert f"checkpoints/{latest} is unreadable" in caplog.text
  assert sorted(os.listdir(ckpts)) == [str(latest - 1)]
  (moved,) = os.listdir(tmp_path / checkpoint.CORRUPT_DIR)
  assert moved.startswith(f"{latest}-")

  _corrupt(tmp_path / checkpoint.CORRUPT_DIR / moved)  # put it back, as before the fallback
  os.rename(tmp_path / checkpoint.CORRUPT_DIR / moved, ckpts / str(latest))
  rows = _read_jsonl(tmp_path / "metrics.jsonl")
  capsys.readouterr()
  train.train_and_evaluate(tiny_config, str(tmp_path))  # resumes from latest - 1
  assert f"resuming from {ckpts}/{latest - 1}: epoch 0, train batch 2" in capsys.readouterr().out
  kept = sorted(int(s) for s in os.listdir(ckpts) if s.isdigit())
  assert kept == [latest - 1, latest]  # the good one survived the save's garbage collection
  caplog.clear()
  assert (
      checkpoint.Checkpointer(str(ckpts)).restore_latest({"state": state, "targets": targets})[1][
          "epoch"
      ]
      == 1
  )
  assert "unreadable" not in caplog.text
  assert _strip_timing(_read_jsonl(tmp_path / "metrics.jsonl")) == _strip_timing(rows)

  for step in kept:
    _corrupt(ckpts / str(step))
  with pytest.raises(checkpoint.UnreadableCheckpoints, match=f"no checkpoint in {ckpts} is"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert _strip_timing(_read_jsonl(tmp_path / "metrics.jsonl")) == _strip_timing(rows)


def test_init_checkpoint_loads_and_rejects_a_different_model(tiny_config, tmp_path):
  run = rundir.Run(tiny_config, str(tmp_path))
  state, _ = train.fresh_state(run)
  variables = {
      "params": jax.tree.map(lambda x: x + 1.0, state.variables["params"]),
      "batch_stats": state.batch_stats,
  }
  path = tmp_path / "init.msgpack"
  path.write_bytes(flax.serialization.msgpack_serialize(jax.device_get(variables)))
  tiny_config.model.init = "checkpoint"
  tiny_config.model.init_checkpoint = str(path)
  loaded, _ = train.fresh_state(rundir.Run(tiny_config, str(tmp_path)))
  for a, b in zip(
      jax.tree.leaves(loaded.variables["params"]), jax.tree.leaves(variables["params"])
  ):
    np.testing.assert_array_equal(a, b)
  tiny_config.model.fpn_channels = 8
  with pytest.raises(ValueError, match="init_checkpoint.*does not fit config.model"):
    train.fresh_state(rundir.Run(tiny_config, str(tmp_path)))


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


def test_failed_evaluation_keeps_the_epoch_and_raising_num_epochs_continues(
    finished_run, tiny_config, tmp_path, monkeypatch
):
  """1 epoch; then num_epochs=2 with epoch 1's evaluation failing; then a plain rerun: the
  outputs must equal the uninterrupted 2-epoch run's. Lowering num_epochs is refused."""
  reference = finished_run[0]
  tiny_config.num_epochs = 1
  train.train_and_evaluate(tiny_config, str(tmp_path))
  tiny_config.num_epochs = 2
  real_evaluate = evaluate.evaluate

  def failing_evaluate(*args, vis_prefix, **kwargs):
    if vis_prefix.endswith("epoch001"):
      raise RuntimeError("evaluation failed")
    return real_evaluate(*args, vis_prefix=vis_prefix, **kwargs)

  monkeypatch.setattr(evaluate, "evaluate", failing_evaluate)
  with pytest.raises(RuntimeError, match="evaluation failed"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert _latest_meta(tmp_path)["epoch"] == 2  # epoch 1's training was saved
  assert [r["epoch"] for r in _read_jsonl(tmp_path / "metrics.jsonl")] == [0]
  monkeypatch.setattr(evaluate, "evaluate", real_evaluate)
  final = train.train_and_evaluate(tiny_config, str(tmp_path))  # evaluates epoch 1, then final
  assert _strip_timing(_read_jsonl(tmp_path / "metrics.jsonl")) == _strip_timing(
      _read_jsonl(reference / "metrics.jsonl")
  )
  assert final == finished_run[1]
  with open(reference / "matching.json") as a, open(tmp_path / "matching.json") as b:
    assert json.load(a) == json.load(b)
  tiny_config.num_epochs = 1
  with pytest.raises(ValueError, match="is 2 epochs into the run; config.num_epochs=1 is fewer"):
    train.train_and_evaluate(tiny_config, str(tmp_path))


def test_label_counts_summed_on_device_never_overflow_int32():
  """Per-batch int32 counts up to the bound summed past 2**31: the host totals are exact."""
  counts = parallel.DeviceCounts([(1, 2)], counts_per_batch=2**29 + 1)
  assert counts.batches_per_flush == 3
  for batch in range(7):
    counts.add([jnp.array([[2**29, batch]], jnp.int32)])
  (total,) = counts.to_host()
  assert total.dtype == np.int64
  np.testing.assert_array_equal(total, [[7 * 2**29, sum(range(7))]])


@pytest.mark.parametrize("reference_quirks", [False, True])
def test_views_share_the_kmeans_init_seed_only_under_reference_quirks(
    reference_quirks, tiny_config, monkeypatch
):
  """The official code seeds both views' k-means alike: under reference_quirks the views' inits
  get one key, and one key draws the same buffer rows whatever the points are."""
  tiny_config.augment.reference_quirks = reference_quirks
  run = rundir.Run(tiny_config, "/tmp/unused")
  state, _ = train.fresh_state(run)
  keys, real_init = [], km.random_init_from_batches

  def recording_init(key, points, valid, k, *, mesh):
    keys.append(np.asarray(jax.random.key_data(key)))
    return real_init(key, points, valid, k, mesh=mesh)

  monkeypatch.setattr(km, "random_init_from_batches", recording_init)
  train.cluster_phase(run, state, epoch=0)
  assert len(keys) == 2
  assert np.array_equal(keys[0], keys[1]) == reference_quirks

  points = jax.random.normal(jax.random.PRNGKey(3), (2, 10, 4))
  valid = jnp.arange(20).reshape(2, 10) % 3 > 0
  rows = real_init(jax.random.PRNGKey(5), points, valid, 4, mesh=run.mesh)
  doubled = real_init(jax.random.PRNGKey(5), 2 * points, valid, 4, mesh=run.mesh)
  np.testing.assert_allclose(np.asarray(doubled), 2 * np.asarray(rows), rtol=1e-6)
