"""Dataset sources: synthetic (generated), COCO-Stuff (27 / stuff-15 / thing-12), Cityscapes-27
and Potsdam (3 / 6) (prepared TFDS splits, see `prepare`), and a plain image folder read
directly. Nothing is downloaded.

  coco_stuff27, coco_stuff15, coco_thing12, cityscapes27, potsdam3, potsdam6: `picie-jax
      prepare` writes the splits from config.dataset.manual_dir (coco_stuff.py, cityscapes.py,
      potsdam.py name the files) into
      config.dataset.data_dir; training reads them from there by index.
  image_folder:  config.dataset.root/{train,val}/images/*.{jpg,jpeg,png}, optional
      {train,val}/labels/<stem>.png with values 0..num_classes-1 and 255 unlabeled; without
      val labels a run trains but skips evaluation (see `evaluation_source`).

Every source decodes the same way (`_encoded_source`): encoded bytes fetched by index, decoded
in the tf.data map, label PNGs read at their exact bit depth and mapped through a table.

EXIF orientation: an image folder's photos are shown as a viewer shows them (a phone's
rotated JPEG, with its label drawn on the displayed picture, stays aligned). COCO and
Cityscapes keep the stored pixel array, as the official loader (PIL `Image.open`, no
`exif_transpose`) does: their annotations are defined on the stored array.

Before a run (`Source.scan`, called where the Run is built): an image folder's every file
header (scan.py) and, when config.dataset.scan_label_values, every evaluation label's values;
a prepared split's first and last records (that the split is complete and readable; `prepare`
wrote it from the checked archives) and, likewise, its label values.
"""

from collections.abc import Callable
import os
from typing import Any, NamedTuple

import numpy as np
import tensorflow as tf

from picie_jax.data import cityscapes
from picie_jax.data import coco_stuff
from picie_jax.data import formats
from picie_jax.data import pipeline
from picie_jax.data import potsdam
from picie_jax.data import prepared
from picie_jax.data import scan
from picie_jax.data import synthetic

_INVALID = -2  # table entry for a label value the dataset does not define
_LABEL_TABLE_SIZE = 1 << 16  # every value a 16-bit PNG can hold


class Dataset(NamedTuple):
  """A DATASETS entry: `read(config.dataset, split)` is a split's Source; `builder` the TFDS
  builder `prepare` writes the splits with (None: read directly, nothing to prepare)."""

  read: Callable[[Any, str], pipeline.Source]
  builder: type | None = None


def build_source(config, split):
  """The `split` ('train' or 'val') of the dataset named by config.dataset.name."""
  name = config.dataset.name
  if name not in DATASETS:
    raise ValueError(f"config.dataset.name={name!r} is not one of {sorted(DATASETS)}")
  if split not in ("train", "val"):
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
  return DATASETS[name].read(config.dataset, split)


def evaluation_source(config):
  """(labelled val source, None), or (None, why there is none): an image folder may come
  without val labels (config.dataset.num_classes=0), and then a run trains and clusters but
  reports no scores; with num_classes set, missing val labels are an error."""
  if config.dataset.name == "image_folder":
    for sub in ("images", "labels"):
      path = os.path.join(config.dataset.root, "val", sub)
      if not os.path.isdir(path):
        why = (
            f"{path} does not exist (config.dataset.root={config.dataset.root!r}); "
            "add val/images and val/labels/<stem>.png to evaluate"
        )
        if config.dataset.num_classes:
          raise FileNotFoundError(
              f"{why}, or set config.dataset.num_classes=0 to train without evaluation"
          )
        return None, why
  return build_source(config, "val"), None


def scan_sources(train_source, val_source, scan_label_values, progress):
  """The up-front check of a run's data (see the module docstring); raises naming the file.
  Train labels are never read (training is unsupervised), so only their presence is checked."""
  for source, labels in ((train_source, False), (val_source, True)):
    if source is not None and source.scan is not None:
      source.scan(labels=labels, values=labels and scan_label_values, progress=progress)


def prepare(config):
  """Writes the prepared splits of config.dataset.name from config.dataset.manual_dir into
  config.dataset.data_dir (TFDS's default if empty); returns the dataset's directory."""
  name = config.dataset.name
  builder = DATASETS[name].builder if name in DATASETS else None
  if builder is None:
    raise ValueError(
        f"config.dataset.name={name!r} needs no prepare step (it is read directly); prepare "
        f"is for {sorted(n for n, dataset in DATASETS.items() if dataset.builder)}"
    )
  manual_dir = _require_dir(config.dataset.manual_dir, "config.dataset.manual_dir")
  return prepared.prepare(builder, config.dataset.data_dir, manual_dir).data_dir


def _limit(count, limit):
  return min(count, limit) if limit else count


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
      name=f"synthetic/{split}",
      num_examples=count,
      load=load,
      has_labels=True,
      num_classes=synthetic.NUM_CLASSES,
      class_names=synthetic.CLASS_NAMES,
      thing_classes=synthetic.THING_CLASSES,
      describe=lambda i: f"synthetic[{split}][{i}]",
  )


def label_table(mapping):
  """A table over every 16-bit value: raw label value -> class id, -1 ignored, _INVALID undefined."""
  table = np.full(_LABEL_TABLE_SIZE, _INVALID, np.int32)
  for raw, cls in mapping.items():
    table[raw] = cls
  return tf.constant(table)


def decode_label_png(png_bytes, file_name, table):
  """The class ids of a label PNG: its stored values, exactly, mapped through `table`.

  TF decodes an n-bit PNG to uint16 scaled by 65535 / (2^n - 1) (an 8-bit 7 reads as 1799;
  the uint8 default divides 16-bit values by 257), so the bit depth is read from the IHDR chunk
  and the scale undone. A file that is not a single-channel PNG, or a value `table` does not
  define, is an error naming `file_name`.
  """
  header = tf.io.decode_raw(tf.strings.substr(png_bytes + b"\0" * 26, 0, 26), tf.uint8)
  bit_depth, colour_type = tf.cast(header[24], tf.int32), header[25]
  is_gray_png = tf.logical_and(
      tf.reduce_all(header[:8] == np.frombuffer(formats.PNG_SIGNATURE, np.uint8)), colour_type == 0
  )
  check_format = tf.debugging.Assert(
      is_gray_png,
      [
          tf.strings.join(
              [
                  "label file ",
                  file_name,
                  " is not a single-channel (grayscale) PNG (PNG colour type ",
                  tf.strings.as_string(colour_type),
                  "; 2 = RGB, 3 = palette, 4/6 = with alpha): save "
                  "class ids as an 8- or 16-bit grayscale PNG",
              ]
          )
      ],
  )
  with tf.control_dependencies([check_format]):
    raw_scaled = tf.io.decode_png(png_bytes, channels=1, dtype=tf.uint16)[..., 0]
    scale = (2**16 - 1) // (tf.bitwise.left_shift(1, bit_depth) - 1)
  raw = tf.cast(raw_scaled, tf.int32) // scale
  label = tf.gather(table, raw)
  bad = label == _INVALID
  bad_values = tf.unique(tf.boolean_mask(tf.reshape(raw, [-1]), tf.reshape(bad, [-1])))[0]
  check_values = tf.debugging.Assert(
      tf.logical_not(tf.reduce_any(bad)),
      [
          tf.strings.join(
              [
                  "label file ",
                  file_name,
                  " has values the dataset does not define: ",
                  tf.strings.reduce_join(tf.strings.as_string(bad_values), separator=", "),
              ]
          )
      ],
  )
  with tf.control_dependencies([check_values]):
    return tf.identity(label)


def _encoded_source(
    dcfg,
    name,
    num_examples,
    fetch,
    table,
    has_labels,
    num_classes,
    describe,
    scan_fn,
    honour_exif=False,
    class_names=(),
    thing_classes=None,
):
  """A Source whose `fetch(index)` gives (image bytes, label PNG bytes, label file name).

  `scan_fn(source, labels, progress)` checks the headers of the split; `honour_exif` turns
  images as their EXIF orientation says.
  """
  if num_examples <= 0:
    raise ValueError(f"{name}: no images found")

  def decode_image(image_bytes):
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    if not honour_exif:
      return image
    orientation = tf.numpy_function(
        scan.orientation_of_bytes, [image_bytes], tf.int64, stateful=False
    )
    return apply_orientation(image, orientation)

  def load(index):
    image_bytes, label_bytes, label_file = fetch(index)
    image = decode_image(image_bytes)
    if not has_labels:
      return {"image": image, "label": tf.fill(tf.shape(image)[:2], pipeline.IGNORE_LABEL)}
    label = decode_label_png(label_bytes, label_file, table)
    same_size = tf.reduce_all(tf.shape(label) == tf.shape(image)[:2])
    check_size = tf.debugging.Assert(
        same_size,
        [tf.strings.join(["label file ", label_file, " has a different size from its image"])],
    )
    with tf.control_dependencies([check_size]):
      return {"image": image, "label": tf.identity(label)}

  def load_label(index):
    _, label_bytes, label_file = fetch(index)
    return decode_label_png(label_bytes, label_file, table)

  def unreadable_file(index):
    """(file, error) of the first file of example `index` that cannot be read or decoded."""
    try:
      image_bytes, label_bytes, label_file = fetch(tf.constant(index, tf.int64))
    except tf.errors.OpError as e:
      return describe(index), e.message
    parts = [(describe(index), lambda: tf.io.decode_image(image_bytes, expand_animations=False))]
    if has_labels:
      parts.append(
          (label_file.numpy().decode(), lambda: tf.io.decode_png(label_bytes, dtype=tf.uint16))
      )
    for file, decode in parts:
      try:
        decode()
      except tf.errors.OpError as e:
        return file, e.message
    return None

  def scan_split(labels, values, progress):
    scan_fn(source, labels and has_labels, progress)
    if labels and has_labels and values:
      scan.check_label_values(source, load_label, progress)

  source = pipeline.Source(
      name=name,
      num_examples=num_examples,
      load=load,
      has_labels=has_labels,
      num_classes=num_classes,
      class_names=tuple(class_names),
      thing_classes=thing_classes,
      describe=describe,
      unreadable_file=unreadable_file,
      scan=scan_split,
      bad_files=pipeline.BadFiles(dcfg.on_bad_file),
  )
  return source


def apply_orientation(image_hwc, orientation):
  """The image as displayed for EXIF `orientation` (1..8), as PIL's ImageOps.exif_transpose:
  5..8 transpose first; then (flip rows, flip columns) cycle (no, no), (no, yes), (yes, yes),
  (yes, no) over 1..4 and again over 5..8."""
  step = (orientation - 1) % 4
  image = tf.cond(orientation >= 5, lambda: tf.transpose(image_hwc, [1, 0, 2]), lambda: image_hwc)
  image = tf.cond(tf.logical_or(step == 2, step == 3), lambda: image[::-1], lambda: image)
  return tf.cond(tf.logical_or(step == 1, step == 2), lambda: image[:, ::-1], lambda: image)


def _prepared_source(
    dcfg, split, table, has_labels, num_classes, class_names=(), thing_classes=None
):
  """A Source over a prepared split of config.dataset.name, read by index."""
  records = prepared.open_split(DATASETS[dcfg.name].builder, dcfg.data_dir, split)
  count = _limit(len(records), dcfg.num_train if split == "train" else dcfg.num_val)

  def scan_records(source, labels, progress):
    """The first and last records: the split is there, complete and readable."""
    del progress  # two records
    examples = []
    for index in sorted({0, count - 1}):
      record = records[index]
      examples.append(
          (
              record["image"],
              record["label"] if labels else None,
              record["image_file"].decode(),
              record["label_file"].decode(),
              False,
          )
      )
    scan.check_headers(source, examples, progress=False)

  return _encoded_source(
      dcfg,
      f"{dcfg.name}/{split}",
      count,
      prepared.fetch_fn(records),
      table,
      has_labels,
      num_classes,
      describe=lambda i: records[i]["image_file"].decode(),
      scan_fn=scan_records,
      class_names=class_names,
      thing_classes=thing_classes,
  )


def _coco_stuff(dcfg, split):
  mapping, class_names, things = coco_stuff.label_setting(dcfg.name)
  return _prepared_source(
      dcfg, split, label_table(mapping), True, len(class_names), class_names, things
  )


def _cityscapes27(dcfg, split):
  return _prepared_source(
      dcfg, split, label_table(cityscapes.LABEL_MAP), split == "val", cityscapes.NUM_CLASSES
  )


def _potsdam(dcfg, split):
  mapping, class_names = potsdam.label_setting(dcfg.name)
  return _prepared_source(dcfg, split, label_table(mapping), True, len(class_names), class_names)


def _require_dir(path, key):
  if not path:
    raise ValueError(f"{key} is empty: set it to the dataset's directory")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path} does not exist: set {key} to the dataset's directory")
  return path


def _image_folder(dcfg, split):
  """Image files read directly from config.dataset.root/<split>/images (and labels)."""
  root = _require_dir(os.path.join(dcfg.root, split), "config.dataset.root")
  image_dir = _require_dir(os.path.join(root, "images"), "config.dataset.root")
  names = sorted(f for f in os.listdir(image_dir) if f.lower().endswith(formats.IMAGE_SUFFIXES))
  names = names[: _limit(len(names), dcfg.num_train if split == "train" else dcfg.num_val)]
  images = [os.path.join(image_dir, f) for f in names]
  label_dir = os.path.join(root, "labels")
  has_labels = os.path.isdir(label_dir)
  labels = [""] * len(names)
  if has_labels:
    if dcfg.num_classes <= 0:
      raise ValueError(f"{label_dir} has labels: set config.dataset.num_classes")
    labels = [os.path.join(label_dir, os.path.splitext(f)[0] + ".png") for f in names]
    missing = [p for p in labels if not os.path.isfile(p)]
    if missing:
      raise FileNotFoundError(f"{len(missing)} label files missing, e.g. {missing[0]}")
  images_t, labels_t = tf.constant(images or [""]), tf.constant(labels or [""])

  def fetch(index):
    label_file = tf.gather(labels_t, index)
    label_bytes = tf.io.read_file(label_file) if has_labels else tf.constant(b"")
    return tf.io.read_file(tf.gather(images_t, index)), label_bytes, label_file

  def scan_files(source, with_labels, progress):
    scan.check_headers(
        source,
        [
            (image, label if with_labels else None, image, label, True)
            for image, label in zip(images, labels)
        ],
        progress,
    )

  mapping = {**{v: v for v in range(dcfg.num_classes)}, formats.IGNORE_VALUE: pipeline.IGNORE_LABEL}
  return _encoded_source(
      dcfg,
      f"image_folder/{split}",
      len(images),
      fetch,
      label_table(mapping),
      has_labels,
      dcfg.num_classes,
      describe=lambda i: images[i],
      scan_fn=scan_files,
      honour_exif=True,
  )


# config.dataset.name -> its Dataset; config_check takes the valid names from here.
DATASETS = {
    "synthetic": Dataset(_synthetic),
    "coco_stuff27": Dataset(_coco_stuff, coco_stuff.PicieCocoStuff),
    "coco_stuff15": Dataset(_coco_stuff, coco_stuff.PicieCocoStuff),
    "coco_thing12": Dataset(_coco_stuff, coco_stuff.PicieCocoStuff),
    "cityscapes27": Dataset(_cityscapes27, cityscapes.PicieCityscapes),
    "potsdam3": Dataset(_potsdam, potsdam.PiciePotsdam),
    "potsdam6": Dataset(_potsdam, potsdam.PiciePotsdam),
    "image_folder": Dataset(_image_folder),
}
