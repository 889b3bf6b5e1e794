"""Tests of picie_jax.core.transforms against PIL, colorsys, scipy and hand-worked numpy."""

import colorsys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageEnhance
import pytest
from scipy import ndimage

from picie_jax.core import transforms as T

PIL_TOL = 2.0 / 255 + 1e-6  # PIL works in uint8: rounded means, truncated blends
# Jitted once per shape: far faster on CPU than dispatching every op eagerly.
apply_photometric = jax.jit(T.apply_photometric, static_argnums=2)
apply_geometric = jax.jit(T.apply_geometric, static_argnums=2)
resize_bilinear = jax.jit(T.resize_bilinear, static_argnums=1)
batch_params = jax.jit(T.batch_params, static_argnums=(0, 5))


def smooth_images_u8(batch, size, seed=0):
  """Random smooth colour images: a coarse random grid upsampled, plus a little noise."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (batch, 4, 4, 3))
  zoomed = ndimage.zoom(coarse, (1, size / 4, size / 4, 1), order=1)
  noisy = zoomed + rng.normal(0, 8, zoomed.shape)
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def photometric_batch(batch, **overrides):
  """Identity P params for `batch` images with some entries set per sample."""
  params = {name: np.full((batch,), value) for name, value in T.IDENTITY_PHOTOMETRIC.items()}
  params.update({name: np.asarray(value) for name, value in overrides.items()})
  return jax.tree.map(jnp.asarray, params)


def geometric_batch(**values):
  params = dict(T.IDENTITY_GEOMETRIC, **values)
  return {name: jnp.asarray([value]) for name, value in params.items()}


def apply_p(images_u8, params, cfg=None):
  cfg = cfg or T.PhotometricConfig()
  return np.asarray(apply_photometric(jnp.asarray(images_u8, jnp.float32) / 255, params, cfg))


@pytest.mark.parametrize(
    "op, enhancer",
    [
        ("brightness", ImageEnhance.Brightness),
        ("contrast", ImageEnhance.Contrast),
        ("saturation", ImageEnhance.Color),
    ],
)
def test_jitter_matches_pil_enhance(op, enhancer):
  images = smooth_images_u8(3, 24)
  factors = np.array([0.7, 1.0, 1.3], np.float32)
  got = apply_p(images, photometric_batch(3, **{op: factors}))
  for image, factor, out in zip(images, factors, got):
    want = np.asarray(enhancer(Image.fromarray(image)).enhance(float(factor))) / 255.0
    np.testing.assert_allclose(out, want, atol=PIL_TOL)
  assert np.abs(got[0] - images[0] / 255.0).max() > 0.05  # the op did something


def test_grayscale_matches_pil_convert_l():
  images = smooth_images_u8(2, 16)
  got = apply_p(images, photometric_batch(2, grayscale=np.array([True, False])))
  want = np.asarray(Image.fromarray(images[0]).convert("L")) / 255.0
  np.testing.assert_allclose(got[0], np.repeat(want[..., None], 3, -1), atol=1.0 / 255 + 1e-6)
  np.testing.assert_allclose(got[1], images[1] / 255.0, atol=1e-6)


def test_hue_matches_colorsys_round_trip():
  images = smooth_images_u8(3, 8, seed=1)
  shifts = np.array([-0.1, 0.05, 0.4], np.float32)
  got = apply_p(images, photometric_batch(3, hue=shifts))
  for image, shift, out in zip(images / 255.0, shifts, got):
    want = np.array(
        [
            colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
            for h, s, v in (colorsys.rgb_to_hsv(*rgb) for rgb in image.reshape(-1, 3))
        ]
    )
    np.testing.assert_allclose(out.reshape(-1, 3), want, atol=1e-5)


@pytest.mark.parametrize("size", [20, 5])  # 5 < the radius 6: reflected more than once
def test_blur_matches_scipy_gaussian_filter(size):
  rng = np.random.default_rng(2)
  images = rng.uniform(0, 1, (4, size, size, 3)).astype(np.float32)
  sigmas = np.array([0.3, 1.0, 2.0, 0.0], np.float32)
  got = np.asarray(
      apply_photometric(
          jnp.asarray(images), photometric_batch(4, blur_sigma=sigmas), T.PhotometricConfig()
      )
  )
  for image, sigma, out in zip(images.astype(np.float64), sigmas, got):
    # scipy 'mirror' (d c b | a b c d) is torch's 'reflect'; radius int(3*sigma + 0.5).
    want = ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="mirror", truncate=3.0)
    np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("size, out_size", [(40, 20), (24, 24), (12, 5)])
def test_views_blur_inside_the_resize_as_blur_then_resize(size, out_size):
  """The views apply P's blur inside G's resampling (and the plain and antialiased resizes');
  the same as P's blurred image resized, for crops at both borders, flips, all blur sizes."""
  images = jnp.asarray(smooth_images_u8(4, size, seed=7), jnp.float32) / 255
  cfg = T.PhotometricConfig()
  photo = photometric_batch(
      4,
      brightness=[1.2, 1.0, 0.8, 1.0],
      hue=[0.05, 0.0, -0.1, 0.0],
      blur_sigma=np.array([2.0, 0.7, 0.0, 1.3], np.float32),
  )
  geo = {
      "scale": jnp.array([0.5, 1.0, 0.73, 0.5]),
      "offset_y": jnp.array([0.0, 1.0, 0.4, 1.0]),
      "offset_x": jnp.array([1.0, 0.0, 0.6, 0.0]),
      "hflip": jnp.array([True, False] * 2),
      "vflip": jnp.array([False, True, True, False]),
  }
  coloured, blur = T.apply_colour(images, photo, cfg), T.blur_kernels(photo, cfg)
  blurred = jnp.asarray(
      np.stack(
          [  # scipy 'mirror' is torch's 'reflect'; radius 3 sigma
              ndimage.gaussian_filter(image, (sigma, sigma, 0), mode="mirror", truncate=3.0)
              for image, sigma in zip(np.asarray(coloured, np.float64), photo["blur_sigma"])
          ]
      ),
      jnp.float32,
  )
  assert float(jnp.abs(blurred - coloured).max()) > 0.05  # the blur did something
  separate = {
      "geometric": apply_geometric(blurred, geo, out_size),
      "bilinear": resize_bilinear(blurred, out_size),
      "antialiased": T.resize_antialiased(blurred, out_size),
  }
  for platform in ("cpu", "tpu"):  # CPU's banded gathers, and the GPU/TPU dense matrices
    folded = {
        "geometric": jax.jit(T.apply_geometric, static_argnums=(2, 4))(
            coloured, geo, out_size, blur, platform
        ),
        "bilinear": jax.jit(T.resize_bilinear, static_argnums=(1, 3))(
            coloured, out_size, blur, platform
        ),
        "antialiased": T.resize_antialiased(coloured, out_size, blur, platform),
    }
    for name, want in separate.items():
      np.testing.assert_allclose(folded[name], want, atol=2e-6, err_msg=f"{name} on {platform}")


def test_ops_applied_in_order_with_clamping():
  images = smooth_images_u8(2, 12, seed=3)
  values = dict(
      brightness=[1.3, 0.8],
      contrast=[0.7, 1.2],
      saturation=[1.25, 0.75],
      hue=[0.08, -0.05],
      grayscale=[True, False],
      blur_sigma=[0.8, 1.5],
  )
  got = apply_p(images, photometric_batch(2, **{k: np.array(v) for k, v in values.items()}))
  want = images / 255.0
  for name, value in values.items():
    want = np.asarray(
        apply_photometric(
            jnp.asarray(want, jnp.float32),
            photometric_batch(2, **{name: np.array(value)}),
            T.PhotometricConfig(),
        )
    )
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_views_draw_and_apply_inside_one_jit():
  """The train step's pattern: params drawn from traced (epoch, indices) inside jit."""
  p_cfg, g_cfg = T.PhotometricConfig(), T.GeometricConfig()

  @jax.jit
  def view1(images, key, epoch, indices):
    p = T.batch_params(T.photometric_params, key, epoch, indices, T.VIEW1_PHOTOMETRIC_STREAM, p_cfg)
    g = T.batch_params(T.geometric_params, key, epoch, indices, T.GEOMETRIC_STREAM, g_cfg)
    return T.apply_geometric(T.apply_photometric(images, p, p_cfg), g, 8), p

  images = jnp.asarray(smooth_images_u8(4, 16), jnp.float32) / 255
  out, p = view1(images, jax.random.key(0), 2, jnp.arange(10, 14))
  separate = batch_params(
      T.photometric_params,
      jax.random.key(0),
      2,
      jnp.arange(10, 14),
      T.VIEW1_PHOTOMETRIC_STREAM,
      p_cfg,
  )
  jax.tree.map(np.testing.assert_array_equal, p, separate)
  assert out.shape == (4, 8, 8, 3) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def bilinear_resize_np(image_hwc, out_size):
  """torch F.interpolate(bilinear, align_corners=False) written as loops, float64."""
  in_h, in_w, _ = image_hwc.shape

  def taps(o, in_size):
    src = max((o + 0.5) * in_size / out_size - 0.5, 0.0)
    i0 = int(np.floor(src))
    return i0, min(i0 + 1, in_size - 1), src - i0

  out = np.zeros((out_size, out_size, image_hwc.shape[2]))
  for oy in range(out_size):
    y0, y1, fy = taps(oy, in_h)
    for ox in range(out_size):
      x0, x1, fx = taps(ox, in_w)
      out[oy, ox] = (1 - fy) * ((1 - fx) * image_hwc[y0, x0] + fx * image_hwc[y0, x1]) + fy * (
          (1 - fx) * image_hwc[y1, x0] + fx * image_hwc[y1, x1]
      )
  return out


@pytest.mark.parametrize("out_size", [3, 8])
def test_geometric_crop_box_hand_worked(out_size):
  # S=10, s=0.55 -> c=5; top=round(5*0.5)=round(2.5)=2 (half to even, like the official
  # code's Python round; floor(x+0.5) would give 3); left=round(5*0.875)=round(4.375)=4.
  image = np.random.default_rng(4).uniform(0, 1, (10, 10, 2))
  params = geometric_batch(scale=0.55, offset_y=0.5, offset_x=0.875)
  got = apply_geometric(jnp.asarray(image[None], jnp.float32), params, out_size)[0]
  want = bilinear_resize_np(image[2:7, 4:9], out_size)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_flips_reverse_the_resized_crop():
  image = np.random.default_rng(5).uniform(0, 1, (1, 12, 12, 3)).astype(np.float32)
  base = dict(scale=0.7, offset_y=0.3, offset_x=0.6)
  crop = np.asarray(apply_geometric(jnp.asarray(image), geometric_batch(**base), 6))
  hflip = apply_geometric(jnp.asarray(image), geometric_batch(**base, hflip=True), 6)
  vflip = apply_geometric(jnp.asarray(image), geometric_batch(**base, vflip=True), 6)
  np.testing.assert_allclose(hflip, crop[:, :, ::-1], atol=1e-6)
  np.testing.assert_allclose(vflip, crop[:, ::-1], atol=1e-6)
  whole = apply_geometric(jnp.asarray(image), geometric_batch(hflip=True), 12)
  np.testing.assert_allclose(whole, image[:, :, ::-1], atol=1e-6)


def smooth_field(size, oversample=1):
  """Smooth two-channel image of a continuous field sampled at pixel centres."""
  coords = (np.arange(size * oversample) + 0.5) / (size * oversample)
  y, x = np.meshgrid(coords, coords, indexing="ij")
  return np.stack([np.sin(2.3 * x + 1.1 * y), np.cos(1.7 * y - 2.9 * x * y)], -1)


def box_downsample(images_bhwc, factor):
  b, h, w, c = images_bhwc.shape
  return images_bhwc.reshape(b, h // factor, factor, w // factor, factor, c).mean((2, 4))


@pytest.mark.parametrize("fine_out, interior_tol", [(32, 2e-3), (64, 5e-3)])
def test_geometric_commutes_with_downsampling(fine_out, interior_tol):
  # s=0.75: c=48 on 64 and c=12 on 16; offsets round(16*0.5)=8=4*round(4*0.5), round(16/4)=4
  # =4*round(4/4): the same crop in relative terms, so G(down(x)) ~ down(G(x)). When G
  # upsamples (fine_out=64), torch's clamp at the crop edge holds the border constant for
  # half an input pixel, which is wider on the coarse map: the border agrees less closely.
  image = smooth_field(64)[None].astype(np.float32)
  coarse_image = jnp.asarray(box_downsample(image, 4))
  params = geometric_batch(scale=0.75, offset_y=0.5, offset_x=0.25, hflip=True, vflip=True)
  fine = box_downsample(np.asarray(apply_geometric(jnp.asarray(image), params, fine_out)), 4)
  coarse = np.asarray(apply_geometric(coarse_image, params, fine_out // 4))
  np.testing.assert_allclose(fine[:, 1:-1, 1:-1], coarse[:, 1:-1, 1:-1], atol=interior_tol)
  np.testing.assert_allclose(fine, coarse, atol=0.03)
  shifted = geometric_batch(scale=0.75, offset_y=0.5, offset_x=0.5, hflip=True, vflip=True)
  moved = np.asarray(apply_geometric(coarse_image, shifted, fine_out // 4))  # 1 px in x
  assert np.abs(fine - moved)[:, 1:-1, 1:-1].max() > 0.05


def test_resize_bilinear():
  image = np.random.default_rng(6).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32)
  half = np.asarray(resize_bilinear(jnp.asarray(image), 4))
  np.testing.assert_allclose(half, box_downsample(image, 2), atol=1e-6)  # 2x = 2x2 mean
  for out_size in (3, 13):
    got = np.asarray(resize_bilinear(jnp.asarray(image), out_size))
    np.testing.assert_allclose(got[1], bilinear_resize_np(image[1], out_size), atol=1e-5)


def draw(param_fn, cfg, epoch=0, stream=0, n=8, seed=0):
  return jax.tree.map(
      np.asarray, batch_params(param_fn, jax.random.key(seed), epoch, jnp.arange(n), stream, cfg)
  )


def test_params_deterministic_per_epoch_index_stream():
  cfg = T.PhotometricConfig(jitter_p=1.0)
  first = draw(T.photometric_params, cfg, epoch=3, stream=1)
  again = draw(T.photometric_params, cfg, epoch=3, stream=1)
  other_epoch = draw(T.photometric_params, cfg, epoch=4, stream=1)
  other_view = draw(T.photometric_params, cfg, epoch=3, stream=2)
  jax.tree.map(np.testing.assert_array_equal, first, again)
  assert not np.allclose(first["brightness"], other_epoch["brightness"])
  assert not np.allclose(first["brightness"], other_view["brightness"])
  assert len(np.unique(first["brightness"])) == 8  # each image its own draw
  single = T.photometric_params(T.sample_key(jax.random.key(0), 3, 5, 1), cfg)
  assert float(single["brightness"]) == first["brightness"][5]


def test_photometric_probabilities_and_ranges():
  p = draw(T.photometric_params, T.PhotometricConfig(), n=2000)
  for name, limit in (("brightness", 0.3), ("contrast", 0.3), ("saturation", 0.3)):
    applied = p[name] != 1.0
    assert abs(applied.mean() - 0.8) < 0.05, name
    assert np.all(np.abs(p[name] - 1.0) <= limit + 1e-6), name
  assert abs((p["hue"] != 0).mean() - 0.8) < 0.05 and np.all(np.abs(p["hue"]) <= 0.1 + 1e-7)
  assert abs(p["grayscale"].mean() - 0.2) < 0.05
  blurred = p["blur_sigma"] > 0
  assert abs(blurred.mean() - 0.5) < 0.05
  sigma = p["blur_sigma"][blurred]
  assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(np.median(sigma) - 1.05) < 0.1


def test_reference_quirks_blur_and_no_grayscale():
  p = draw(T.photometric_params, T.PhotometricConfig(reference_quirks=True), n=2000)
  assert not p["grayscale"].any()
  blurred = p["blur_sigma"] > 0
  assert abs(blurred.mean() - 0.5) < 0.05
  # sigma = |3.8*(u-0.5)+0.1| with u ~ U(0, 0.5): w ~ U(-1.8, 0.1), so
  # P(sigma <= t) = 2t/1.9 for t <= 0.1 and (t + 0.1)/1.9 above.
  sigma = p["blur_sigma"][blurred]
  assert sigma.max() <= 1.8 + 1e-6
  for t in (0.05, 0.5, 1.0, 1.5):
    want = 2 * t / 1.9 if t <= 0.1 else (t + 0.1) / 1.9
    assert abs((sigma <= t).mean() - want) < 0.05, t


def test_geometric_probabilities_and_ranges():
  p = draw(T.geometric_params, T.GeometricConfig(vflip_p=0.3), n=2000)
  assert abs(p["hflip"].mean() - 0.5) < 0.05 and abs(p["vflip"].mean() - 0.3) < 0.05
  assert p["scale"].min() >= 0.5 and p["scale"].max() <= 1.0
  assert abs(p["offset_y"].mean() - 0.5) < 0.05 and abs(p["offset_x"].mean() - 0.5) < 0.05
  assert not draw(T.geometric_params, T.GeometricConfig(), n=2000)["vflip"].any()


def test_disabled_configs_are_identity():
  images = jnp.asarray(smooth_images_u8(3, 16), jnp.float32) / 255
  p_cfg, g_cfg = T.PhotometricConfig(enabled=False), T.GeometricConfig(enabled=False)
  p_params = batch_params(T.photometric_params, jax.random.key(1), 0, jnp.arange(3), 1, p_cfg)
  g_params = batch_params(T.geometric_params, jax.random.key(1), 0, jnp.arange(3), 0, g_cfg)
  np.testing.assert_array_equal(apply_photometric(images, p_params, p_cfg), images)
  # identity params also leave images alone when P itself runs
  np.testing.assert_allclose(
      apply_photometric(images, p_params, T.PhotometricConfig()), images, atol=1e-6
  )
  np.testing.assert_allclose(apply_geometric(images, g_params, 16), images, atol=1e-6)
