"""The linear probe and fine-tuning: label downsampling by hand, the probe's Adam steps against a
float64 NumPy logistic regression, both commands end to end on tiny runs, the labelled subset,
and the error for a dataset without train labels."""

import json
import os
import subprocess
import sys

from conftest import TINY_OVERRIDES
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
import pytest

from picie_jax import finetune
from picie_jax import probe
from picie_jax import rundir
from picie_jax import steps
from picie_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_labels_at_features_take_the_pixel_nearest_each_cell_centre():
  labels = np.arange(16).reshape(1, 4, 4)
  np.testing.assert_array_equal(probe.labels_at_features(labels, 2, 2), [[[5, 7], [13, 15]]])
  # 6 label rows over 4 feature rows: centres 0.75, 2.25, 3.75, 5.25 -> rows 0, 2, 3, 5
  tall = np.arange(6).reshape(1, 6, 1) * np.ones((1, 1, 3), np.int64)
  np.testing.assert_array_equal(probe.labels_at_features(tall, 4, 1)[0, :, 0], [0, 2, 3, 5])
  assert probe.labels_at_features(np.full((1, 4, 4), -1), 2, 2).min() == -1


def _numpy_probe(features, labels_at_features, masks, num_classes, lr, steps):
  """Softmax regression with bias and Adam (optax's defaults), float64, zero init: the head
  (K, C+1) after `steps` steps cycling over the batches, and the loss before each step."""
  b1, b2, eps = 0.9, 0.999, 1e-8
  head = np.zeros((num_classes, features[0].shape[-1] + 1))
  m, v, seen = np.zeros_like(head), np.zeros_like(head), []
  for t in range(1, steps + 1):
    i = (t - 1) % len(features)
    x = features[i].reshape(-1, features[i].shape[-1]).astype(np.float64)
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    y = labels_at_features[i].reshape(-1)
    keep = (y >= 0) & np.repeat(masks[i], len(y) // len(masks[i]))
    x, y = x[keep], y[keep]
    logits = x @ head.T
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    seen.append(-np.mean(np.log(p[np.arange(len(y)), y])))
    p[np.arange(len(y)), y] -= 1
    grad = p.T @ x / len(y)
    m = b1 * m + (1 - b1) * grad
    v = b2 * v + (1 - b2) * grad**2
    head -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
  return head, seen


def test_probe_steps_match_a_numpy_logistic_regression():
  rng = np.random.default_rng(0)
  num_classes, channels, lr, num_steps = 4, 5, 0.05, 30
  features = [rng.normal(size=(3, 2, 2, channels)).astype(np.float32) for _ in range(2)]
  # labels at twice the feature resolution: nearest sampling keeps rows and columns 1 and 3
  labels = [rng.integers(-1, num_classes, size=(3, 4, 4)) for _ in range(2)]
  masks = [np.array([True, True, False]), np.array([True, True, True])]
  expected_head, expected_losses = _numpy_probe(
      features, [y[:, 1::2, 1::2] for y in labels], masks, num_classes, lr, num_steps
  )
  state = probe.head_state(num_classes, channels, optax.adam(lr))
  update = jax.jit(probe.probe_update)
  losses = []
  for t in range(num_steps):
    i = t % 2
    state, loss = update(state, features[i], jnp.asarray(labels[i]), masks[i])
    losses.append(float(loss))
  np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
  np.testing.assert_allclose(state.classifier, expected_head, rtol=1e-4, atol=1e-5)
  assert losses[-2] < losses[0] and losses[-1] < losses[1]  # each batch's loss went down


def test_labelled_subset_is_fixed_by_the_seed_and_nested():
  tenth = finetune.labelled_subset(200, 0.1, seed=3)
  assert len(tenth) == 20 and len(set(tenth)) == 20 and tenth.max() < 200
  np.testing.assert_array_equal(tenth, finetune.labelled_subset(200, 0.1, seed=3))
  assert set(finetune.labelled_subset(200, 0.01, seed=3)) <= set(tenth)
  assert not np.array_equal(tenth, finetune.labelled_subset(200, 0.1, seed=4))
  assert len(finetune.labelled_subset(200, 0.001, seed=3)) == 1
  np.testing.assert_array_equal(finetune.labelled_subset(5, 1.0, seed=3), np.arange(5))


def _tiny_config(**overrides):
  from configs import synthetic  # pylint: disable=g-import-not-at-top

  config = synthetic.get_config()
  config.update_from_flattened_dict({**TINY_OVERRIDES, **overrides})
  return config


def test_probe_of_a_trained_run_end_to_end(tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_tiny_config(num_epochs=1), workdir)
  probe.probe_workdir(workdir, {"probe.epochs": 3, "probe.lr": 0.05, "probe.batch_size": 16})
  with open(os.path.join(workdir, probe.PROBE_FILE)) as f:
    scores = json.load(f)
  assert 0 <= scores["acc"] <= 100 and 0 <= scores["miou"] <= 100
  assert len(scores["per_class_iou"]) == 8 and scores["network"] == "checkpoint after 1 epochs"
  assert scores["probe"] == {"epochs": 3, "lr": 0.05, "batch_size": 16}
  assert len(scores["train_loss"]) == 3 and scores["train_loss"][-1] < scores["train_loss"][0]
  for name in ("probe_segmentation.png", "probe_confusion.png"):
    assert os.path.isfile(os.path.join(workdir, "probe", name)), name
  # the run's saved config is left as it was, and the probe's settings never block a resume
  assert rundir.saved_config(workdir).probe.epochs == 10
  assert not rundir.config_changes(_tiny_config(num_epochs=1, **{"probe.epochs": 3}), workdir)


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("iic", {"method": "iic"}),
        (  # 2 x width channels, not fpn_channels
            "iic_res12",
            {"method": "iic", "model.backbone": "resnet18_res12", "model.fpn_channels": 24},
        ),
        (
            "mdc",
            {"method": "mdc", "train.classifier": "parametric", "train.cross_view_loss": False},
        ),
    ],
)
def test_probe_of_any_method_scores_its_linear_head(name, overrides, tmp_path):
  """IIC's heads and MDC's classifier are not the probe's: the probe's head, over the network's
  own feature channels, is trained and scored (a 0-epoch run: its init)."""
  workdir = str(tmp_path / name)
  os.makedirs(workdir)
  rundir.write_config(_tiny_config(num_epochs=0, **overrides), workdir)
  scores = probe.probe_workdir(workdir, {"probe.epochs": 1, "probe.batch_size": 16})
  assert scores["k"] == 8 and 0 <= scores["acc"] <= 100 and scores["network"] == "init (random)"
  # the head is scored on the features it was trained on (IIC's are raw, PiCIE's normalised)
  run, variables, _ = probe.supervised_run(workdir, {}, "probe")
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), np.uint8))
  trained_on = steps.plain_features(run.model, variables, images, run.step_config)
  scored_on = steps.plain_features(
      run.model, variables, images, probe.head_step_config(run.step_config)
  )
  np.testing.assert_array_equal(scored_on, trained_on)


def test_finetune_from_a_random_init_end_to_end(tmp_path):
  workdir, out = str(tmp_path / "init"), str(tmp_path / "finetuned")
  os.makedirs(workdir)
  rundir.write_config(_tiny_config(num_epochs=0), workdir)  # a 0-epoch run: its init
  results = finetune.finetune_workdir(
      workdir,
      out,
      {
          "finetune.labelled_fraction": 0.5,
          "finetune.epochs": 2,
          "finetune.lr": 1e-3,
          "finetune.head_lr": 0.05,
          "finetune.batch_size": 8,
      },
  )
  assert results["labelled_images"] == 24 and results["network"] == "init (random)"
  assert len(results["train_loss"]) == 2 and results["train_loss"][1] < results["train_loss"][0]
  with open(os.path.join(out, finetune.FINETUNE_FILE)) as f:
    written = json.load(f)
  assert written["acc"] == results["acc"] and 0 <= written["acc"] <= 100
  assert 0 <= written["miou"] <= 100
  assert rundir.saved_config(out).finetune.labelled_fraction == 0.5
  assert os.path.isfile(os.path.join(out, "finetune", "finetune_segmentation.png"))
  with pytest.raises(ValueError, match="config.res1 cannot be changed"):
    finetune.finetune_workdir(workdir, out, {"res1": 64})


def test_a_dataset_without_train_labels_is_one_clear_error(tmp_path):
  rng = np.random.default_rng(0)
  for split, sub in (("train", "images"), ("val", "images"), ("val", "labels")):
    os.makedirs(tmp_path / "data" / split / sub)
    for i in range(2):
      if sub == "images":
        picture = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
      else:
        picture = rng.integers(0, 3, (40, 40), dtype=np.uint8)
      Image.fromarray(picture).save(tmp_path / "data" / split / sub / f"im{i}.png")
  config = _tiny_config(
      num_epochs=0,
      **{"dataset.name": "image_folder", "dataset.root": str(tmp_path / "data")},
  )
  config.dataset.num_classes = 3
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  rundir.write_config(config, workdir)
  result = subprocess.run(
      [sys.executable, "-m", "picie_jax.main", "probe", "--workdir", workdir],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "picie-jax: error: image_folder/train has no train labels: the linear probe and "
      "fine-tuning train on them (evaluation alone needs only val labels)"
  )
