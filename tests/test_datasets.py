"""Prepared COCO-Stuff / Cityscapes (TFDS builders on fake trees in the real layouts), exact
label reading, and training on an image folder without labels."""

import json
import os

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from configs import common
from picie_jax import train
from picie_jax.data import coco_stuff
from picie_jax.data import datasets
from picie_jax.data import pipeline
from picie_jax.data import prepared

_COCO_IDS = {
    "train2017": ["000000000009", "000000000025", "000000000030"],
    "val2017": ["000000000285", "000000000139", "000000000632", "000000000724"],
}
_COCO_FINE_VALUES = np.array([0, 1, 40, 90, 91, 95, 150, 181, 255], np.uint8)
_CITYSCAPES = {
    "train": ["aachen"],
    "val": ["frankfurt", "lindau"],
    "test": ["berlin"],
    "train_extra": ["augsburg", "bad-honnef"],
}
_CITYSCAPES_IDS = np.array([0, 1, 6, 7, 8, 20, 26, 33, 34, 255], np.uint8)


def _save(array, path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _random_image(rng, shape):
  return rng.integers(0, 256, shape + (3,), dtype=np.uint8)


@pytest.fixture(scope="module")
def coco_tree(tmp_path_factory):
  """A manual dir in the COCO-Stuff layout (lists not sorted by id; one unlisted image)."""
  root = tmp_path_factory.mktemp("coco_raw")
  rng = np.random.default_rng(0)
  for sub, ids in _COCO_IDS.items():
    for n, image_id in enumerate(ids + ["000000999999"]):
      shape = (24 + 8 * (n % 2), 32)
      _save(_random_image(rng, shape), root / "images" / sub / f"{image_id}.jpg")
      _save(rng.choice(_COCO_FINE_VALUES, shape), root / "annotations" / sub / f"{image_id}.png")
    os.makedirs(root / "curated" / sub)
    (root / "curated" / sub / coco_stuff.LIST_FILE).write_text("\n".join(ids) + "\n")
  return root


@pytest.fixture(scope="module")
def coco_prepared(coco_tree, tmp_path_factory):
  config = _config(
      "coco_stuff27", manual_dir=coco_tree, data_dir=tmp_path_factory.mktemp("coco_tfds")
  )
  datasets.prepare(config)
  return config


def _config(name, **dataset_fields):
  c = common.get_config()
  c.dataset.name = name
  for key, value in dataset_fields.items():
    c.dataset[key] = str(value)
  return c


def _coarse_reference(setting):
  """Fine id -> class of `setting`, from the shipped hierarchy, in numpy (255 and others -1)."""
  with open(os.path.join(os.path.dirname(datasets.__file__), "cocostuff27.json")) as f:
    coarse = np.array(json.load(f)["fine_to_coarse"])
  table = np.full(256, -1)
  table[:182] = {
      "coco_stuff27": coarse,
      "coco_thing12": np.where(coarse < 12, coarse, -1),
      "coco_stuff15": np.where(coarse >= 12, coarse - 12, -1),
  }[setting]
  return table


def _decoded(path):
  return tf.io.decode_image(tf.io.read_file(str(path)), channels=3).numpy()


@pytest.mark.parametrize(
    "setting,num_classes", [("coco_stuff27", 27), ("coco_stuff15", 15), ("coco_thing12", 12)]
)
def test_coco_settings_read_the_curated_lists(coco_prepared, coco_tree, setting, num_classes):
  config = _config(setting, data_dir=coco_prepared.dataset.data_dir)
  reference = _coarse_reference(setting)
  for split, sub in (("train", "train2017"), ("val", "val2017")):
    source = datasets.build_source(config, split)
    assert source.num_examples == len(_COCO_IDS[sub]) and source.has_labels
    assert source.num_classes == len(source.class_names) == num_classes
    for index, image_id in enumerate(_COCO_IDS[sub]):
      example = source.load(index)
      np.testing.assert_array_equal(
          example["image"], _decoded(coco_tree / "images" / sub / f"{image_id}.jpg")
      )
      fine = np.asarray(Image.open(coco_tree / "annotations" / sub / f"{image_id}.png"))
      np.testing.assert_array_equal(example["label"], reference[fine])
  assert source.thing_classes == (tuple(range(12)) if setting == "coco_stuff27" else None)


def test_prepared_records_keep_the_original_bytes(coco_prepared, coco_tree):
  """Also the up-front scan of a prepared split (first/last records, val label values)."""
  datasets.scan_sources(
      datasets.build_source(coco_prepared, "train"),
      datasets.build_source(coco_prepared, "val"),
      True,
      progress=False,
  )
  records = prepared.open_split(coco_stuff.PicieCocoStuff, coco_prepared.dataset.data_dir, "val")
  assert records[1]["image_file"].decode() == "images/val2017/000000000139.jpg"
  assert records[1]["image"] == (coco_tree / "images/val2017/000000000139.jpg").read_bytes()
  assert records[1]["label"] == (coco_tree / "annotations/val2017/000000000139.png").read_bytes()


def test_two_hosts_pass_visits_every_image_once(coco_prepared):
  source = datasets.build_source(coco_prepared, "val")
  seen = []
  for host_id in (0, 1):
    for batch in pipeline.pass_batches(
        source, 2, 16, with_labels=True, num_hosts=2, host_id=host_id
    ):
      assert batch["image"].shape == (1, 16, 16, 3)
      seen += batch["index"][batch["mask"]].tolist()
  assert sorted(seen) == list(range(source.num_examples))


def test_missing_archive_and_unprepared_data_are_named(coco_tree, tmp_path):
  os.symlink(coco_tree / "images", tmp_path / "images")
  os.symlink(coco_tree / "curated", tmp_path / "curated")
  config = _config("coco_thing12", manual_dir=tmp_path, data_dir=tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="stuffthingmaps_trainval2017.zip"):
    datasets.prepare(config)
  with pytest.raises(FileNotFoundError, match="picie-jax prepare"):
    datasets.build_source(config, "train")
  with pytest.raises(FileNotFoundError, match="config.dataset.manual_dir"):
    datasets.prepare(_config("coco_stuff27", manual_dir=tmp_path / "nope"))
  with pytest.raises(ValueError, match="config.dataset.data_dir='gs://bucket'"):
    datasets.build_source(_config("cityscapes27", data_dir="gs://bucket"), "val")


def _write_cityscapes(root):
  """leftImg8bit/<subset>/<city>/*_leftImg8bit.png, gtFine labelIds for train and val."""
  rng = np.random.default_rng(1)
  files = {}
  for subset, cities in _CITYSCAPES.items():
    for city in cities:
      for frame in (19, 3):
        stem = f"{city}_000000_{frame:06d}"
        shape = (16, 24)
        _save(
            _random_image(rng, shape),
            root / "leftImg8bit" / subset / city / f"{stem}_leftImg8bit.png",
        )
        if subset in ("train", "val"):
          _save(
              rng.choice(_CITYSCAPES_IDS, shape),
              root / "gtFine" / subset / city / f"{stem}_gtFine_labelIds.png",
          )
        files.setdefault(subset, []).append(f"{city}/{stem}")
  return {subset: sorted(stems) for subset, stems in files.items()}


def test_cityscapes_splits_and_label_ids(tmp_path):
  stems = _write_cityscapes(tmp_path / "raw")
  config = _config("cityscapes27", manual_dir=tmp_path / "raw", data_dir=tmp_path / "tfds")
  datasets.prepare(config)
  train_source = datasets.build_source(config, "train")
  assert not train_source.has_labels
  assert train_source.num_examples == len(stems["test"]) + len(stems["train_extra"])
  last = stems["train_extra"][-1]
  np.testing.assert_array_equal(
      train_source.load(train_source.num_examples - 1)["image"],
      _decoded(tmp_path / "raw" / "leftImg8bit" / "train_extra" / f"{last}_leftImg8bit.png"),
  )
  val_source = datasets.build_source(config, "val")
  order = [("val", s) for s in stems["val"]] + [("train", s) for s in stems["train"]]
  assert val_source.num_examples == len(order) and val_source.num_classes == 27
  ids = _CITYSCAPES_IDS.astype(int)
  reference = dict(zip(ids, np.where((ids >= 7) & (ids <= 33), ids - 7, -1)))
  for index, (subset, stem) in enumerate(order):
    example = val_source.load(index)
    np.testing.assert_array_equal(
        example["image"],
        _decoded(tmp_path / "raw" / "leftImg8bit" / subset / f"{stem}_leftImg8bit.png"),
    )
    raw = np.asarray(
        Image.open(tmp_path / "raw" / "gtFine" / subset / f"{stem}_gtFine_labelIds.png")
    )
    np.testing.assert_array_equal(example["label"], np.vectorize(reference.get)(raw))


def _folder_with_labels(root, label_arrays):
  rng = np.random.default_rng(2)
  for n, label in enumerate(label_arrays):
    _save(_random_image(rng, label.shape[:2]), root / "val" / "images" / f"im{n}.png")
    _save(label, root / "val" / "labels" / f"im{n}.png")
  return _config("image_folder", root=root)


def test_16_bit_label_png_reads_exactly(tmp_path):
  values = np.array([[0, 1, 2, 255]], np.uint16).repeat(4, 0)
  config = _folder_with_labels(tmp_path, [values, values.astype(np.uint8)])
  config.dataset.num_classes = 3
  assert Image.open(tmp_path / "val" / "labels" / "im0.png").mode == "I;16"
  source = datasets.build_source(config, "val")
  for index in (0, 1):
    np.testing.assert_array_equal(source.load(index)["label"][0], [0, 1, 2, -1])


@pytest.mark.parametrize(
    "bad_label,message",
    [
        (np.array([[0, 300]], np.uint16), r"im1\.png has values the dataset does not define"),
        (np.zeros((1, 2, 3), np.uint8), r"im1\.png is not a single-channel"),
    ],
)
def test_bad_label_files_are_named(tmp_path, bad_label, message):
  config = _folder_with_labels(tmp_path, [np.zeros((1, 2), np.uint8), bad_label])
  config.dataset.num_classes = 3
  source = datasets.build_source(config, "val")
  with pytest.raises(ValueError, match=message):
    list(pipeline.pass_batches(source, 2, 8, with_labels=True))


def test_image_folder_without_labels_trains_and_skips_evaluation(tiny_config, tmp_path, capsys):
  """Also the run summary of dataset.on_bad_file='skip': a truncated photo is left out."""
  rng = np.random.default_rng(3)
  for n in range(16):
    _save(_random_image(rng, (40, 48)), tmp_path / "photos" / "train" / "images" / f"{n}.jpg")
  truncated = tmp_path / "photos" / "train" / "images" / "7.jpg"
  truncated.write_bytes(truncated.read_bytes()[:600])  # the header stays readable
  tiny_config.dataset.name = "image_folder"
  tiny_config.dataset.root = str(tmp_path / "photos")
  tiny_config.dataset.on_bad_file = "skip"
  tiny_config.num_epochs = 1
  tiny_config.method = "mdc"  # one view: the quickest real training loop
  tiny_config.train.cross_view_loss = False
  final = train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
  assert "val/images does not exist" in final["evaluation_skipped"]
  assert final["bad_files"] == [str(truncated)]
  assert "evaluation skipped" in capsys.readouterr().out
  with open(tmp_path / "run" / "final.json") as f:
    assert json.load(f) == final
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    record = json.loads(f.readline())
  assert record["epoch"] == 0 and "acc" not in record and np.isfinite(record["train_loss_total"])
  assert os.listdir(tmp_path / "run" / "checkpoints")
