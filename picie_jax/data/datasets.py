"""Dataset sources from the user's local files (or generated): synthetic, COCO-Stuff-27,
Cityscapes-27 and a plain image folder. Nothing is downloaded.

Layouts expected under `config.dataset.root`:
  coco_stuff27:  images/{train2017,val2017}/<id>.jpg, annotations/{train2017,val2017}/<id>.png
                 (stuffthingmaps, fine ids 0-181, 255 unlabeled),
                 curated/{train2017,val2017}/Coco164kFull_Stuff_Coarse_7.txt (IIC image lists)
  cityscapes27:  leftImg8bit/<split>/<city>/*_leftImg8bit.png,
                 gtFine/<split>/<city>/*_gtFine_labelIds.png; train = test + train_extra
                 (unlabelled), val = val + train (labelled)
  image_folder:  {train,val}/images/*.{jpg,jpeg,png}, optional {train,val}/labels/<stem>.png
                 with values 0..num_classes-1 and 255 unlabeled
"""
import json
import os
from importlib import resources

import numpy as np
import tensorflow as tf

from picie_jax.data import pipeline
from picie_jax.data import synthetic

_INVALID = -2  # LUT entry for a label value the dataset does not define
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


def build_source(config, split):
  """The `split` ('train' or 'val') of the dataset named by config.dataset.name."""
  builders = {
      "synthetic": _synthetic,
      "coco_stuff27": _coco_stuff27,
      "cityscapes27": _cityscapes27,
      "image_folder": _image_folder,
  }
  name = config.dataset.name
  if name not in builders:
    raise ValueError(f"config.dataset.name={name!r} is not one of {sorted(builders)}")
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  return builders[name](config.dataset, split)


def _limit(items, count):
  return items[:count] if count else items


def _synthetic(dcfg, split):
  """Generated scenes; train and val use disjoint seeds so no image is shared."""
  count = dcfg.num_train if split == "train" else dcfg.num_val
  if count <= 0:
    raise ValueError(f"config.dataset.num_{split} must be > 0 for the synthetic dataset")
  seed = 1000 if split == "train" else 2000
  images, labels = synthetic.generate_split(seed, 0, count, dcfg.synthetic_size)
  images_t = tf.constant(images)
  labels_t = tf.constant(labels.astype(np.int32))

  def load(index):
    return {"image": tf.gather(images_t, index), "label": tf.gather(labels_t, index)}

  return pipeline.Source(
      name=f"synthetic/{split}", num_examples=count, load=load, has_labels=True,
      num_classes=synthetic.NUM_CLASSES, class_names=synthetic.CLASS_NAMES,
      thing_classes=synthetic.THING_CLASSES, describe=lambda i: f"synthetic[{split}][{i}]")


def _label_lut(mapping):
  """A 256-entry table: raw PNG value -> class id, -1 ignored, _INVALID undefined."""
  lut = np.full(256, _INVALID, np.int32)
  for raw, cls in mapping.items():
    lut[raw] = cls
  return tf.constant(lut)


def file_source(name, image_paths, label_paths, lut, num_classes, class_names=(),
                thing_classes=None):
  """A Source over image files (JPEG/PNG) and optional label PNGs mapped through `lut`."""
  if not image_paths:
    raise ValueError(f"{name}: no images found")
  images_t = tf.constant(image_paths)
  labels_t = tf.constant(label_paths) if label_paths else None

  def load(index):
    path = tf.gather(images_t, index)
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    example = {"image": image}
    if labels_t is not None:
      label_path = tf.gather(labels_t, index)
      raw = tf.io.decode_png(tf.io.read_file(label_path), channels=1)[..., 0]
      label = tf.gather(lut, tf.cast(raw, tf.int32))
      bad = tf.reduce_any(label == _INVALID)
      tf.debugging.Assert(tf.logical_not(bad), [
          "label file has values outside the dataset's label set:", label_path,
          "values:", tf.unique(tf.reshape(tf.boolean_mask(raw, label == _INVALID), [-1]))[0]
      ])
      shape_ok = tf.reduce_all(tf.shape(raw)[:2] == tf.shape(image)[:2])
      tf.debugging.Assert(shape_ok, ["label size differs from its image:", label_path, path])
      example["label"] = label
    else:
      example["label"] = tf.fill(tf.shape(image)[:2], pipeline.IGNORE_LABEL)
    return example

  return pipeline.Source(
      name=name, num_examples=len(image_paths), load=load, has_labels=bool(label_paths),
      num_classes=num_classes, class_names=tuple(class_names), thing_classes=thing_classes,
      describe=lambda i: image_paths[i])


def _require_dir(path, key="config.dataset.root"):
  if not path:
    raise ValueError(f"{key} is empty: set it to the dataset's directory")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist: set {key} to the dataset's directory")
  return path


def _coco_stuff27(dcfg, split):
  root = _require_dir(dcfg.root)
  with resources.files("picie_jax.data").joinpath("cocostuff27.json").open() as f:
    meta = json.load(f)
  sub = f"{split}2017"
  list_file = os.path.join(root, "curated", sub, meta["curated_subset"]["list_file_name"])
  if not os.path.isfile(list_file):
    raise FileNotFoundError(f"{list_file} is missing: COCO-Stuff-27 needs the IIC image list")
  with open(list_file) as f:
    ids = [line.strip() for line in f if line.strip()]
  ids = _limit(ids, dcfg.num_train if split == "train" else dcfg.num_val)
  images = [os.path.join(root, "images", sub, f"{i}.jpg") for i in ids]
  labels = [os.path.join(root, "annotations", sub, f"{i}.png") for i in ids]
  lut = {fine: coarse for fine, coarse in enumerate(meta["fine_to_coarse"])}
  lut[255] = pipeline.IGNORE_LABEL
  return file_source(f"coco_stuff27/{split}", images, labels, _label_lut(lut), 27,
                     meta["coarse_names"], thing_classes=tuple(range(12)))


def _cityscapes27(dcfg, split):
  root = _require_dir(dcfg.root)
  subsets = ("test", "train_extra") if split == "train" else ("val", "train")
  images = []
  for sub in subsets:
    d = os.path.join(root, "leftImg8bit", sub)
    if os.path.isdir(d):
      images += sorted(os.path.join(dp, f) for dp, _, fs in os.walk(d) for f in fs
                       if f.endswith("_leftImg8bit.png"))
  images = _limit(images, dcfg.num_train if split == "train" else dcfg.num_val)
  labels = []
  if split == "val":
    labels = [p.replace(os.sep + "leftImg8bit" + os.sep, os.sep + "gtFine" + os.sep)
              .replace("_leftImg8bit.png", "_gtFine_labelIds.png") for p in images]
  lut = {raw: pipeline.IGNORE_LABEL for raw in range(256)}
  lut.update({raw: raw - 7 for raw in range(7, 34)})
  return file_source(f"cityscapes27/{split}", images, labels, _label_lut(lut), 27)


def _image_folder(dcfg, split):
  root = _require_dir(os.path.join(dcfg.root, split), "config.dataset.root")
  image_dir = _require_dir(os.path.join(root, "images"))
  names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(_IMAGE_EXTENSIONS))
  names = _limit(names, dcfg.num_train if split == "train" else dcfg.num_val)
  images = [os.path.join(image_dir, f) for f in names]
  label_dir = os.path.join(root, "labels")
  labels = []
  if os.path.isdir(label_dir):
    if dcfg.num_classes <= 0:
      raise ValueError(f"{label_dir} has labels: set config.dataset.num_classes")
    labels = [os.path.join(label_dir, os.path.splitext(f)[0] + ".png") for f in names]
    missing = [p for p in labels if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{len(missing)} label files missing, e.g. {missing[0]}")
  lut = {v: v for v in range(dcfg.num_classes)}
  lut[255] = pipeline.IGNORE_LABEL
  return file_source(f"image_folder/{split}", images, labels, _label_lut(lut),
                     dcfg.num_classes)
