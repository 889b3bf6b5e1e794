"""COCO-Stuff on the curated IIC image lists as a TFDS dataset, and its three class settings.

Labels are stored as the raw stuffthingmaps PNGs (fine ids 0-181, 255 unlabeled) and mapped at
read time: one prepared dataset serves the 27-class, stuff-15 and thing-12 settings, and a map
can be checked or changed without preparing 50k images again.

Settings, as the official PiCIE code defines them (data/coco_*_dataset.py, flags --stuff /
--thing): all use the same curated lists `Coco164kFull_Stuff_Coarse_7.txt`; fine ids go to 27
coarse classes (0-11 things, 12-26 stuff, cocostuff27.json). coco_stuff27 keeps all 27;
coco_thing12 keeps coarse 0-11 and ignores stuff; coco_stuff15 keeps coarse 12-26 as 0-14 and
ignores things. (The reference's stuff-only branch intends this, but its mask tests `>= 255`
after 255 was already mapped to -1, so it shifts nothing and scores coarse 0-14 instead.)
"""

from importlib import resources
import json

import tensorflow_datasets as tfds

from picie_jax.data import prepared

LIST_FILE = "Coco164kFull_Stuff_Coarse_7.txt"
_SUBSETS = {"train": "train2017", "val": "val2017"}
_IMAGE_ARCHIVES = {
    "train2017": "train2017.zip (http://images.cocodataset.org/zips/train2017.zip)",
    "val2017": "val2017.zip (http://images.cocodataset.org/zips/val2017.zip)",
}
_LABEL_ARCHIVE = (
    "stuffthingmaps_trainval2017.zip (https://github.com/nightrome/cocostuff), "
    "as annotations/{train2017,val2017}/"
)
_LIST_SOURCE = (
    "the curated IIC image list (curated/ in github.com/janghyuncho/PiCIE, from "
    "github.com/xu-ji/IIC)"
)
NUM_THINGS = 12


class PicieCocoStuff(prepared.RawFilesBuilder):
  """COCO-Stuff images and raw fine-label PNGs (ids 0-181, 255 unlabeled) of the curated IIC
  image lists (49,629 train / 2,175 val), in list order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original files' bytes, curated list order."}
  HOMEPAGE = "https://github.com/nightrome/cocostuff"
  CITATION = "Caesar, Uijlings, Ferrari. COCO-Stuff: Thing and Stuff Classes in Context. CVPR 2018."
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put the extracted archives in the manual directory (config.dataset.manual_dir) like this:
    images/train2017/<id>.jpg        from {_IMAGE_ARCHIVES['train2017']}
    images/val2017/<id>.jpg          from {_IMAGE_ARCHIVES['val2017']}
    annotations/{{train2017,val2017}}/<id>.png   from {_LABEL_ARCHIVE}
    curated/train2017/{LIST_FILE}    (49,629 ids) and
    curated/val2017/{LIST_FILE}      (2,175 ids): {_LIST_SOURCE}
  """

  def file_pairs(self, root):
    return {split: _curated_pairs(root, sub) for split, sub in _SUBSETS.items()}


def _curated_pairs(root, sub):
  """(image, label) paths relative to `root` for the curated list of `sub`, in list order."""
  list_file = root / "curated" / sub / LIST_FILE
  if not list_file.is_file():
    raise FileNotFoundError(f"{list_file} is missing: put {_LIST_SOURCE} there.")
  ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
  prepared.require_dir(root, f"images/{sub}", _IMAGE_ARCHIVES[sub])
  prepared.require_dir(root, f"annotations/{sub}", _LABEL_ARCHIVE)
  pairs = [(f"images/{sub}/{i}.jpg", f"annotations/{sub}/{i}.png") for i in ids]
  prepared.require_files(root, [p for p, _ in pairs], _IMAGE_ARCHIVES[sub])
  prepared.require_files(root, [p for _, p in pairs], _LABEL_ARCHIVE)
  return pairs


def _hierarchy():
  with resources.files("picie_jax.data").joinpath("cocostuff27.json").open() as f:
    return json.load(f)


def label_setting(name):
  """For coco_stuff27 / coco_stuff15 / coco_thing12: ({raw fine id: class or -1}, class names,
  thing classes or None)."""
  meta = _hierarchy()
  coarse = dict(enumerate(meta["fine_to_coarse"]))
  names = meta["coarse_names"]
  if name == "coco_stuff27":
    mapping, class_names, things = coarse, names, tuple(range(NUM_THINGS))
  elif name == "coco_thing12":
    mapping = {f: c if c < NUM_THINGS else -1 for f, c in coarse.items()}
    class_names, things = names[:NUM_THINGS], None
  elif name == "coco_stuff15":
    mapping = {f: c - NUM_THINGS if c >= NUM_THINGS else -1 for f, c in coarse.items()}
    class_names, things = names[NUM_THINGS:], None
  else:
    raise ValueError(f"{name!r} is not a COCO-Stuff setting")
  return {**mapping, 255: -1}, tuple(class_names), things
