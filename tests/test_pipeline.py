"""The tf.data pipeline and the dataset sources, on small fixtures in the real file formats."""

import os

import numpy as np
from PIL import Image
import pytest

from configs import common
from picie_jax.data import datasets
from picie_jax.data import pipeline


def _folder_config(root, num_classes=3):
  c = common.get_config()
  c.dataset.name = "image_folder"
  c.dataset.root = str(root)
  c.dataset.num_classes = num_classes
  return c


def _write_folder(root, split, n, size=(20, 30), with_labels=True, label_values=(0, 1, 2, 255)):
  rng = np.random.default_rng(0)
  os.makedirs(root / split / "images", exist_ok=True)
  if with_labels:
    os.makedirs(root / split / "labels", exist_ok=True)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(
        root / split / "images" / f"im{i:02d}.jpg"
        if i % 2
        else root / split / "images" / f"im{i:02d}.png"
    )
    if with_labels:
      label = rng.choice(np.array(label_values, np.uint8), size=size)
      Image.fromarray(label).save(root / split / "labels" / f"im{i:02d}.png")


def test_batch_indices_pad_and_split_hosts():
  idx = pipeline.batch_indices(np.arange(10), 4, num_hosts=2, host_id=1)
  np.testing.assert_array_equal(idx, [[2, 3], [6, 7], [-1, -1]])
  both = np.concatenate([pipeline.batch_indices(np.arange(10), 4, 2, h) for h in (0, 1)], 1)
  assert sorted(i for i in both.ravel() if i >= 0) == list(range(10))
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.batch_indices(np.arange(10), 5, num_hosts=2, host_id=0)


def test_epoch_order_is_a_seeded_permutation():
  a = pipeline.epoch_order(50, seed=1, epoch=3)
  np.testing.assert_array_equal(a, pipeline.epoch_order(50, seed=1, epoch=3))
  assert sorted(a) == list(range(50))
  assert not np.array_equal(a, pipeline.epoch_order(50, seed=1, epoch=4))


@pytest.mark.parametrize("stream", [pipeline.CLUSTER_ORDER, pipeline.FRESH_ORDER])
def test_pass_orders_are_per_epoch_and_the_same_for_any_host_split(tmp_path, stream):
  """The cluster pass's and fresh clusters' orders: a permutation of the split per (seed, epoch,
  stream), new each epoch and unlike the train order; the global batches are the same read
  by one host or split over two (so over any device count), and again from a resume."""
  _write_folder(tmp_path, "train", 11, with_labels=False)
  source = datasets.build_source(_folder_config(tmp_path), "train")
  order = pipeline.epoch_order(11, seed=3, epoch=1, stream=stream)
  assert sorted(order) == list(range(11)) and not np.array_equal(order, np.arange(11))
  assert not np.array_equal(order, pipeline.epoch_order(11, seed=3, epoch=2, stream=stream))
  assert not np.array_equal(order, pipeline.epoch_order(11, seed=3, epoch=1))

  def read(**hosts):
    return [
        b["index"][b["mask"]]
        for b in pipeline.train_batches(source, 4, 8, seed=3, epoch=1, stream=stream, **hosts)
    ]

  one_host = read()
  np.testing.assert_array_equal(np.concatenate(one_host), order)
  two_hosts = [
      np.concatenate(pair)
      for pair in zip(read(num_hosts=2, host_id=0), read(num_hosts=2, host_id=1))
  ]
  for a, b in zip(one_host, two_hosts):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(np.concatenate(read()), order)  # a resume reads it again


def test_resize_shorter_and_center_crop_against_pil_geometry():
  # A 20x30 image whose columns encode their x coordinate: the crop must keep the centre columns.
  image = np.tile(np.arange(30, dtype=np.float32)[None, :, None], (20, 1, 3))
  out = pipeline.resize_shorter_and_center_crop(image, 10, "nearest").numpy()
  assert out.shape == (10, 10, 3)
  # shorter side 20 -> 10, width 30 -> 15, centre crop left = 2; PIL resizes the same way.
  pil = np.asarray(Image.fromarray(image[..., 0].astype(np.uint8)).resize((15, 10), Image.NEAREST))
  np.testing.assert_array_equal(out[..., 0], pil[:, 2:12])
  np.testing.assert_array_equal(out[0, :, 0], np.arange(5, 25, 2))


def test_pass_batches_cover_every_image_once_with_mask(tmp_path):
  _write_folder(tmp_path, "val", 5)
  source = datasets.build_source(_folder_config(tmp_path), "val")
  batches = list(pipeline.pass_batches(source, 2, 16, with_labels=True))
  assert len(batches) == 3
  indices = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(indices, np.arange(5))
  assert batches[-1]["mask"].tolist() == [True, False]
  assert batches[0]["image"].dtype == np.uint8 and batches[0]["image"].shape == (2, 16, 16, 3)
  labels = np.concatenate([b["label"] for b in batches])
  assert set(np.unique(labels)) <= {-1, 0, 1, 2}


def test_train_batches_resume_from_batch(tmp_path):
  _write_folder(tmp_path, "train", 7, with_labels=False)
  source = datasets.build_source(_folder_config(tmp_path), "train")
  full = [b["index"] for b in pipeline.train_batches(source, 2, 8, seed=3, epoch=1)]
  tail = [b["index"] for b in pipeline.train_batches(source, 2, 8, seed=3, epoch=1, start_batch=2)]
  assert len(full) == 4
  for a, b in zip(full[2:], tail):
    np.testing.assert_array_equal(a, b)


def test_label_values_outside_the_label_set_name_the_file(tmp_path):
  _write_folder(tmp_path, "val", 3, label_values=(0, 1, 7))
  source = datasets.build_source(_folder_config(tmp_path), "val")
  with pytest.raises(ValueError, match=r"labels/im0\d\.png"):
    list(pipeline.pass_batches(source, 2, 8, with_labels=True))


def test_unreadable_image_names_the_file(tmp_path):
  _write_folder(tmp_path, "train", 3, with_labels=False)
  (tmp_path / "train" / "images" / "im01.jpg").write_bytes(b"not a jpeg")
  source = datasets.build_source(_folder_config(tmp_path), "train")
  with pytest.raises(ValueError, match=r"im01\.jpg"):
    list(pipeline.pass_batches(source, 4, 8))


def test_missing_root_names_the_config_key(tmp_path):
  c = _folder_config(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.dataset.root"):
    datasets.build_source(c, "train")
  c.dataset.name = "imagenet"
  with pytest.raises(ValueError, match="config.dataset.name"):
    datasets.build_source(c, "train")
