"""Potsdam (potsdam3 / potsdam6): the TFDS builder on a generated tree in IIC's layout (.mat
tiles written with scipy.io.savemat as IIC's potsdam_prepare.py does), the class settings, the
errors naming the file at fault, and one training epoch through configs/potsdam3.py."""

import json
import shutil

from conftest import TINY_OVERRIDES
import numpy as np
import pytest
import scipy.io

from configs import potsdam3
from configs import potsdam6
from picie_jax import train
from picie_jax.data import datasets

_IDS = {  # not sorted: the records keep list order
    "labelled_train.txt": ["7", "12", "3", "40"],
    "labelled_test.txt": ["25", "4", "9"],
    "unlabelled_train.txt": ["30", "1"],  # images only, as in the real tree
}
_TILE = (12, 16)  # the real tiles are 200x200; any size reads the same
# IIC code/datasets/segmentation/potsdam.py:418-421, restated: roads and cars, buildings and
# clutter, vegetation and trees.
_IIC_FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}


def _write_tile(root, tile_id, rng, with_label=True):
  rgbir = rng.integers(0, 256, _TILE + (4,), dtype=np.uint8)
  scipy.io.savemat(root / "imgs" / f"{tile_id}.mat", {"img": rgbir})
  if with_label:
    fine = rng.choice(np.array([0, 1, 2, 3, 4, 5, 255], np.int32), _TILE)
    scipy.io.savemat(root / "gt" / f"{tile_id}.mat", {"gt": fine})


@pytest.fixture(scope="module")
def potsdam_tree(tmp_path_factory):
  """A manual dir in the layout of IIC's Potsdam.tar.gz / STEGO's potsdam.zip."""
  root = tmp_path_factory.mktemp("potsdam_raw")
  (root / "imgs").mkdir()
  (root / "gt").mkdir()
  rng = np.random.default_rng(0)
  for list_name, ids in _IDS.items():
    (root / list_name).write_text("\n".join(ids) + "\n")
    for tile_id in ids:
      _write_tile(root, tile_id, rng, with_label=list_name != "unlabelled_train.txt")
  (root / "all.txt").write_text("\n".join(sum(_IDS.values(), [])) + "\n")
  return root


@pytest.fixture(scope="module")
def potsdam_data_dir(potsdam_tree, tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("potsdam_tfds")
  datasets.prepare(_config(potsdam3, manual_dir=potsdam_tree, data_dir=data_dir))
  return data_dir


def _config(module, **dataset_fields):
  c = module.get_config()
  for key, value in dataset_fields.items():
    c.dataset[key] = str(value)
  return c


def _mat(path, key):
  return scipy.io.loadmat(path)[key]


@pytest.mark.parametrize(
    "module,fine_to_class",
    [(potsdam3, _IIC_FINE_TO_COARSE), (potsdam6, {f: f for f in range(6)})],
)
def test_settings_read_the_split_lists(potsdam_tree, potsdam_data_dir, module, fine_to_class):
  config = _config(module, data_dir=potsdam_data_dir)
  assert config.kmeans.k_train == config.eval.k_test == len(set(fine_to_class.values()))
  for split, list_name in (("train", "labelled_train.txt"), ("val", "labelled_test.txt")):
    source = datasets.build_source(config, split)
    assert source.num_examples == len(_IDS[list_name]) and source.has_labels
    assert source.num_classes == len(source.class_names) == config.eval.k_test
    assert source.thing_classes is None
    for index, tile_id in enumerate(_IDS[list_name]):
      example = source.load(index)
      np.testing.assert_array_equal(
          example["image"], _mat(potsdam_tree / "imgs" / f"{tile_id}.mat", "img")[:, :, :3]
      )
      fine = _mat(potsdam_tree / "gt" / f"{tile_id}.mat", "gt")
      expected = np.vectorize(lambda f: fine_to_class.get(f, -1))(fine)
      assert (expected == -1).any() and (expected == config.eval.k_test - 1).any()
      np.testing.assert_array_equal(example["label"], expected)
  datasets.scan_sources(
      datasets.build_source(config, "train"), source, scan_label_values=True, progress=False
  )


def _broken_copy(tree, tmp_path):
  copy = tmp_path / "raw"
  shutil.copytree(tree, copy)
  return copy


def _prepare(manual_dir, tmp_path):
  datasets.prepare(_config(potsdam3, manual_dir=manual_dir, data_dir=tmp_path / "tfds"))


def test_missing_split_file_is_named(potsdam_tree, tmp_path):
  root = _broken_copy(potsdam_tree, tmp_path)
  (root / "labelled_test.txt").unlink()
  with pytest.raises(FileNotFoundError, match=r"labelled_test\.txt is missing.*Potsdam\.tar\.gz"):
    _prepare(root, tmp_path)


def test_missing_label_file_is_named(potsdam_tree, tmp_path):
  root = _broken_copy(potsdam_tree, tmp_path)
  (root / "gt" / "9.mat").unlink()
  with pytest.raises(FileNotFoundError, match=r"1 of 3 files are missing.*gt/9\.mat"):
    _prepare(root, tmp_path)


@pytest.mark.parametrize(
    "file,content,message",
    [
        ("imgs/3.mat", b"not a mat file" * 20, r"imgs/3\.mat is not a readable MATLAB \.mat"),
        ("imgs/3.mat", {"image": np.zeros((2, 2, 4), np.uint8)}, r"imgs/3\.mat has no array 'img'"),
        ("imgs/3.mat", {"img": np.zeros(_TILE + (4,))}, r"imgs/3\.mat: 'img' is float64"),
        ("gt/3.mat", {"gt": np.zeros((2, 2), np.int32)}, r"gt/3\.mat: 'gt' is int32 \(2, 2\)"),
        (
            "gt/3.mat",
            {"gt": np.array([[0, 6], [-1, 255]], np.int32).repeat(6, 0).repeat(8, 1)},
            r"gt/3\.mat: 'gt' has values \[-1, 6\] outside the classes 0-5",
        ),
    ],
)
def test_bad_mat_files_are_named(potsdam_tree, tmp_path, file, content, message):
  root = _broken_copy(potsdam_tree, tmp_path)
  if isinstance(content, bytes):
    (root / file).write_bytes(content)
  else:
    scipy.io.savemat(root / file, content)
  with pytest.raises(ValueError, match=message):
    _prepare(root, tmp_path)


def test_potsdam3_config_trains_an_epoch(potsdam_data_dir, tmp_path):
  """configs/potsdam3.py end to end on the generated tiles, with the tiny model of the loop
  tests (sides 32 stand for 224)."""
  config = potsdam3.get_config()
  config.update_from_flattened_dict(
      {
          **{k: v for k, v in TINY_OVERRIDES.items() if not k.startswith("dataset.")},
          "dataset.data_dir": str(potsdam_data_dir),
          "res2": 32,
          "res1": 32,
          "eval.res": 32,
          "num_epochs": 1,
          "kmeans.batch_size": 4,
          "train.batch_size": 4,
          "eval.batch_size": 4,
      }
  )
  final = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert final["fresh"]["k"] == 3 and 0.0 < final["fresh"]["acc"] <= 100.0, final
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    record = json.loads(f.readline())
  assert record["epoch"] == 0 and np.isfinite(record["train_loss_total"])
  assert 0.0 < record["acc"] <= 100.0
