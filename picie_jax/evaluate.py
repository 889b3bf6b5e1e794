"""Evaluation (DESIGN §1): confusion histogram over the validation split, cluster matching,
Acc / mIoU (thing/stuff where the dataset defines them), fresh clusters and overclustering."""

import os

import jax
import numpy as np

from picie_jax import clustering
from picie_jax import parallel
from picie_jax import reporting
from picie_jax import steps
from picie_jax import visualize
from picie_jax.core import metrics
from picie_jax.data import pipeline


def evaluate(
    model,
    variables,
    classifier_kc1,
    source,
    config,
    mesh,
    method,
    *,
    many_to_one=False,
    vis_prefix=None,
    progress=True,
):
  """Scores the classifier's predictions on `source` (a labelled split).

  `classifier_kc1`: (K, C+1) weights (see steps.classifier_from_centroids). Matching is
  Hungarian (one-to-one) or, with `many_to_one`, majority (overclustering). With `vis_prefix`,
  writes `<prefix>_segmentation.png` (image | ground truth | prediction for the first
  eval.num_vis images) and `<prefix>_confusion.png`. Returns (scores dict, histogram); the
  scores include the matching, `cluster_to_class` (class id per cluster, -1 if unmatched).
  """
  if not source.has_labels:
    raise ValueError(f"{source.name} has no labels to evaluate against")
  num_true = source.num_classes
  k = classifier_kc1.shape[0]
  hist = np.zeros((num_true, k), np.int64)
  classifier = parallel.replicate(classifier_kc1, mesh)
  vis = {"image": [], "label": [], "pred": []}
  batches = pipeline.pass_batches(
      source,
      config.eval.batch_size,
      config.eval.res,
      with_labels=True,
      num_hosts=jax.process_count(),
      host_id=jax.process_index(),
  )
  bar = reporting.Progress(
      "eval",
      pipeline.num_batches(source.num_examples, config.eval.batch_size),
      config.eval.batch_size,
      enabled=progress,
  )
  for host_batch in batches:
    batch = parallel.shard_host_batch(host_batch, mesh)
    pred, batch_hist = steps.eval_step(
        model, variables, classifier, batch, method=method, num_true=num_true
    )
    hist += parallel.to_host(batch_hist).astype(np.int64)
    wanted = config.eval.num_vis - len(vis["image"])
    if vis_prefix and wanted > 0:
      keep = host_batch["mask"][:wanted]
      vis["image"] += list(host_batch["image"][:wanted][keep])
      vis["label"] += list(host_batch["label"][:wanted][keep])
      vis["pred"] += list(parallel.local_rows(pred)[:wanted][keep])
    bar.update(1)
  bar.close()
  mapping = metrics.majority_match(hist) if many_to_one else metrics.hungarian_match(hist)
  scores = metrics.segmentation_scores(
      hist, mapping, class_names=source.class_names or None, thing_classes=source.thing_classes
  )
  scores["cluster_to_class"] = mapping.tolist()
  if vis_prefix and reporting.is_main_process():
    _write_pictures(vis_prefix, vis, mapping, hist, source)
  return scores, hist


def _write_pictures(prefix, vis, mapping, hist, source):
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  if vis["image"]:
    matched = [np.where(p >= 0, np.asarray(mapping)[p], -1) for p in vis["pred"]]
    panel = visualize.segmentation_panel(
        np.stack(vis["image"]),
        np.stack(vis["label"]),
        np.stack(matched),
        source.num_classes,
        class_names=source.class_names or None,
    )
    visualize.save_png(f"{prefix}_segmentation.png", panel)
  matched_hist = metrics.remap_histogram(hist, mapping, source.num_classes)
  visualize.save_png(
      f"{prefix}_confusion.png",
      visualize.confusion_matrix_image(matched_hist, source.class_names or None),
  )


def fresh_centroids(model, variables, source, config, mesh, method, k, key, progress=True):
  """k-means with `k` clusters on un-augmented eval-mode features of `source` (fresh clusters).

  Its init buffer is checked, subsampled and stored as the cluster phase's
  (kmeans.init_pixels_per_image, kmeans.buffer_dtype), with one view.
  """
  batch_size = config.kmeans.batch_size
  batches = pipeline.pass_batches(
      source, batch_size, config.res2, num_hosts=jax.process_count(), host_id=jax.process_index()
  )
  side = config.res1 // steps.FEATURE_STRIDE
  clustering.check_init_buffer(
      config,
      mesh=mesh,
      num_views=1,
      points_per_image=side * side,
      channels=3 if method.pixels else config.model.fpn_channels,
      say=reporting.say,
  )
  bar = reporting.Progress(
      f"fresh k-means (K={k})",
      pipeline.num_batches(source.num_examples, batch_size),
      batch_size,
      enabled=progress,
  )

  def features_fn(host_batch, for_init):
    batch = parallel.shard_host_batch(host_batch, mesh)
    views = [steps.fresh_features(model, variables, batch, method=method)]
    if for_init:  # the init buffer's subset, as the cluster phase keeps it
      views = clustering.init_subset(
          views, batch["index"], jax.random.fold_in(key, 1), config.kmeans.init_pixels_per_image
      )
    return views

  centroids, stats = clustering.minibatch_kmeans(
      batches,
      features_fn,
      k=k,
      num_init_batches=config.kmeans.num_init_batches,
      iters=config.kmeans.iters,
      init=config.kmeans.init,
      keys=[key],
      mesh=mesh,
      chunk_size=config.kmeans.chunk_size,
      buffer_dtype=config.kmeans.buffer_dtype,
      progress=bar,
  )
  bar.close()
  return centroids[0], stats[0]


def final_evaluation(
    model, variables, train_source, val_source, config, mesh, method, key, out_dir, progress=True
):
  """The run's final numbers: fresh clusters (K = eval.k_test), optionally overclustering."""
  results = {}
  runs = [("fresh", config.eval.k_test, False)]
  if config.eval.overcluster_k:
    runs.append(("overcluster", config.eval.overcluster_k, True))
  for name, k, many_to_one in runs:
    centroids, stats = fresh_centroids(
        model,
        variables,
        train_source,
        config,
        mesh,
        method,
        k,
        jax.random.fold_in(key, k),
        progress,
    )
    scores, _ = evaluate(
        model,
        variables,
        steps.classifier_from_centroids(centroids, config.kmeans.metric),
        val_source,
        config,
        mesh,
        method,
        many_to_one=many_to_one,
        vis_prefix=os.path.join(out_dir, f"final_{name}"),
        progress=progress,
    )
    results[name] = {
        "k": k,
        "kmeans_init_loss": stats["init_loss"],
        "kmeans_online_loss": stats["online_loss"],
        **scores,
    }
  return results
