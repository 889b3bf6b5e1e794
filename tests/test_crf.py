"""The dense CRF against a float64 brute-force mean field (explicit N x N kernels), its chunked
and separable paths against their plain forms, and hand-worked cases."""

import numpy as np
import pytest

from picie_jax.core import crf

# A kernel set whose every term matters on a 6 x 7 image (STEGO's 67-pixel appearance width
# and 3-level colour width leave the appearance kernel nearly diagonal on random colours).
WIDE = crf.CRFParams(
    iterations=4,
    appearance_weight=2.5,
    appearance_xy_std=3.0,
    appearance_rgb_std=20.0,
    smoothness_weight=1.5,
    smoothness_xy_std=1.3,
)


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference_mean_field(logits_hwk, image_hwc, params):
  """pydensecrf's inference restated in float64 with explicit (N, N) kernels."""
  height, width, k = logits_hwk.shape
  y, x = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  positions = np.stack([x.ravel(), y.ravel()], 1).astype(np.float64)
  colours = image_hwc.reshape(-1, 3).astype(np.float64)

  def normalised_kernel(features):
    kernel = np.exp(-0.5 * ((features[:, None, :] - features[None, :, :]) ** 2).sum(-1))
    norm = 1.0 / np.sqrt(kernel.sum(1))
    return norm[:, None] * kernel * norm[None, :]

  pairwise = [
      (
          params.appearance_weight,
          normalised_kernel(
              np.concatenate(
                  [positions / params.appearance_xy_std, colours / params.appearance_rgb_std], 1
              )
          ),
      ),
      (params.smoothness_weight, normalised_kernel(positions / params.smoothness_xy_std)),
  ]
  probabilities = _softmax(logits_hwk.reshape(-1, k).astype(np.float64))
  unary = -np.log(np.clip(probabilities, 1e-5, 1.0))
  q = _softmax(-unary)
  for _ in range(params.iterations):
    q = _softmax(-unary + sum(w * kernel @ q for w, kernel in pairwise))
  return q.reshape(height, width, k)


def _scene(rng, batch=2, height=6, width=7, k=4):
  """Logits with some near-zero probabilities (the 1e-5 clip acts) and an image of three
  nearby colours with noise (so colour distances are neither 0 nor huge)."""
  logits = rng.normal(size=(batch, height, width, k)).astype(np.float32) * 2.0
  logits[:, 0, 0, 0] = -15.0
  palette = np.array([[120, 60, 200], [126, 64, 196], [90, 140, 30]], np.float32)
  image = palette[rng.integers(0, 3, size=(batch, height, width))]
  image = np.clip(image + rng.integers(-3, 4, size=image.shape), 0, 255).astype(np.uint8)
  return logits, image


@pytest.mark.parametrize("params", [crf.STEGO, WIDE], ids=["stego", "wide"])
def test_matches_float64_brute_force(params):
  logits, image = _scene(np.random.default_rng(0))
  got = np.asarray(crf.dense_crf(logits, image, params=params, chunk_size=5))
  for b in range(len(logits)):
    want = _reference_mean_field(logits[b], image[b], params)
    # float32 through 10 iterations whose pairwise terms reach ~7: measured 2.7e-6 (STEGO)
    np.testing.assert_allclose(got[b], want, atol=1e-5, rtol=0)
  # the pairwise terms moved the probabilities: the comparison is not of two softmaxes
  assert np.abs(got - _softmax(logits)).max() > 0.05


def test_chunked_equals_unchunked():
  logits, image = _scene(np.random.default_rng(1))
  num_pixels = logits.shape[1] * logits.shape[2]
  whole = crf.dense_crf(logits, image, params=WIDE, chunk_size=num_pixels)
  for chunk_size in (1, 5, 41):  # 5 and 41 leave a padded last chunk
    np.testing.assert_allclose(
        crf.dense_crf(logits, image, params=WIDE, chunk_size=chunk_size), whole, atol=1e-6
    )


def test_gaussian_message_against_explicit_kernel():
  rng = np.random.default_rng(2)
  features = rng.normal(size=(2, 30, 5)).astype(np.float32)
  values = rng.normal(size=(2, 30, 3)).astype(np.float32)
  f64 = features.astype(np.float64)
  kernel = np.exp(-0.5 * ((f64[:, :, None] - f64[:, None]) ** 2).sum(-1))
  want = np.einsum("bij,bjk->bik", kernel, values)
  np.testing.assert_allclose(crf.gaussian_message(features, values, 7), want, atol=1e-5)


def test_separable_smoothness_equals_dense_positions():
  """A 2-D Gaussian of the Euclidean distance is separable exactly: the two per-axis matrices
  give the dense (N, N) positional kernel's message."""
  rng = np.random.default_rng(3)
  values = rng.normal(size=(2, 9, 11, 3)).astype(np.float32)
  std = 1.7
  y, x = np.meshgrid(np.arange(9), np.arange(11), indexing="ij")
  positions = np.stack([y.ravel(), x.ravel()], 1).astype(np.float32) / std
  dense = crf.gaussian_message(
      np.broadcast_to(positions, (2, 99, 2)), values.reshape(2, 99, 3), chunk_size=16
  )
  np.testing.assert_allclose(
      crf.separable_gaussian_message(values, std),
      np.asarray(dense).reshape(values.shape),
      atol=1e-5,
  )


def test_zero_weights_return_the_softmax():
  logits, image = _scene(np.random.default_rng(4))
  logits[:, 0, 0, 0] = 0.0  # no probability under the clip: the unary is exactly -log p
  no_pairwise = crf.STEGO._replace(appearance_weight=0.0, smoothness_weight=0.0)
  np.testing.assert_allclose(
      crf.dense_crf(logits, image, params=no_pairwise), _softmax(logits), atol=1e-6
  )


def test_uniform_image_removes_salt_and_pepper():
  """On one colour every pixel's neighbours vote for class 0: isolated class-1 pixels whose
  own scores prefer class 1 by a margin of 1 are outvoted."""
  height, width = 16, 16
  logits = np.zeros((1, height, width, 3), np.float32)
  logits[..., 0] = 1.0
  pepper = [(2, 3), (7, 7), (11, 4), (13, 13)]
  for y, x in pepper:
    logits[0, y, x] = [0.0, 1.0, 0.0]
  image = np.full((1, height, width, 3), 128, np.uint8)
  before = logits.argmax(-1)
  after = np.asarray(crf.dense_crf(logits, image)).argmax(-1)
  assert [before[0, y, x] for y, x in pepper] == [1] * len(pepper)
  np.testing.assert_array_equal(after, 0)


def test_image_size_must_match_the_logits():
  with pytest.raises(ValueError, match="upsample the logits"):
    crf.dense_crf(np.zeros((1, 4, 4, 2), np.float32), np.zeros((1, 8, 8, 3), np.uint8))


def test_agrees_with_pydensecrf():
  """pydensecrf (pip pydensecrf2; pydensecrf 1.0rc3 does not build with Cython 3) on STEGO's
  settings. Its permutohedral lattice approximates the Gaussian kernels, so agreement is
  approximate: measured on this scene 99.94% of the labels (1 pixel of 1,600) and a mean |dQ|
  of 5.5e-4 (max 0.55), where the exact unnormalised kernel would give 3.1e-3 and the logits'
  own argmax agrees on 54% of the pixels."""
  from pydensecrf import densecrf as dcrf  # pylint: disable=g-import-not-at-top
  from pydensecrf import utils  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(5)
  height, width, k = 40, 40, 4
  yy, xx = np.mgrid[:height, :width]
  region = (yy > height // 2) * 2 + (xx > width // 3)
  image = rng.integers(0, 256, size=(4, 3))[region] + rng.normal(0, 4, size=(height, width, 3))
  image = np.clip(image, 0, 255).astype(np.uint8)
  logits = rng.normal(size=(height, width, k)).astype(np.float32)
  logits[yy, xx, region % k] += 1.0
  p = crf.STEGO
  model = dcrf.DenseCRF2D(width, height, k)
  unary = utils.unary_from_softmax(_softmax(logits).transpose(2, 0, 1).astype(np.float32))
  model.setUnaryEnergy(np.ascontiguousarray(unary))
  model.addPairwiseGaussian(sxy=p.smoothness_xy_std, compat=p.smoothness_weight)
  model.addPairwiseBilateral(
      sxy=p.appearance_xy_std, srgb=p.appearance_rgb_std, rgbim=image, compat=p.appearance_weight
  )
  theirs = np.array(model.inference(p.iterations)).reshape(k, height, width).transpose(1, 2, 0)
  ours = np.asarray(crf.dense_crf(logits[None], image[None]))[0]
  assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99
  assert np.abs(ours - theirs).mean() < 1e-3
