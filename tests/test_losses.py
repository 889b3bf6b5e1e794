"""Losses against brute-force float64 loops over pixels and finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from picie_jax.core import losses


def brute_weighted_ce(features, labels, centroids, weights, pixel_mask):
  """sum_i w[y_i] l_i / sum_i w[y_i], one pixel at a time in float64 Python arithmetic."""
  num_classes = centroids.shape[0]
  total, weight_sum = 0.0, 0.0
  for index in np.ndindex(labels.shape):
    y = int(labels[index])
    if not (0 <= y < num_classes) or not pixel_mask[index]:
      continue
    z = features[index].astype(np.float64)
    logits = [float(np.dot(z, centroids[k].astype(np.float64))) for k in range(num_classes)]
    top = max(logits)
    log_norm = top + math.log(sum(math.exp(s - top) for s in logits))
    total += weights[y] * (log_norm - logits[y])
    weight_sum += weights[y]
  return total / weight_sum if weight_sum > 0 else 0.0


def random_case(seed, batch=3, height=4, width=5, channels=6, num_classes=4):
  rng = np.random.default_rng(seed)
  features = rng.normal(size=(batch, height, width, channels)).astype(np.float32)
  centroids = rng.normal(size=(num_classes, channels)).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(batch, height, width)).astype(np.int32)
  labels[0, 0, :2] = -1  # ignore label
  labels[1, 2, 3] = 255  # out of range: ignored too
  weights = rng.uniform(0.1, 2.0, size=num_classes).astype(np.float32)
  return features, labels, centroids, weights


def test_prototype_logits_match_float64_dot_products():
  features, _, centroids, _ = random_case(0)
  logits = losses.prototype_logits(jnp.asarray(features), jnp.asarray(centroids))
  assert logits.shape == (3, 4, 5, 4) and logits.dtype == jnp.float32
  expected = np.tensordot(features.astype(np.float64), centroids.astype(np.float64).T, axes=1)
  np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def test_prototype_logits_compute_bfloat16_inputs_in_float32():
  features, _, centroids, _ = random_case(1)
  logits = losses.prototype_logits(jnp.asarray(features, jnp.bfloat16), jnp.asarray(centroids))
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("mask_kind", ["none", "pixel_bool", "image_float"])
def test_weighted_cross_entropy_matches_brute_force(mask_kind):
  features, labels, centroids, weights = random_case(2)
  rng = np.random.default_rng(3)
  full = np.ones(labels.shape, bool)
  if mask_kind == "none":
    mask, pixel_mask = None, full
  elif mask_kind == "pixel_bool":
    mask = rng.random(labels.shape) < 0.6
    pixel_mask = mask
  else:
    mask = np.array([1.0, 0.0, 1.0], np.float32)[:, None, None]
    pixel_mask = np.broadcast_to(mask, labels.shape) > 0
  logits = losses.prototype_logits(jnp.asarray(features), jnp.asarray(centroids))
  loss = jax.jit(losses.weighted_cross_entropy)(
      logits, jnp.asarray(labels), jnp.asarray(weights), None if mask is None else jnp.asarray(mask)
  )
  expected = brute_weighted_ce(features, labels, centroids, weights, pixel_mask)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_weighted_cross_entropy_is_zero_with_finite_grad_when_nothing_is_valid():
  features, labels, centroids, weights = random_case(4)
  mask = np.zeros(labels.shape, bool)

  def loss_of(z):
    logits = losses.prototype_logits(z, jnp.asarray(centroids))
    return losses.weighted_cross_entropy(logits, jnp.asarray(labels), jnp.asarray(weights), mask)

  value, grad = jax.value_and_grad(loss_of)(jnp.asarray(features))
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_balance_weights_hand_case():
  np.testing.assert_allclose(
      losses.balance_weights(np.array([1, 3, 0, 4])), [0.125, 0.375, 0.0, 0.5]
  )
  np.testing.assert_array_equal(
      losses.balance_weights(np.array([1, 3, 0, 4]), enabled=False), [1, 1, 1, 1]
  )
  np.testing.assert_array_equal(losses.balance_weights(np.zeros(3)), [1, 1, 1])


def two_view_case(seed):
  features1, labels1, centroids1, weights1 = random_case(seed)
  features2, labels2, centroids2, weights2 = random_case(seed + 100)
  return features1, features2, labels1, labels2, centroids1, centroids2, weights1, weights2


@pytest.mark.parametrize("use_cross", [True, False])
def test_picie_loss_matches_brute_force_formula(use_cross):
  z1, z2, y1, y2, mu1, mu2, w1, w2 = two_view_case(5)
  mask_b = np.array([True, False, True])
  pixel_mask = np.broadcast_to(mask_b[:, None, None], y1.shape)
  out = jax.jit(losses.picie_loss, static_argnames="use_cross")(
      *map(jnp.asarray, (z1, z2, y1, y2, mu1, mu2, w1, w2)),
      mask_b=jnp.asarray(mask_b),
      use_cross=use_cross,
  )

  def brute(z, y, mu, w):
    return brute_weighted_ce(z, y, mu, w, pixel_mask)

  within = (brute(z1, y1, mu1, w1) + brute(z2, y2, mu2, w2)) / 2
  cross = (brute(z1, y2, mu2, w2) + brute(z2, y1, mu1, w1)) / 2
  np.testing.assert_allclose(float(out["within"]), within, rtol=1e-5)
  np.testing.assert_allclose(float(out["cross"]), cross, rtol=1e-5)
  np.testing.assert_allclose(
      float(out["total"]), (within + cross) / 2 if use_cross else within, rtol=1e-5
  )


def test_picie_loss_gradient_matches_central_differences_in_float64():
  with jax.enable_x64(True):
    z1, z2, y1, y2, mu1, mu2, w1, w2 = two_view_case(6)
    z1, z2, mu1, mu2, w1, w2 = (jnp.asarray(a, jnp.float64) for a in (z1, z2, mu1, mu2, w1, w2))
    mask_b = jnp.array([True, True, False])

    @jax.jit
    def total(a, b):
      return losses.picie_loss(a, b, y1, y2, mu1, mu2, w1, w2, mask_b=mask_b)["total"]

    grad1, grad2 = jax.grad(total, argnums=(0, 1))(z1, z2)
    assert grad1.dtype == jnp.float64
    eps = 1e-6
    rng = np.random.default_rng(7)
    for which, (z, grad) in enumerate(((z1, grad1), (z2, grad2))):
      for flat in rng.choice(z.size, size=20, replace=False):
        index = np.unravel_index(flat, z.shape)
        step = jnp.zeros_like(z).at[index].set(eps)
        args_plus = (z + step, z2) if which == 0 else (z1, z + step)
        args_minus = (z - step, z2) if which == 0 else (z1, z - step)
        numeric = (float(total(*args_plus)) - float(total(*args_minus))) / (2 * eps)
        np.testing.assert_allclose(float(grad[index]), numeric, rtol=1e-6, atol=1e-9)
    assert np.all(np.asarray(grad1[2]) == 0.0)  # the masked image gets no gradient
  assert not jax.config.jax_enable_x64
