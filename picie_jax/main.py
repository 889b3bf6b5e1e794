"""picie-jax: `prepare` a dataset, `train` (or resume) a run, `eval` a run's latest checkpoint,
`segment` images with a run, `convert` an official PiCIE checkpoint into a run, `study` a config
over seeds and sweep values.

  picie-jax train --workdir runs/demo                       # the synthetic demo (default config)
  picie-jax prepare --config configs/coco_stuff27.py --config.dataset.manual_dir=/raw/coco \
      --config.dataset.data_dir=/data/tfds
  picie-jax train --config configs/coco_stuff27.py --config.dataset.data_dir=/data/tfds --workdir runs/coco
  picie-jax eval --workdir runs/demo [--overcluster_k 64] [--config.eval.k_test=54 ...]
  picie-jax segment --workdir runs/demo --out labelled/ photo.jpg more_photos/
  picie-jax convert --config configs/coco_stuff27.py --workdir runs/official checkpoint.pth.tar
  picie-jax study --seeds 1,2,3 --sweep train.lr=1e-4,1e-3 --workdir runs/lr_study [--list|--only I]
"""

import os
import shlex
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

import configs

_DEFAULT_CONFIG = os.path.join(os.path.dirname(configs.__file__), "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    _DEFAULT_CONFIG,
    "Recipe file (a get_config() module); override fields with " "--config.a.b=value.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and PNGs.")
_OVERCLUSTER_K = flags.DEFINE_integer(
    "overcluster_k", None, "eval: also score K-cluster many-to-one matching."
)
_OUT = flags.DEFINE_string("out", None, "segment: directory for the label and overlay PNGs.")
_SEEDS = flags.DEFINE_list("seeds", ["1", "2", "3"], "study: the seeds of every sweep point.")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "study: KEY=V1,V2,... a config field and its values; repeat for a grid."
)
_ONLY = flags.DEFINE_integer(
    "only",
    None,
    "study: train only the run of this index (one cluster "
    "job each), no aggregation; see --list.",
)
_LIST = flags.DEFINE_boolean(
    "list",
    False,
    "study: print each run's index, directory, state " "and --only command, then exit.",
)
_VERBOSE = flags.DEFINE_bool(
    "verbose",
    False,
    "Print the traceback of errors that are the " "user's to fix (bad config, missing files) too.",
)
# command -> (min, max) number of positional arguments after it
_COMMANDS = {
    "prepare": (0, 0),
    "train": (0, 0),
    "eval": (0, 0),
    "segment": (1, None),
    "convert": (1, 1),
    "study": (0, 0),
}
_USAGE = (
    f"usage: picie-jax {{{'|'.join(_COMMANDS)}}} [--workdir DIR] [flags]; "
    "segment --workdir RUN --out DIR IMAGES_OR_DIRS...; "
    "convert --config CFG --workdir NEW_RUN checkpoint.pth.tar; "
    "study --config CFG --seeds 1,2,3 [--sweep KEY=V1,V2 ...] --workdir DIR"
)


_PACKAGE_DIRS = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep for f in (configs.__file__, __file__)
)
# Raised by our code for the user (bad config, missing files, a diverging run): one line.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)


def _one_line(exc):
  """(message, exit code) for an error the user can act on, or None for a bug (traceback)."""
  from picie_jax import preemption  # pylint: disable=g-import-not-at-top
  from picie_jax import reporting  # pylint: disable=g-import-not-at-top

  if isinstance(exc, preemption.Stopped):
    command = shlex.join(["picie-jax", *sys.argv[1:]])
    return f"{exc}; resume with: {command}", exc.exit_code
  if isinstance(exc, reporting.UserError):
    return f"error: {exc}", 1
  full = reporting.no_space_error(exc)
  if full is not None:
    what = getattr(full, "filename", None) or "the run's outputs"
    return f"error: {reporting.DiskFull(what)}", 1
  raised_at = traceback.extract_tb(exc.__traceback__)[-1].filename if exc.__traceback__ else ""
  if isinstance(exc, _USER_ERRORS) and os.path.abspath(raised_at).startswith(_PACKAGE_DIRS):
    return f"error: {exc}", 1
  return None


def main(argv):
  try:
    _run_command(argv)
  except Exception as e:  # pylint: disable=broad-except
    reported = _one_line(e)
    if reported is None:
      raise
    if _VERBOSE.value:
      traceback.print_exc()
    print(f"picie-jax: {reported[0]}", file=sys.stderr, flush=True)
    sys.exit(reported[1])


def _run_command(argv):
  if len(argv) < 2 or argv[1] not in _COMMANDS:
    raise app.UsageError(_USAGE)
  command, positional = argv[1], argv[2:]
  low, high = _COMMANDS[command]
  if len(positional) < low or (high is not None and len(positional) > high):
    raise app.UsageError(_USAGE)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")  # leave accelerator memory to JAX
  if command == "prepare":
    from picie_jax.data import datasets  # pylint: disable=g-import-not-at-top

    print(f"prepared {_CONFIG.value.dataset.name} in {datasets.prepare(_CONFIG.value)}")
    return
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required")
  if command == "segment" and not _OUT.value:
    raise app.UsageError("segment needs --out DIR")
  import jax  # pylint: disable=g-import-not-at-top

  from picie_jax import parallel  # pylint: disable=g-import-not-at-top

  parallel.maybe_initialize_distributed()
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if command == "segment":
    from picie_jax import segment  # pylint: disable=g-import-not-at-top

    written = segment.segment_images(_WORKDIR.value, _OUT.value, positional)
    print(f"wrote {len(written)} label maps and overlays to {_OUT.value}")
    return
  if command == "study":
    from picie_jax import study  # pylint: disable=g-import-not-at-top

    runs = study.plan(_CONFIG.value, _SEEDS.value, _SWEEP.value)
    if _LIST.value:
      print("\n".join(study.run_commands(runs, _WORKDIR.value, sys.argv)))
    elif study.run_study(runs, _WORKDIR.value, only=_ONLY.value) and jax.process_index() == 0:
      print(
          f"wrote {os.path.join(_WORKDIR.value, study.STUDY_MD)}, {study.STUDY_JSON}, "
          f"{study.STUDY_PNG}"
      )
    return
  if command == "convert":
    from picie_jax import convert  # pylint: disable=g-import-not-at-top

    config = convert.import_official_checkpoint(_CONFIG.value, positional[0], _WORKDIR.value)
    print(
        f"imported {positional[0]} (K={config.kmeans.k_train}, epoch {config.num_epochs}) "
        f"into {_WORKDIR.value}; score it with: picie-jax eval --workdir {_WORKDIR.value}"
    )
    return
  if command == "train":
    from picie_jax import train  # pylint: disable=g-import-not-at-top

    final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  else:
    from picie_jax import evaluate  # pylint: disable=g-import-not-at-top

    final = evaluate.evaluate_workdir(_WORKDIR.value, _eval_overrides())
  for name, scores in final.items() if jax.process_index() == 0 else ():
    if isinstance(scores, dict):
      print(f"{name} (K={scores['k']}): acc {scores['acc']:.2f}  mIoU {scores['miou']:.2f}")
    else:
      print(f"{name}: {scores}")


def _eval_overrides():
  """The --config.<key> values given on the command line (eval applies them to the run's saved
  config; the recipe file itself is not read), and --overcluster_k."""
  overrides = dict(config_flags.get_override_values(flags.FLAGS["config"]))
  if _OVERCLUSTER_K.value is not None:
    overrides["eval.overcluster_k"] = _OVERCLUSTER_K.value
  return overrides


def run():
  app.run(main)


if __name__ == "__main__":
  run()
