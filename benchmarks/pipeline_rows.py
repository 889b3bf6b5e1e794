"""Input-pipeline row: images/s of picie_jax.data.pipeline decoding COCO-sized JPEGs.

64 JPEGs of 640x480 are written to a temporary image folder (random crops of scikit-image's
sample photos, resized, or smooth noise where scikit-image is missing: JPEG decoding costs
about the same for any photographic content), then whole passes of `pipeline.pass_batches`
at res2 (decode, shorter-side resize, centre crop, batch) are timed.
"""

import os
import tempfile

import numpy as np
from PIL import Image

from benchmarks import timing
from picie_jax.data import datasets
from picie_jax.data import pipeline

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
)  # bundled with scikit-image (no download)
WIDTH, HEIGHT = 640, 480


def _sources():
  """RGB uint8 sample photos from scikit-image, or smooth random fields without it."""
  try:
    from skimage import data  # pylint: disable=import-outside-toplevel

    photos = []
    for name in PHOTOS:
      fn = getattr(data, name, None)
      if fn is not None:
        image = np.asarray(fn())
        photos.append(image if image.ndim == 3 else np.repeat(image[..., None], 3, -1))
    return [p[..., :3] for p in photos], "scikit-image sample photos"
  except ImportError:
    rng = np.random.default_rng(0)
    coarse = [rng.integers(0, 256, (15, 20, 3), dtype=np.uint8) for _ in range(8)]
    return (
        [np.asarray(Image.fromarray(c).resize((WIDTH, HEIGHT), Image.BICUBIC)) for c in coarse],
        "smooth noise (scikit-image not installed)",
    )


def write_jpegs(directory, count=64, seed=0):
  """`count` 640x480 JPEGs (quality 90) in directory/train/images; returns their source."""
  photos, origin = _sources()
  image_dir = os.path.join(directory, "train", "images")
  os.makedirs(image_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    scale = rng.uniform(0.6, 1.0)
    ch, cw = max(16, int(h * scale)), max(16, int(w * scale))
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(photo[top : top + ch, left : left + cw])
    crop.resize((WIDTH, HEIGHT), Image.BILINEAR).save(
        os.path.join(image_dir, f"{i:04d}.jpg"), quality=90
    )
  return origin


def pipeline_row(config, repeats, warmup, max_foreign_cores, max_extra_rounds, count=64):
  """Images/s of full passes over `count` JPEGs at config.res2, batches of train.batch_size."""
  with tempfile.TemporaryDirectory() as tmp:
    origin = write_jpegs(tmp, count)
    folder = config.copy_and_resolve_references()
    folder.dataset.update({"name": "image_folder", "root": tmp, "num_train": 0, "num_classes": 0})
    source = datasets.build_source(folder, "train")
    batch = config.train.batch_size

    def one_pass():
      return sum(len(b["image"]) for b in pipeline.pass_batches(source, batch, config.res2))

    timed = timing.time_interleaved(
        {"picie_jax/input_pipeline": one_pass}, repeats, warmup, max_foreign_cores, max_extra_rounds
    )
  stats = timed["fns"]["picie_jax/input_pipeline"]
  return {
      "images": count,
      "image_size": [WIDTH, HEIGHT],
      "content": origin,
      "res2": config.res2,
      "batch_size": batch,
      "timing": timed,
      "images_per_s": count / stats["median_s"],
  }
