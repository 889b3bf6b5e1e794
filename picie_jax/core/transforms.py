"""The two views of PiCIE: photometric jitter P and the geometric transform G (DESIGN.md §1).

All parameters come from a stateless key `(seed, epoch, image index, stream)`, so clustering,
labelling and training see the same draws within an epoch without storing lists. Semantics
follow torchvision on float tensors in [0, 1] (multiplicative brightness, contrast/saturation
blends with the grayscale image, hue rotation in HSV), not tf.image's additive ones.

`apply_geometric` is the one crop-resize-flip used for images (640 -> 320) and feature maps
(80 -> 80); `resize_bilinear` is the same code with the identity crop. Each output row of a
resampling is a few taps (source rows and weights), and P's blur (linear, last in P) is folded
into them: a view costs one resize at the base resolution, not a blur pass plus a resize.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from picie_jax import platform as platform_lib

GEOMETRIC_STREAM = 0
VIEW1_PHOTOMETRIC_STREAM = 1
VIEW2_PHOTOMETRIC_STREAM = 2

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL convert('L')
BLUR_TRUNCATE_SIGMAS = 3.0  # kernel half-width = min(int(3*sigma + 0.5), blur_max_radius)
IDENTITY_PHOTOMETRIC = {
    "brightness": 1.0,
    "contrast": 1.0,
    "saturation": 1.0,
    "hue": 0.0,
    "grayscale": False,
    "blur_sigma": 0.0,
}
IDENTITY_GEOMETRIC = {
    "scale": 1.0,
    "offset_y": 0.0,
    "offset_x": 0.0,
    "hflip": False,
    "vflip": False,
}


class PhotometricConfig(NamedTuple):
  """Photometric jitter P (MoCo-v2 values). Hashable: pass as a static jit argument.

  reference_quirks reproduces the official code: grayscale is never applied, and the blur
  sigma is |(max-min)/(1-p)*(u-p) + min| with the same u ~ U(0,1) that decides application
  (u < p), i.e. |3.8*(u-0.5)+0.1| for the defaults.
  """

  brightness: float = 0.3
  contrast: float = 0.3
  saturation: float = 0.3
  hue: float = 0.1
  jitter_p: float = 0.8
  grayscale_p: float = 0.2
  blur_p: float = 0.5
  blur_sigma: tuple = (0.1, 2.0)
  blur_max_radius: int = 6
  reference_quirks: bool = False
  enabled: bool = True


class GeometricConfig(NamedTuple):
  """Geometric transform G: random square crop of side scale*S, then flips."""

  min_scale: float = 0.5
  max_scale: float = 1.0
  hflip_p: float = 0.5
  vflip_p: float = 0.0
  enabled: bool = True


def sample_key(base_key, epoch, index, stream):
  """Key for one image's draw of one stream: fold_in chain over (epoch, index, stream)."""
  key = jax.random.fold_in(base_key, epoch)
  key = jax.random.fold_in(key, index)
  return jax.random.fold_in(key, stream)


def _identity_like(params, identity):
  """The identity values with the dtypes of drawn `params` (disabled transforms)."""
  return {name: jnp.full_like(value, identity[name]) for name, value in params.items()}


def photometric_params(key, cfg: PhotometricConfig):
  """One sample's P parameters; the identity values (factor 1, shift 0, sigma 0) when off."""
  keys = jax.random.split(key, 6)
  jitter_applied = jax.random.uniform(keys[0], (4,)) < cfg.jitter_p
  strengths = jnp.array([cfg.brightness, cfg.contrast, cfg.saturation])
  factors = jax.random.uniform(
      keys[1], (3,), minval=jnp.maximum(0.0, 1.0 - strengths), maxval=1.0 + strengths
  )
  hue_shift = jax.random.uniform(keys[2], (), minval=-cfg.hue, maxval=cfg.hue)
  grayscale = jax.random.uniform(keys[3]) < cfg.grayscale_p
  blur_u = jax.random.uniform(keys[4])
  sigma_min, sigma_max = cfg.blur_sigma
  if cfg.reference_quirks:
    if cfg.blur_p >= 1.0:
      raise ValueError(f"reference_quirks blur needs blur_p < 1, got {cfg.blur_p}")
    grayscale = jnp.zeros((), bool)
    slope = (sigma_max - sigma_min) / (1.0 - cfg.blur_p)
    sigma = jnp.abs(slope * (blur_u - cfg.blur_p) + sigma_min)
  else:
    sigma = jax.random.uniform(keys[5], minval=sigma_min, maxval=sigma_max)
  params = {
      "brightness": jnp.where(jitter_applied[0], factors[0], 1.0),
      "contrast": jnp.where(jitter_applied[1], factors[1], 1.0),
      "saturation": jnp.where(jitter_applied[2], factors[2], 1.0),
      "hue": jnp.where(jitter_applied[3], hue_shift, 0.0),
      "grayscale": grayscale,
      "blur_sigma": jnp.where(blur_u < cfg.blur_p, sigma, 0.0),
  }
  return params if cfg.enabled else _identity_like(params, IDENTITY_PHOTOMETRIC)


def geometric_params(key, cfg: GeometricConfig):
  """One sample's G parameters: side scale, relative offsets (y, x) in [0,1], flips."""
  keys = jax.random.split(key, 5)
  params = {
      "scale": jax.random.uniform(keys[0], minval=cfg.min_scale, maxval=cfg.max_scale),
      "offset_y": jax.random.uniform(keys[1]),
      "offset_x": jax.random.uniform(keys[2]),
      "hflip": jax.random.uniform(keys[3]) < cfg.hflip_p,
      "vflip": jax.random.uniform(keys[4]) < cfg.vflip_p,
  }
  return params if cfg.enabled else _identity_like(params, IDENTITY_GEOMETRIC)


def batch_params(param_fn, base_key, epoch, indices_b, stream, cfg):
  """`param_fn` drawn for every image index of a batch; leaves get a leading batch dim."""
  return jax.vmap(lambda index: param_fn(sample_key(base_key, epoch, index, stream), cfg))(
      indices_b
  )


def _grayscale(images_bhwc):
  """Luma (B,H,W,1) with PIL's convert('L') weights."""
  return jnp.einsum(
      "bhwc,c->bhw",
      images_bhwc,
      jnp.array(GRAY_WEIGHTS, images_bhwc.dtype),
      precision=jax.lax.Precision.HIGHEST,
  )[..., None]


def _blend(images_bhwc, other, factor_b):
  """torchvision's _blend: factor*img + (1-factor)*other, clamped to [0,1]."""
  factor = factor_b[:, None, None, None]
  return jnp.clip(factor * images_bhwc + (1.0 - factor) * other, 0.0, 1.0)


def _wrap(value, period):
  """value mod period in [0, period), as floor arithmetic: XLA-CPU's float remainder is a
  scalar library call, about 10x slower than the rest of the hue rotation together."""
  return value - period * jnp.floor(value / period)


def _rotate_hue(images_bhwc, shift_b):
  """RGB -> HSV, h = (h + shift) mod 1, -> RGB (torchvision's _rgb2hsv/_hsv2rgb)."""
  r, g, b = images_bhwc[..., 0], images_bhwc[..., 1], images_bhwc[..., 2]
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  chroma = maxc - jnp.minimum(jnp.minimum(r, g), b)
  safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
  # hue6 = (g-b)/chroma if max is r, 2 + (b-r)/chroma if g, else 4 + (r-g)/chroma.
  numerator = jnp.where(maxc == r, g - b, jnp.where(maxc == g, b - r, r - g))
  sector = jnp.where(maxc == r, 0.0, jnp.where(maxc == g, 2.0, 4.0))
  hue = _wrap((sector + numerator / safe_chroma) / 6.0 + shift_b[:, None, None], 1.0)
  # HSV -> RGB: channel n in (R,G,B) = v - chroma*clip(min(k, 4-k), 0, 1), k = (n + 6h) mod 6
  # with n = 5, 3, 1; chroma = v*s.
  channels = []
  for n in (5.0, 3.0, 1.0):
    k = _wrap(n + 6.0 * hue, 6.0)
    channels.append(maxc - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return jnp.stack(channels, axis=-1)


def _gaussian_kernels(sigma_b, radius: int):
  """(B, 2*radius+1) normalised Gaussian taps, zero beyond int(3*sigma+0.5); sigma 0 = delta."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  blurred = sigma_b > 0
  sigma = jnp.where(blurred, sigma_b, 1.0)[:, None]
  within = jnp.abs(offsets) <= jnp.floor(BLUR_TRUNCATE_SIGMAS * sigma + 0.5)
  taps = jnp.where(within, jnp.exp(-0.5 * (offsets / sigma) ** 2), 0.0)
  taps = taps / jnp.sum(taps, axis=1, keepdims=True)
  return jnp.where(blurred[:, None], taps, (offsets == 0).astype(jnp.float32))


def blur_kernels(params, cfg: PhotometricConfig):
  """(B, 2*blur_max_radius+1) taps of P's Gaussian blur for each sample (a delta when off)."""
  if not cfg.enabled:
    return None
  return _gaussian_kernels(params["blur_sigma"], cfg.blur_max_radius)


def _pil_luma(u_bhwc):
  """PIL's convert('L') of 0..255 integer-valued RGB: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
  u = u_bhwc.astype(jnp.int32)
  return ((u[..., :1] * 19595 + u[..., 1:2] * 38470 + u[..., 2:] * 7471 + 32768) >> 16).astype(
      jnp.float32
  )


def _pil_blend(degenerate, u_bhwc, factor_b):
  """Pillow's ImagingBlend (ImageEnhance): degenerate + f (image - degenerate), clipped to
  0..255 and truncated to uint8."""
  blended = degenerate + factor_b[:, None, None, None] * (u_bhwc - degenerate)
  return jnp.floor(jnp.clip(blended, 0.0, 255.0))


def _pil_round(x):
  """C's round() of non-negative values (half away from zero), as Pillow's HSV -> RGB."""
  return jnp.floor(x + 0.5)


def _pil_hue_shift(u_bhwc, shift_b):
  """torchvision's PIL adjust_hue: Pillow's 8-bit HSV (its rgb2hsv / hsv2rgb), h += uint8(shift
  * 255) modulo 256, back to RGB; 0..255 integer values in and out."""
  r, g, b = u_bhwc[..., 0], u_bhwc[..., 1], u_bhwc[..., 2]
  maxc = jnp.maximum(jnp.maximum(r, g), b)
  chroma = maxc - jnp.minimum(jnp.minimum(r, g), b)
  grey = chroma == 0
  safe_chroma, safe_max = jnp.where(grey, 1.0, chroma), jnp.where(grey, 1.0, maxc)
  rc, gc, bc = ((maxc - c) / safe_chroma for c in (r, g, b))
  h6 = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
  h = _wrap(h6 / 6.0 + 1.0, 1.0)
  hue = jnp.where(grey, 0.0, jnp.floor(h * 255.0))
  sat = jnp.where(grey, 0.0, jnp.floor(chroma / safe_max * 255.0))
  hue = _wrap(hue + jnp.trunc(shift_b * 255.0)[:, None, None], 256.0)
  sector = jnp.floor(hue * 6.0 / 255.0)
  frac = hue * 6.0 / 255.0 - sector
  fs = sat / 255.0
  p, q, t = (_pil_round(maxc * (1.0 - fs * w)) for w in (1.0, frac, 1.0 - frac))
  sector = jnp.mod(sector, 6.0)[..., None]
  rgb = [
      jnp.stack(channels, axis=-1)
      for channels in (
          (maxc, t, p),
          (q, maxc, p),
          (p, maxc, t),
          (p, q, maxc),
          (t, p, maxc),
          (maxc, p, q),
      )
  ]
  out = rgb[5]
  for i in range(4, -1, -1):
    out = jnp.where(sector == i, rgb[i], out)
  return jnp.where((sat == 0)[..., None], maxc[..., None], out)


def _pil_colour(images_bhwc, params):
  """apply_colour as the official code runs it (reference_quirks): torchvision's PIL ops on
  uint8 images, each result truncated to uint8 (Pillow's blends), greys as convert('L'), the
  contrast grey int(mean + 0.5), the hue through Pillow's 8-bit HSV (an op not drawn is skipped,
  as the official code skips it). Grayscale is never applied under the quirks."""
  u = jnp.round(images_bhwc * 255.0)
  u = _pil_blend(0.0, u, params["brightness"])
  contrast_grey = jnp.floor(jnp.mean(_pil_luma(u), axis=(1, 2, 3), keepdims=True) + 0.5)
  u = _pil_blend(contrast_grey, u, params["contrast"])
  u = _pil_blend(_pil_luma(u), u, params["saturation"])
  u = jnp.where((params["hue"] != 0)[:, None, None, None], _pil_hue_shift(u, params["hue"]), u)
  return u / 255.0


def apply_colour(images_bhwc, params, cfg: PhotometricConfig):
  """P without its blur: brightness, contrast, saturation, hue, grayscale, each clamped to
  [0,1] as torchvision's tensor ops are (with reference_quirks, on uint8 values as its PIL ops
  are: `_pil_colour`). The blur is linear, so the views apply it inside their resampling
  (`blur_kernels`); `apply_photometric` is the whole P."""
  if not cfg.enabled:
    return images_bhwc
  if cfg.reference_quirks:
    return _pil_colour(images_bhwc, params)
  x = jnp.clip(images_bhwc * params["brightness"][:, None, None, None], 0.0, 1.0)
  gray_mean = jnp.mean(_grayscale(x), axis=(1, 2, 3), keepdims=True)
  x = _blend(x, gray_mean, params["contrast"])
  x = _blend(x, _grayscale(x), params["saturation"])
  x = jnp.clip(_rotate_hue(x, params["hue"]), 0.0, 1.0)
  return jnp.where(params["grayscale"][:, None, None, None], _grayscale(x), x)


def apply_photometric(images_bhwc, params, cfg: PhotometricConfig, platform=platform_lib.CPU):
  """P on float images in [0,1]: `apply_colour`, then the Gaussian blur, clamped to [0,1]
  (the blur in the form of `platform`, as in `apply_geometric`).

  `params` has a leading batch dim (from `batch_params`).
  """
  if not cfg.enabled:
    return images_bhwc
  batch, height, width, _ = images_bhwc.shape

  def identity(size):  # one tap per row
    return (jnp.broadcast_to(jnp.arange(size), (batch, size)), jnp.ones((batch, size, 1)))

  return _resample_blurred(
      apply_colour(images_bhwc, params, cfg),
      identity(height),
      identity(width),
      blur_kernels(params, cfg),
      platform,
  )


def _crop_resize_taps(in_size: int, out_size: int, start, length, flip):
  """Resampling rows in banded form: (first (out,), weights (out, 2)), where output o is
  weights[o, 0] * in[first[o]] + weights[o, 1] * in[first[o] + 1]: crop [start, start+length),
  resize, optionally reverse.

  torch F.interpolate(bilinear, align_corners=False, no antialias) on the cropped slice:
  source = max((o + 0.5) * length / out_size - 0.5, 0), two taps clamped inside the crop, so
  no pixel outside the crop contributes (jax.image.scale_and_translate would let the pixels
  next to the crop leak in when upsampling).
  """
  length_f = length.astype(jnp.float32)
  source = jnp.maximum(
      (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * length_f / out_size - 0.5, 0.0
  )
  lower = jnp.minimum(jnp.floor(source).astype(jnp.int32), length - 1)
  frac = jnp.where(lower + 1 < length, source - lower, 0.0)  # the crop's last row: one tap
  first = jnp.minimum(start + lower, in_size - 2) if in_size > 1 else start + lower
  weights = jnp.stack([1.0 - frac, frac], axis=1)
  # Shifted back from the image's end: weights (w, 0) at row in-1 become (0, w) at in-2.
  weights = jnp.where((start + lower > first)[:, None], weights[:, ::-1], weights)
  first, weights = jnp.where(flip, first[::-1], first), jnp.where(flip, weights[::-1], weights)
  return first, weights


def _dense(sources_bot, weights_bot, in_size: int):
  """The (B, out, in) matrix of rows given as taps: row o = sum_t weights[o, t] e_{sources[o,
  t]}."""
  return sum(
      weights_bot[..., t, None] * jax.nn.one_hot(sources_bot[..., t], in_size)
      for t in range(weights_bot.shape[-1])
  )


def _consecutive(first_bo, weights_bot):
  """Taps (sources, weights) of rows whose taps start at `first` and are consecutive."""
  return first_bo[..., None] + jnp.arange(weights_bot.shape[-1]), weights_bot


def _resample(x_bhwc, rows_boh, cols_bpw):
  """out[b,o,p] = sum_{h,w} rows[b,o,h] x[b,h,w] cols[b,p,w] (two small contractions)."""
  highest = jax.lax.Precision.HIGHEST
  x = jnp.einsum("boh,bhwc->bowc", rows_boh.astype(x_bhwc.dtype), x_bhwc, precision=highest)
  return jnp.einsum("bpw,bowc->bopc", cols_bpw.astype(x_bhwc.dtype), x, precision=highest)


def _banded_resample(x, sources_ot, weights_ot, axis: int):
  """One sample resampled along `axis`: out[.., o, ..] = sum_t weights[o, t] x[.., sources[o,
  t], ..], a gather of whole rows (or columns) per tap."""
  shape = [1] * x.ndim
  shape[axis] = -1
  weights_ot = weights_ot.astype(x.dtype)
  return sum(
      weights_ot[:, t].reshape(shape) * jnp.take(x, sources_ot[:, t], axis, mode="clip")
      for t in range(weights_ot.shape[1])
  )


def _resample_blurred(x_bhwc, rows, cols, blur_kernels_bk, platform):
  """x blurred by `blur_kernels_bk`, clamped to [0, 1] (P's last two ops), then resampled by
  the banded `rows` and `cols` ((first, weights) pairs); without kernels, x resampled.

  The blur folds into the resampling: each output row's taps are its resampling weights
  convolved with the blur's, read from the reflected rows, so a 640 -> 320 view reads 14
  rows per output row where a blur pass and then the resize would read 13 + 2 at 640 and the
  dense contraction all 640 (about 5x faster on CPU; on GPU/TPU, per `platform`, the same taps
  make dense matrices: the matrix units do the extra work faster than gathers, slow on TPU).
  Images come here; differentiated feature maps take the dense `_resample`, whose transpose is
  a matmul, not a scatter.
  """
  _, height, width, _ = x_bhwc.shape
  if blur_kernels_bk is None:
    return _resample(
        x_bhwc, _dense(*_consecutive(*rows), height), _dense(*_consecutive(*cols), width)
    )
  radius = blur_kernels_bk.shape[1] // 2

  def blurred(first_bo, weights_bot, size):
    num_taps = weights_bot.shape[2]
    taps = sum(
        jnp.pad(
            weights_bot[..., t, None] * blur_kernels_bk[:, None, :],
            ((0, 0), (0, 0), (t, num_taps - 1 - t)),
        )
        for t in range(num_taps)
    )
    sources = first_bo[..., None] + jnp.arange(taps.shape[2]) - radius
    period = max(2 * (size - 1), 1)  # reflection, a triangle wave: .. c b | a b c d | c ..
    return (size - 1) - jnp.abs((size - 1) - jnp.mod(sources, period)), taps

  rows, cols = blurred(*rows, height), blurred(*cols, width)
  if not platform_lib.uses_cpu_forms(platform):
    return jnp.clip(_resample(x_bhwc, _dense(*rows, height), _dense(*cols, width)), 0.0, 1.0)
  # The first pass is a loop over the batch: as one vmapped expression XLA-CPU fuses it into
  # every tap of the second pass and computes it 14 times over (15x slower).
  x = jax.lax.map(lambda a: _banded_resample(*a, axis=0), (x_bhwc, *rows))
  x = jax.vmap(functools.partial(_banded_resample, axis=1))(x, *cols)
  return jnp.clip(x, 0.0, 1.0)


def apply_geometric(x_bhwc, params, out_size: int, blur_kernels_bk=None, platform=platform_lib.CPU):
  """G on square maps of side S: crop, bilinear resize to out_size, then flips.

  `blur_kernels_bk` (from `blur_kernels`) blurs x first, as P's last op: G(P(x)) is
  `apply_geometric(apply_colour(x), g, size, blur_kernels(p))`, within float rounding (the
  blur of values in [0, 1] stays there, so P's final clamp is moved after the resize).
  `platform` (platform.platform_of(mesh)) picks the blurred resample's form.

  Crop side c = floor(scale*S), top = round((S-c)*offset_y), left = round((S-c)*offset_x),
  rounding half to even (numpy/Python `round`, as the official code's int(round(...))).
  The same function serves images (640 -> 320) and feature maps (80 -> 80).
  """
  _, height, width, _ = x_bhwc.shape
  if height != width:
    raise ValueError(f"apply_geometric needs square maps, got x_bhwc.shape={x_bhwc.shape}")

  def taps(p):
    side = jnp.clip(jnp.floor(p["scale"] * height).astype(jnp.int32), 1, height)
    top = jnp.round((height - side) * p["offset_y"]).astype(jnp.int32)
    left = jnp.round((height - side) * p["offset_x"]).astype(jnp.int32)
    return (
        _crop_resize_taps(height, out_size, top, side, p["vflip"]),
        _crop_resize_taps(height, out_size, left, side, p["hflip"]),
    )

  rows, cols = jax.vmap(taps)(params)
  return _resample_blurred(x_bhwc, rows, cols, blur_kernels_bk, platform)


def _batched(taps, batch):
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (batch,) + a.shape), taps)


def resize_bilinear(x_bhwc, out_size, blur_kernels_bk=None, platform=platform_lib.CPU):
  """Whole-map bilinear resize to `out_size` (side of a square, or (height, width)) as torch
  F.interpolate(bilinear, align_corners=False, no antialias); `blur_kernels_bk` and
  `platform` as in `apply_geometric`. The one resize of images, feature maps (the FPN) and logits.
  """
  batch, height, width, _ = x_bhwc.shape
  out_height, out_width = (out_size, out_size) if isinstance(out_size, int) else out_size
  no_flip = jnp.zeros((), bool)
  rows = _crop_resize_taps(height, out_height, 0, jnp.int32(height), no_flip)
  cols = _crop_resize_taps(width, out_width, 0, jnp.int32(width), no_flip)
  return _resample_blurred(
      x_bhwc, _batched(rows, batch), _batched(cols, batch), blur_kernels_bk, platform
  )


def resize_antialiased(images_bhwc, out_size: int, blur_kernels_bk=None, platform=platform_lib.CPU):
  """Whole-image resize to (out_size, out_size) as PIL's Image.resize(BILINEAR): a triangle
  filter widened by the downscale factor (antialiased), weights renormalised at the borders.
  reference_quirks resizes view 2 so, as the official loader does (PIL, 640 -> 320).
  The weights are jax.image.resize's, read off as its resize of the identity matrix."""
  batch, height, width, _ = images_bhwc.shape

  def taps(in_size):
    with jax.ensure_compile_time_eval():  # a constant of the shapes, also under jit
      matrix = np.asarray(
          jax.image.resize(
              np.eye(in_size, dtype=np.float32), (out_size, in_size), "linear", antialias=True
          )
      )
    nonzero = matrix != 0
    first = np.minimum(nonzero.argmax(axis=1), in_size - 1)
    width = int((in_size - nonzero[:, ::-1].argmax(axis=1) - first).max())
    first = np.minimum(first, in_size - width)
    columns = first[:, None] + np.arange(width)
    return _batched(
        (jnp.asarray(first), jnp.asarray(np.take_along_axis(matrix, columns, 1))), batch
    )

  return _resample_blurred(images_bhwc, taps(height), taps(width), blur_kernels_bk, platform)
