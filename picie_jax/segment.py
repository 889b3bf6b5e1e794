"""`picie-jax segment`: label your own photos with a trained run's clusters.

Each image is resized as evaluation resizes (bilinear, shorter side to config.eval.res) but not
cropped: the longer side is rounded to a multiple of 32 instead, so the whole photo is seen. The
run's classifier scores every feature pixel, and the logits are upsampled bilinearly to the
original size before the argmax. Images of one network input shape are batched together.
"""

import collections
import json
import os

import jax
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow as tf

from picie_jax import config_check
from picie_jax import evaluate
from picie_jax import parallel
from picie_jax import reporting
from picie_jax import rundir
from picie_jax import steps
from picie_jax import visualize
from picie_jax.data import formats

_STRIDE = 32  # the backbone's: network inputs are multiples of it


def find_images(paths):
  """The image files of `paths`: files as given, directories searched (not recursively) for
  .jpg/.jpeg/.png in sorted order; a file named twice is kept once."""
  found, seen = [], set()
  for path in paths:
    if os.path.isdir(path):
      files = [
          os.path.join(path, name)
          for name in sorted(os.listdir(path))
          if name.lower().endswith(formats.IMAGE_SUFFIXES)
      ]
      if not files:
        raise FileNotFoundError(f"{path} holds no {'/'.join(formats.IMAGE_SUFFIXES)} files")
    elif os.path.isfile(path):
      files = [path]
    else:
      raise FileNotFoundError(f"{path} is neither an image file nor a directory")
    for file in files:
      if os.path.realpath(file) not in seen:
        seen.add(os.path.realpath(file))
        found.append(file)
  if not found:
    raise ValueError("no images given: name image files or directories after `segment`")
  return found


def output_stems(paths):
  """One output name per image: its file stem, or `<stem>_2`, `<stem>_3`, ... for later images
  whose stem is taken (same name in another directory, or x.jpg beside x.png)."""
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  reserved, used, names = set(stems), set(), []
  for stem in stems:
    name, n = stem, 1
    while name in used or (name != stem and name in reserved):
      n += 1
      name = f"{stem}_{n}"
    used.add(name)
    names.append(name)
  return names


def network_input_size(height, width, res):
  """(h, w) the network sees: shorter side `res`, longer side scaled alike, both rounded to a
  multiple of 32 (config.eval.res is one, so the shorter side stays `res`)."""
  scale = res / min(height, width)
  return tuple(max(_STRIDE, _STRIDE * round(side * scale / _STRIDE)) for side in (height, width))


def _unreadable(path, error):
  return ValueError(f"{path}: not a readable image ({error})")


def image_size(path):
  """(height, width) of an image as displayed (EXIF orientation applied), from its header."""
  try:
    with Image.open(path) as image:
      width, height = image.size
      swapped = (
          image.getexif().get(formats.EXIF_ORIENTATION_TAG, 1) in formats.TRANSPOSED_ORIENTATIONS
      )
  except OSError as e:
    raise _unreadable(path, e) from None
  return (width, height) if swapped else (height, width)


def load_rgb(path):
  """uint8 (H, W, 3) pixels, upright as the EXIF orientation says."""
  try:
    with Image.open(path) as image:
      return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
  except OSError as e:
    raise _unreadable(path, e) from None


def network_input(image_hwc_uint8, size_hw):
  """The image resized as the evaluation pipeline resizes (bilinear, antialiased, to uint8)."""
  resized = tf.image.resize(image_hwc_uint8, size_hw, method="bilinear", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8).numpy()


def group_batch_size(group_size, eval_batch_size, num_devices):
  """Batch size for `group_size` images of one shape: config.eval.batch_size, or fewer for a
  small group, rounded up to a multiple of the device count (every device gets equal rows)."""
  wanted = min(group_size, eval_batch_size)
  return -(-wanted // num_devices) * num_devices


def load_matching(workdir):
  """The run's matching.json (written when it evaluated with labels), or None."""
  path = os.path.join(workdir, rundir.MATCHING_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def cluster_names(k, matching, epoch):
  """Legend name per cluster: "<class> (cluster j)" from `matching` when it describes these
  centroids (same epoch and K), else "cluster j"."""
  names = [f"cluster {j}" for j in range(k)]
  if matching is None or matching["epoch"] != epoch or matching["k"] != k:
    return names
  classes = matching["class_names"]
  return [
      f"{classes[c]} ({name})" if c >= 0 else name
      for name, c in zip(names, matching["cluster_to_class"])
  ]


def _restore_classifier(workdir):
  """(run, variables, replicated (K, C+1) classifier, cluster names) of a run's latest checkpoint."""
  config = rundir.saved_config(workdir)
  config_check.validate(config)
  run = rundir.Run(config, workdir, load_data=False)
  state, targets, meta = rundir.restore_latest(run)
  classifier = evaluate.eval_classifier(run, state, targets)
  epoch = meta.centroids_epoch
  matching = load_matching(workdir)
  if matching is not None and matching["epoch"] != epoch:
    reporting.say(
        f"{workdir}/{rundir.MATCHING_FILE} describes the clusters of epoch "
        f"{matching['epoch']}, the checkpoint holds epoch {epoch}'s: legends show "
        "cluster numbers only"
    )
  variables = state.variables
  return (
      run,
      variables,
      parallel.replicate(classifier, run.mesh),
      cluster_names(steps.num_clusters(classifier), matching, epoch),
  )


def segment_images(workdir, out_dir, paths, progress=None):
  """Labels every image of `paths` (files or directories) with the run in `workdir`.

  Writes `<stem>_labels.png` (cluster id per pixel at the original size; uint8, or uint16 for
  K > 256) and `<stem>_overlay.png` (image | segmentation over it, with a legend) to `out_dir`.
  Returns the label PNG paths, in the order of the images.
  """
  if jax.process_count() > 1:
    raise ValueError(
        "picie-jax segment runs in one process: unset PICIE_COORDINATOR and " "PICIE_DISTRIBUTED"
    )
  images = find_images(paths)
  sizes = [image_size(path) for path in images]  # an unreadable file fails before any work
  run, variables, classifier, names = _restore_classifier(workdir)
  k = steps.num_clusters(classifier)
  stems = output_stems(images)
  groups = collections.defaultdict(list)
  for i, (height, width) in enumerate(sizes):
    groups[network_input_size(height, width, run.config.eval.res)].append(i)
  bar = reporting.Progress(
      "segment", len(images), 1, enabled=run.config.progress if progress is None else progress
  )
  label_paths = [None] * len(images)
  for input_hw, members in groups.items():
    batch_size = group_batch_size(len(members), run.config.eval.batch_size, jax.device_count())
    for start in range(0, len(members), batch_size):
      chunk = members[start : start + batch_size]
      originals = [load_rgb(images[i]) for i in chunk]
      batch = np.zeros((batch_size, *input_hw, 3), np.uint8)  # rows past the chunk: padding
      for row, image in enumerate(originals):
        batch[row] = network_input(image, input_hw)
      logits = steps.whole_image_logits(
          run.model,
          variables,
          classifier,
          parallel.shard_host_batch(batch, run.mesh),
          step_config=run.step_config,
      )
      for row, (i, image) in enumerate(zip(chunk, originals)):
        labels = np.asarray(steps.upsampled_argmax(logits[row], image.shape[:2]))
        label_paths[i] = os.path.join(out_dir, f"{stems[i]}_labels.png")
        visualize.save_png(label_paths[i], labels.astype(steps.label_dtype(k)))
        visualize.save_png(
            os.path.join(out_dir, f"{stems[i]}_overlay.png"),
            visualize.overlay_panel(image, labels, names),
        )
      bar.update(len(chunk))
  bar.close()
  return label_paths
