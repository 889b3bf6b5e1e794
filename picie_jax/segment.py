"""`picie-jax segment`: label your own photos with a trained run's clusters.

Each image is resized as evaluation resizes (bilinear, shorter side to config.eval.res) but not
cropped: the longer side is rounded to a multiple of 32 instead, so the whole photo is seen. The
run's classifier scores every feature pixel, and the logits are upsampled bilinearly to the
original size before the argmax; with config.eval.crf the dense CRF refines them first, at the
network input's size on the resized image (as STEGO's demo runs it at its input resolution:
the cost grows with pixels^2), and its probabilities are upsampled instead. Images of one
network input shape are batched together.
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
  return parallel.padded_batch_size(wanted, num_devices)


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


def _restore_classifier(workdir, overrides):
  """(run, variables, replicated (K, C+1) classifier, cluster names) of a run's latest
  checkpoint, its saved config changed by the eval `overrides` (evaluate.EVAL_OVERRIDABLE)."""
  config = rundir.saved_config(workdir)
  for line in evaluate.apply_eval_overrides(config, overrides or {}):
    reporting.say(f"segment overrides {line}")
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


def _read_all(paths, read, strict, unreadable):
  """{path: read(path)} of the paths that read; each failure is reported and recorded in
  `unreadable` ({path: reason}), or raised when `strict`."""
  results = {}
  for path in paths:
    try:
      results[path] = read(path)
    except ValueError as e:
      if strict:
        raise
      reporting.say(f"warning: skipping {e}")
      unreadable[path] = str(e)
  return results


def segment_images(workdir, out_dir, paths, progress=None, strict=False, overrides=None):
  """Labels every image of `paths` (files or directories) with the run in `workdir`
  (`overrides` as `picie-jax eval` takes them, e.g. {'eval.crf': True}).

  Writes `<stem>_labels.png` (cluster id per pixel at the original size; uint8, or uint16 for
  K > 256) and `<stem>_overlay.png` (image | segmentation over it, with a legend) to `out_dir`.
  An image that cannot be read (a truncated JPEG, a text file named .jpg) is skipped with a
  warning and named again in a summary at the end; with `strict`, or when no image could be
  labelled, that is an error. Returns the label PNG paths of the images labelled, in order.
  """
  if jax.process_count() > 1:
    raise ValueError(
        "picie-jax segment runs in one process: unset PICIE_COORDINATOR and PICIE_DISTRIBUTED"
    )
  images = find_images(paths)
  unreadable = {}
  sizes = _read_all(images, image_size, strict, unreadable)  # header only: before any work
  if not sizes:
    raise ValueError(f"none of the {len(images)} images could be read (the warnings say why)")
  run, variables, classifier, names = _restore_classifier(workdir, overrides)
  k = steps.num_clusters(classifier)
  stems = dict(zip(images, output_stems(images)))
  groups = collections.defaultdict(list)
  for path, (height, width) in sizes.items():
    groups[network_input_size(height, width, run.config.eval.res)].append(path)
  bar = reporting.Progress(
      "segment", len(sizes), 1, enabled=run.config.progress if progress is None else progress
  )
  label_paths = {}
  for input_hw, members in groups.items():
    batch_size = group_batch_size(len(members), run.config.eval.batch_size, jax.device_count())
    for start in range(0, len(members), batch_size):
      chunk = members[start : start + batch_size]
      originals = _read_all(chunk, load_rgb, strict, unreadable)  # pixels: truncation shows
      batch = np.zeros((batch_size, *input_hw, 3), np.uint8)  # rows past the images: padding
      for row, image in enumerate(originals.values()):
        batch[row] = network_input(image, input_hw)
      logits = steps.whole_image_logits(
          run.model,
          variables,
          classifier,
          parallel.shard_host_batch(batch, run.mesh),
          step_config=run.step_config,
          use_crf=run.config.eval.crf,
      )
      for row, (path, image) in enumerate(originals.items()):
        labels = np.asarray(steps.upsampled_argmax(logits[row], image.shape[:2]))
        label_paths[path] = os.path.join(out_dir, f"{stems[path]}_labels.png")
        visualize.save_png(label_paths[path], labels.astype(steps.label_dtype(k)))
        visualize.save_png(
            os.path.join(out_dir, f"{stems[path]}_overlay.png"),
            visualize.overlay_panel(image, labels, names),
        )
      bar.update(len(chunk))
  bar.close()
  if unreadable:
    skipped = [path for path in images if path in unreadable]
    summary = f"could not label {len(skipped)} of {len(images)} images: " + ", ".join(skipped)
    if not label_paths:
      raise ValueError(f"{summary} (the warnings above say why)")
    reporting.say(f"warning: {summary}")
  return [label_paths[path] for path in images if path in label_paths]
