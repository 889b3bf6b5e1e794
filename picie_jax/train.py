"""The PiCIE epoch loop (DESIGN §1): cluster -> label -> train, evaluate, checkpoint, resume.

The label phase fixes the epoch's targets (a frozen copy of the variables after the cluster
phase, the centroids, and class-balance weights from a label pass in eval mode) and keeps the
labels of each host's train examples in its memory (config.train.labels='cached'), fed with the
batches of the train phase; with 'recompute', `steps.train_step` recomputes each batch's labels
from the targets under stop_gradient. Both call `steps.labels_for_batch`, so the weights
describe exactly the labels the loss sees. Labels are not checkpointed: a resume recomputes
them.
"""

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from picie_jax import checkpoint
from picie_jax import clustering
from picie_jax import config_check
from picie_jax import convert
from picie_jax import evaluate
from picie_jax import parallel
from picie_jax import preemption
from picie_jax import reporting
from picie_jax import rundir
from picie_jax import steps
from picie_jax import workdir_lock
from picie_jax.core import losses
from picie_jax.data import pipeline
from picie_jax.models import layers


def fresh_state(run):
  """The state and placeholder targets a new run starts from: config.model.init applied."""
  variables = convert.initial_variables(rundir.random_variables(run), run.config.model)
  return rundir.initial_state(run, variables)


OVERCLUSTER_SEEDS = 1  # folded into the epoch's k-means key for PiCIE + H's clustering


def cluster_phase(run, state, epoch):
  """Mini-batch k-means of every view from one pass of train-mode features; returns
  (state, [(centroids (V, K, C), per-view k-means stats) per clustering]): the main one and,
  with PiCIE + H (config.kmeans.k_overcluster), the overclustering of the same features into
  K_H clusters with k-means seeds of its own.

  The pass reads the train split in the epoch's seeded order (pipeline.CLUSTER_ORDER), as the
  reference reshuffles its dataset every epoch: the Lloyd init sees a new random subset of
  num_init_batches batches each epoch and the online updates a new order.

  The reference runs one pass per view under model.train(), so the BN running averages move
  through view 1's batches, then view 2's. Train-mode features do not depend on the running
  averages, and these follow r <- m r + (1 - m) s per pass; so one pass carries a chain per
  view (view 1's from the current averages, the others' from zeros) and combines them as
  r = m^N r_view1 + r_view2 (N batches): the two-pass result, in one read of the data.
  """
  cfg = run.config
  num_batches = pipeline.num_batches(run.train_source.num_examples, cfg.kmeans.batch_size)
  side = cfg.res1 // run.step_config.feature_stride
  kmeans_key = jax.random.fold_in(run.keys[rundir.KMEANS_STREAM], epoch)
  clusterings = [(run.k, kmeans_key)]
  if cfg.kmeans.k_overcluster:
    clusterings.append(
        (cfg.kmeans.k_overcluster, jax.random.fold_in(kmeans_key, OVERCLUSTER_SEEDS))
    )
  clustering.check_init_buffer(
      cfg,
      mesh=run.mesh,
      num_sets=len(clusterings) * run.num_views,
      points_per_image=side * side,
      channels=run.step_config.feature_channels,
      say=reporting.say,
  )
  bar = run.progress(f"epoch {epoch} cluster", run.train_source.num_examples, cfg.kmeans.batch_size)
  features = _ClusterFeatures(run, state, epoch, [key for _, key in clusterings])
  centroids, set_stats = clustering.minibatch_kmeans(
      parallel.prefetch_to_device(
          pipeline.train_batches(
              run.train_source,
              cfg.kmeans.batch_size,
              cfg.res2,
              seed=cfg.seed,
              epoch=epoch,
              stream=pipeline.CLUSTER_ORDER,
              **run.hosts,
          ),
          run.mesh,
      ),
      features,
      k=[k for k, _ in clusterings for _ in range(run.num_views)],
      num_init_batches=cfg.kmeans.num_init_batches,
      iters=cfg.kmeans.iters,
      init=cfg.kmeans.init,
      keys=[
          _view_key(key, view, cfg.augment.reference_quirks)
          for _, key in clusterings
          for view in range(run.num_views)
      ],
      mesh=run.mesh,
      chunk_size=cfg.kmeans.chunk_size,
      buffer_dtype=cfg.kmeans.buffer_dtype,
      progress=bar,
  )
  bar.close()
  batch_stats, *chains = features.chains
  if not run.step_config.pixels:
    decays = layers.running_average_decays(
        run.model,
        {**state.variables, "batch_stats": batch_stats},
        jnp.zeros((1, cfg.res1, cfg.res1, 3)),
    )
    for chain in chains:
      batch_stats = jax.tree.map(
          lambda m, first, then: m**num_batches * first + then, decays, batch_stats, chain
      )
  views = run.num_views
  results = [
      (jnp.stack(centroids[i : i + views]), set_stats[i : i + views])
      for i in range(0, len(centroids), views)
  ]
  return state.replace(batch_stats=batch_stats), results


def _view_key(kmeans_key, view, reference_quirks):
  """The k-means init key of one view: its own, or with reference_quirks the same for every
  view, as the official code seeds each view's faiss k-means with `np.random.randint(args.seed)`
  (0 for its seed 1), so the views' inits start from the same buffer positions: the same pixels,
  view 2's features being in view 1's frame."""
  return kmeans_key if reference_quirks else jax.random.fold_in(kmeans_key, view)


class _ClusterFeatures:
  """The cluster pass's feature function for minibatch_kmeans: each batch's views, once per
  clustering (each subsampled for its init buffer with its own key), moving each view's chain
  of BN running averages along (`chains`)."""

  def __init__(self, run, state, epoch, subset_keys):
    self.run, self.params, self.epoch, self.subset_keys = (
        run,
        state.variables["params"],
        epoch,
        subset_keys,
    )
    self.chains = [state.batch_stats] + [
        jax.tree.map(jnp.zeros_like, state.batch_stats) for _ in range(run.num_views - 1)
    ]

  def __call__(self, batch, for_init):
    run = self.run
    preemption.stop_if_requested("cluster", self.epoch)
    views, self.chains = steps.cluster_features(
        run.model,
        self.params,
        self.chains,
        batch,
        self.epoch,
        run.augment_key,
        step_config=run.step_config,
    )
    if not for_init:
      return views * len(self.subset_keys)
    per_image = run.config.kmeans.init_pixels_per_image
    return [
        subset
        for key in self.subset_keys
        for subset in clustering.init_subset(views, batch["index"], key, per_image)
    ]


def label_pass(run, targets, epoch):
  """One eval-mode pass over the data with the epoch's targets: the (V, K) label counts of each
  centroid set (targets.centroid_sets(): PiCIE + H's overclustering after the main one) and,
  with config.train.labels='cached', this host's label cache (see `_host_label_order`).

  Each host labels the examples it will train on this epoch, in that order, so it keeps only
  its share of the labels and none cross hosts (labels depend on the image and the epoch, not
  on the batch); the counts are summed over all hosts on device.
  """
  cfg = run.config
  cache = None
  sets = targets.centroid_sets()
  side = cfg.res1 // run.step_config.feature_stride
  order = _host_label_order(run, epoch)
  if run.step_config.cached_labels:
    cache = np.zeros(
        (order.size, len(sets) * run.num_views, side, side),
        steps.label_dtype(max(c.shape[1] for c, _ in sets)),
    )
    reporting.say(
        f"label cache: {cache.shape} {cache.dtype} = {cache.nbytes / 2**20:.1f} MiB of host "
        f"memory on each of {run.hosts['num_hosts']} host(s) (config.train.labels='recompute' "
        "avoids it)"
    )
  counts = parallel.DeviceCounts(
      [c.shape[:2] for c, _ in sets], side * side * cfg.kmeans.batch_size
  )
  bar = run.progress(f"epoch {epoch} label", run.train_source.num_examples, cfg.kmeans.batch_size)
  filled = 0
  for batch in parallel.prefetch_to_device(
      pipeline.make_batches(run.train_source, order, cfg.res2), run.mesh
  ):
    preemption.stop_if_requested("label", epoch)
    batch_counts, batch_labels = steps.label_counts(
        run.model, targets, batch, epoch, run.augment_key, step_config=run.step_config
    )
    counts.add(batch_counts)
    if cache is not None:
      rows = parallel.local_rows(batch_labels)
      cache[filled : filled + len(rows)] = rows
      filled += len(rows)
    bar.update(1)
  bar.close()
  return counts.to_host(), cache


def _host_label_order(run, epoch):
  """The label pass's (num_batches, kmeans.batch_size / hosts) examples of this host: its train
  examples of the epoch in train order (padded with -1), so row r of the label cache is the
  r-th example the train pass feeds this host (`_with_cached_labels`)."""
  cfg = run.config
  hosts = run.hosts["num_hosts"]
  train_order = pipeline.epoch_batch_indices(
      run.train_source.num_examples,
      cfg.train.batch_size,
      cfg.seed,
      epoch,
      pipeline.TRAIN_ORDER,
      **run.hosts,
  )
  return pipeline.batch_indices(train_order.reshape(-1), cfg.kmeans.batch_size // hosts, 1, 0)


def _with_cached_labels(batches, labels, local_batch, start_batch):
  """The train batches (from `start_batch`) with their rows of this host's label cache."""
  for i, batch in enumerate(batches, start=start_batch):
    yield {**batch, "labels": labels[i * local_batch : (i + 1) * local_batch]}


def label_phase(run, state, centroids, epoch, overcluster_centroids=None):
  """Fixes the epoch's targets: frozen variables, centroids, balance weights from label counts;
  with PiCIE + H's `overcluster_centroids` their weights too.

  Returns (targets, [(V, K) counts per centroid set], label cache or None).
  """
  targets = parallel.replicate(
      steps.EpochTargets(
          # A copy: train_step donates the state's buffers, the frozen variables must outlive it.
          frozen=jax.tree.map(jnp.copy, state.variables),
          centroids=centroids,
          weights=jnp.ones(centroids.shape[:2], jnp.float32),
          overcluster_centroids=overcluster_centroids,
          overcluster_weights=(
              None
              if overcluster_centroids is None
              else jnp.ones(overcluster_centroids.shape[:2], jnp.float32)
          ),
      ),
      run.mesh,
  )
  counts, labels = label_pass(run, targets, epoch)
  weights = [
      parallel.replicate(
          jnp.stack(
              [
                  losses.balance_weights(
                      jnp.asarray(c, jnp.float32), enabled=run.config.train.balance
                  )
                  for c in set_counts
              ]
          ),
          run.mesh,
      )
      for set_counts in counts
  ]
  if overcluster_centroids is not None:
    targets = targets.replace(overcluster_weights=weights[1])
  return targets.replace(weights=weights[0]), counts, labels


def resumed_labels(run, targets, epoch):
  """The label cache of a run resumed mid-epoch: not checkpointed, so recomputed by a label
  pass from the checkpointed targets (the same function on the same inputs: exact)."""
  if not run.step_config.cached_labels:
    return None
  reporting.say(
      f"recomputing epoch {epoch}'s label cache from the checkpointed targets "
      "(one label pass; labels are not stored in checkpoints)"
  )
  return label_pass(run, targets, epoch)[1]


def _new_classifier(run, state, epoch):
  """MDC's parametric classifier is re-initialised (with its optimizer) every epoch."""
  if not run.step_config.parametric:
    return state
  classifier = steps.init_classifier(
      jax.random.fold_in(run.keys[rundir.CLASSIFIER_STREAM], epoch),
      run.num_views,
      run.k,
      state.classifier.shape[-1] - 1,
  )
  return parallel.replicate(state.with_new_classifier(classifier), run.mesh)


def epoch_targets(run, state, targets, epoch):
  """The cluster and label phases that fix an epoch's targets: (state, targets, label cache or
  None, ClusterStats). IIC has none: the state and targets pass through, no labels or stats."""
  if run.step_config.iic is not None:
    return state, targets, None, None
  state, clusterings = cluster_phase(run, state, epoch)
  (centroids, kmeans_stats), *overclustering = clusterings
  overcluster_centroids, overcluster_stats = overclustering[0] if overclustering else (None, None)
  targets, counts, labels = label_phase(run, state, centroids, epoch, overcluster_centroids)
  state = _new_classifier(run, state, epoch)
  stats = rundir.ClusterStats.of(kmeans_stats, counts[0])
  if overcluster_stats is not None:
    stats = dataclasses.replace(
        stats, overcluster=rundir.ClusterStats.of(overcluster_stats, counts[1])
    )
  return state, targets, labels, stats


def _check_finite(step_losses, first_step, epoch, first_batch, ckpt):
  """Raises on the first non-finite loss among steps fetched together (first_step on)."""
  for offset, out in enumerate(step_losses):
    bad = {k: v for k, v in out.items() if not math.isfinite(v)}
    if bad:
      last = first_step + len(step_losses) - 1
      checked = f"steps {first_step}-{last}" if last > first_step else f"step {first_step}"
      raise FloatingPointError(
          f"non-finite loss {bad} at train step {first_step + offset} (epoch {epoch}, batch "
          f"{first_batch + offset}; losses fetched for {checked}); the run stopped without "
          f"saving. Last good checkpoint: {ckpt.latest_path()}. Likely causes: a learning rate "
          "too high (config.train.lr) or degenerate clusters (a class weight of 0 for every "
          "labelled pixel)."
      )


def _fetch_losses(pending, first_step, epoch, last_batch, ckpt):
  """The losses of the steps not yet fetched (`pending`, first_step on) as floats, checked."""
  step_losses = [{k: float(v) for k, v in out.items()} for out in jax.device_get(pending)]
  _check_finite(step_losses, first_step, epoch, last_batch - len(pending) + 1, ckpt)
  return step_losses


def _add_losses(sums, step_losses):
  """`sums` (loss name -> sum, and 'batches') with `step_losses` added."""
  sums = dict(sums)
  for out in step_losses:
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + v
  sums["batches"] = sums.get("batches", 0) + len(step_losses)
  return sums


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_passes(step_config):
  """The heads an epoch trains, one pass over the data each: IIC's overclustering head, then its
  main head (steps.IIC_HEADS), as IIC's two-head training does; one pass (None) otherwise."""
  return steps.IIC_HEADS if step_config.iic is not None else (None,)


def train_phase(run, state, targets, labels, epoch, ckpt, meta):
  """Trains one epoch from batch `meta.next_batch`, adding the losses to `meta.loss_sums`;
  checkpoints every checkpoint_every_steps. Returns (state, loss sums, images/s).

  An epoch is one pass over the data per head of `train_passes` (IIC: two), its batches
  numbered on through the passes; pass p of epoch e draws its order and augmentations as
  data epoch e * passes + p (PiCIE's: e). `labels` is this host's label cache (its train
  examples in train order, `label_pass`), fed with each batch, or None
  (config.train.labels='recompute': the train step recomputes them; IIC: none). The step loop
  stays asynchronous: losses are fetched every log_every_steps and before each checkpoint, where
  they are checked (a checkpoint never holds non-finite losses or params).
  """
  cfg = run.config
  start_batch, sums = meta.next_batch, meta.loss_sums
  heads = train_passes(run.step_config)
  per_pass = pipeline.num_batches(run.train_source.num_examples, cfg.train.batch_size)
  total = per_pass * len(heads)
  pending, first_step = [], int(state.step) + 1  # losses not yet fetched, from this step on
  images_per_s = []
  for pass_index, head in enumerate(heads):
    pass_start = pass_index * per_pass
    if start_batch >= pass_start + per_pass:
      continue
    bar = run.progress(
        f"epoch {epoch} train" + (f" ({head} head)" if head else ""),
        run.train_source.num_examples,
        cfg.train.batch_size,
        initial=max(start_batch - pass_start, 0),
    )
    data_epoch = epoch * len(heads) + pass_index
    batches = pipeline.train_batches(
        run.train_source,
        cfg.train.batch_size,
        cfg.res2,
        seed=cfg.seed,
        epoch=data_epoch,
        start_batch=max(start_batch - pass_start, 0),
        **run.hosts,
    )
    if labels is not None:  # PiCIE and MDC: one pass, data_epoch == epoch
      local_batch = cfg.train.batch_size // run.hosts["num_hosts"]
      batches = _with_cached_labels(batches, labels, local_batch, max(start_batch - pass_start, 0))
    for batch_index, batch in enumerate(
        parallel.prefetch_to_device(batches, run.mesh), start=max(start_batch, pass_start)
    ):
      state, out = steps.train_step(
          run.model,
          state,
          targets,
          batch,
          data_epoch,
          run.augment_key,
          step_config=run.step_config,
          head=head,
      )
      pending.append(out)
      preemption.step_dispatched(out)
      done = batch_index + 1
      stop = preemption.requested()
      save = stop or (done < total and done % cfg.checkpoint_every_steps == 0)
      if save or done % cfg.log_every_steps == 0 or done == pass_start + per_pass:
        step_losses = _fetch_losses(pending, first_step, epoch, batch_index, ckpt)
        sums = _add_losses(sums, step_losses)
        bar.update(len(step_losses), loss=step_losses[-1]["total"])
        pending, first_step = [], first_step + len(step_losses)
      if save:
        if not bool(_all_finite(state.params)):
          raise FloatingPointError(
              f"non-finite parameters after train step {int(state.step)} (epoch {epoch}); not "
              f"saved. Last good checkpoint: {ckpt.latest_path()}. Lower config.train.lr."
          )
        ckpt.save(
            {"state": state, "targets": targets},
            dataclasses.replace(meta, next_batch=done, loss_sums=sums).to_json(),
        )
      if stop:
        raise preemption.stopped(f"at epoch {epoch} batch {done}: saved {ckpt.latest_path()}")
    bar.close()
    images_per_s.append(bar.images_per_second())
  return state, sums, float(np.mean(images_per_s))


def _epoch_summary(record):
  parts = [f"epoch {record['epoch']}", f"step {record['step']}"]
  for key, label in (
      ("kmeans_online_loss_view1", "k-means"),
      ("train_loss_within", "within"),
      ("train_loss_cross", "cross"),
      ("train_loss_mutual_information", "MI"),
      ("acc", "acc"),
      ("miou", "mIoU"),
      ("train_images_per_s", "img/s"),
  ):
    if key in record:
      parts.append(f"{label} {record[key]:.3f}")
  return " | ".join(parts)


def train_and_evaluate(config, workdir):
  """Runs (or resumes) training in `workdir`; returns the final metrics dict.

  One run per workdir (a lock); SIGTERM/SIGINT stop it at the next batch boundary with a
  checkpoint where the phase allows (preemption.Stopped).
  """
  config_check.validate(config)
  run = rundir.Run(config, workdir)  # finds the data first: a bad path fails before writing
  rundir.check_same_config(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  with workdir_lock.hold(workdir) as release_lock, preemption.handle_signals(release_lock):
    writer = reporting.MetricWriter(workdir)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
      return _train_and_evaluate(run, writer, ckpt)
    finally:
      writer.close()
      ckpt.close()


def _resume_point(run, ckpt):
  """(state, targets, start_epoch, start_batch, meta): a fresh start, or the latest checkpoint's."""
  if ckpt.latest_path() is None:
    return (*fresh_state(run), 0, None, rundir.CheckpointMeta(epoch=0))
  return rundir.resume_point(run, ckpt)


def _evaluate_epoch(run, state, targets, epoch, record, writer):
  """Evaluates an epoch when config.eval schedules it, then writes its metrics row."""
  config = run.config
  if run.val_source is not None and (
      (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs
  ):
    scores, _ = evaluate.evaluate(
        run.model,
        state.variables,
        evaluate.eval_classifier(run, state, targets),
        run.val_source,
        config,
        run.mesh,
        run.step_config,
        vis_prefix=os.path.join(run.workdir, "vis", f"epoch{epoch:03d}"),
        progress=config.progress,
    )
    record = {**record, **{k: scores[k] for k in scores if not isinstance(scores[k], (list, dict))}}
    rundir.write_matching(run.workdir, epoch, scores, run.val_source)
  writer.write(record, record["step"])
  reporting.say(_epoch_summary(record))


def _train_and_evaluate(run, writer, ckpt):
  config, workdir = run.config, run.workdir
  state, targets, start_epoch, start_batch, meta = _resume_point(run, ckpt)
  rundir.write_config(config, workdir)
  # The end-of-epoch checkpoint is saved before the epoch's evaluation: when that evaluation
  # did not finish (no metrics row), it is done now.
  unevaluated = (
      start_batch is None
      and meta.record is not None
      and start_epoch - 1 not in reporting.recorded_epochs(workdir)
  )
  writer.drop_from_epoch(start_epoch - 1 if unevaluated else start_epoch)
  if run.val_source is None:
    reporting.say(f"evaluation skipped: {run.no_evaluation_reason}")
  if unevaluated:
    _evaluate_epoch(run, state, targets, start_epoch - 1, meta.record, writer)

  for epoch in range(start_epoch, config.num_epochs):
    if start_batch is None:
      state, targets, labels, cluster_stats = epoch_targets(run, state, targets, epoch)
      meta = rundir.CheckpointMeta(epoch=epoch, next_batch=0, cluster_stats=cluster_stats)
      ckpt.save({"state": state, "targets": targets}, meta.to_json())
    else:
      labels = resumed_labels(run, targets, epoch)
    state, sums, images_per_s = train_phase(run, state, targets, labels, epoch, ckpt, meta)
    record = {"epoch": epoch, "step": int(state.step), "train_images_per_s": images_per_s}
    if meta.cluster_stats is not None:  # IIC has no cluster phase
      record.update(meta.cluster_stats.record())
    record.update(
        {f"train_loss_{k}": v / sums["batches"] for k, v in sums.items() if k != "batches"}
    )
    ckpt.save(
        {"state": state, "targets": targets},
        rundir.CheckpointMeta(epoch=epoch + 1, record=record).to_json(),
    )
    if preemption.requested():
      raise preemption.stopped(
          f"at the end of epoch {epoch}, before its evaluation: saved {ckpt.latest_path()}"
      )
    _evaluate_epoch(run, state, targets, epoch, record, writer)
    start_batch = None

  if run.val_source is None:
    final = {"evaluation_skipped": run.no_evaluation_reason}
  else:
    final = evaluate.final_scores(run, state, workdir)
  final.update(run.bad_files())
  reporting.write_json(os.path.join(workdir, "final.json"), final)
  return final
