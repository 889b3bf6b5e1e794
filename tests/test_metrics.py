"""Metrics against hand-worked cases and brute-force searches."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picie_jax.core import metrics


def test_confusion_histogram_hand_case_with_ignore_and_mask():
  labels_true = np.array([[0, 1, 2, 255], [1, 1, 0, -1]])
  labels_pred = np.array([[0, 0, 1, 2], [1, 1, 2, 0]])
  mask = np.array([[True, True, True, True], [True, False, True, True]])
  # Counted by hand, pixel (1, 1) masked, 255 and -1 ignored:
  # (0,0) (1,0) (2,1) (1,1) (0,2)
  expected = np.array([[1, 0, 1], [1, 1, 0], [0, 1, 0]])
  hist = jax.jit(metrics.confusion_histogram, static_argnums=(2, 3))(
      labels_true, labels_pred, 3, 3, mask
  )
  assert hist.dtype == jnp.int32 and hist.shape == (3, 3)
  np.testing.assert_array_equal(np.asarray(hist), expected)
  unmasked = metrics.confusion_histogram(labels_true, labels_pred, 3, 3)
  np.testing.assert_array_equal(
      np.asarray(unmasked), expected + np.array([[0, 0, 0], [0, 1, 0], [0, 0, 0]])
  )


def test_confusion_histogram_rectangular_matches_numpy_add_at():
  rng = np.random.default_rng(0)
  labels_true = rng.integers(-1, 5, size=(2, 7, 9))
  labels_true[0, 0] = 255
  labels_pred = rng.integers(0, 8, size=(2, 7, 9))
  mask_b = np.array([True, False])[:, None, None]
  expected = np.zeros((4, 8), np.int64)
  for t, p, keep in zip(
      labels_true.ravel(), labels_pred.ravel(), np.broadcast_to(mask_b, labels_true.shape).ravel()
  ):
    if keep and 0 <= t < 4:
      np.add.at(expected, (t, p), 1)
  hist = metrics.confusion_histogram(labels_true, labels_pred, 4, 8, mask_b)
  np.testing.assert_array_equal(np.asarray(hist), expected)


def brute_best_matching(hist):
  """Largest matched pixel count over all injective assignments of classes to clusters."""
  num_true, num_pred = hist.shape
  return max(
      sum(hist[t, p] for t, p in enumerate(preds))
      for preds in itertools.permutations(range(num_pred), num_true)
  )


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_hungarian_matches_brute_force_permutation_search(k):
  rng = np.random.default_rng(k)
  for _ in range(3):
    hist = rng.integers(0, 50, size=(k, k))
    mapping = metrics.hungarian_match(hist)
    assert sorted(mapping.tolist()) == list(range(k))
    assert sum(hist[mapping[p], p] for p in range(k)) == brute_best_matching(hist)


def test_hungarian_with_more_clusters_than_classes_leaves_extras_unmatched():
  rng = np.random.default_rng(11)
  hist = rng.integers(0, 50, size=(3, 5))
  mapping = metrics.hungarian_match(hist)
  matched = mapping[mapping >= 0]
  assert sorted(matched.tolist()) == [0, 1, 2] and np.sum(mapping == -1) == 2
  assert sum(hist[mapping[p], p] for p in range(5) if mapping[p] >= 0) == brute_best_matching(hist)


def test_majority_match_hand_case():
  hist = np.array([[4, 0, 3, 1], [1, 3, 0, 0], [0, 2, 5, 0]])
  np.testing.assert_array_equal(metrics.majority_match(hist), [0, 1, 2, 0])


def test_remap_histogram_hand_case():
  hist = np.array([[4, 0, 3], [1, 3, 0]])
  np.testing.assert_array_equal(metrics.remap_histogram(hist, [0, 1, 0], 2), [[7, 0], [1, 3]])
  np.testing.assert_array_equal(metrics.remap_histogram(hist, [1, -1, 0], 2), [[3, 4], [0, 1]])
  with pytest.raises(ValueError, match="mapping"):
    metrics.remap_histogram(hist, [0, 1], 2)


def test_scores_hand_case_with_thing_stuff_split():
  hist = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])
  scores = metrics.segmentation_scores(
      hist, np.arange(3), class_names=["a", "b", "c"], thing_classes=[0]
  )
  # acc = (5 + 3) / 11; IoU_a = 5 / (6 + 7 - 5); IoU_b = 3 / (5 + 4 - 3); c absent everywhere.
  assert scores["acc"] == pytest.approx(100 * 8 / 11)
  assert scores["per_class_iou"][:2] == pytest.approx([62.5, 50.0]) and np.isnan(
      scores["per_class_iou"][2]
  )
  assert scores["miou"] == pytest.approx(56.25)
  assert scores["iou_by_name"]["a"] == pytest.approx(62.5)
  assert scores["thing_acc"] == pytest.approx(100 * 5 / 6) and scores[
      "thing_miou"
  ] == pytest.approx(62.5)
  assert scores["stuff_acc"] == pytest.approx(100 * 3 / 5) and scores[
      "stuff_miou"
  ] == pytest.approx(50.0)
  with pytest.raises(ValueError, match="class_names"):
    metrics.segmentation_scores(hist, np.arange(3), class_names=["a"])


def test_scores_count_pixels_of_unmatched_clusters_as_errors():
  hist = np.array([[4, 0, 1], [0, 3, 2]])
  mapping = metrics.hungarian_match(hist)
  np.testing.assert_array_equal(mapping, [0, 1, -1])
  scores = metrics.segmentation_scores(hist, mapping)
  assert scores["acc"] == pytest.approx(70.0)
  assert scores["per_class_iou"] == pytest.approx([80.0, 60.0])


def test_overclustering_scores_hand_case():
  hist = np.array([[4, 0, 3], [1, 3, 0]])
  scores = metrics.segmentation_scores(hist, metrics.majority_match(hist))
  # Matched [[7, 0], [1, 3]]: acc 10/11, IoU 7/8 and 3/4.
  assert scores["acc"] == pytest.approx(100 * 10 / 11)
  assert scores["miou"] == pytest.approx((87.5 + 75.0) / 2)


def test_permuted_perfect_prediction_scores_100():
  rng = np.random.default_rng(3)
  labels_true = rng.integers(0, 5, size=(2, 6, 6))
  labels_true[0, :2] = 255
  permutation = rng.permutation(5)
  hist = metrics.confusion_histogram(labels_true, permutation[np.clip(labels_true, 0, 4)], 5, 5)
  scores = metrics.segmentation_scores(hist, metrics.hungarian_match(hist))
  assert scores["acc"] == pytest.approx(100.0) and scores["miou"] == pytest.approx(100.0)
