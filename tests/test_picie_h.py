"""PiCIE + H (config.kmeans.k_overcluster): the overclustering's loss term against a float64
recomputation of one batch, and a tiny run end to end."""

import json

from conftest import TINY_OVERRIDES
import jax
import jax.numpy as jnp
import numpy as np

from configs import picie_h_synthetic
from picie_jax import clustering
from picie_jax import parallel
from picie_jax import rundir
from picie_jax import steps
from picie_jax import train
from picie_jax.core import transforms as T
from picie_jax.data import pipeline


def tiny_h_config(**overrides):
  config = picie_h_synthetic.get_config()
  config.update_from_flattened_dict({**TINY_OVERRIDES, "kmeans.k_overcluster": 12, **overrides})
  return config


def numpy_weighted_ce(z, y, mu, w, mask):
  """sum_i w[y_i] (-log softmax(<z_i, mu>)[y_i]) / sum_i w[y_i] over valid images, float64."""
  logits = z @ mu.T
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]
  pixel_w = w[y] * mask[:, None, None]
  return (pixel_w * nll).sum() / pixel_w.sum()


def test_overcluster_loss_term_matches_float64_recomputation():
  """Labels by nearest centroid of the frozen eval-mode features, train-mode features of both
  views (view 2 under G), cosine logits, weighted within + cross for each clustering; the
  total is the main term plus the overclustering's (equal weight)."""
  run = rundir.Run(tiny_h_config(), "/tmp/unused")
  state, targets = rundir.initial_state(run)
  rng = np.random.default_rng(0)

  def unit_rows(shape):
    x = rng.normal(size=shape)
    return jnp.asarray(x / np.linalg.norm(x, axis=-1, keepdims=True), jnp.float32)

  channels = run.step_config.feature_channels
  targets = targets.replace(
      centroids=unit_rows((2, run.k, channels)),
      weights=jnp.asarray(rng.uniform(0.5, 1.5, (2, run.k)), jnp.float32),
      overcluster_centroids=unit_rows((2, 12, channels)),
      overcluster_weights=jnp.asarray(rng.uniform(0.5, 1.5, (2, 12)), jnp.float32),
  )
  host_batch = next(pipeline.pass_batches(run.train_source, 4, run.config.res2))
  host_batch["mask"] = host_batch["mask"].copy()
  host_batch["mask"][-1] = False
  batch = parallel.shard_host_batch(host_batch, run.mesh)
  labels = steps.labels_for_batch(run.model, targets, batch, 0, run.augment_key, run.step_config)
  (total, (out, _)), _ = steps.loss_and_grads(
      run.model, state, targets, batch, labels, 0, run.augment_key, run.step_config
  )

  def features(train_phase, variables, train):
    (v1, v2), geo = steps.view_images(
        batch["image"], batch["index"], 0, run.augment_key, run.step_config, train_phase
    )
    feats, batch_stats = [], variables["batch_stats"]
    for view, images in enumerate((v1, v2)):
      z, updates = run.model.apply(
          {**variables, "batch_stats": batch_stats}, images, train=train, mutable=["batch_stats"]
      )
      batch_stats = updates["batch_stats"] if train else batch_stats
      if view == 1:
        z = T.apply_geometric(z, geo, z.shape[1])
      z = np.asarray(z, np.float64)
      feats.append(z / np.linalg.norm(z, axis=-1, keepdims=True))
    return feats

  frozen = features(False, targets.frozen, train=False)
  z = features(True, state.variables, train=True)
  mask = host_batch["mask"].astype(np.float64)
  expected = {}
  for name, mu_all, w_all in (
      ("", targets.centroids, targets.weights),
      ("overcluster_", targets.overcluster_centroids, targets.overcluster_weights),
  ):
    mu = [np.asarray(m, np.float64) for m in mu_all]
    w = [np.asarray(x, np.float64) for x in w_all]
    y = [np.argmax(f @ m.T, axis=-1) for f, m in zip(frozen, mu)]  # unit rows: nearest
    within = (
        numpy_weighted_ce(z[0], y[0], mu[0], w[0], mask)
        + numpy_weighted_ce(z[1], y[1], mu[1], w[1], mask)
    ) / 2
    cross = (
        numpy_weighted_ce(z[0], y[1], mu[1], w[1], mask)
        + numpy_weighted_ce(z[1], y[0], mu[0], w[0], mask)
    ) / 2
    expected.update(
        {f"{name}within": within, f"{name}cross": cross, f"{name}total": (within + cross) / 2}
    )
  for key in ("within", "cross", "overcluster_within", "overcluster_cross", "overcluster_total"):
    np.testing.assert_allclose(float(out[key]), expected[key], rtol=1e-4, err_msg=key)
  np.testing.assert_allclose(
      float(total), expected["total"] + expected["overcluster_total"], rtol=1e-4
  )


def test_picie_h_run_writes_both_clusterings(tmp_path):
  final = train.train_and_evaluate(tiny_h_config(num_epochs=1), str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    (record,) = [json.loads(line) for line in f]
  for key in (
      "kmeans_online_loss_view1",
      "kmeans_overcluster_online_loss_view2",
      "kmeans_overcluster_init_loss_view1",
      "train_loss_overcluster_within",
      "train_loss_overcluster_cross",
      "train_loss_total",
      "acc",
  ):
    assert np.isfinite(record[key]), key
  np.testing.assert_allclose(
      record["train_loss_total"],
      (record["train_loss_within"] + record["train_loss_cross"]) / 2
      + record["train_loss_overcluster_total"],
      rtol=1e-5,
  )
  assert 0 <= final["fresh"]["acc"] <= 100
  _, targets, _ = rundir.restore_latest(rundir.Run(tiny_h_config(), str(tmp_path)))
  assert targets.overcluster_centroids.shape == (2, 12, 16)
  weights = np.asarray(targets.overcluster_weights)
  np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)  # label frequencies


def test_one_pass_clusters_as_separate_passes_would():
  """The overclustering shares the main clustering's pass: its centroids are those of a
  k-means of K_H clusters alone over the same features (its own init subset and seeds), and
  the main centroids are those of the run without overclustering."""
  config = tiny_h_config(**{"kmeans.init_pixels_per_image": 20})
  run = rundir.Run(config, "/tmp/unused")
  state, _ = train.fresh_state(run)
  _, ((centroids, _), (over_centroids, _)) = train.cluster_phase(run, state, epoch=1)

  plain_run = rundir.Run(
      tiny_h_config(**{"kmeans.init_pixels_per_image": 20, "kmeans.k_overcluster": 0}),
      "/tmp/unused",
  )
  _, ((plain_centroids, _),) = train.cluster_phase(plain_run, state, epoch=1)
  np.testing.assert_array_equal(np.asarray(centroids), np.asarray(plain_centroids))

  over_key = jax.random.fold_in(
      jax.random.fold_in(run.keys[rundir.KMEANS_STREAM], 1), train.OVERCLUSTER_SEEDS
  )
  chains = [state.batch_stats, state.batch_stats]

  def features_fn(batch, for_init):
    nonlocal chains
    views, chains = steps.cluster_features(
        run.model,
        state.variables["params"],
        chains,
        batch,
        1,
        run.augment_key,
        step_config=run.step_config,
    )
    if for_init:
      views = clustering.init_subset(views, batch["index"], over_key, 20)
    return views

  alone, _ = clustering.minibatch_kmeans(
      parallel.prefetch_to_device(
          pipeline.train_batches(
              run.train_source,
              16,
              config.res2,
              seed=config.seed,
              epoch=1,
              stream=pipeline.CLUSTER_ORDER,
          ),
          run.mesh,
      ),
      features_fn,
      k=12,
      num_init_batches=config.kmeans.num_init_batches,
      iters=config.kmeans.iters,
      init=config.kmeans.init,
      keys=[jax.random.fold_in(over_key, view) for view in range(2)],
      mesh=run.mesh,
      chunk_size=config.kmeans.chunk_size,
  )
  assert over_centroids.shape == (2, 12, 16)
  np.testing.assert_allclose(np.asarray(over_centroids), np.stack(alone), rtol=1e-6, atol=1e-7)
