"""A run and its directory: the static setup (`Run`), the saved config and its comparison,
checkpoint restore and the resume checks, and the matching file that names the clusters.

Training (train.py), evaluation of a finished run (evaluate.py), the official-checkpoint import
(convert.py) and `segment` share these, so none of them imports another's job.
"""

import dataclasses
import json
import math
import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from configs import common
from picie_jax import checkpoint
from picie_jax import config_check
from picie_jax import parallel
from picie_jax import platform
from picie_jax import reporting
from picie_jax import steps
from picie_jax.data import datasets
from picie_jax.data import pipeline
from picie_jax.models import fpn

MATCHING_FILE = "matching.json"


@dataclasses.dataclass(frozen=True)
class ClusterStats:
  """What an epoch's cluster and label phases measured, kept for its metrics row."""

  init_buffer_bytes: int  # the k-means init buffers' size, all views
  init_loss: tuple  # per view: the k-means init's loss on its buffer
  online_loss: tuple  # per view: the mean squared distance over the pass
  # per view: the unweighted mean of the init loss and every online batch's (the reference's log)
  reference_loss: tuple
  label_counts: list  # (V, K) pixels per cluster in the label pass
  overcluster: "ClusterStats | None" = None  # PiCIE + H: the overclustering's

  @classmethod
  def of(cls, view_stats, label_counts):
    """From clustering.minibatch_kmeans' per-view stats and the label pass's (V, K) counts."""
    return cls(
        init_buffer_bytes=sum(s["init_buffer_bytes"] for s in view_stats),
        init_loss=tuple(s["init_loss"] for s in view_stats),
        online_loss=tuple(s["online_loss"] for s in view_stats),
        reference_loss=tuple(s["reference_loss"] for s in view_stats),
        label_counts=label_counts.tolist(),
    )

  def record(self):
    """The metrics row's fields: kmeans_init_buffer_bytes, kmeans_{init,online}_loss_view<v>,
    kmeans_loss_reference_view<v>, and PiCIE + H's as kmeans_overcluster_*."""
    record = {"kmeans_init_buffer_bytes": self.init_buffer_bytes}
    losses = zip(self.init_loss, self.online_loss, self.reference_loss)
    for view, (init, online, reference) in enumerate(losses, start=1):
      record.update(
          {
              f"kmeans_init_loss_view{view}": init,
              f"kmeans_online_loss_view{view}": online,
              f"kmeans_loss_reference_view{view}": reference,
          }
      )
    if self.overcluster is not None:
      for key, value in self.overcluster.record().items():
        record[key.replace("kmeans_", "kmeans_overcluster_", 1)] = value
    return record

  def to_json(self):
    tree = {**self.record(), "label_counts": self.label_counts}
    if self.overcluster is not None:
      tree["overcluster"] = self.overcluster.to_json()
    return tree

  @classmethod
  def from_json(cls, tree):
    views = range(1, len(tree["label_counts"]) + 1)
    overcluster = tree.get("overcluster")
    return cls(
        init_buffer_bytes=tree["kmeans_init_buffer_bytes"],
        init_loss=tuple(tree[f"kmeans_init_loss_view{v}"] for v in views),
        online_loss=tuple(tree[f"kmeans_online_loss_view{v}"] for v in views),
        # a checkpoint written before the reference loss was recorded has none
        reference_loss=tuple(tree.get(f"kmeans_loss_reference_view{v}", math.nan) for v in views),
        label_counts=tree["label_counts"],
        overcluster=None if overcluster is None else cls.from_json(overcluster),
    )


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
  """A checkpoint's place in the run (the JSON saved beside its arrays).

  Inside an epoch (`next_batch` set): the train batch to resume at, the epoch's summed losses
  so far and its cluster statistics. At an epoch boundary (`next_batch` None): `epoch` counts
  the finished epochs, with the last one's metrics row before its evaluation, or the file a
  converted run came from.
  """

  epoch: int
  next_batch: int | None = None
  loss_sums: dict = dataclasses.field(default_factory=dict)  # loss name -> sum, and 'batches'
  cluster_stats: ClusterStats | None = None
  record: dict | None = None
  imported_from: str | None = None

  @property
  def centroids_epoch(self):
    """The epoch whose centroids the checkpoint holds."""
    return self.epoch - 1 if self.next_batch is None else self.epoch

  def to_json(self):
    """The JSON form; fields left unset are left out."""
    tree = {"epoch": self.epoch, "next_batch": self.next_batch}
    if self.next_batch is not None:
      tree["loss_sums"] = self.loss_sums
    if self.cluster_stats is not None:
      tree["cluster_stats"] = self.cluster_stats.to_json()
    for name in ("record", "imported_from"):
      if getattr(self, name) is not None:
        tree[name] = getattr(self, name)
    return tree

  @classmethod
  def from_json(cls, tree):
    stats = tree.get("cluster_stats")
    return cls(
        epoch=tree["epoch"],
        next_batch=tree.get("next_batch"),
        loss_sums=dict(tree.get("loss_sums", {})),
        cluster_stats=None if stats is None else ClusterStats.from_json(stats),
        record=tree.get("record"),
        imported_from=tree.get("imported_from"),
    )


# Independent random streams derived from the seed.
AUGMENT_STREAM, KMEANS_STREAM, INIT_STREAM, CLASSIFIER_STREAM, FRESH_STREAM = range(5)


class Run:
  """The static parts of a run: config, model, step config, mesh, data sources, random keys.

  With the data, batch sizes are checked against the mesh and the data scanned (headers,
  label values) before anything trains. `load_data=False` leaves the sources out (None):
  labelling new images needs no dataset.
  """

  def __init__(self, config, workdir, load_data=True):
    self.config = config
    self.workdir = workdir
    self.mesh = parallel.make_mesh()
    self.step_config = steps.step_config_from_config(config, self.mesh)
    self.model = fpn.model_from_config(config.model, platform.platform_of(self.mesh))
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
    self.augment_key = parallel.replicate(self.keys[AUGMENT_STREAM], self.mesh)
    self.hosts = {"num_hosts": jax.process_count(), "host_id": jax.process_index()}

  @property
  def k(self):
    return self.config.kmeans.k_train

  @property
  def num_views(self):
    return self.step_config.num_views

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


def random_variables(run):
  """The network's random init ({'params', 'batch_stats'}), before config.model.init applies."""
  return steps.init_variables(run.model, run.keys[INIT_STREAM], run.config.res1)


def initial_state(run, variables=None):
  """TrainState of `variables` (default: the random init) and placeholder EpochTargets (shapes
  only matter for restoring). A state about to be overwritten by a checkpoint keeps the random
  init, so restoring needs no weight files; a fresh run passes convert.initial_variables'.
  """
  if variables is None:
    variables = random_variables(run)
  channels = run.step_config.feature_channels
  classifier = steps.initial_classifier(run.keys[CLASSIFIER_STREAM], run.step_config, run.k)
  tx = steps.make_optimizer(
      run.config.train.lr,
      run.config.train.weight_decay,
      steps.trains_classifier(run.step_config),
      run.config.model.freeze_backbone,
  )
  state = steps.TrainState.create(variables, classifier, tx)
  k_h = run.config.kmeans.k_overcluster
  targets = steps.EpochTargets(
      frozen=jax.tree.map(jnp.copy, dict(variables)),
      centroids=jnp.zeros((run.num_views, run.k, channels), jnp.float32),
      weights=jnp.ones((run.num_views, run.k), jnp.float32),
      overcluster_centroids=(
          jnp.zeros((run.num_views, k_h, channels), jnp.float32) if k_h else None
      ),
      overcluster_weights=jnp.ones((run.num_views, k_h), jnp.float32) if k_h else None,
  )
  return parallel.replicate(state, run.mesh), parallel.replicate(targets, run.mesh)


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
    state, targets = initial_state(run)
    restored = checkpoint.Checkpointer(directory).restore_latest(
        {"state": state, "targets": targets}
    )
  if restored is None:
    raise FileNotFoundError(
        f"no checkpoint under {directory}: train the run first "
        f"(picie-jax train --workdir {run.workdir})"
    )
  tree, meta = restored
  return tree["state"], tree["targets"], CheckpointMeta.from_json(meta)


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
    # read only by `probe` and `finetune`, not by training
    "probe.epochs",
    "probe.lr",
    "probe.batch_size",
    "finetune.labelled_fraction",
    "finetune.epochs",
    "finetune.lr",
    "finetune.head_lr",
    "finetune.batch_size",
)


def config_changes(config, workdir):
  """{key: (saved, now)} for the fields where `config` would change the results of the run
  saved in `workdir/config.json` (empty when there is none). A field added since the run was
  saved counts as its default, so upgrading picie_jax neither reruns nor refuses old runs."""
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    return {}
  saved = flatten(json.loads(saved_config(workdir).to_json_best_effort()))
  now = flatten(json.loads(config.to_json_best_effort()))
  return {
      k: (saved.get(k), now.get(k))
      for k in sorted(set(saved) | set(now))
      if saved.get(k) != now.get(k) and k not in _RESUMABLE_CHANGES
  }


def check_same_config(config, workdir):
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


def resume_point(run, ckpt):
  """(state, targets, start_epoch, start_batch, meta) from the latest readable checkpoint of
  `ckpt` (one exists); refuses a checkpoint further on than config.num_epochs."""
  state, targets = initial_state(run)
  tree, meta = ckpt.restore_latest({"state": state, "targets": targets})
  meta = CheckpointMeta.from_json(meta)
  start_epoch, start_batch = meta.epoch, meta.next_batch
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


def flatten(tree):
  """{'a': {'b': 1}} -> {'a.b': 1}: a config's JSON as dotted keys."""
  return flax.traverse_util.flatten_dict(tree, sep=".")


def write_config(config, workdir):
  """Saves the resolved config as `workdir/config.json` on process 0, written whole and then
  renamed: the other processes of a resumed run read it meanwhile."""
  if not reporting.is_main_process():
    return
  path = os.path.join(workdir, "config.json")
  with reporting.writing(path):
    with open(path + ".tmp", "w") as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(path + ".tmp", path)
