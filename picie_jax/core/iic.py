"""IIC's segmentation loss (Ji et al., ICCV 2019): mutual information between two views'
per-pixel cluster predictions, over a window of spatial displacements.

For a displacement t = (dy, dx) in [-T, T]^2 the joint of the two views' classes is
`J_t[i, j] = sum_{b, p} m[b, p+t] m[b, p] y1[b, p+t, i] y2[b, p, j]` (zero outside the map),
normalised to sum 1 and symmetrised, `P_t = (J_t + J_t^T) / 2`; with its marginals P_i, P_j
the loss is `-sum_ij P_ij (log P_ij - lambda log P_i - lambda log P_j)`, i.e. minus the
mutual information for lambda = 1 (lambda > 1 weighs the marginals' entropy up, against
collapse).

Two forms, as the published code (github xu-ji/IIC, code/utils/segmentation/IID_losses.py):
- `per_displacement=True` ("uncollapsed", `IID_segmentation_loss_uncollapsed`): the loss of
  every P_t, averaged over the (2T+1)^2 displacements. This is the paper's objective (the mean
  over t of I(P_t)) and the form every segmentation command of the IIC release uses
  (`--use_uncollapsed_loss`), so it is the default here.
- `per_displacement=False` (`IID_segmentation_loss`, the script's default): one joint summed
  over all displacements, then the same loss.
Both clamp P_ij and the marginals below float64's epsilon to it before the logs, as the
published code does (entries that small carry no gradient there either).
"""

import sys

import jax
import jax.numpy as jnp

# The published code's clamp: Python's float epsilon (float64's, 2.2e-16), also in float32.
EPS = sys.float_info.epsilon


def displaced_joints(probs1_bhwk, probs2_bhwk, mask_bhw, half_window: int):
  """Unnormalised joints J_t (2T+1, 2T+1, K, K) for T = `half_window`.

  `J[T + dy, T + dx, i, j] = sum_{b, y, x} m y1[b, y+dy, x+dx, i] * m y2[b, y, x, j]`, pixels
  outside the map or with mask 0 contributing nothing. One convolution whose batch is view 1's
  classes, whose channels are the images and whose kernel is view 2's whole map (the published
  code's `F.conv2d(x1, weight=x2, padding=T)`).
  """
  mask = mask_bhw[..., None].astype(probs1_bhwk.dtype)
  return jax.lax.conv_general_dilated(
      probs1_bhwk * mask,
      probs2_bhwk * mask,
      window_strides=(1, 1),
      padding=((half_window, half_window), (half_window, half_window)),
      dimension_numbers=("CHWN", "IHWO", "HWNC"),
      precision=jax.lax.Precision.HIGHEST,
  )


def _information_loss(joint_kk, lamb):
  """-sum P_ij (log P_ij - lamb log P_i - lamb log P_j) of one unnormalised joint."""
  # A window with no valid pair (every image masked) has joint 0: loss of the EPS floor.
  p = joint_kk / jnp.maximum(jnp.sum(joint_kk), EPS)
  p = (p + p.T) / 2.0
  p_i = jnp.maximum(jnp.sum(p, axis=1, keepdims=True), EPS)
  p_j = jnp.maximum(jnp.sum(p, axis=0, keepdims=True), EPS)
  p = jnp.maximum(p, EPS)
  return -jnp.sum(p * (jnp.log(p) - lamb * jnp.log(p_i) - lamb * jnp.log(p_j)))


def iic_segmentation_loss(
    probs1_bhwk, probs2_bhwk, mask_bhw, *, half_window: int, lamb=1.0, per_displacement=True
):
  """IIC's loss of two views' softmax predictions (B, H, W, K), both in view 1's frame.

  `mask_bhw` (1 valid, 0 not) holds for both maps: a pair counts when both its pixels are
  valid. `half_window` is T, in pixels of the prediction maps. Returns (loss, loss at
  lambda=1), the second being minus the mutual information, for logging as the published
  code does.
  """
  joints = displaced_joints(probs1_bhwk, probs2_bhwk, mask_bhw, half_window)
  joints = joints.reshape(-1, *joints.shape[2:]).astype(jnp.float32)
  if not per_displacement:
    joints = jnp.sum(joints, axis=0, keepdims=True)

  def mean_loss(lamb):
    return jnp.mean(jax.vmap(_information_loss, in_axes=(0, None))(joints, lamb))

  return mean_loss(lamb), mean_loss(1.0)
