"""The up-front data check of `train` and `eval`: problems a run would otherwise meet only
after an epoch (an unreadable file, an RGB label, a label of another size, undefined label
values) are found before anything trains, each naming its file.

Headers only, so it is quick: PIL reads an image's size and EXIF block without decoding it,
and a label's size, bit depth and colour type are the 26 bytes of its PNG IHDR chunk. The
label value scan decodes every label of an evaluation split (the tf.data map of `datasets`,
in parallel); config.dataset.scan_label_values=False skips it on huge sets.
"""

import concurrent.futures
import io

import numpy as np
from PIL import Image
import tensorflow as tf
import tqdm

from picie_jax.data import formats
from picie_jax.data import pipeline

_THREADS = 16  # header reads are I/O bound (network file systems): overlap them


def exif_orientation(image):
  """The EXIF Orientation (1..8, 1 = as stored) of an opened PIL image, from the EXIF block
  read with the header (a JPEG's APP1, a PNG's eXIf chunk): no decoding."""
  exif_bytes = image.info.get("exif")
  if not exif_bytes:
    return 1
  exif = Image.Exif()
  exif.load(exif_bytes)
  orientation = exif.get(formats.EXIF_ORIENTATION_TAG, 1)
  return orientation if orientation in range(1, 9) else 1


def orientation_of_bytes(image_bytes):
  """int64 exif_orientation of encoded image bytes (bytes, or the 0-d array tf.numpy_function
  passes); 1 when PIL cannot read them (decoding then fails and names the file)."""
  data = image_bytes if isinstance(image_bytes, bytes) else np.asarray(image_bytes).item()
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.int64(exif_orientation(image))
  except (OSError, SyntaxError, ValueError):
    return np.int64(1)


def _open(file_or_bytes):
  return Image.open(
      io.BytesIO(file_or_bytes) if isinstance(file_or_bytes, bytes) else file_or_bytes
  )


def _head(file_or_bytes, size):
  if isinstance(file_or_bytes, bytes):
    return file_or_bytes[:size]
  with open(file_or_bytes, "rb") as f:
    return f.read(size)


def check_header(image, label, image_name, label_name, honour_exif):
  """None, or (unreadable: bool, file, problem) for one example; `image`/`label` are paths or
  encoded bytes (`label` None for an unlabelled split). The label must be a grayscale PNG of
  the image's size as displayed (EXIF orientation applied when `honour_exif`)."""
  try:
    with _open(image) as opened:
      width, height = opened.size
      if honour_exif and exif_orientation(opened) in formats.TRANSPOSED_ORIENTATIONS:
        width, height = height, width
  except (OSError, SyntaxError, ValueError) as e:
    return True, image_name, f"not a readable JPEG/PNG image ({e})"
  if label is None:
    return None
  try:
    head = _head(label, 26)
  except OSError as e:
    return True, label_name, f"cannot read it ({e})"
  if len(head) < 26 or head[:8] != formats.PNG_SIGNATURE:
    return True, label_name, "not a PNG file"
  if head[25] != 0:
    return (
        False,
        label_name,
        (
            f"label file {label_name} is not a single-channel (grayscale) PNG (PNG colour type "
            f"{head[25]}; 2 = RGB, 3 = palette, 4/6 = with alpha): save class ids as an 8- or "
            "16-bit grayscale PNG"
        ),
    )
  label_width, label_height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
  if (label_height, label_width) != (height, width):
    shown = " as displayed (EXIF orientation applied)" if honour_exif else ""
    return (
        False,
        label_name,
        (
            f"label file {label_name} is {label_width}x{label_height} but its image {image_name} "
            f"is {width}x{height}{shown}: labels must have their image's size"
        ),
    )
  return None


def check_headers(source, examples, progress):
  """Checks every (image, label or None, image name, label name, honour_exif) of `examples`;
  an unreadable file goes to `source.bad_files` (an error unless skipping), any other problem
  raises ValueError naming its file."""
  with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
    results = pool.map(lambda example: check_header(*example), examples)
    for problem in tqdm.tqdm(
        results,
        total=len(examples),
        desc=f"checking {source.name}",
        unit="file",
        leave=False,
        disable=not progress,
    ):
      if problem is None:
        continue
      unreadable, file, message = problem
      if not unreadable:
        raise ValueError(f"{source.name}: {message}")
      source.bad_files.report(source.name, file, message)


def check_label_values(source, load_label, progress):
  """Decodes every label of `source` with `load_label(index)` (a TF function that raises
  naming the file for undefined values); undecodable labels go to `source.bad_files`."""
  count = source.num_examples

  def checked_from(start):
    ds = tf.data.Dataset.range(start, count).map(
        lambda index: tf.size(load_label(index)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    return ds.prefetch(8).as_numpy_iterator()

  checked = pipeline.recovering(
      checked_from, count, lambda position, error: pipeline.check_example(source, position, error)
  )
  for _ in tqdm.tqdm(
      checked,
      total=count,
      desc=f"checking {source.name} label values",
      unit="label",
      leave=False,
      disable=not progress,
  ):
    pass
