"""The one tf.data input pipeline for every dataset: index -> decode -> base resize/crop -> batch.

A dataset is a `Source`: a number of examples and a TF function loading example `i`. Batches
are built from index lists, so the order is exact and reproducible: a pass over the data in
fixed order (cluster, label, evaluation phases) or a seeded shuffle per epoch (training),
both with the last batch padded (index -1, mask False) so no example is dropped or counted
twice. Each host loads only its own slice of every global batch.
"""
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow as tf

IGNORE_LABEL = -1


@dataclasses.dataclass(frozen=True)
class Source:
  """A dataset split: `load(index)` returns {'image': uint8 HxWx3, 'label': int32 HxW (-1 ignored)}."""
  name: str
  num_examples: int
  load: Callable[[tf.Tensor], dict]
  has_labels: bool
  num_classes: int = 0
  class_names: Sequence[str] = ()
  thing_classes: Optional[Sequence[int]] = None
  describe: Callable[[int], str] = str  # index -> file name (for error messages)


def resize_shorter_and_center_crop(image_hwc, side, method):
  """Resizes the shorter side to `side` and centre-crops a side x side square (DESIGN base transform)."""
  shape = tf.shape(image_hwc)
  h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
  scale = tf.cast(side, tf.float32) / tf.minimum(h, w)
  new_h = tf.maximum(side, tf.cast(tf.round(h * scale), tf.int32))
  new_w = tf.maximum(side, tf.cast(tf.round(w * scale), tf.int32))
  resized = tf.image.resize(image_hwc, (new_h, new_w), method=method,
                            antialias=method == "bilinear")
  top = (new_h - side) // 2
  left = (new_w - side) // 2
  return resized[top:top + side, left:left + side]


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
  padded[:len(indices)] = indices
  return padded.reshape(num_batches, num_hosts, local)[:, host_id]


def epoch_order(num_examples, seed, epoch):
  """The training order of one epoch: a permutation drawn from (seed, epoch) only."""
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_examples)


def make_batches(source, host_indices, side, with_labels=False):
  """An iterator of numpy batches for the given (num_batches, local) index array."""
  ds = tf.data.Dataset.from_tensor_slices(host_indices.reshape(-1))
  ds = ds.map(_prepare(source, side, with_labels), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(host_indices.shape[1], drop_remainder=True).prefetch(2)
  return _with_clear_errors(ds.as_numpy_iterator(), source, host_indices)


def _with_clear_errors(iterator, source, host_indices):
  """Re-raises a decode error with the files of the failing batch named."""
  for batch_number in range(host_indices.shape[0]):
    try:
      yield next(iterator)
    except tf.errors.OpError as e:
      names = ", ".join(source.describe(int(i)) for i in host_indices[batch_number] if i >= 0)
      raise ValueError(
          f"{source.name}: could not read an example of batch {batch_number} "
          f"(one of: {names}): {e.message}") from None


def pass_batches(source, global_batch, side, *, with_labels=False, num_hosts=1, host_id=0,
                 start_batch=0):
  """All examples once in index order; last batch padded and masked."""
  idx = batch_indices(np.arange(source.num_examples), global_batch, num_hosts, host_id)
  return make_batches(source, idx[start_batch:], side, with_labels)


def train_batches(source, global_batch, side, *, seed, epoch, num_hosts=1, host_id=0,
                  start_batch=0):
  """All examples once in the seeded order of `epoch`, from batch `start_batch` on (resume)."""
  idx = batch_indices(epoch_order(source.num_examples, seed, epoch), global_batch,
                      num_hosts, host_id)
  return make_batches(source, idx[start_batch:], side)


def num_batches(num_examples, global_batch):
  return -(-num_examples // global_batch)
