"""Unsupervised segmentation evaluation: confusion histogram, cluster matching, Acc / mIoU.

`confusion_histogram` runs on device inside the jitted eval step; the rest is small host-side
NumPy on the (classes x clusters) histogram. Histograms are indexed [true class, predicted
cluster]. Per-call counts are int32 (fine for one batch); sum them across batches in int64.
"""

import jax.numpy as jnp
import numpy as np
import scipy.optimize


def confusion_histogram(labels_true, labels_pred, num_true, num_pred, mask=None):
  """(num_true, num_pred) int32 counts of (true, pred) pixel pairs; jittable.

  Pixels are ignored when the true label is outside [0, num_true) (so 255 = unlabelled and
  negative ignore labels drop out), when the prediction is outside [0, num_pred), or when
  `mask` (bool or 0/1, broadcastable to the labels) is unset. `num_true`/`num_pred` are static.
  """
  labels_true = jnp.asarray(labels_true)
  labels_pred = jnp.asarray(labels_pred)
  if labels_true.shape != labels_pred.shape:
    raise ValueError(
        f"labels_true shape {labels_true.shape} differs from labels_pred shape {labels_pred.shape}"
    )
  valid = (
      (labels_true >= 0) & (labels_true < num_true) & (labels_pred >= 0) & (labels_pred < num_pred)
  )
  if mask is not None:
    valid = valid & jnp.broadcast_to(jnp.asarray(mask).astype(bool), labels_true.shape)
  pair_index = jnp.where(valid, labels_true * num_pred + labels_pred, 0)
  counts = jnp.bincount(
      pair_index.ravel(), weights=valid.ravel().astype(jnp.int32), length=num_true * num_pred
  )
  return counts.astype(jnp.int32).reshape(num_true, num_pred)


def hungarian_match(hist):
  """One-to-one mapping pred cluster -> true class maximising the matched pixel count.

  Solves the assignment on the histogram (scipy's Hungarian solver). Returns an int array of
  shape (num_pred,); with more clusters than classes the clusters left unmatched map to -1
  (their pixels then count as errors).
  """
  hist = np.asarray(hist)
  pred_ids, true_ids = scipy.optimize.linear_sum_assignment(hist.T, maximize=True)
  mapping = np.full(hist.shape[1], -1, dtype=np.int64)
  mapping[pred_ids] = true_ids
  return mapping


def majority_match(hist):
  """Many-to-one mapping for overclustering: each pred cluster -> its most frequent true class."""
  return np.argmax(np.asarray(hist), axis=0).astype(np.int64)


def remap_histogram(hist, mapping, num_true):
  """(num_true, num_true) int64 histogram [true class, matched class]: columns summed per mapping.

  Clusters mapped to -1 are dropped, so their pixels stay in the row totals of `hist` only.
  """
  hist = np.asarray(hist, dtype=np.int64)
  mapping = np.asarray(mapping)
  if mapping.shape != (hist.shape[1],):
    raise ValueError(
        f"mapping has shape {mapping.shape}, expected ({hist.shape[1]},) "
        "entries, one per predicted cluster (column of hist)"
    )
  if np.any(mapping >= num_true):
    raise ValueError(f"mapping {mapping} has a class id >= num_true={num_true}")
  matched = mapping >= 0
  onehot = np.zeros((hist.shape[1], num_true), dtype=np.int64)
  onehot[np.flatnonzero(matched), mapping[matched]] = 1
  return hist @ onehot


def _class_set_scores(true_pixels, correct, iou, classes):
  """Pixel accuracy (%) over pixels whose true class is in `classes`, and their mean IoU (%).

  NaN when the set has no labelled pixels / no class with a defined IoU.
  """
  labelled = true_pixels[classes].sum()
  acc = 100.0 * correct[classes].sum() / labelled if labelled else float("nan")
  defined = iou[classes][~np.isnan(iou[classes])]
  miou = defined.mean() if defined.size else float("nan")
  return float(acc), float(miou)


def segmentation_scores(hist, mapping, class_names=None, thing_classes=None):
  """Acc and mIoU (percent) of matched predictions, from a [true, pred cluster] histogram.

  - acc: correctly matched pixels / all labelled pixels (pixels of unmatched clusters are errors).
  - per_class_iou: TP / (TP + FP + FN) per true class after matching; NaN for a class with
    neither ground-truth nor predicted pixels. miou: mean over the non-NaN classes.
  - class_names (one per true class) adds `iou_by_name`.
  - thing_classes (true class ids; the rest are stuff) adds thing_/stuff_ acc and miou, each
    class set evaluated on the one matching of all classes: acc over pixels whose ground truth
    is in the set (a thing pixel predicted as stuff is an error, so errors across the partition
    are not forgiven), miou = mean of the same per-class IoUs over the set.
  """
  hist = np.asarray(hist, dtype=np.int64)
  num_true = hist.shape[0]
  matched = remap_histogram(hist, mapping, num_true)
  true_pixels = hist.sum(axis=1)
  pred_pixels = matched.sum(axis=0)
  correct = np.diag(matched)
  union = true_pixels + pred_pixels - correct
  iou = np.where(union > 0, 100.0 * correct / np.maximum(union, 1), np.nan)
  acc, miou = _class_set_scores(true_pixels, correct, iou, np.arange(num_true))
  scores = {"acc": acc, "miou": miou, "per_class_iou": [float(v) for v in iou]}
  if class_names is not None:
    if len(class_names) != num_true:
      raise ValueError(f"class_names has {len(class_names)} names for {num_true} true classes")
    scores["iou_by_name"] = dict(zip(class_names, scores["per_class_iou"]))
  if thing_classes is not None:
    things = np.unique(np.asarray(thing_classes, dtype=np.int64))
    if things.size and (things.min() < 0 or things.max() >= num_true):
      raise ValueError(f"thing_classes {list(things)} must be class ids in [0, {num_true})")
    stuff = np.setdiff1d(np.arange(num_true), things)
    for name, classes in (("thing", things), ("stuff", stuff)):
      scores[f"{name}_acc"], scores[f"{name}_miou"] = _class_set_scores(
          true_pixels, correct, iou, classes
      )
  return scores
