"""augment.reference_quirks: the official loader's view 1 and view 2, re-stated small.

Official (data/cityscapes_train_dataset.py, data/coco_train_dataset.py, TrainX.transform_image):
  mode 'compute' (cluster and label phases): view 1 = tensor(P1(x)), G on the GPU;
                                             view 2 = tensor(PIL resize(P2(x), res1, BILINEAR))
  mode 'train' / 'baseline_train' (the loss):
      Cityscapes: image1 = transform_inv(x, 0); image1 = transform_tensor(image)  -> G(x), no P1
      COCO:       image1 = transform_tensor(image1)                              -> G(P1(x))
      view 2 as in 'compute'.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageFilter

from configs import synthetic as synthetic_config
from picie_jax import parallel
from picie_jax import steps
from picie_jax.core import transforms as T
from picie_jax.data import synthetic


def _step_config(dataset="cityscapes27", **overrides):
  c = synthetic_config.get_config()
  c.res1 = 32
  c.dataset.name = dataset
  c.augment.reference_quirks = True
  c.update_from_flattened_dict(overrides)
  return steps.step_config_from_config(c, parallel.make_mesh())


def test_quirk_view1_unjittered_in_cityscapes_train_phase_only():
  """MDC (one view: the official 'baseline_train' mode drops P1 alike) keeps this cheap."""
  images = jnp.asarray(synthetic.generate_split(7, 0, 2, 32)[0])
  indices, key = jnp.arange(2), jax.random.PRNGKey(3)
  mdc = {"method": "mdc", "train.cross_view_loss": False}
  step_config = _step_config(**mdc)
  geo = T.batch_params(
      T.geometric_params, key, 0, indices, T.GEOMETRIC_STREAM, step_config.geometric
  )
  x = images.astype(jnp.float32) / 255

  def official(want, photometric):  # the quirks' jitter works on uint8 values, the default not
    if want == "unjittered":
      return T.apply_geometric(x, geo, step_config.res1)
    photo = T.batch_params(
        T.photometric_params, key, 0, indices, T.VIEW1_PHOTOMETRIC_STREAM, photometric
    )
    return T.apply_geometric(T.apply_photometric(x, photo, photometric), geo, step_config.res1)

  jittered = official("jittered", step_config.photometric)
  assert float(jnp.abs(jittered - official("unjittered", None)).max()) > 0.05
  cases = {
      ("cityscapes27", True, "compute"): "jittered",
      ("cityscapes27", True, "train"): "unjittered",
      ("coco_stuff27", True, "train"): "jittered",
      ("cityscapes27", False, "train"): "jittered",
  }
  for (dataset, quirks, mode), want in cases.items():
    step_config = _step_config(dataset, **mdc, **{"augment.reference_quirks": quirks})
    (v1,), _ = steps.view_images(images, indices, 0, key, step_config, train_phase=mode == "train")
    np.testing.assert_allclose(
        v1,
        official(want, step_config.photometric),
        atol=1e-6,
        err_msg=f"{dataset} quirks={quirks} {mode}",
    )


def test_train_step_asks_for_the_train_phase_inputs(monkeypatch):
  """The loss's view_images call is the one marked train_phase (labels recomputed in the step
  keep P1)."""
  step_config = _step_config(
      **{"method": "pixel_kmeans", "kmeans.metric": "l2", "train.labels": "recompute"}
  )
  calls = []
  real = steps.view_images

  def recording(*args, train_phase=False, **kwargs):
    calls.append(train_phase)
    return real(*args, train_phase=train_phase, **kwargs)

  monkeypatch.setattr(steps, "view_images", recording)
  state = steps.TrainState.create(
      {"params": {}, "batch_stats": {}},
      jnp.zeros((2, 3, 4)),
      steps.make_optimizer(1e-3, 0.0, train_classifier=False),
  )
  targets = steps.EpochTargets(
      frozen={"params": {}, "batch_stats": {}},
      centroids=jnp.zeros((2, 3, 3)),
      weights=jnp.ones((2, 3)),
  )
  batch = {
      "image": jnp.zeros((2, 64, 64, 3), jnp.uint8),
      "index": jnp.arange(2),
      "mask": jnp.ones(2, bool),
  }
  step = functools.partial(steps.train_step.__wrapped__, None, step_config=step_config)
  jax.make_jaxpr(step)(state, targets, batch, 0, jax.random.PRNGKey(0))
  assert calls.count(True) == 1 and calls.count(False) == 1  # the loss, the labels


def test_quirk_view2_is_resized_as_pil_does():
  """Official view 2: PIL Image.resize(BILINEAR) of the uint8 base image (640 -> 320 there,
  64 -> 32 here: the same factor); PIL rounds to uint8 with fixed-point weights, so one
  level is the tolerance. Plain bilinear (the default) is far from it on fine texture."""
  image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  pil = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR), np.float32)
  step_config = _step_config(**{"augment.photometric": False})
  (_, v2), _ = steps.view_images(
      jnp.asarray(image)[None], jnp.arange(1), 0, jax.random.PRNGKey(0), step_config
  )
  ours = np.asarray(v2[0]) * 255
  assert np.abs(ours - pil).max() <= 1.0 + 1e-3 and np.abs(ours - pil).mean() < 0.3
  plain = np.asarray(T.resize_bilinear(jnp.asarray(image, jnp.float32)[None], 32)[0])
  assert np.abs(plain - pil).max() > 20


def _pil_colour_jitter(image_u8, brightness, contrast, saturation, hue):
  """The official jitter of one image: torchvision's PIL functional ops in its order (Pillow's
  ImageEnhance for the first three; adjust_hue through Pillow's HSV, h += uint8(hue * 255))."""
  image = Image.fromarray(image_u8)
  image = ImageEnhance.Brightness(image).enhance(brightness)
  image = ImageEnhance.Contrast(image).enhance(contrast)
  image = ImageEnhance.Color(image).enhance(saturation)
  if hue != 0:
    h, s, v = image.convert("HSV").split()
    shifted = (np.asarray(h, np.int64) + int(hue * 255)) % 256
    image = Image.merge("HSV", (Image.fromarray(shifted.astype(np.uint8), "L"), s, v))
    image = image.convert("RGB")
  return np.asarray(image, np.float32)


def _photometric(n, rng, **fixed):
  params = {
      "brightness": rng.uniform(0.7, 1.3, n),
      "contrast": rng.uniform(0.7, 1.3, n),
      "saturation": rng.uniform(0.7, 1.3, n),
      "hue": rng.uniform(-0.1, 0.1, n),
      "grayscale": np.zeros(n, bool),
      "blur_sigma": np.zeros(n),
      **fixed,
  }
  return {k: np.asarray(v, bool if k == "grayscale" else np.float32) for k, v in params.items()}


def test_quirk_colour_jitter_is_pils_uint8_arithmetic():
  """Measured on 8 synthetic scenes: on the uint8 path 0.3% of the values differ from Pillow's
  (mean |d| 0.006/255, max 6/255: float rounding at truncation and HSV boundaries); the
  torchvision tensor semantics (the default) differ by 1.6/255 on average."""
  images = np.asarray(synthetic.generate_split(0, 0, 8, 128)[0])
  params = _photometric(len(images), np.random.default_rng(0))
  want = np.stack(
      [
          _pil_colour_jitter(
              image,
              *(
                  float(params[k][i])
                  for k in T.IDENTITY_PHOTOMETRIC
                  if k not in ("grayscale", "blur_sigma")
              ),
          )
          for i, image in enumerate(images)
      ]
  )
  x = jnp.asarray(images, jnp.float32) / 255
  colour = jax.jit(T.apply_colour, static_argnums=2)
  ours = np.asarray(colour(x, params, T.PhotometricConfig(reference_quirks=True))) * 255
  difference = np.abs(ours - want)
  assert (difference > 0.5).mean() < 0.01 and difference.mean() < 0.02 and difference.max() <= 8
  tensor_semantics = np.asarray(colour(x, params, T.PhotometricConfig())) * 255
  assert np.abs(tensor_semantics - want).mean() > 1.0


def test_quirk_blur_differs_from_pils_box_approximation_by_a_measured_amount():
  """The remaining difference of the quirk path: PIL's GaussianBlur (three box blurs, uint8)
  against our Gaussian taps, measured at sigma 1 on the synthetic scenes (mean |d| 0.64/255,
  max 31/255 at sharp edges)."""
  images = np.asarray(synthetic.generate_split(0, 0, 8, 128)[0])
  params = _photometric(
      len(images),
      np.random.default_rng(0),
      brightness=np.ones(8),
      contrast=np.ones(8),
      saturation=np.ones(8),
      hue=np.zeros(8),
      blur_sigma=np.ones(8),
  )
  cfg = T.PhotometricConfig(reference_quirks=True)
  ours = np.asarray(T.apply_photometric(jnp.asarray(images, jnp.float32) / 255, params, cfg)) * 255
  pil = np.stack(
      [
          np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius=1.0)))
          for im in images
      ]
  ).astype(np.float32)
  difference = np.abs(ours - pil)
  assert 0.3 < difference.mean() < 1.0 and difference.max() < 40
