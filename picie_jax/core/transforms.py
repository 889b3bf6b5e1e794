"""The two views of PiCIE: photometric jitter P and the geometric transform G (DESIGN.md §1).

All parameters come from a stateless key `(seed, epoch, image index, stream)`, so clustering,
labelling and training see the same draws within an epoch without storing lists. Semantics
follow torchvision on float tensors in [0, 1] (multiplicative brightness, contrast/saturation
blends with the grayscale image, hue rotation in HSV), not tf.image's additive ones.

`apply_geometric` is the one crop-resize-flip used for images (640 -> 320) and feature maps
(80 -> 80); `resize_bilinear` is the same code with the identity crop.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

GEOMETRIC_STREAM = 0
VIEW1_PHOTOMETRIC_STREAM = 1
VIEW2_PHOTOMETRIC_STREAM = 2

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL convert('L')
BLUR_TRUNCATE_SIGMAS = 3.0  # kernel half-width = min(int(3*sigma + 0.5), blur_max_radius)
IDENTITY_PHOTOMETRIC = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0,
                        "grayscale": False, "blur_sigma": 0.0}
IDENTITY_GEOMETRIC = {"scale": 1.0, "offset_y": 0.0, "offset_x": 0.0, "hflip": False,
                      "vflip": False}


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
    factors = jax.random.uniform(keys[1], (3,), minval=jnp.maximum(0.0, 1.0 - strengths),
                                 maxval=1.0 + strengths)
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
        indices_b)


def _grayscale(images_bhwc):
    """Luma (B,H,W,1) with PIL's convert('L') weights."""
    return jnp.einsum("bhwc,c->bhw", images_bhwc, jnp.array(GRAY_WEIGHTS, images_bhwc.dtype),
                      precision=jax.lax.Precision.HIGHEST)[..., None]


def _blend(images_bhwc, other, factor_b):
    """torchvision's _blend: factor*img + (1-factor)*other, clamped to [0,1]."""
    factor = factor_b[:, None, None, None]
    return jnp.clip(factor * images_bhwc + (1.0 - factor) * other, 0.0, 1.0)


def _rotate_hue(images_bhwc, shift_b):
    """RGB -> HSV, h = (h + shift) mod 1, -> RGB (torchvision's _rgb2hsv/_hsv2rgb)."""
    r, g, b = images_bhwc[..., 0], images_bhwc[..., 1], images_bhwc[..., 2]
    maxc = jnp.max(images_bhwc, axis=-1)
    chroma = maxc - jnp.min(images_bhwc, axis=-1)
    safe_chroma = jnp.where(chroma > 0, chroma, 1.0)
    hue6 = jnp.where(maxc == r, (g - b) / safe_chroma,
                     jnp.where(maxc == g, 2.0 + (b - r) / safe_chroma,
                               4.0 + (r - g) / safe_chroma))
    hue = jnp.mod(hue6 / 6.0 + shift_b[:, None, None], 1.0)
    # HSV -> RGB: channel n in (R,G,B) = v - chroma*clip(min(k, 4-k), 0, 1), k = (n + 6h) mod 6
    # with n = 5, 3, 1; chroma = v*s.
    k = jnp.mod(jnp.array([5.0, 3.0, 1.0]) + 6.0 * hue[..., None], 6.0)
    return maxc[..., None] - chroma[..., None] * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def _gaussian_kernels(sigma_b, radius: int):
    """(B, 2*radius+1) normalised Gaussian taps, zero beyond int(3*sigma+0.5); sigma 0 = delta."""
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    blurred = sigma_b > 0
    sigma = jnp.where(blurred, sigma_b, 1.0)[:, None]
    within = jnp.abs(offsets) <= jnp.floor(BLUR_TRUNCATE_SIGMAS * sigma + 0.5)
    taps = jnp.where(within, jnp.exp(-0.5 * (offsets / sigma) ** 2), 0.0)
    taps = taps / jnp.sum(taps, axis=1, keepdims=True)
    return jnp.where(blurred[:, None], taps, (offsets == 0).astype(jnp.float32))


def _blur_axis(images_bhwc, kernels_bk, axis: int):
    """Per-sample 1-D convolution along `axis` (1 or 2) with reflect ('mirror') padding."""
    radius = kernels_bk.shape[1] // 2
    pad = [(0, 0)] * 4
    pad[axis] = (radius, radius)
    padded = jnp.pad(images_bhwc, pad, mode="reflect")
    size = images_bhwc.shape[axis]
    taps = kernels_bk.astype(images_bhwc.dtype)[:, :, None, None, None]
    return sum(taps[:, k] * jax.lax.slice_in_dim(padded, k, k + size, axis=axis)
               for k in range(kernels_bk.shape[1]))


def apply_photometric(images_bhwc, params, cfg: PhotometricConfig):
    """P on float images in [0,1]: brightness, contrast, saturation, hue, grayscale, blur.

    Each op is clamped to [0,1] as torchvision's tensor ops are. `params` has a leading batch
    dim (from `batch_params`).
    """
    if not cfg.enabled:
        return images_bhwc
    x = jnp.clip(images_bhwc * params["brightness"][:, None, None, None], 0.0, 1.0)
    gray_mean = jnp.mean(_grayscale(x), axis=(1, 2, 3), keepdims=True)
    x = _blend(x, gray_mean, params["contrast"])
    x = _blend(x, _grayscale(x), params["saturation"])
    x = jnp.clip(_rotate_hue(x, params["hue"]), 0.0, 1.0)
    x = jnp.where(params["grayscale"][:, None, None, None], _grayscale(x), x)
    kernels = _gaussian_kernels(params["blur_sigma"], cfg.blur_max_radius)
    x = _blur_axis(_blur_axis(x, kernels, axis=1), kernels, axis=2)
    return jnp.clip(x, 0.0, 1.0)


def _crop_resize_matrix(in_size: int, out_size: int, start, length, flip):
    """(out_size, in_size) weights: crop [start, start+length), resize, optionally reverse.

    torch F.interpolate(bilinear, align_corners=False, no antialias) on the cropped slice:
    source = max((o + 0.5) * length / out_size - 0.5, 0), two taps clamped inside the crop, so
    no pixel outside the crop contributes (jax.image.scale_and_translate would let the pixels
    next to the crop leak in when upsampling).
    """
    length_f = length.astype(jnp.float32)
    source = jnp.maximum((jnp.arange(out_size, dtype=jnp.float32) + 0.5) * length_f / out_size
                         - 0.5, 0.0)
    lower = jnp.minimum(jnp.floor(source).astype(jnp.int32), length - 1)
    upper = jnp.minimum(lower + 1, length - 1)
    frac = (source - lower)[:, None]
    weights = ((1.0 - frac) * jax.nn.one_hot(start + lower, in_size)
               + frac * jax.nn.one_hot(start + upper, in_size))
    return jnp.where(flip, weights[::-1], weights)


def _resample(x_bhwc, rows_boh, cols_bpw):
    """out[b,o,p] = sum_{h,w} rows[b,o,h] x[b,h,w] cols[b,p,w] (two small contractions)."""
    highest = jax.lax.Precision.HIGHEST
    x = jnp.einsum("boh,bhwc->bowc", rows_boh.astype(x_bhwc.dtype), x_bhwc, precision=highest)
    return jnp.einsum("bpw,bowc->bopc", cols_bpw.astype(x_bhwc.dtype), x, precision=highest)


def apply_geometric(x_bhwc, params, out_size: int):
    """G on square maps of side S: crop, bilinear resize to out_size, then flips.

    Crop side c = floor(scale*S), top = round((S-c)*offset_y), left = round((S-c)*offset_x),
    rounding half to even (numpy/Python `round`, as the official code's int(round(...))).
    The same function serves images (640 -> 320) and feature maps (80 -> 80).
    """
    _, height, width, _ = x_bhwc.shape
    if height != width:
        raise ValueError(f"apply_geometric needs square maps, got x_bhwc.shape={x_bhwc.shape}")

    def matrices(p):
        side = jnp.clip(jnp.floor(p["scale"] * height).astype(jnp.int32), 1, height)
        top = jnp.round((height - side) * p["offset_y"]).astype(jnp.int32)
        left = jnp.round((height - side) * p["offset_x"]).astype(jnp.int32)
        return (_crop_resize_matrix(height, out_size, top, side, p["vflip"]),
                _crop_resize_matrix(height, out_size, left, side, p["hflip"]))

    rows, cols = jax.vmap(matrices)(params)
    return _resample(x_bhwc, rows, cols)


def resize_bilinear(images_bhwc, out_size: int):
    """Whole-image bilinear resize to (out_size, out_size), torch half-pixel, no antialias."""
    batch, height, width, _ = images_bhwc.shape
    no_flip = jnp.zeros((), bool)
    rows = _crop_resize_matrix(height, out_size, 0, jnp.int32(height), no_flip)
    cols = _crop_resize_matrix(width, out_size, 0, jnp.int32(width), no_flip)
    return _resample(images_bhwc, jnp.broadcast_to(rows, (batch,) + rows.shape),
                     jnp.broadcast_to(cols, (batch,) + cols.shape))



def resize_antialiased(images_bhwc, out_size: int):
    """Whole-image resize to (out_size, out_size) as PIL's Image.resize(BILINEAR): a triangle
    filter widened by the downscale factor (antialiased), weights renormalised at the borders.
    reference_quirks resizes view 2 so, as the official loader does (PIL, 640 -> 320)."""
    batch, _, _, channels = images_bhwc.shape
    return jax.image.resize(images_bhwc, (batch, out_size, out_size, channels), "linear",
                            antialias=True)
