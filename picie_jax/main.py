"""picie-jax: `train` (or resume) a run, `eval` a run's latest checkpoint, `segment` images.

  picie-jax train --workdir runs/demo                       # the synthetic demo (default config)
  picie-jax train --config configs/coco_stuff27.py --config.dataset.root=/data/coco --workdir runs/coco
  picie-jax eval --workdir runs/demo [--overcluster_k 64]
  picie-jax segment --workdir runs/demo --out labelled/ photo.jpg more_photos/
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

import configs

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Recipe file (a get_config() module); override fields with "
    "--config.a.b=value.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and PNGs.")
_OVERCLUSTER_K = flags.DEFINE_integer("overcluster_k", None,
                                      "eval: also score K-cluster many-to-one matching.")
_OUT = flags.DEFINE_string("out", None, "segment: directory for the label and overlay PNGs.")
_COMMANDS = ("train", "eval", "segment")


def main(argv):
  if len(argv) < 2 or argv[1] not in _COMMANDS or (len(argv) > 2) != (argv[1] == "segment"):
    raise app.UsageError(f"usage: picie-jax {{{'|'.join(_COMMANDS)}}} --workdir DIR [flags]; "
                         "segment also --out DIR IMAGES_OR_DIRS...")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if argv[1] == "segment" and not _OUT.value:
    raise app.UsageError("segment needs --out DIR")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # leave accelerator memory to JAX
  import jax  # pylint: disable=g-import-not-at-top
  from picie_jax import parallel  # pylint: disable=g-import-not-at-top
  from picie_jax import train  # pylint: disable=g-import-not-at-top
  parallel.maybe_initialize_distributed()
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if argv[1] == "segment":
    from picie_jax import segment  # pylint: disable=g-import-not-at-top
    written = segment.segment_images(_WORKDIR.value, _OUT.value, argv[2:])
    print(f"wrote {len(written)} label maps and overlays to {_OUT.value}")
    return
  if argv[1] == "train":
    final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  else:
    final = train.evaluate_workdir(_WORKDIR.value, overcluster_k=_OVERCLUSTER_K.value)
  for name, scores in final.items() if jax.process_index() == 0 else ():
    print(f"{name} (K={scores['k']}): acc {scores['acc']:.2f}  mIoU {scores['miou']:.2f}")


def run():
  app.run(main)


if __name__ == "__main__":
  run()
