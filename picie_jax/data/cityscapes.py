"""Cityscapes for PiCIE as a TFDS dataset: train = leftImg8bit/{test,train_extra} (unlabelled),
val = leftImg8bit/{val,train} with gtFine labelIds.

Labels are stored as the raw `*_gtFine_labelIds.png` files and mapped at read time
(LABEL_MAP: ids 7..33 -> classes 0..26, every other id ignored), so the prepared data keeps
the official ids and other class settings need no second preparation.
"""

import tensorflow_datasets as tfds

from picie_jax.data import prepared

_IMAGES_TRAINVALTEST = "leftImg8bit_trainvaltest.zip (https://www.cityscapes-dataset.com, login)"
_IMAGES_EXTRA = "leftImg8bit_trainextra.zip (https://www.cityscapes-dataset.com, login)"
_LABELS = "gtFine_trainvaltest.zip (https://www.cityscapes-dataset.com, login)"
_SUBSETS = {
    "train": (("test", _IMAGES_TRAINVALTEST), ("train_extra", _IMAGES_EXTRA)),
    "val": (("val", _IMAGES_TRAINVALTEST), ("train", _IMAGES_TRAINVALTEST)),
}
NUM_CLASSES = 27
LABEL_MAP = {**{raw: -1 for raw in range(256)}, **{raw: raw - 7 for raw in range(7, 34)}}


class PicieCityscapes(prepared.RawFilesBuilder):
  """Cityscapes leftImg8bit PNGs and raw gtFine labelIds PNGs (val split only), sorted by path
  within each subset."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original files' bytes, sorted paths."}
  HOMEPAGE = "https://www.cityscapes-dataset.com"
  CITATION = (
      "Cordts et al. The Cityscapes Dataset for Semantic Urban Scene Understanding. CVPR 2016."
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Extract into the manual directory (config.dataset.manual_dir), keeping the archives' folders:
    leftImg8bit/{{train,val,test}}/<city>/*_leftImg8bit.png   from {_IMAGES_TRAINVALTEST}
    leftImg8bit/train_extra/<city>/*_leftImg8bit.png        from {_IMAGES_EXTRA}
    gtFine/{{train,val}}/<city>/*_gtFine_labelIds.png        from {_LABELS}
  """

  def file_pairs(self, root):
    return {
        split: [
            pair
            for subset, archive in subsets
            for pair in _subset_pairs(root, subset, archive, labelled=split == "val")
        ]
        for split, subsets in _SUBSETS.items()
    }


def _subset_pairs(root, subset, archive, labelled):
  """(image, label or None) paths relative to `root` of one leftImg8bit subset, sorted."""
  image_dir = prepared.require_dir(root, f"leftImg8bit/{subset}", archive)
  images = sorted(str(p.relative_to(root)) for p in image_dir.glob("*/*_leftImg8bit.png"))
  if not images:
    raise FileNotFoundError(f"{image_dir} has no <city>/*_leftImg8bit.png: extract {archive}")
  if not labelled:
    return [(image, None) for image in images]
  prepared.require_dir(root, f"gtFine/{subset}", _LABELS)
  labels = [
      image.replace("leftImg8bit/", "gtFine/", 1).replace(
          "_leftImg8bit.png", "_gtFine_labelIds.png"
      )
      for image in images
  ]
  prepared.require_files(root, labels, _LABELS)
  return list(zip(images, labels))
