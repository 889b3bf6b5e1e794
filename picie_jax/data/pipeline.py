"""The one tf.data input pipeline for every dataset: index -> decode -> base resize/crop -> batch.

A dataset is a `Source`: a number of examples and a TF function loading example `i`. Batches
are built from index lists, so the order is exact and reproducible: a pass over the data in
fixed order (label and evaluation phases) or a seeded shuffle per (epoch, stream): the train
phase, the cluster phase and the fresh clusters each draw their own, as the reference's loaders
reshuffle (the permutation is of the whole split, so any host or device count sees the same
global batches), both with the last batch padded (index -1, mask False) so no example is dropped or counted
twice. Each host loads only its own slice of every global batch.

A batch that fails to load is re-read one example at a time (only then, so it costs nothing
otherwise) to name the one bad file; with config.dataset.on_bad_file='skip' an undecodable
file's example is masked out of its batch (like padding, so every count stays exact).
"""

from collections.abc import Callable
from collections.abc import Sequence
import dataclasses

from absl import logging
import numpy as np
import tensorflow as tf

IGNORE_LABEL = -1
ON_BAD_FILE = ("error", "skip")


class BadFiles:
  """The files of a split that cannot be decoded: an error naming the file, or (policy 'skip')
  one warning per file and a record of it for the run summary."""

  def __init__(self, policy="error"):
    if policy not in ON_BAD_FILE:
      raise ValueError(f"config.dataset.on_bad_file={policy!r} must be one of {ON_BAD_FILE}")
    self.policy = policy
    self.files = {}  # file -> why it could not be read, in the order found

  def report(self, source_name, file, message):
    if self.policy == "error":
      raise ValueError(
          f"{source_name}: cannot decode {file}: {message}. Replace or remove the "
          "file, or set config.dataset.on_bad_file='skip' to leave it out."
      )
    if file not in self.files:
      self.files[file] = message
      logging.warning("%s: skipping %s (cannot decode it: %s)", source_name, file, message)


@dataclasses.dataclass(frozen=True)
class Source:
  """A dataset split: `load(index)` returns {'image': uint8 HxWx3, 'label': int32 HxW (-1 ignored)}.

  `unreadable_file(index)` (eager) gives (file, error) for a file of example `index` that
  cannot be decoded, else None; `scan(values, progress)` is the up-front check of the split
  (see datasets.py). Both are optional (generated data cannot be unreadable).
  """

  name: str
  num_examples: int
  load: Callable[[tf.Tensor], dict]
  has_labels: bool
  num_classes: int = 0
  class_names: Sequence[str] = ()
  thing_classes: Sequence[int] | None = None
  describe: Callable[[int], str] = str  # index -> file name (for error messages)
  unreadable_file: Callable[[int], tuple | None] | None = None
  scan: Callable[..., None] | None = None
  bad_files: BadFiles = dataclasses.field(default_factory=BadFiles)


def resize_shorter_and_center_crop(image_hwc, side, method):
  """Resizes the shorter side to `side` and centre-crops a side x side square (DESIGN base transform)."""
  shape = tf.shape(image_hwc)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = tf.cast(side, tf.float32) / tf.minimum(h, w)
  new_h = tf.maximum(side, tf.cast(tf.round(h * scale), tf.int32))
  new_w = tf.maximum(side, tf.cast(tf.round(w * scale), tf.int32))
  resized = tf.image.resize(
      image_hwc, (new_h, new_w), method=method, antialias=method == "bilinear"
  )
  top = (new_h - side) // 2
  left = (new_w - side) // 2
  return resized[top : top + side, left : left + side]


def _prepare(source, side, with_labels):
  """index -> dict(image uint8 side^2 x3, index, mask[, label int32 side^2])."""

  def fn(index):
    valid = index >= 0
    example = source.load(tf.maximum(index, 0))
    image = resize_shorter_and_center_crop(example["image"], side, "bilinear")
    out = {
        "image": tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8),
        "index": tf.maximum(index, 0),
        "mask": valid,
    }
    if with_labels:
      label = resize_shorter_and_center_crop(example["label"][..., None], side, "nearest")
      out["label"] = tf.cast(label[..., 0], tf.int32)
    return out

  return fn


def batch_indices(indices, global_batch, num_hosts, host_id):
  """Pads `indices` with -1 to whole global batches; returns this host's (num_batches, local) slice."""
  if global_batch % num_hosts:
    raise ValueError(f"batch size {global_batch} is not divisible by the {num_hosts} hosts")
  local = global_batch // num_hosts
  num_batches = -(-len(indices) // global_batch)
  padded = np.full(num_batches * global_batch, -1, np.int64)
  padded[: len(indices)] = indices
  return padded.reshape(num_batches, num_hosts, local)[:, host_id]


# The passes that read the train split in a seeded order of their own (epoch_order's `stream`).
TRAIN_ORDER = 0x5EED
CLUSTER_ORDER = 0xC1057E5
FRESH_ORDER = 0xF5E54


def epoch_order(num_examples, seed, epoch, stream=TRAIN_ORDER):
  """The order of one pass of `stream` in `epoch`: a permutation drawn from (seed, epoch, stream)
  only, so every host, device count and resume sees the same one."""
  return np.random.default_rng([seed, epoch, stream]).permutation(num_examples)


def make_batches(source, host_indices, side, with_labels=False):
  """An iterator of numpy batches for the given (num_batches, local) index array."""
  prepare = _prepare(source, side, with_labels)

  def batches_from(start):
    ds = tf.data.Dataset.from_tensor_slices(host_indices[start:].reshape(-1))
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(host_indices.shape[1], drop_remainder=True).prefetch(2).as_numpy_iterator()

  return recovering(
      batches_from,
      len(host_indices),
      lambda position, error: _reread_batch(
          source, prepare, host_indices[position], position, error, side, with_labels
      ),
  )


def recovering(items_from, count, on_error):
  """Yields the `count` items of `items_from(start)` (an iterator from item `start`); an item
  that raises is replaced by `on_error(position, error)` and iteration restarts after it."""
  position, items = 0, items_from(0)
  while position < count:
    try:
      item = next(items)
    except tf.errors.OpError as e:
      item = on_error(position, e)
      items = items_from(position + 1)
    yield item
    position += 1


def check_example(source, index, error):
  """After `error` on example `index`: reports an undecodable file to `source.bad_files`
  (which raises unless skipping); anything else (a label with undefined values, of the wrong
  format or size) raises naming the example."""
  bad = source.unreadable_file(index) if source.unreadable_file else None
  if bad is None:
    raise ValueError(
        f"{source.name}: cannot use {source.describe(index)}: {error.message}"
    ) from None
  source.bad_files.report(source.name, *bad)


def _reread_batch(source, prepare, indices, batch_number, error, side, with_labels):
  """A failed batch rebuilt one example at a time, undecodable examples masked out."""
  examples, skipped = [], False
  for index in indices:
    try:
      examples.append({k: v.numpy() for k, v in prepare(tf.constant(index)).items()})
    except tf.errors.OpError as e:
      check_example(source, int(index), e)
      examples.append(_masked_example(side, with_labels))
      skipped = True
  if not skipped:
    names = ", ".join(source.describe(int(i)) for i in indices if i >= 0)
    raise ValueError(
        f"{source.name}: could not read batch {batch_number} (one of: {names}): {error.message}"
    ) from None
  return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def _masked_example(side, with_labels):
  """What a skipped example becomes: as padding, masked out of every count."""
  example = {"image": np.zeros((side, side, 3), np.uint8), "index": np.int64(0), "mask": np.False_}
  if with_labels:
    example["label"] = np.full((side, side), IGNORE_LABEL, np.int32)
  return example


def pass_batches(
    source, global_batch, side, *, with_labels=False, num_hosts=1, host_id=0, start_batch=0
):
  """All examples once in index order; last batch padded and masked."""
  idx = batch_indices(np.arange(source.num_examples), global_batch, num_hosts, host_id)
  return make_batches(source, idx[start_batch:], side, with_labels)


def train_batches(
    source,
    global_batch,
    side,
    *,
    seed,
    epoch,
    stream=TRAIN_ORDER,
    num_hosts=1,
    host_id=0,
    start_batch=0,
):
  """All examples once in the seeded order of (`epoch`, `stream`), from batch `start_batch` on
  (resume)."""
  idx = epoch_batch_indices(
      source.num_examples, global_batch, seed, epoch, stream, num_hosts, host_id
  )
  return make_batches(source, idx[start_batch:], side)


def epoch_batch_indices(num_examples, global_batch, seed, epoch, stream, num_hosts, host_id):
  """This host's (num_batches, local) examples of the seeded order of (`epoch`, `stream`),
  padded with -1: what `train_batches` feeds it."""
  return batch_indices(
      epoch_order(num_examples, seed, epoch, stream), global_batch, num_hosts, host_id
  )


def num_batches(num_examples, global_batch):
  return -(-num_examples // global_batch)
