"""Evaluation (DESIGN §1): confusion histogram over the validation split, cluster matching,
Acc / mIoU (thing/stuff where the dataset defines them), fresh clusters and overclustering;
and `picie-jax eval`, which scores a finished run's latest checkpoint again."""

import json
import os
import tempfile

import jax
import numpy as np

from picie_jax import clustering
from picie_jax import config_check
from picie_jax import parallel
from picie_jax import reporting
from picie_jax import rundir
from picie_jax import steps
from picie_jax import visualize
from picie_jax.core import crf
from picie_jax.core import metrics
from picie_jax.data import pipeline


def evaluate(
    model,
    variables,
    classifier_kc1,
    source,
    config,
    mesh,
    step_config,
    *,
    many_to_one=False,
    predicts_classes=False,
    vis_prefix=None,
    progress=True,
):
  """Scores the classifier's predictions on `source` (a labelled split).

  `classifier_kc1`: (K, C+1) weights (see steps.classifier_from_centroids), or IIC's heads'
  params (the main head predicts; steps.prediction_scores). Matching is Hungarian (one-to-one)
  or, with `many_to_one`, majority (overclustering); with `predicts_classes` output k is class k
  (a supervised head: no matching). config.eval.crf refines the predictions with the dense
  CRF (steps.crf_probabilities; the scores then carry its parameters as 'crf'). With `vis_prefix`,
  writes `<prefix>_segmentation.png` (image | ground truth | prediction for the first
  eval.num_vis images) and `<prefix>_confusion.png`. Returns (scores dict, histogram); the
  scores include the matching, `cluster_to_class` (class id per cluster, -1 if unmatched).
  """
  if not source.has_labels:
    raise ValueError(f"{source.name} has no labels to evaluate against")
  num_true = source.num_classes
  k = steps.num_clusters(classifier_kc1)
  classifier = parallel.replicate(classifier_kc1, mesh)
  vis = {"image": [], "label": [], "pred": []}
  batch_size = parallel.padded_batch_size(config.eval.batch_size, mesh.size)
  batches = pipeline.pass_batches(
      source,
      batch_size,
      config.eval.res,
      with_labels=True,
      num_hosts=jax.process_count(),
      host_id=jax.process_index(),
  )
  bar = reporting.Progress(
      "eval", pipeline.num_batches(source.num_examples, batch_size), batch_size, enabled=progress
  )
  counts = parallel.DeviceCounts([(num_true, k)], batch_size * config.eval.res**2)
  for host_batch in batches:
    batch = parallel.shard_host_batch(host_batch, mesh)
    pred, batch_hist = steps.eval_step(
        model,
        variables,
        classifier,
        batch,
        step_config=step_config,
        num_true=num_true,
        use_crf=config.eval.crf,
    )
    counts.add([batch_hist])
    wanted = config.eval.num_vis - len(vis["image"])
    if vis_prefix and wanted > 0:
      keep = host_batch["mask"][:wanted]
      vis["image"] += list(host_batch["image"][:wanted][keep])
      vis["label"] += list(host_batch["label"][:wanted][keep])
      vis["pred"] += list(parallel.local_rows(pred)[:wanted][keep])
    bar.update(1)
  bar.close()
  (hist,) = counts.to_host()
  if predicts_classes:
    mapping = np.arange(k)
  else:
    mapping = metrics.majority_match(hist) if many_to_one else metrics.hungarian_match(hist)
  scores = metrics.segmentation_scores(
      hist, mapping, class_names=source.class_names or None, thing_classes=source.thing_classes
  )
  scores["cluster_to_class"] = mapping.tolist()
  if config.eval.crf:
    scores["crf"] = crf.STEGO._asdict()
  if vis_prefix and reporting.is_main_process():
    _write_pictures(vis_prefix, vis, mapping, hist, source)
  return scores, hist


def _write_pictures(prefix, vis, mapping, hist, source):
  with reporting.writing(f"{prefix}_*.png", os.path.dirname(prefix)):
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


def fresh_centroids(model, variables, source, config, mesh, step_config, k, key, progress=True):
  """k-means with `k` clusters on un-augmented features of `source` (fresh clusters); returns
  (centroids (K, C), stats, variables).

  The images are read as evaluation reads them (config.eval.res, steps.evaluation_input), in a
  seeded shuffled order (pipeline.FRESH_ORDER), as the reference's shuffled loader over the
  train split with its evaluation transform. config.eval.fresh_bn='train' runs BatchNorm on
  batch statistics and moves the running averages with every batch (the reference, under
  model.train()); the returned variables carry them ('eval': `variables` unchanged). The init
  buffer is checked, subsampled and stored as the cluster phase's (one view).
  """
  batch_size = config.kmeans.batch_size
  batches = pipeline.train_batches(
      source,
      batch_size,
      config.eval.res,
      seed=config.seed,
      epoch=0,
      stream=pipeline.FRESH_ORDER,
      num_hosts=jax.process_count(),
      host_id=jax.process_index(),
  )
  side = config.res1 // step_config.feature_stride
  clustering.check_init_buffer(
      config,
      mesh=mesh,
      num_sets=1,
      points_per_image=side * side,
      channels=step_config.feature_channels,
      say=reporting.say,
  )
  bar = reporting.Progress(
      f"fresh k-means (K={k})",
      pipeline.num_batches(source.num_examples, batch_size),
      batch_size,
      enabled=progress,
  )
  moved = dict(variables)

  def features_fn(host_batch, for_init):
    batch = parallel.shard_host_batch(host_batch, mesh)
    points, moved["batch_stats"] = steps.fresh_features(
        model, moved, batch, step_config=step_config, train=config.eval.fresh_bn == "train"
    )
    views = [points]
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
  return centroids[0], stats[0], moved


def final_evaluation(
    model,
    variables,
    train_source,
    val_source,
    config,
    mesh,
    step_config,
    key,
    out_dir,
    progress=True,
):
  """The run's final numbers: fresh clusters (K = eval.k_test), optionally overclustering.

  Each is one fresh k-means pass from the trained `variables` and the evaluation that follows
  it (with eval.fresh_bn='train', on the running averages its pass moved)."""
  results = {}
  runs = [("fresh", config.eval.k_test, False)]
  if config.eval.overcluster_k:
    runs.append(("overcluster", config.eval.overcluster_k, True))
  for name, k, many_to_one in runs:
    centroids, stats, fresh_variables = fresh_centroids(
        model,
        variables,
        train_source,
        config,
        mesh,
        step_config,
        k,
        jax.random.fold_in(key, k),
        progress,
    )
    scores, _ = evaluate(
        model,
        fresh_variables,
        steps.classifier_from_centroids(centroids, config.kmeans.metric),
        val_source,
        config,
        mesh,
        step_config,
        many_to_one=many_to_one,
        vis_prefix=os.path.join(out_dir, f"final_{name}"),
        progress=progress,
    )
    results[name] = {
        "k": k,
        "kmeans_init_loss": stats["init_loss"],
        "kmeans_online_loss": stats["online_loss"],
        "kmeans_loss_reference": stats["reference_loss"],
        **scores,
    }
  return results


def final_scores(run, state, out_dir):
  """A run's final numbers from its trained `state`: IIC's main head, else fresh clusters."""
  if run.step_config.iic is not None:
    return main_head_evaluation(run, state, out_dir)
  return final_evaluation(
      run.model,
      state.variables,
      run.train_source,
      run.val_source,
      run.config,
      run.mesh,
      run.step_config,
      run.keys[rundir.FRESH_STREAM],
      out_dir,
      progress=run.config.progress,
  )


def main_head_evaluation(run, state, out_dir):
  """IIC's final numbers: the main head's argmax on the validation split, Hungarian-matched
  (no k-means: IIC's clusters are its head's classes). {'main_head': {'k', scores...}}."""
  scores, _ = evaluate(
      run.model,
      state.variables,
      state.classifier,
      run.val_source,
      run.config,
      run.mesh,
      run.step_config,
      vis_prefix=os.path.join(out_dir, "final_main_head"),
      progress=run.config.progress,
  )
  return {"main_head": {"k": run.k, **scores}}


def eval_classifier(run, state, targets):
  """View 1's classifier: the centroids (non-parametric), the learned 1x1 conv (MDC), or IIC's
  heads' params (its main head predicts)."""
  if run.step_config.iic is not None:
    return state.classifier
  if run.step_config.parametric:
    return state.classifier[0]
  return steps.classifier_from_centroids(targets.centroids[0], run.config.kmeans.metric)


# Fields `eval` may change: where the data is read, how it is checked, what is scored and
# shown. Anything else would score another model than the run trained.
EVAL_OVERRIDABLE = (
    "dataset.root",
    "dataset.data_dir",
    "dataset.manual_dir",
    "dataset.scan_label_values",
    "dataset.on_bad_file",
    "eval.batch_size",
    "eval.k_test",
    "eval.overcluster_k",
    "eval.num_vis",
    "eval.fresh_bn",
    "eval.crf",
    "progress",
    # the fresh clusters' k-means and its init buffer's memory
    "kmeans.batch_size",
    "kmeans.num_init_batches",
    "kmeans.init_pixels_per_image",
    "kmeans.buffer_dtype",
)


def apply_eval_overrides(config, overrides):
  """Sets the {dotted key: value} `overrides` on a run's saved config; returns one line per
  changed field ('config.k: old -> new'). A changed field outside EVAL_OVERRIDABLE is an error
  naming it (an unchanged one is accepted: it is what the run used)."""
  saved = rundir.flatten(json.loads(config.to_json_best_effort()))
  changed = {k: v for k, v in overrides.items() if saved.get(k) != v}
  refused = [k for k in changed if k not in EVAL_OVERRIDABLE]
  if refused:
    raise ValueError(
        "; ".join(
            f"config.{k} cannot be changed at eval ({saved.get(k)!r} -> {changed[k]!r}): it "
            "changes the model or the run being scored"
            for k in refused
        )
        + ". eval may change only "
        + ", ".join(f"config.{k}" for k in EVAL_OVERRIDABLE)
    )
  config.update_from_flattened_dict(changed)
  return [f"config.{k}: {saved.get(k)!r} -> {v!r}" for k, v in changed.items()]


def _require_writable(workdir, out_dir, files):
  """Fails before any computing when eval could not write its results."""
  try:
    os.makedirs(out_dir, exist_ok=True)
    for directory in (workdir, out_dir):
      with tempfile.TemporaryFile(dir=directory):
        pass
  except OSError as e:
    raise PermissionError(
        f"cannot write the evaluation's results under {workdir} ({e}): make it writable"
    ) from None
  for path in files:
    if os.path.exists(path) and not (os.path.isfile(path) and os.access(path, os.W_OK)):
      raise PermissionError(f"{path} is not a writable file: remove it or make it writable")


def evaluate_workdir(workdir, overrides=None):
  """Re-evaluates the latest checkpoint of a run: its own clusters, fresh clusters, and
  optionally overclustering (IIC: its main head only); writes `eval.json` and PNGs under
  workdir/eval, or with config.eval.crf `eval_crf.json` and workdir/eval_crf (the plain scores
  and matching.json stay as they are, so both rows can be read side by side).

  `overrides` ({dotted key: value}, e.g. {'eval.k_test': 54}) change the saved config where
  that does not change the model (EVAL_OVERRIDABLE); each change is reported in one line.
  """
  config = rundir.saved_config(workdir)
  for line in apply_eval_overrides(config, overrides or {}):
    reporting.say(f"eval overrides {line}")
  config_check.validate(config)
  name = "eval_crf" if config.eval.crf else "eval"
  out_dir = os.path.join(workdir, name)
  writes_matching = not config.eval.crf
  outputs = [os.path.join(workdir, f"{name}.json")]
  if writes_matching:
    outputs.append(os.path.join(workdir, rundir.MATCHING_FILE))
  _require_writable(workdir, out_dir, outputs)
  run = rundir.Run(config, workdir)
  if run.val_source is None:
    raise FileNotFoundError(f"nothing to evaluate against: {run.no_evaluation_reason}")
  state, targets, meta = rundir.restore_latest(run)
  results = {}
  if run.step_config.iic is None and config.method != "pixel_kmeans" and meta.epoch > 0:
    scores, _ = evaluate(
        run.model,
        state.variables,
        eval_classifier(run, state, targets),
        run.val_source,
        config,
        run.mesh,
        run.step_config,
        vis_prefix=os.path.join(out_dir, "epoch_clusters"),
        progress=config.progress,
    )
    if writes_matching:
      rundir.write_matching(workdir, meta.centroids_epoch, scores, run.val_source)
    results["epoch_clusters"] = {"k": run.k, **scores}
  results.update(final_scores(run, state, out_dir))
  if run.step_config.iic is not None and writes_matching:  # its clusters are its main head's
    rundir.write_matching(workdir, meta.centroids_epoch, results["main_head"], run.val_source)
  results.update(run.bad_files())
  reporting.write_json(outputs[0], results)
  return results
