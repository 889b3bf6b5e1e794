"""The per-batch functions: view alignment (G wiring), labels, classifier and eval step."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from configs import synthetic as synthetic_config
from picie_jax import parallel
from picie_jax import steps
from picie_jax.core import transforms as T
from picie_jax.data import synthetic


def _step_config(**overrides):
  c = synthetic_config.get_config()
  c.res1 = 64
  c.update_from_flattened_dict(overrides)
  return steps.step_config_from_config(c, parallel.make_mesh())


def _images(n=4, size=128):
  images, labels = synthetic.generate_split(7, 0, n, size)
  return jnp.asarray(images), labels


def test_views_are_aligned_pixel_for_pixel():
  """With P off, z2 = G(f(view2)) must equal z1 = f(G(x)) for f = stride-4 pooling, up to
  interpolation error; a wrong G wiring (wrong view, flip or offset) breaks this badly."""
  step_config = _step_config(
      **{"augment.photometric": False, "method": "pixel_kmeans", "kmeans.metric": "l2"}
  )
  noise = np.random.default_rng(0).random((4, 128, 128, 3))
  smooth = scipy.ndimage.gaussian_filter(noise, sigma=(0, 16, 16, 0), mode="wrap")
  smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
  images = jnp.asarray(np.round(smooth * 255).astype(np.uint8))
  feats, _ = steps.view_features(
      None, {}, images, jnp.arange(4), 0, jax.random.PRNGKey(0), step_config, train=False
  )
  z1, z2 = (np.asarray(f) for f in feats)
  assert z1.shape == z2.shape == (4, 16, 16, 3)
  aligned = np.abs(z1 - z2).mean()
  shifted_by_one_cell = min(
      np.abs(z1[:, 1:] - z2[:, :-1]).mean(),
      np.abs(z1[:, :, 1:] - z2[:, :, :-1]).mean(),
      np.abs(z1[:, :, :-1] - z2[:, :, 1:]).mean(),
  )
  assert aligned < 0.025, aligned
  assert shifted_by_one_cell > 1.4 * aligned, (aligned, shifted_by_one_cell)


def test_view1_is_crop_of_the_image():
  """View 1 with P off equals apply_geometric of the image with the drawn parameters."""
  step_config = _step_config(**{"augment.photometric": False})
  images, _ = _images(2)
  key = jax.random.PRNGKey(3)
  (v1, v2), geo = steps.view_images(images, jnp.arange(2), 5, key, step_config)
  expect_geo = T.batch_params(
      T.geometric_params, key, 5, jnp.arange(2), T.GEOMETRIC_STREAM, step_config.geometric
  )
  x = images.astype(jnp.float32) / 255
  np.testing.assert_allclose(v1, T.apply_geometric(x, expect_geo, 64), atol=1e-6)
  np.testing.assert_allclose(v2, T.resize_bilinear(x, 64), atol=1e-6)
  assert float(jnp.abs(v1 - v2).max()) > 0.1  # G did something


def test_classifier_from_centroids_argmax_is_nearest_centroid_for_l2():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(50, 5)).astype(np.float32)
  mu = rng.normal(size=(7, 5)).astype(np.float32)
  w = steps.classifier_from_centroids(jnp.asarray(mu), "l2")
  logits = np.asarray(steps.with_bias_column(jnp.asarray(z)) @ w.T)
  nearest = np.argmin(((z[:, None] - mu[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(logits.argmax(1), nearest)
  w_cos = steps.classifier_from_centroids(jnp.asarray(mu), "cosine")
  np.testing.assert_allclose(
      np.asarray(steps.with_bias_column(jnp.asarray(z)) @ w_cos.T), z @ mu.T, rtol=1e-5, atol=1e-5
  )


def test_pixel_features_average_stride_cells():
  x = np.random.default_rng(1).random((2, 8, 12, 3)).astype(np.float32)
  expect = x.reshape(2, 2, 4, 3, 4, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(steps.pixel_features(jnp.asarray(x), 4), expect, rtol=1e-6)


def test_label_dtype_is_the_smallest_png_dtype_holding_every_cluster():
  """uint8 or uint16 (what segment's label PNGs can hold), int32 beyond; every id survives."""
  for k, want in ((2, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16)):
    dtype = np.dtype(steps.label_dtype(k))
    assert dtype == want, k
    np.testing.assert_array_equal(np.arange(k).astype(dtype), np.arange(k))
  assert np.dtype(steps.label_dtype(65537)) == np.int32
