"""The PiCIE epoch loop (DESIGN §1): cluster -> label -> train, evaluate, checkpoint, resume.

The label phase fixes the epoch's targets (a frozen copy of the variables after the cluster
phase, the centroids, and class-balance weights from a label pass in eval mode) and keeps every
image's labels in host memory (config.train.labels='cached'), fed with the batches of the train
phase; with 'recompute', `steps.train_step` recomputes each batch's labels from the targets
under stop_gradient. Both call `steps.labels_for_batch`, so the weights describe exactly the
labels the loss sees. Labels are not checkpointed: a resume recomputes them.
"""

import json
import math
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from picie_jax import checkpoint
from picie_jax import clustering
from picie_jax import config_check
from picie_jax import convert
from picie_jax import evaluate
from picie_jax import parallel
from picie_jax import platform
from picie_jax import preemption
from picie_jax import reporting
from picie_jax import steps
from picie_jax import workdir_lock
from picie_jax.core import losses
from picie_jax.data import datasets
from picie_jax.data import pipeline
from picie_jax.models import fpn
from picie_jax.models import layers

MATCHING_FILE = "matching.json"

# Independent random streams derived from the seed.
_AUGMENT_STREAM, _KMEANS_STREAM, _INIT_STREAM, _CLASSIFIER_STREAM, _FRESH_STREAM = range(5)


class Run:
  """The static parts of a run: config, model, method, mesh, data sources, optimizer.

  With the data, batch sizes are checked against the mesh and the data scanned (headers,
  label values) before anything trains. `load_data=False` leaves the sources out (None):
  labelling new images needs no dataset.
  """

  def __init__(self, config, workdir, load_data=True):
    self.config = config
    self.workdir = workdir
    self.mesh = parallel.make_mesh()
    self.method = steps.method_from_config(config, self.mesh)
    self.model = fpn.model_from_config(config.model, platform.platform_of(self.mesh))
    self.tx = steps.make_optimizer(config.train.lr, config.train.weight_decay)
    self.train_source = self.val_source = None
    self.no_evaluation_reason = "the run was set up without its dataset"
    if load_data:
      config_check.check_batch_sizes(config, self.mesh.size, jax.process_count())
      self.train_source = datasets.build_source(config, "train")
      self.val_source, self.no_evaluation_reason = datasets.evaluation_source(config)
      datasets.scan_sources(
          self.train_source,
          self.val_source,
          config.dataset.scan_label_values,
          progress=config.progress and reporting.is_main_process(),
      )
    seed_key = jax.random.PRNGKey(config.seed)
    self.keys = {s: jax.random.fold_in(seed_key, s) for s in range(5)}
    self.augment_key = parallel.replicate(self.keys[_AUGMENT_STREAM], self.mesh)
    self.hosts = {"num_hosts": jax.process_count(), "host_id": jax.process_index()}

  @property
  def k(self):
    return self.config.kmeans.k_train

  @property
  def num_views(self):
    return self.method.num_views

  def shard(self, host_batch):
    return parallel.shard_host_batch(host_batch, self.mesh)

  def bad_files(self):
    """{'bad_files': [...]}: the files left out (config.dataset.on_bad_file='skip'), else {}."""
    if self.config.dataset.on_bad_file != "skip":
      return {}
    sources = (s for s in (self.train_source, self.val_source) if s is not None)
    return {"bad_files": sorted({f for s in sources for f in s.bad_files.files})}

  def progress(self, desc, num_examples, batch_size, initial=0):
    return reporting.Progress(
        desc,
        pipeline.num_batches(num_examples, batch_size),
        batch_size,
        enabled=self.config.progress,
        initial=initial,
    )


def initial_state(run, pretrained=True):
  """Fresh TrainState and placeholder EpochTargets (shapes only matter for restoring).

  `pretrained` applies config.model.init (e.g. ImageNet weights); a state about to be
  overwritten by a checkpoint skips it, so restoring needs no weight files.
  """
  variables = steps.init_variables(run.model, run.keys[_INIT_STREAM], run.config.res1)
  if pretrained:
    variables = convert.initial_variables(variables, run.config.model)
  channels = 3 if run.method.pixels else run.config.model.fpn_channels
  classifier = steps.init_classifier(run.keys[_CLASSIFIER_STREAM], run.num_views, run.k, channels)
  state = steps.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=variables["params"],
      batch_stats=variables["batch_stats"],
      opt_state=run.tx.init(variables["params"]),
      classifier=classifier,
      classifier_opt_state=run.tx.init(classifier),
  )
  targets = steps.EpochTargets(
      frozen=jax.tree.map(jnp.copy, dict(variables)),
      centroids=jnp.zeros((run.num_views, run.k, channels), jnp.float32),
      weights=jnp.ones((run.num_views, run.k), jnp.float32),
  )
  return parallel.replicate(state, run.mesh), parallel.replicate(targets, run.mesh)


def cluster_phase(run, state, epoch):
  """Mini-batch k-means of every view from one pass of train-mode features; returns
  (state, centroids (V, K, C), stats).

  The reference runs one pass per view under model.train(), so the BN running averages move
  through view 1's batches, then view 2's. Train-mode features do not depend on the running
  averages, and these follow r <- m r + (1 - m) s per pass; so one pass carries a chain per
  view (view 1's from the current averages, the others' from zeros) and combines them as
  r = m^N r_view1 + r_view2 (N batches): the two-pass result, in one read of the data.
  """
  cfg = run.config
  num_batches = pipeline.num_batches(run.train_source.num_examples, cfg.kmeans.batch_size)
  side = cfg.res1 // steps.FEATURE_STRIDE
  clustering.check_init_buffer(
      cfg,
      mesh=run.mesh,
      num_views=run.num_views,
      points_per_image=side * side,
      channels=3 if run.method.pixels else cfg.model.fpn_channels,
      say=reporting.say,
  )
  chains = [state.batch_stats] + [
      jax.tree.map(jnp.zeros_like, state.batch_stats) for _ in range(run.num_views - 1)
  ]
  kmeans_key = jax.random.fold_in(run.keys[_KMEANS_STREAM], epoch)
  bar = run.progress(f"epoch {epoch} cluster", run.train_source.num_examples, cfg.kmeans.batch_size)

  def features_fn(batch, for_init):
    nonlocal chains
    preemption.stop_if_requested("cluster", epoch)
    views, chains = steps.cluster_features(
        run.model, state.params, chains, batch, epoch, run.augment_key, method=run.method
    )
    if for_init:
      views = clustering.init_subset(
          views, batch["index"], kmeans_key, cfg.kmeans.init_pixels_per_image
      )
    return views

  centroids, view_stats = clustering.minibatch_kmeans(
      parallel.prefetch_to_device(
          pipeline.pass_batches(run.train_source, cfg.kmeans.batch_size, cfg.res2, **run.hosts),
          run.mesh,
      ),
      features_fn,
      k=run.k,
      num_init_batches=cfg.kmeans.num_init_batches,
      iters=cfg.kmeans.iters,
      init=cfg.kmeans.init,
      keys=[jax.random.fold_in(kmeans_key, view) for view in range(run.num_views)],
      mesh=run.mesh,
      chunk_size=cfg.kmeans.chunk_size,
      buffer_dtype=cfg.kmeans.buffer_dtype,
      progress=bar,
  )
  bar.close()
  batch_stats = chains[0]
  if not run.method.pixels:
    decays = layers.running_average_decays(
        run.model,
        {"params": state.params, "batch_stats": batch_stats},
        jnp.zeros((1, cfg.res1, cfg.res1, 3)),
    )
    for chain in chains[1:]:
      batch_stats = jax.tree.map(
          lambda m, first, then: m**num_batches * first + then, decays, batch_stats, chain
      )
  stats = {"kmeans_init_buffer_bytes": sum(s["init_buffer_bytes"] for s in view_stats)}
  for view, s in enumerate(view_stats):
    stats.update(
        {
            f"kmeans_init_loss_view{view + 1}": s["init_loss"],
            f"kmeans_online_loss_view{view + 1}": s["online_loss"],
        }
    )
  return state.replace(batch_stats=batch_stats), centroids, stats


def label_pass(run, targets, epoch):
  """One eval-mode pass over the data with the epoch's targets: (V, K) label counts and, with
  config.train.labels='cached', every image's labels (num_examples, V, h, w) on every host.

  Each batch's labels are gathered to all hosts (parallel.to_host), since the train order is a
  global shuffle; the cache is host memory (its size is printed).
  """
  cfg = run.config
  cache = None
  if run.method.cached_labels:
    side = cfg.res1 // steps.FEATURE_STRIDE
    cache = np.zeros(
        (run.train_source.num_examples, run.num_views, side, side), steps.label_dtype(run.k)
    )
    reporting.say(
        f"label cache: {cache.shape} {cache.dtype} = {cache.nbytes / 2**20:.1f} MiB of "
        "host memory per host (config.train.labels='recompute' avoids it)"
    )
  counts = np.zeros((run.num_views, run.k), np.int64)
  bar = run.progress(f"epoch {epoch} label", run.train_source.num_examples, cfg.kmeans.batch_size)
  for batch in parallel.prefetch_to_device(
      pipeline.pass_batches(run.train_source, cfg.kmeans.batch_size, cfg.res2, **run.hosts),
      run.mesh,
  ):
    preemption.stop_if_requested("label", epoch)
    batch_counts, batch_labels = steps.label_counts(
        run.model, targets, batch, epoch, run.augment_key, method=run.method, k=run.k
    )
    counts += parallel.to_host(batch_counts)
    if cache is not None:
      valid = parallel.to_host(batch["mask"])
      cache[parallel.to_host(batch["index"])[valid]] = parallel.to_host(batch_labels)[valid]
    bar.update(1)
  bar.close()
  return counts, cache


def label_phase(run, state, centroids, epoch):
  """Fixes the epoch's targets: frozen variables, centroids, balance weights from label counts.

  Returns (targets, counts, label cache or None).
  """
  targets = parallel.replicate(
      steps.EpochTargets(
          # A copy: train_step donates the state's buffers, the frozen variables must outlive it.
          frozen=jax.tree.map(jnp.copy, {"params": state.params, "batch_stats": state.batch_stats}),
          centroids=centroids,
          weights=jnp.ones((run.num_views, run.k), jnp.float32),
      ),
      run.mesh,
  )
  counts, labels = label_pass(run, targets, epoch)
  weights = jnp.stack(
      [
          losses.balance_weights(jnp.asarray(c, jnp.float32), enabled=run.config.train.balance)
          for c in counts
      ]
  )
  return targets.replace(weights=parallel.replicate(weights, run.mesh)), counts, labels


def resumed_labels(run, targets, epoch):
  """The label cache of a run resumed mid-epoch: not checkpointed, so recomputed by a label
  pass from the checkpointed targets (the same function on the same inputs: exact)."""
  if not run.method.cached_labels:
    return None
  reporting.say(
      f"recomputing epoch {epoch}'s label cache from the checkpointed targets "
      "(one label pass; labels are not stored in checkpoints)"
  )
  return label_pass(run, targets, epoch)[1]


def _new_classifier(run, state, epoch):
  """MDC's parametric classifier is re-initialised (with its optimizer) every epoch."""
  if not run.method.parametric:
    return state
  classifier = steps.init_classifier(
      jax.random.fold_in(run.keys[_CLASSIFIER_STREAM], epoch),
      run.num_views,
      run.k,
      state.classifier.shape[-1] - 1,
  )
  return state.replace(
      classifier=parallel.replicate(classifier, run.mesh),
      classifier_opt_state=parallel.replicate(run.tx.init(classifier), run.mesh),
  )


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


@jax.jit
def _all_finite(tree):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def train_phase(run, state, targets, labels, epoch, start_batch, sums, ckpt, meta):
  """Trains one epoch from batch `start_batch`; checkpoints every checkpoint_every_steps.

  `labels` is the label phase's cache (num_examples, V, h, w), fed with each batch, or None
  (config.train.labels='recompute': the train step recomputes them). The step loop stays
  asynchronous: losses are fetched every log_every_steps and before each checkpoint, where
  they are checked (a checkpoint never holds non-finite losses or params).
  """
  cfg = run.config
  total = pipeline.num_batches(run.train_source.num_examples, cfg.train.batch_size)
  bar = run.progress(
      f"epoch {epoch} train",
      run.train_source.num_examples,
      cfg.train.batch_size,
      initial=start_batch,
  )
  batches = pipeline.train_batches(
      run.train_source,
      cfg.train.batch_size,
      cfg.res2,
      seed=cfg.seed,
      epoch=epoch,
      start_batch=start_batch,
      **run.hosts,
  )
  if labels is not None:
    batches = ({**b, "labels": labels[b["index"]]} for b in batches)
  pending, first_step = [], int(state.step) + 1

  def fetch(batch_index):
    nonlocal pending, first_step
    step_losses = [{k: float(v) for k, v in out.items()} for out in jax.device_get(pending)]
    _check_finite(step_losses, first_step, epoch, batch_index - len(pending) + 1, ckpt)
    for out in step_losses:
      for k, v in out.items():
        sums[k] = sums.get(k, 0.0) + v
    sums["batches"] = sums.get("batches", 0) + len(step_losses)
    bar.update(len(step_losses), loss=step_losses[-1]["total"])
    first_step += len(step_losses)
    pending = []

  for batch_index, batch in enumerate(
      parallel.prefetch_to_device(batches, run.mesh), start=start_batch
  ):
    state, out = steps.train_step(
        run.model, state, targets, batch, epoch, run.augment_key, method=run.method, tx=run.tx
    )
    pending.append(out)
    done = batch_index + 1
    stop = preemption.requested()
    save = stop or (done < total and done % cfg.checkpoint_every_steps == 0)
    if save or done % cfg.log_every_steps == 0 or done == total:
      fetch(batch_index)
    if save:
      if not bool(_all_finite(state.params)):
        raise FloatingPointError(
            f"non-finite parameters after train step {int(state.step)} (epoch {epoch}); not "
            f"saved. Last good checkpoint: {ckpt.latest_path()}. Lower config.train.lr."
        )
      ckpt.save(
          {"state": state, "targets": targets}, {**meta, "next_batch": done, "loss_sums": sums}
      )
    if stop:
      raise preemption.stopped(f"at epoch {epoch} batch {done}: saved {ckpt.latest_path()}")
  bar.close()
  return state, sums, bar.images_per_second()


def _epoch_summary(record):
  parts = [f"epoch {record['epoch']}", f"step {record['step']}"]
  for key, label in (
      ("kmeans_online_loss_view1", "k-means"),
      ("train_loss_within", "within"),
      ("train_loss_cross", "cross"),
      ("acc", "acc"),
      ("miou", "mIoU"),
      ("train_images_per_s", "img/s"),
  ):
    if key in record:
      parts.append(f"{label} {record[key]:.3f}")
  return " | ".join(parts)


def eval_classifier(run, state, targets):
  """View 1's classifier: the centroids (non-parametric) or the learned 1x1 conv (MDC)."""
  if run.method.parametric:
    return state.classifier[0]
  return steps.classifier_from_centroids(targets.centroids[0], run.config.kmeans.metric)


def centroids_epoch(meta):
  """The epoch whose centroids a checkpoint holds (its meta counts finished epochs at the end)."""
  return meta["epoch"] - 1 if meta.get("next_batch") is None else meta["epoch"]


def write_matching(workdir, epoch, scores, source):
  """Saves `workdir/matching.json`: the Hungarian cluster -> class map of an epoch's centroids,
  with the class names, so later commands (segment) can name the clusters."""
  names = list(source.class_names) or [f"class {i}" for i in range(source.num_classes)]
  reporting.write_json(
      os.path.join(workdir, MATCHING_FILE),
      {
          "epoch": epoch,
          "k": len(scores["cluster_to_class"]),
          "cluster_to_class": scores["cluster_to_class"],
          "class_names": names,
      },
  )


# Fields that may change when a run is resumed: they do not change its results.
# num_epochs may be raised to continue a run (checked against the checkpoint on resume).
_RESUMABLE_CHANGES = (
    "progress",
    "log_every_steps",
    "checkpoint_every_steps",
    "dataset.data_dir",
    "dataset.manual_dir",
    "dataset.scan_label_values",
    "dataset.on_bad_file",
    "num_epochs",
)


def config_changes(config, workdir):
  """{key: (saved, now)} for the fields where `config` would change the results of the run
  saved in `workdir/config.json` (empty when there is none)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    saved = _flatten(json.load(f))
  now = _flatten(json.loads(config.to_json_best_effort()))
  return {
      k: (saved.get(k), now.get(k))
      for k in sorted(set(saved) | set(now))
      if saved.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES
  }


def _check_same_config(config, workdir):
  """Refuses to resume a run in `workdir` with a config that would change its results."""
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    return
  changed = config_changes(config, workdir)
  if changed:
    details = ", ".join(
        f"config.{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:5]
    )
    raise ValueError(
        f"{workdir} holds a run with a different config ({details}); resuming "
        "would mix the two. Use a new --workdir, or the original config."
    )


def _flatten(tree, prefix=""):
  """{'a': {'b': 1}} -> {'a.b': 1}."""
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {
      k: v for key, value in tree.items() for k, v in _flatten(value, f"{prefix}{key}.").items()
  }


def train_and_evaluate(config, workdir):
  """Runs (or resumes) training in `workdir`; returns the final metrics dict.

  One run per workdir (a lock); SIGTERM/SIGINT stop it at the next batch boundary with a
  checkpoint where the phase allows (preemption.Stopped).
  """
  config_check.validate(config)
  run = Run(config, workdir)  # finds the data first: a bad path fails before anything is written
  _check_same_config(config, workdir)
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
  """(state, targets, start_epoch, start_batch, meta) from the latest readable checkpoint."""
  if ckpt.latest_path() is None:
    return (*initial_state(run), 0, None, {})
  state, targets = initial_state(run, pretrained=False)
  tree, meta = ckpt.restore_latest({"state": state, "targets": targets})
  start_epoch, start_batch = meta["epoch"], meta.get("next_batch")
  started = start_epoch + (start_batch is not None)
  if started > run.config.num_epochs:
    raise ValueError(
        f"{ckpt.latest_path()} is {started} epochs into the run; "
        f"config.num_epochs={run.config.num_epochs} is fewer: use at least "
        f"{started}, or a new --workdir"
    )
  reporting.say(
      f"resuming from {ckpt.latest_path()}: epoch {start_epoch}, "
      f"{'cluster phase' if start_batch is None else f'train batch {start_batch}'}"
  )
  return (
      parallel.replicate(tree["state"], run.mesh),
      parallel.replicate(tree["targets"], run.mesh),
      start_epoch,
      start_batch,
      meta,
  )


def _evaluate_epoch(run, state, targets, epoch, record, writer):
  """Evaluates an epoch when config.eval schedules it, then writes its metrics row."""
  config = run.config
  if run.val_source is not None and (
      (epoch + 1) % config.eval.every_epochs == 0 or epoch + 1 == config.num_epochs
  ):
    scores, _ = evaluate.evaluate(
        run.model,
        {"params": state.params, "batch_stats": state.batch_stats},
        eval_classifier(run, state, targets),
        run.val_source,
        config,
        run.mesh,
        run.method,
        vis_prefix=os.path.join(run.workdir, "vis", f"epoch{epoch:03d}"),
        progress=config.progress,
    )
    record = {**record, **{k: scores[k] for k in scores if not isinstance(scores[k], (list, dict))}}
    write_matching(run.workdir, epoch, scores, run.val_source)
  writer.write(record, record["step"])
  reporting.say(_epoch_summary(record))


def _train_and_evaluate(run, writer, ckpt):
  config, workdir = run.config, run.workdir
  state, targets, start_epoch, start_batch, meta = _resume_point(run, ckpt)
  if reporting.is_main_process():
    # Written whole, then renamed: the other processes of a resumed run read it meanwhile.
    config_path = os.path.join(workdir, "config.json")
    with reporting.writing(config_path):
      with open(config_path + ".tmp", "w") as f:
        f.write(config.to_json_best_effort(indent=2))
      os.replace(config_path + ".tmp", config_path)
  # The end-of-epoch checkpoint is saved before the epoch's evaluation: when that evaluation
  # did not finish (no metrics row), it is done now.
  unevaluated = (
      start_batch is None
      and "record" in meta
      and start_epoch - 1 not in reporting.recorded_epochs(workdir)
  )
  writer.drop_from_epoch(start_epoch - 1 if unevaluated else start_epoch)
  if run.val_source is None:
    reporting.say(f"evaluation skipped: {run.no_evaluation_reason}")
  if unevaluated:
    _evaluate_epoch(run, state, targets, start_epoch - 1, meta["record"], writer)

  for epoch in range(start_epoch, config.num_epochs):
    if start_batch is None:
      state, centroids, cluster_stats = cluster_phase(run, state, epoch)
      targets, counts, labels = label_phase(run, state, centroids, epoch)
      state = _new_classifier(run, state, epoch)
      meta = {
          "epoch": epoch,
          "next_batch": 0,
          "loss_sums": {},
          "cluster_stats": {**cluster_stats, "label_counts": counts.tolist()},
      }
      ckpt.save({"state": state, "targets": targets}, meta)
      start_batch = 0
    else:
      labels = resumed_labels(run, targets, epoch)
    state, sums, images_per_s = train_phase(
        run, state, targets, labels, epoch, start_batch, dict(meta["loss_sums"]), ckpt, meta
    )
    record = {"epoch": epoch, "step": int(state.step), "train_images_per_s": images_per_s}
    record.update({k: v for k, v in meta["cluster_stats"].items() if k != "label_counts"})
    record.update(
        {f"train_loss_{k}": v / sums["batches"] for k, v in sums.items() if k != "batches"}
    )
    ckpt.save(
        {"state": state, "targets": targets},
        {"epoch": epoch + 1, "next_batch": None, "record": record},
    )
    if preemption.requested():
      raise preemption.stopped(
          f"at the end of epoch {epoch}, before its evaluation: saved " f"{ckpt.latest_path()}"
      )
    _evaluate_epoch(run, state, targets, epoch, record, writer)
    start_batch = None

  if run.val_source is None:
    final = {"evaluation_skipped": run.no_evaluation_reason}
  else:
    final = evaluate.final_evaluation(
        run.model,
        {"params": state.params, "batch_stats": state.batch_stats},
        run.train_source,
        run.val_source,
        config,
        run.mesh,
        run.method,
        run.keys[_FRESH_STREAM],
        workdir,
        progress=config.progress,
    )
  final.update(run.bad_files())
  reporting.write_json(os.path.join(workdir, "final.json"), final)
  return final


def saved_config(workdir):
  """The resolved config a run saved in `workdir/config.json` (fields added to
  configs/common.py since then take their defaults)."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: is {workdir} a picie-jax run directory?")
  with open(path) as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(
      _with_new_fields(saved, json.loads(common.get_config().to_json_best_effort()))
  )


def _with_new_fields(tree, defaults):
  for key, value in defaults.items():
    if isinstance(value, dict):
      _with_new_fields(tree.setdefault(key, {}), value)
    else:
      tree.setdefault(key, value)
  return tree


def restore_latest(run):
  """(state, targets, meta) of the latest readable checkpoint of `run.workdir`."""
  directory = os.path.join(run.workdir, "checkpoints")
  restored = None
  if os.path.isdir(directory):  # else a Checkpointer would create it
    state, targets = initial_state(run, pretrained=False)
    restored = checkpoint.Checkpointer(directory).restore_latest(
        {"state": state, "targets": targets}
    )
  if restored is None:
    raise FileNotFoundError(
        f"no checkpoint under {directory}: train the run first "
        f"(picie-jax train --workdir {run.workdir})"
    )
  tree, meta = restored
  return tree["state"], tree["targets"], meta


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
  saved = _flatten(json.loads(config.to_json_best_effort()))
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
        f"cannot write the evaluation's results under {workdir} ({e}): " "make it writable"
    ) from None
  for path in files:
    if os.path.exists(path) and not (os.path.isfile(path) and os.access(path, os.W_OK)):
      raise PermissionError(f"{path} is not a writable file: remove it or make it writable")


def evaluate_workdir(workdir, overrides=None):
  """Re-evaluates the latest checkpoint of a run: its own clusters, fresh clusters, and
  optionally overclustering; writes `eval.json` and PNGs under workdir/eval.

  `overrides` ({dotted key: value}, e.g. {'eval.k_test': 54}) change the saved config where
  that does not change the model (EVAL_OVERRIDABLE); each change is reported in one line.
  """
  config = saved_config(workdir)
  for line in apply_eval_overrides(config, overrides or {}):
    reporting.say(f"eval overrides {line}")
  config_check.validate(config)
  out_dir = os.path.join(workdir, "eval")
  _require_writable(
      workdir, out_dir, [os.path.join(workdir, name) for name in ("eval.json", MATCHING_FILE)]
  )
  run = Run(config, workdir)
  if run.val_source is None:
    raise FileNotFoundError(f"nothing to evaluate against: {run.no_evaluation_reason}")
  state, targets, meta = restore_latest(run)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  results = {}
  if config.method != "pixel_kmeans" and meta["epoch"] > 0:
    scores, _ = evaluate.evaluate(
        run.model,
        variables,
        eval_classifier(run, state, targets),
        run.val_source,
        config,
        run.mesh,
        run.method,
        vis_prefix=os.path.join(out_dir, "epoch_clusters"),
        progress=config.progress,
    )
    write_matching(workdir, centroids_epoch(meta), scores, run.val_source)
    results["epoch_clusters"] = {"k": run.k, **scores}
  results.update(
      evaluate.final_evaluation(
          run.model,
          variables,
          run.train_source,
          run.val_source,
          config,
          run.mesh,
          run.method,
          run.keys[_FRESH_STREAM],
          out_dir,
          progress=config.progress,
      )
  )
  results.update(run.bad_files())
  reporting.write_json(os.path.join(workdir, "eval.json"), results)
  return results


def import_official_checkpoint(config, path, workdir):
  """Turns an official PiCIE or MDC `checkpoint.pth.tar` into a run directory (config.json and
  one checkpoint holding the network and the classifiers) that `eval` and `segment` accept.

  PiCIE's frozen classifiers become the views' centroids (their bias must be zero, as the
  official code leaves it); with `train.classifier='parametric'` (MDC) the learned classifier
  is kept as it is. The file fixes K (config.kmeans.k_train) and the epoch count; the rest of
  the config (dataset, evaluation) is the caller's. Returns the config written.
  """
  if os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileExistsError(f"{workdir} already holds a run; convert into a new --workdir")
  official = convert.read_picie_checkpoint(path)
  classifiers = official["classifiers"]
  config.kmeans.k_train = classifiers.shape[1]
  config.model.init, config.model.init_checkpoint = "random", ""
  config_check.validate(config)
  run = Run(config, workdir, load_data=False)
  if classifiers.shape[0] < run.num_views:
    raise ValueError(
        f"{path} has {classifiers.shape[0]} classifier(s); "
        f"config.method={config.method!r} needs {run.num_views}"
    )
  classifiers = jnp.asarray(classifiers[: run.num_views])
  if not run.method.parametric and np.any(classifiers[..., -1] != 0):
    raise ValueError(
        f"{path} has classifiers with a bias (a learned MDC classifier?): "
        "convert it with config.train.classifier='parametric'"
    )
  state, targets = initial_state(run)
  network = convert.import_state_dict(
      {"params": state.params, "batch_stats": state.batch_stats},
      official["state_dict"],
      config.model.backbone,
      source=path,
  )
  config.num_epochs = official["epoch"]
  state = state.replace(params=network["params"], batch_stats=network["batch_stats"])
  if run.method.parametric:
    state = state.replace(classifier=classifiers)
  targets = targets.replace(frozen=jax.tree.map(jnp.copy, network), centroids=classifiers[..., :-1])
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(
      parallel.replicate({"state": state, "targets": targets}, run.mesh),
      {"epoch": official["epoch"], "next_batch": None, "imported_from": os.path.abspath(path)},
  )
  ckpt.close()
  return config
