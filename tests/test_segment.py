"""`segment` on a tiny trained run: outputs, sizes, labels against an independent computation,
padding, errors, the CLI; and the run's matching.json."""

import json
import os
import shutil
import subprocess
import sys

from absl import flags
from conftest import TINY_OVERRIDES
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from picie_jax import evaluate
from picie_jax import main
from picie_jax import rundir
from picie_jax import segment
from picie_jax import steps
from picie_jax import train
from picie_jax.core import crf
from picie_jax.core import metrics
from picie_jax.core import transforms
from picie_jax.data import pipeline
from picie_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  from configs import synthetic as synthetic_config  # pylint: disable=g-import-not-at-top

  config = synthetic_config.get_config()
  config.update_from_flattened_dict(
      {**TINY_OVERRIDES, "num_epochs": 1, "dataset.num_train": 32, "kmeans.num_init_batches": 1}
  )
  workdir = tmp_path_factory.mktemp("run")
  train.train_and_evaluate(config, str(workdir))
  return workdir


@pytest.fixture(scope="module")
def restored(run_dir):
  """(run, state, targets, meta) of the run's latest checkpoint, restored for the checks."""
  run = rundir.Run(rundir.saved_config(run_dir), str(run_dir))
  return (run, *rundir.restore_latest(run))


def _photo(path, height, width, seed, mode="RGB"):
  """A smooth random picture (so the network sees structure), saved by its suffix's format."""
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, size=(4, 5, 3), dtype=np.uint8)
  image = Image.fromarray(coarse).resize((width, height), Image.BILINEAR).convert(mode)
  image.save(path)
  return path


def _truncated_jpeg(path):
  """A photo cut off mid-file, as an interrupted copy leaves it: its header reads, its pixels
  do not."""
  _photo(path, 120, 160, 7)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) * 2 // 3])
  return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
  root = tmp_path_factory.mktemp("photos")
  (root / "more").mkdir()
  (root / "more" / "notes.txt").write_text("not an image")
  return {
      "wide": _photo(root / "wide.png", 48, 130, 0),
      "wide_b": _photo(root / "wide_b.png", 48, 130, 5),
      "wide_c": _photo(root / "wide_c.png", 48, 130, 6),
      "tall": _photo(root / "tall.jpg", 75, 50, 1),
      "gray": _photo(root / "gray.png", 33, 33, 2, mode="L"),
      "dir": root / "more",
      "dup": _photo(root / "more" / "wide.png", 64, 64, 3),
      "other": _photo(root / "more" / "other.jpeg", 50, 70, 4),
      "broken": _truncated_jpeg(root / "more" / "broken.jpg"),  # skipped with a warning
  }


def _bilinear_upsample(x_hwk, height, width):
  """float64 bilinear resize with half-pixel centres and edge clamping (torch's
  align_corners=False), written out independently of the package."""

  def taps(out_size, in_size):
    src = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0, in_size - 1)
    low = np.floor(src).astype(int)
    return low, np.minimum(low + 1, in_size - 1), src - low

  r0, r1, fr = taps(height, x_hwk.shape[0])
  c0, c1, fc = taps(width, x_hwk.shape[1])
  rows = x_hwk[r0] * (1 - fr)[:, None, None] + x_hwk[r1] * fr[:, None, None]
  return rows[:, c0] * (1 - fc)[None, :, None] + rows[:, c1] * fc[None, :, None]


def _expected_labels(restored, path, input_hw):
  """Cluster ids from the checkpoint's network applied to this one image resized to
  `input_hw`, float64 cosine logits against the centroids, numpy upsampling; and the top-2
  logit margin per pixel."""
  run, state, targets, _ = restored
  original = np.asarray(Image.open(path).convert("RGB"))
  resized = tf.image.resize(original, input_hw, method="bilinear", antialias=True)
  x = jnp.asarray(np.clip(np.round(resized.numpy()), 0, 255)[None] / 255.0, jnp.float32)
  z, _ = steps.network_features(run.model, state.variables, x, train=False)
  z = np.asarray(z[0], np.float64)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  logits = _bilinear_upsample(
      z @ np.asarray(targets.centroids[0], np.float64).T, *original.shape[:2]
  )
  top2 = np.sort(logits, axis=-1)[..., -2:]
  return np.argmax(logits, axis=-1), top2[..., 1] - top2[..., 0]


def test_segment_writes_labels_at_original_size_equal_to_a_direct_computation(
    run_dir, restored, photos, tmp_path, monkeypatch
):
  """Batches of 2 (monkeypatched), so wide_c shares no batch and is padded with a blank row."""
  monkeypatch.setattr(segment, "group_batch_size", lambda *_: 2)
  out = tmp_path / "out"
  names = ["wide", "wide_b", "wide_c", "tall", "gray", "dir"]
  label_paths = segment.segment_images(str(run_dir), str(out), [str(photos[n]) for n in names])
  stems = ["wide", "wide_b", "wide_c", "tall", "gray", "other", "wide_2"]  # more/ is sorted
  assert label_paths == [str(out / f"{s}_labels.png") for s in stems]
  assert sorted(os.listdir(out)) == sorted(
      f"{s}_{kind}.png" for s in stems for kind in ("labels", "overlay")
  )
  sources = [photos[n] for n in ("wide", "wide_b", "wide_c", "tall", "gray", "other", "dup")]
  for stem, source in zip(stems, sources):
    with Image.open(out / f"{stem}_labels.png") as labels, Image.open(source) as original:
      assert labels.mode == "L" and labels.size == original.size
      assert np.asarray(labels).max() < K
    with Image.open(out / f"{stem}_overlay.png") as overlay:
      assert overlay.width > 2 * original.width and overlay.height > original.height

  assert segment.network_input_size(48, 130, 32) == (32, 96)
  for stem in ("wide", "wide_c"):
    expected, margin = _expected_labels(restored, photos[stem], (32, 96))
    got = np.asarray(Image.open(out / f"{stem}_labels.png"))
    clear = margin > 1e-4
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(got[clear], expected[clear])
    assert len(np.unique(got)) > 1  # a real segmentation, not one cluster everywhere


def test_segment_labels_the_good_photos_and_names_the_bad_ones(run_dir, photos, tmp_path, capsys):
  """A folder with a truncated JPEG, a text file named .png and a non-image file among good
  photos: the good ones are labelled, the bad ones warned about and summarised; --strict, or a
  folder where nothing could be labelled, is an error (one line from the CLI)."""
  folder = tmp_path / "folder"
  folder.mkdir()
  shutil.copy(photos["wide"], folder / "a.png")
  shutil.copy(photos["tall"], folder / "b.jpg")
  shutil.copy(photos["broken"], folder / "broken.jpg")
  (folder / "not_a.png").write_text("not a png")
  (folder / "notes.txt").write_text("ignored, as train ignores it")
  out = tmp_path / "out"
  written = segment.segment_images(str(run_dir), str(out), [str(folder)])
  assert written == [str(out / "a_labels.png"), str(out / "b_labels.png")]
  assert sorted(os.listdir(out)) == [
      f"{s}_{kind}.png" for s in ("a", "b") for kind in ("labels", "overlay")
  ]
  stdout = capsys.readouterr().out
  assert f"warning: skipping {folder}/not_a.png: not a readable image (cannot identify" in stdout
  assert f"warning: skipping {folder}/broken.jpg: not a readable image (image file is trunc" in (
      stdout
  )
  assert stdout.strip().splitlines()[-1] == (
      f"warning: could not label 2 of 4 images: {folder}/broken.jpg, {folder}/not_a.png"
  )

  with pytest.raises(ValueError, match=r"broken\.jpg: not a readable image \(image file is trun"):
    segment.segment_images(str(run_dir), str(out), [str(folder / "broken.jpg")], strict=True)
  with pytest.raises(ValueError, match=r"none of the 1 images could be read"):
    segment.segment_images(str(run_dir), str(out), [str(folder / "not_a.png")])
  try:
    for args, expected in (
        ([str(folder / "broken.jpg")], f"could not label 1 of 1 images: {folder}/broken.jpg"),
        (["--strict", str(folder)], f"{folder}/not_a.png: not a readable image (cannot ide"),
    ):
      argv = flags.FLAGS(["picie-jax", "segment", f"--workdir={run_dir}", f"--out={out}", *args])
      with pytest.raises(SystemExit) as e:
        main.main(argv)
      assert e.value.code == 1
      assert (
          capsys.readouterr()
          .err.strip()
          .splitlines()[-1]
          .startswith(f"picie-jax: error: {expected}")
      )
  finally:
    flags.FLAGS.unparse_flags()


def test_an_out_dir_under_a_regular_file_is_one_line(run_dir, photos, tmp_path, capsys):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  argv = [
      "picie-jax",
      "segment",
      f"--workdir={run_dir}",
      f"--out={a_file}/out",
      str(photos["tall"]),
  ]
  try:
    with pytest.raises(SystemExit) as e:
      main.main(flags.FLAGS(argv))
  finally:
    flags.FLAGS.unparse_flags()
  assert e.value.code == 1
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"picie-jax: error: {a_file}/out (--out): Not a directory; a part of it is a file, not a "
      "directory: choose another path"
  )


def test_segment_errors_name_the_file(run_dir, photos, tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.jpg is neither"):
    segment.segment_images(str(run_dir), str(tmp_path / "out"), [str(tmp_path / "missing.jpg")])
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="empty holds no"):
    segment.segment_images(str(run_dir), str(tmp_path / "out"), [str(empty)])
  untrained = tmp_path / "untrained"
  untrained.mkdir()
  shutil.copy(run_dir / "config.json", untrained)
  with pytest.raises(FileNotFoundError, match="no checkpoint under .*untrained/checkpoints"):
    segment.segment_images(str(untrained), str(tmp_path / "out"), [str(photos["wide"])])


def test_segment_with_crf_equals_the_crf_of_the_direct_computation(
    run_dir, restored, photos, tmp_path
):
  """--config.eval.crf=True: the CRF runs at the network input's size on the resized image,
  from 2 x the cosine logits (STEGO's cluster probe), and its probabilities are upsampled."""
  run, state, targets, _ = restored
  out = tmp_path / "crf_out"
  segment.segment_images(
      str(run_dir), str(out), [str(photos["wide"])], overrides={"eval.crf": True}
  )
  input_hw = (32, 96)
  original = np.asarray(Image.open(photos["wide"]).convert("RGB"))
  resized = segment.network_input(original, input_hw)
  z, _ = steps.network_features(
      run.model, state.variables, jnp.asarray(resized[None] / 255.0, jnp.float32), train=False
  )
  z = np.asarray(z[0], np.float64)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  logits = _bilinear_upsample(z @ np.asarray(targets.centroids[0], np.float64).T, *input_hw)
  refined = np.asarray(crf.dense_crf(2.0 * logits[None].astype(np.float32), resized[None]))[0]
  probabilities = _bilinear_upsample(refined.astype(np.float64), *original.shape[:2])
  top2 = np.sort(probabilities, axis=-1)[..., -2:]
  clear = top2[..., 1] - top2[..., 0] > 1e-4
  got = np.asarray(Image.open(out / "wide_labels.png"))
  assert clear.mean() > 0.9
  np.testing.assert_array_equal(got[clear], np.argmax(probabilities, -1)[clear])
  plain, _ = _expected_labels(restored, photos["wide"], input_hw)
  assert (got != plain).any()  # the CRF changed some labels: the two paths are not the same


def test_eval_with_crf_writes_its_own_results(run_dir, restored):
  """`eval --config.eval.crf=True` scores into eval_crf.json (the scores carry the CRF's
  parameters), leaving matching.json as it was; its eval step predicts the argmax of the CRF
  of 2 x the upsampled cosine logits on the image."""
  matching_before = (run_dir / "matching.json").read_text()
  results = evaluate.evaluate_workdir(str(run_dir), {"eval.crf": True})
  assert json.loads((run_dir / "eval_crf.json").read_text()) == results
  assert results["fresh"]["crf"] == crf.STEGO._asdict()
  assert results["epoch_clusters"]["crf"] == crf.STEGO._asdict()
  assert (run_dir / "matching.json").read_text() == matching_before
  assert os.path.isfile(run_dir / "eval_crf" / "final_fresh_segmentation.png")

  run, state, targets, _ = restored
  batch = next(pipeline.pass_batches(run.val_source, 4, run.config.eval.res, with_labels=True))
  classifier = evaluate.eval_classifier(run, state, targets)
  pred, _ = steps.eval_step(
      run.model,
      state.variables,
      classifier,
      batch,
      step_config=run.step_config,
      num_true=run.val_source.num_classes,
      use_crf=True,
  )
  scores = steps.prediction_scores(
      run.model, state.variables, classifier, batch["image"], run.step_config
  )
  upsampled = transforms.resize_bilinear(scores, batch["label"].shape[1:])
  want = np.argmax(crf.dense_crf(2.0 * upsampled, batch["image"]), -1)
  np.testing.assert_array_equal(pred, want)


def test_output_names_batches_and_legend_names():
  assert segment.output_stems(["a/x.png", "b/x.jpg", "c/x_2.png", "y.png"]) == [
      "x",
      "x_3",
      "x_2",
      "y",
  ]
  assert segment.group_batch_size(3, 16, 1) == 3
  assert segment.group_batch_size(3, 16, 8) == 8
  assert segment.group_batch_size(40, 16, 8) == 16
  matching = {"epoch": 2, "k": 3, "cluster_to_class": [1, -1, 0], "class_names": ["sky", "road"]}
  assert segment.cluster_names(3, matching, epoch=2) == [
      "road (cluster 0)",
      "cluster 1",
      "sky (cluster 2)",
  ]
  assert segment.cluster_names(3, matching, epoch=3) == ["cluster 0", "cluster 1", "cluster 2"]
  assert segment.cluster_names(3, None, epoch=2) == ["cluster 0", "cluster 1", "cluster 2"]


def test_matching_json_is_the_hungarian_matching_of_the_epoch_clusters(run_dir, restored):
  with open(run_dir / "matching.json") as f:
    matching = json.load(f)
  assert matching["epoch"] == 0 and matching["k"] == K
  assert matching["class_names"] == list(synthetic.CLASS_NAMES)
  run, state, targets, meta = restored
  assert meta.centroids_epoch == 0
  _, hist = evaluate.evaluate(
      run.model,
      state.variables,
      evaluate.eval_classifier(run, state, targets),
      run.val_source,
      run.config,
      run.mesh,
      run.step_config,
      progress=False,
  )
  assert matching["cluster_to_class"] == metrics.hungarian_match(hist).tolist()
  assert sorted(matching["cluster_to_class"]) == list(range(K))  # one-to-one, K = classes


def test_cli_segment(run_dir, photos, tmp_path):
  out = tmp_path / "cli_out"
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "picie_jax.main",
          "segment",
          f"--workdir={run_dir}",
          f"--out={out}",
          str(photos["tall"]),
          str(photos["dir"]),
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"wrote 3 label maps and overlays to {out}" in result.stdout
  assert f"could not label 1 of 4 images: {photos['broken']}" in result.stdout
  assert sorted(os.listdir(out)) == sorted(
      f"{s}_{kind}.png" for s in ("tall", "other", "wide") for kind in ("labels", "overlay")
  )
  usage = subprocess.run(
      [
          sys.executable,
          "-m",
          "picie_jax.main",
          "segment",
          f"--workdir={run_dir}",
          str(photos["tall"]),
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert usage.returncode != 0 and "--out" in usage.stderr
