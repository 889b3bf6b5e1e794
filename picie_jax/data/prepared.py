"""What the TFDS builders (coco_stuff.py, cityscapes.py, potsdam.py) share: the record layout,
checks of the raw files, and random access into a prepared split.

A record holds the original files' bytes verbatim (JPEG/PNG image, PNG label with the
dataset's raw ids; no re-encoding, so nothing is lost; Potsdam's .mat arrays become lossless
PNGs, `read_pair`) and their paths relative to the manual directory (for error messages).
Splits are written in a fixed order (`disable_shuffling`) as ArrayRecord files, so example i of
a split is line i of its image list and any index can be read directly: batches are built from
index lists (pipeline.py), each host reading its own.
"""

import abc

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

FILE_FORMAT = "array_record"


class RawFilesBuilder(tfds.core.GeneratorBasedBuilder):
  """A builder whose records are raw files under the manual directory, listed by `file_pairs`.

  Subclasses set the docstring (the description), HOMEPAGE, CITATION, VERSION,
  MANUAL_DOWNLOAD_INSTRUCTIONS and implement `file_pairs`.
  """

  HOMEPAGE = ""
  CITATION = ""

  @abc.abstractmethod
  def file_pairs(self, root):
    """{split: [(image path, label path or None)]} relative to `root`, checked to exist."""

  def read_pair(self, root, image_file, label_file):
    """(image bytes, label bytes or b"") of one record: the files' own bytes."""
    return (root / image_file).read_bytes(), (root / label_file).read_bytes() if label_file else b""

  def _info(self):
    features = tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # JPEG/PNG file bytes
            "label": tfds.features.Tensor(shape=(), dtype=np.object_),  # PNG bytes; b"" = none
            "image_file": tfds.features.Text(),
            "label_file": tfds.features.Text(),
        }
    )
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=features,
        homepage=self.HOMEPAGE,
        citation=self.CITATION,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    root = dl_manager.manual_dir
    return {
        split: self._generate_examples(root, pairs)
        for split, pairs in self.file_pairs(root).items()
    }

  def _generate_examples(self, root, pairs):
    """(position, record) in list order."""
    for position, (image_file, label_file) in enumerate(pairs):
      image, label = self.read_pair(root, image_file, label_file)
      yield position, {
          "image": image,
          "label": label,
          "image_file": image_file,
          "label_file": label_file or "",
      }


def require_dir(root, relative, archive):
  """`root/relative` must be a directory: else an error naming the archive that provides it."""
  path = root / relative
  if not path.is_dir():
    raise FileNotFoundError(
        f"{path} is missing: extract {archive} into {root} (see the builder's "
        "MANUAL_DOWNLOAD_INSTRUCTIONS, or README 'Real datasets')."
    )
  return path


def require_files(root, relative_paths, archive):
  """Every listed file must exist under `root`; the error names the first missing one."""
  missing = [p for p in relative_paths if not (root / p).is_file()]
  if missing:
    raise FileNotFoundError(
        f"{len(missing)} of {len(relative_paths)} files are missing under {root}, e.g. "
        f"{missing[0]}: extract {archive} there (see MANUAL_DOWNLOAD_INSTRUCTIONS)."
    )


def _builder(builder_cls, data_dir):
  if "://" in data_dir:
    raise ValueError(
        f"config.dataset.data_dir={data_dir!r}: ArrayRecord files open only local paths "
        "(github.com/google/array_record/issues/120); mount the bucket (e.g. gcsfuse) and "
        "give its local path."
    )
  return builder_cls(data_dir=data_dir or None, file_format=FILE_FORMAT)


def prepare(builder_cls, data_dir, manual_dir):
  """Writes the prepared splits under `data_dir` (TFDS's default if empty) from `manual_dir`."""
  builder = _builder(builder_cls, data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def open_split(builder_cls, data_dir, split):
  """A random-access sequence of the records of a prepared split."""
  builder = _builder(builder_cls, data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"{builder.name} is not prepared in {builder.data_dir} (config.dataset.data_dir="
        f"{data_dir!r}): run `picie-jax prepare --config <this config> "
        "--config.dataset.manual_dir=<raw files> --config.dataset.data_dir=<same data_dir>`."
    )
  return builder.as_data_source(split)


def fetch_fn(records):
  """index -> (image bytes, label bytes, label file name), as a TF op for the input map."""

  def fetch_numpy(index):
    record = records[int(index)]
    return record["image"], record["label"], record["label_file"]

  def fetch(index):
    outputs = tf.numpy_function(fetch_numpy, [index], [tf.string] * 3, stateful=False)
    return tuple(tf.ensure_shape(t, []) for t in outputs)

  return fetch
