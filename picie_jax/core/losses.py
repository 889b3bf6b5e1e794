"""PiCIE train-phase loss: prototype logits and class-weighted cross-entropy.

The classifier is non-parametric: logits are inner products with frozen k-means centroids
(the paper's 1x1 conv with the centroids as weight and zero bias). Weighted cross-entropy
follows PyTorch's `CrossEntropyLoss(weight=w)`: `sum_i w[y_i] l_i / sum_i w[y_i]`.
"""

import jax
import jax.numpy as jnp


def _at_least_float32(x):
  """The dtype of `x` promoted to float32 or wider (bfloat16 -> float32, float64 stays)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def prototype_logits(features_bhwc, centroids_kc):
  """Logits `s_k = <z, mu_k>` for every pixel feature, shape (B, H, W, K).

  Computed in float32 (or float64 when given float64) at full matmul precision, since the
  logits of near-tied clusters differ by little and TPUs default to bfloat16 passes.
  """
  dtype = jnp.promote_types(_at_least_float32(features_bhwc), _at_least_float32(centroids_kc))
  return jnp.einsum(
      "bhwc,kc->bhwk",
      features_bhwc.astype(dtype),
      centroids_kc.astype(dtype),
      precision=jax.lax.Precision.HIGHEST,
  )


def weighted_cross_entropy(logits_bhwk, labels_bhw, class_weights_k, mask_bhw=None):
  """`sum_i w[y_i] * l_i / sum_i w[y_i]` over valid pixels, with `l_i = -log softmax(s_i)[y_i]`.

  A pixel is valid when `0 <= y_i < K` and its mask (bool or 0/1 float, broadcastable to the
  labels, e.g. (B, 1, 1) per image) is set. Returns 0, not NaN, when no valid pixel carries
  weight, so a fully padded batch contributes nothing.
  """
  num_classes = logits_bhwk.shape[-1]
  class_weights_k = jnp.asarray(class_weights_k)
  if class_weights_k.shape != (num_classes,):
    raise ValueError(
        f"class_weights_k has shape {class_weights_k.shape}, expected ({num_classes},) "
        "to match the last axis of logits_bhwk"
    )
  log_probs = jax.nn.log_softmax(logits_bhwk, axis=-1)
  in_range = (labels_bhw >= 0) & (labels_bhw < num_classes)
  safe_labels = jnp.where(in_range, labels_bhw, 0)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  pixel_weights = class_weights_k.astype(nll.dtype)[safe_labels] * in_range
  if mask_bhw is not None:
    pixel_weights = pixel_weights * jnp.broadcast_to(mask_bhw, labels_bhw.shape).astype(nll.dtype)
  total_weight = jnp.sum(pixel_weights)
  has_weight = total_weight > 0
  return jnp.where(
      has_weight, jnp.sum(pixel_weights * nll) / jnp.where(has_weight, total_weight, 1), 0
  )


def balance_weights(counts_k, enabled=True):
  """Class weights of one view: label frequencies `counts / sum(counts)`, or ones if disabled.

  Frequency (not inverse frequency) is what the reference passes to `CrossEntropyLoss(weight=)`.
  With no counts at all (sum 0) the weights are ones, i.e. the unweighted loss.
  """
  counts = jnp.asarray(counts_k, jnp.float32)
  if not enabled:
    return jnp.ones_like(counts)
  total = jnp.sum(counts)
  return jnp.where(total > 0, counts / jnp.where(total > 0, total, 1), 1.0)


def picie_loss(z1, z2, y1, y2, mu1, mu2, w1, w2, mask_b=None, use_cross=True):
  """PiCIE loss of two aligned views: dict(within=, cross=, total=).

  `z1`, `z2`: (B, H, W, C) features of views 1 and 2 in the same geometric frame; `y1`, `y2`:
  (B, H, W) cluster labels; `mu1`, `mu2`: (K, C) centroids; `w1`, `w2`: (K,) class weights.
  Weights follow their labels and centroids, as in the reference (criterion v with classifier v):
    within = (L(z1, y1, mu1) + L(z2, y2, mu2)) / 2
    cross  = (L(z1, y2, mu2) + L(z2, y1, mu1)) / 2
    total  = (within + cross) / 2 if use_cross else within.
  `mask_b`: (B,) per-image validity, False for padding. `cross` is reported even when unused.
  """
  mask_bhw = None if mask_b is None else jnp.asarray(mask_b)[:, None, None]

  def clust(z, y, mu, w):
    return weighted_cross_entropy(prototype_logits(z, mu), y, w, mask_bhw)

  within = (clust(z1, y1, mu1, w1) + clust(z2, y2, mu2, w2)) / 2
  cross = (clust(z1, y2, mu2, w2) + clust(z2, y1, mu1, w1)) / 2
  total = (within + cross) / 2 if use_cross else within
  return {"within": within, "cross": cross, "total": total}
