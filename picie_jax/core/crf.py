"""Dense-CRF refinement: mean-field inference in a fully connected CRF (Krähenbühl & Koltun
2011), batched and jitted, computed exactly instead of with a permutohedral lattice.

The parameters are STEGO's (github mhamilton723/STEGO, src/crf.py: MAX_ITER = 10, POS_W = 3,
POS_XY_STD = 1, Bi_W = 4, Bi_XY_STD = 67, Bi_RGB_STD = 3; the image as uint8 0..255, the
logits upsampled bilinearly to the image's size, their softmax as the unary probabilities).
The message passing is pydensecrf's (lucasb-eyer/pydensecrf, densecrf/src): the unary is
-log of the probabilities clipped at 1e-5 (utils.unary_from_softmax); Q starts as softmax(-U);
each iteration sets Q = softmax(-U + sum over kernels of w * n * K(n * Q)) (densecrf.cpp
`inference`, PottsCompatibility: -w Q, subtracted), where K is the Gaussian kernel
exp(-|f_i - f_j|^2 / 2) of the scaled features including its self term i = j (the lattice
filter keeps it) and n = (K 1)^(-1/2) (pairwise.cpp: NORMALIZE_SYMMETRIC, the default of
addPairwiseGaussian/addPairwiseBilateral). Features: (x, y) / xy_std for the smoothness kernel,
(x, y) / xy_std and (r, g, b) / rgb_std for the appearance (bilateral) kernel.
"""

import functools
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

_HIGHEST = lax.Precision.HIGHEST
PROBABILITY_FLOOR = 1e-5  # pydensecrf.utils.unary_from_softmax's clip
# Kernel entries one block of the appearance message holds (B x rows x N float32: 64 MiB).
DEFAULT_BLOCK_ELEMENTS = 1 << 24


class CRFParams(NamedTuple):
  """Mean-field iterations and the two kernels' Potts weights and widths (pixels; 0..255)."""

  iterations: int = 10  # MAX_ITER
  appearance_weight: float = 4.0  # Bi_W (w1)
  appearance_xy_std: float = 67.0  # Bi_XY_STD (theta_alpha)
  appearance_rgb_std: float = 3.0  # Bi_RGB_STD (theta_beta)
  smoothness_weight: float = 3.0  # POS_W (w2)
  smoothness_xy_std: float = 1.0  # POS_XY_STD (theta_gamma)


STEGO = CRFParams()


def gaussian_message(features_bnf, values_bnk, chunk_size):
  """sum_j exp(-|f_i - f_j|^2 / 2) v_j for every point i of every image, exactly.

  The (N, N) kernel is computed `chunk_size` rows at a time and never held whole: memory is
  O(B * chunk_size * N). Distances are taken from the differences (not |f|^2 - 2 f.g + |g|^2)
  so that near pairs keep float32 precision.
  """
  batch, n, dims = features_bnf.shape
  num_chunks = -(-n // chunk_size)
  queries = jnp.pad(features_bnf, ((0, 0), (0, num_chunks * chunk_size - n), (0, 0)))
  queries = queries.reshape(batch, num_chunks, chunk_size, dims).transpose(1, 0, 2, 3)

  def rows(queries_bcf):
    squared = jnp.sum(jnp.square(queries_bcf[:, :, None, :] - features_bnf[:, None, :, :]), -1)
    return jnp.einsum("bcn,bnk->bck", jnp.exp(-0.5 * squared), values_bnk, precision=_HIGHEST)

  out = lax.map(rows, queries)  # (chunks, B, chunk_size, K); padded query rows dropped below
  return out.transpose(1, 0, 2, 3).reshape(batch, num_chunks * chunk_size, -1)[:, :n]


def _gaussian_matrix(side, std):
  positions = jnp.arange(side, dtype=jnp.float32) / std
  return jnp.exp(-0.5 * jnp.square(positions[:, None] - positions[None, :]))


def separable_gaussian_message(values_bhwk, xy_std):
  """sum_j exp(-|p_i - p_j|^2 / (2 xy_std^2)) v_j over pixel positions p, exactly: a Gaussian
  of the Euclidean distance is the product of one Gaussian per axis, so an (H, H) and a (W, W)
  matrix give it (no truncation)."""
  _, height, width, _ = values_bhwk.shape
  out = jnp.einsum(
      "yY,bYxk->byxk", _gaussian_matrix(height, xy_std), values_bhwk, precision=_HIGHEST
  )
  return jnp.einsum("xX,byXk->byxk", _gaussian_matrix(width, xy_std), out, precision=_HIGHEST)


def _symmetric_normalised(kernel_message, shape_bhw1):
  """Q -> n * K(n * Q) with n = (K 1)^(-1/2), pydensecrf's NORMALIZE_SYMMETRIC."""
  norm = lax.rsqrt(kernel_message(jnp.ones(shape_bhw1, jnp.float32)) + 1e-20)
  return lambda q: norm * kernel_message(norm * q)


def default_chunk_size(batch, num_pixels):
  """Query rows per appearance block so that a block holds about DEFAULT_BLOCK_ELEMENTS."""
  return max(1, min(num_pixels, DEFAULT_BLOCK_ELEMENTS // (batch * num_pixels)))


@functools.partial(jax.jit, static_argnames=("params", "chunk_size"))
def dense_crf(logits_bhwk, images_bhwc, params=STEGO, chunk_size=0):
  """Refined class probabilities (B, H, W, K) float32 of `logits_bhwk` on the images.

  `images_bhwc`: RGB in 0..255 (uint8 or float) at the logits' size. `chunk_size`: query
  pixels per block of the appearance kernel (0: default_chunk_size).
  """
  batch, height, width, _ = logits_bhwk.shape
  if images_bhwc.shape[:3] != (batch, height, width):
    raise ValueError(
        f"dense_crf: images {images_bhwc.shape} must match the logits {logits_bhwk.shape} in "
        "batch, height and width (upsample the logits to the image first, as STEGO does)"
    )
  num_pixels = height * width
  chunk_size = chunk_size or default_chunk_size(batch, num_pixels)
  yx = jnp.stack(jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij"), -1).astype(
      jnp.float32
  )
  appearance_features = jnp.concatenate(
      [
          jnp.broadcast_to(yx / params.appearance_xy_std, (batch, height, width, 2)),
          images_bhwc.astype(jnp.float32) / params.appearance_rgb_std,
      ],
      -1,
  ).reshape(batch, num_pixels, -1)

  def appearance_kernel(values_bhwk):
    flat = values_bhwk.reshape(batch, num_pixels, -1)
    return gaussian_message(appearance_features, flat, chunk_size).reshape(values_bhwk.shape)

  shape_bhw1 = (batch, height, width, 1)
  appearance = _symmetric_normalised(appearance_kernel, shape_bhw1)
  smoothness = _symmetric_normalised(
      functools.partial(separable_gaussian_message, xy_std=params.smoothness_xy_std), shape_bhw1
  )
  probabilities = jax.nn.softmax(logits_bhwk.astype(jnp.float32), axis=-1)
  unary = -jnp.log(jnp.clip(probabilities, PROBABILITY_FLOOR, 1.0))

  def iteration(_, q):
    return jax.nn.softmax(
        -unary
        + params.appearance_weight * appearance(q)
        + params.smoothness_weight * smoothness(q),
        axis=-1,
    )

  return lax.fori_loop(0, params.iterations, iteration, jax.nn.softmax(-unary, axis=-1))
