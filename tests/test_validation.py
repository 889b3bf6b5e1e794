"""Everything a run checks before its first epoch (config values, batch sizes vs devices, the
data scan), bad files named one by one or skipped, EXIF orientation, and `eval` overrides."""

import json
import logging
import os
import subprocess
import sys
import types

import numpy as np
from PIL import Image
from PIL import ImageOps
import pytest

from configs import common
from picie_jax import config_check
from picie_jax import evaluate
from picie_jax import parallel
from picie_jax import rundir
from picie_jax import train
from picie_jax.data import datasets
from picie_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder(root, n=3, size=(12, 16), label_values=(0, 1, 2, 255), num_classes=3):
  """root/{train,val}/images/im<i>.png and val/labels/im<i>.png; returns its config."""
  rng = np.random.default_rng(0)
  for split in ("train", "val"):
    os.makedirs(root / split / "images", exist_ok=True)
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, size + (3,), np.uint8)).save(
          root / split / "images" / f"im{i}.png"
      )
  os.makedirs(root / "val" / "labels", exist_ok=True)
  for i in range(n):
    Image.fromarray(rng.choice(np.array(label_values, np.uint8), size)).save(
        root / "val" / "labels" / f"im{i}.png"
    )
  c = common.get_config()
  c.dataset.name = "image_folder"
  c.dataset.root = str(root)
  c.dataset.num_classes = num_classes
  c.progress = False
  return c


def _scan(config):
  train_source = datasets.build_source(config, "train")
  val_source, _ = datasets.evaluation_source(config)
  datasets.scan_sources(train_source, val_source, config.dataset.scan_label_values, progress=False)
  return train_source, val_source


def _truncate(path):
  """Keeps the header (the scan reads it) but cuts the pixel data: decoding fails."""
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def test_config_values_are_checked_up_front():
  c = common.get_config()
  c.res1, c.res2 = 320, 256
  c.dataset.num_classes = 300
  c.dataset.on_bad_file = "ignore"
  c.dataset.name = "image_folder"
  with pytest.raises(ValueError) as e:
    config_check.validate(c)
  for key in (
      "config.res2=256 must be >= config.res1=320",
      "config.dataset.num_classes=300",
      "config.dataset.on_bad_file='ignore'",
      "config.dataset.root is empty",
  ):
    assert key in str(e.value), key


def test_batch_sizes_that_change_results_must_split_and_the_error_says_what_would():
  c = common.get_config()
  c.kmeans.batch_size, c.train.batch_size, c.eval.batch_size, c.train.lr = 256, 6, 7, 1e-4
  config_check.check_batch_sizes(c, num_devices=2, num_hosts=1)  # eval pads, 7 is fine
  with pytest.raises(ValueError) as e:
    config_check.check_batch_sizes(c, num_devices=4, num_hosts=2)
  assert (
      "config.train.batch_size=6 must be a multiple of the 4 devices (on 2 processes) of this "
      "run: e.g. --config.train.batch_size=8 --config.train.lr=0.000133 (linear scaling)"
  ) in str(e.value)
  assert "kmeans" not in str(e.value) and "eval.batch_size" not in str(e.value)
  with pytest.raises(ValueError, match=r"kmeans.batch_size=256 .* --config.kmeans.batch_size=512"):
    config_check.check_batch_sizes(c, num_devices=512, num_hosts=64)


def test_the_eval_batch_pads_to_the_devices():
  assert parallel.padded_batch_size(64, 128) == 128
  assert parallel.padded_batch_size(256, 128) == 256
  assert parallel.padded_batch_size(200, 128) == 256


@pytest.mark.parametrize(
    "break_it,message",
    [
        (
            lambda root: Image.fromarray(np.zeros((12, 15), np.uint8)).save(
                root / "val" / "labels" / "im1.png"
            ),
            r"labels/im1\.png is 15x12 but its image .*im1\.png is 16x12",
        ),
        (
            lambda root: Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(
                root / "val" / "labels" / "im2.png"
            ),
            r"labels/im2\.png is not a single-channel",
        ),
        (
            lambda root: (root / "val" / "labels" / "im0.png").write_bytes(b"\x89PNG garbage"),
            r"cannot decode .*labels/im0\.png: not a PNG",
        ),
        (
            lambda root: (root / "train" / "images" / "im2.png").write_bytes(b"not an image"),
            r"cannot decode .*train/images/im2\.png",
        ),
    ],
)
def test_data_scan_names_the_file_before_training(tmp_path, break_it, message):
  config = _folder(tmp_path)
  break_it(tmp_path)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_label_value_scan_and_its_switch(tmp_path):
  config = _folder(tmp_path, label_values=(0, 1, 7))  # 7 is not one of the 3 classes
  with pytest.raises(ValueError, match=r"val/labels/im0\.png has values .* 7"):
    _scan(config)
  config.dataset.scan_label_values = False
  _scan(config)  # headers are fine; values unchecked


def test_missing_val_labels_is_an_error_when_classes_are_declared(tmp_path):
  config = _folder(tmp_path)
  os.rename(tmp_path / "val" / "labels", tmp_path / "val" / "hidden")
  with pytest.raises(FileNotFoundError, match=r"val/labels does not exist.*num_classes=0"):
    _scan(config)
  config.dataset.num_classes = 0
  assert datasets.evaluation_source(config)[0] is None  # unlabelled: trains, no scores


def test_decode_error_names_the_one_bad_file_or_skips_it(tmp_path, caplog):
  config = _folder(tmp_path, n=4)
  _truncate(tmp_path / "val" / "images" / "im2.png")
  _, val_source = _scan(config)  # the header is intact: found only by decoding
  with pytest.raises(ValueError) as e:
    list(pipeline.pass_batches(val_source, 4, 8, with_labels=True))
  assert "im2.png" in str(e.value) and "on_bad_file='skip'" in str(e.value)
  assert not any(f"im{i}.png" in str(e.value) for i in (0, 1, 3))

  config.dataset.on_bad_file = "skip"
  val_source = datasets.build_source(config, "val")
  with caplog.at_level(logging.WARNING):
    for _ in range(2):  # warned once, however many passes meet it
      (batch,) = pipeline.pass_batches(val_source, 4, 8, with_labels=True)
      assert batch["mask"].tolist() == [True, True, False, True]
      assert batch["index"][batch["mask"]].tolist() == [0, 1, 3]
      assert (batch["label"][2] == -1).all()
  assert list(val_source.bad_files.files) == [str(tmp_path / "val" / "images" / "im2.png")]
  assert sum("skipping" in r.getMessage() for r in caplog.records) == 1


def _rotated_jpeg(path, stored_hw3, orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(stored_hw3).save(path, exif=exif, quality=95)


def test_exif_orientation_is_honoured_for_image_folders(tmp_path):
  """A phone photo stored landscape with Orientation=6 (shown rotated 90 degrees clockwise)
  and its label drawn on the picture as shown: they must align."""
  stored = np.zeros((16, 24, 3), np.uint8)
  stored[:, :8] = 255  # bright left third of the stored array: the top of the shown picture
  config = _folder(tmp_path, n=0)
  _rotated_jpeg(tmp_path / "val" / "images" / "phone.jpg", stored, 6)
  shown = np.asarray(ImageOps.exif_transpose(Image.open(tmp_path / "val" / "images" / "phone.jpg")))
  label = (shown.mean(-1) > 128).astype(np.uint8)  # 24x16 as shown
  Image.fromarray(label).save(tmp_path / "val" / "labels" / "phone.png")
  val_source = datasets.build_source(config, "val")
  val_source.scan(labels=True, values=True, progress=False)  # sizes agree as shown
  example = val_source.load(0)
  np.testing.assert_array_equal(example["label"], label)
  np.testing.assert_array_equal(example["image"].numpy().mean(-1) > 128, label.astype(bool))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pil_exif_transpose(orientation):
  stored = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  image = Image.fromarray(stored)
  exif = image.getexif()
  exif[0x0112] = orientation
  image.info["exif"] = exif.tobytes()
  want = np.asarray(ImageOps.exif_transpose(image))
  np.testing.assert_array_equal(datasets.apply_orientation(stored, orientation), want)


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
  """A run directory's saved config (the pixel baseline on tiny synthetic data): overrides are
  applied and checked before any checkpoint is read."""
  from conftest import TINY_OVERRIDES  # pylint: disable=g-import-not-at-top

  from configs import pixel_kmeans_synthetic  # pylint: disable=g-import-not-at-top

  config = pixel_kmeans_synthetic.get_config()
  config.update_from_flattened_dict(
      {**TINY_OVERRIDES, "num_epochs": 0, "dataset.num_train": 16, "dataset.num_val": 8}
  )
  workdir = str(tmp_path_factory.mktemp("pixel_run"))
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return workdir


def test_eval_overrides_apply_report_and_refuse(pixel_run, monkeypatch, capsys):
  """The overridden config is the one evaluation gets (the scoring itself is the CLI test of
  test_train.py; here it is replaced by a stub that reports what it was given)."""
  with pytest.raises(
      ValueError,
      match=r"config.model.width cannot be changed at eval \(8 -> 16\): it changes the model",
  ):
    evaluate.evaluate_workdir(pixel_run, {"model.width": 16, "eval.k_test": 4})
  checkpoint_state = types.SimpleNamespace(variables={"params": {}, "batch_stats": {}})
  monkeypatch.setattr(
      rundir, "restore_latest", lambda run: (checkpoint_state, None, rundir.CheckpointMeta(epoch=0))
  )
  monkeypatch.setattr(
      evaluate,
      "final_evaluation",
      lambda *args, **kwargs: {
          "fresh": {
              "k": args[4].eval.k_test,
              "batch_size": args[4].eval.batch_size,
              "root": args[4].dataset.root,
          }
      },
  )
  saved_k = rundir.saved_config(pixel_run).eval.k_test
  results = evaluate.evaluate_workdir(
      pixel_run, {"eval.k_test": 4, "model.width": 8, "eval.batch_size": 8}
  )
  assert results == {"fresh": {"k": 4, "batch_size": 8, "root": ""}}
  with open(os.path.join(pixel_run, "eval.json")) as f:
    assert json.load(f) == results
  out = capsys.readouterr().out
  assert f"eval overrides config.eval.k_test: {saved_k} -> 4" in out
  assert "config.eval.batch_size: 16 -> 8" in out and "model.width" not in out
  assert rundir.saved_config(pixel_run).eval.k_test == saved_k  # the run's config is kept


def test_eval_fails_before_computing_when_it_cannot_write(pixel_run, monkeypatch):
  target = os.path.join(pixel_run, "eval.json")
  if os.path.exists(target):
    os.remove(target)
  os.makedirs(target)  # a directory where the file goes
  monkeypatch.setattr(rundir, "Run", None)  # would fail if it got as far as building the run
  try:
    with pytest.raises(PermissionError, match=r"eval\.json is not a writable file"):
      evaluate.evaluate_workdir(pixel_run)
  finally:
    os.rmdir(target)


def test_cli_eval_passes_its_overrides(pixel_run):
  out = subprocess.run(
      [
          sys.executable,
          "-m",
          "picie_jax.main",
          "eval",
          f"--workdir={pixel_run}",
          "--config.eval.k_test=5",
          "--config.model.fpn_channels=32",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode != 0
  assert "config.model.fpn_channels cannot be changed at eval (16 -> 32)" in out.stderr
