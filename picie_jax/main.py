"""picie-jax: the command line. Parses flags and dispatches each command to the module of its job.

`picie-jax --help` lists the commands; `picie-jax COMMAND --help` explains one.
"""

import dataclasses
import errno
import os
import sys
import textwrap
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
    "Recipe file (a get_config() module); override any field with --config.a.b=value.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and PNGs.")
_OVERCLUSTER_K = flags.DEFINE_integer(
    "overcluster_k", None, "Also score K-cluster many-to-one matching."
)
_OUT = flags.DEFINE_string(
    "out", None, "Output directory: segment's label and overlay PNGs, finetune's new run."
)
_STRICT = flags.DEFINE_bool(
    "strict", False, "Stop at an unreadable image (default: skip it with a warning)."
)
_SEEDS = flags.DEFINE_list("seeds", ["1", "2", "3"], "The seeds of every sweep point.")
_SWEEP = flags.DEFINE_multi_string(
    "sweep", [], "KEY=V1,V2,... a config field and its values; repeat for a grid."
)
_ONLY = flags.DEFINE_integer(
    "only", None, "Train only the run of this index (one cluster job each), no aggregation."
)
_LIST = flags.DEFINE_boolean(
    "list", False, "Print each run's index, directory, state and --only command, then exit."
)
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "Print the traceback of errors that are the user's to fix too."
)


@dataclasses.dataclass(frozen=True)
class _Command:
  """What `picie-jax NAME --help` says, and how many positional arguments NAME takes."""

  summary: str
  usage: str
  flags: tuple[str, ...]
  examples: tuple[str, ...]
  min_args: int = 0
  max_args: int | None = 0
  details: str = ""


_COMMANDS = {
    "train": _Command(
        summary="Train a run (PiCIE or a baseline, as the config says), or resume it.",
        usage="picie-jax train [--config FILE] [--config.KEY=VALUE ...] --workdir DIR",
        flags=("config", "workdir", "verbose"),
        examples=(
            "picie-jax train --workdir runs/demo",
            "picie-jax train --config configs/coco_stuff27.py "
            "--config.dataset.data_dir=/data/tfds --workdir runs/coco",
        ),
        details="Rerunning the same command resumes from the last checkpoint; a larger "
        "--config.num_epochs continues a finished run. Writes config.json, metrics.jsonl, "
        "vis/*.png, checkpoints/ and final.json (fresh-cluster scores) under --workdir.",
    ),
    "eval": _Command(
        summary="Evaluate a run's latest checkpoint with fresh clusters; writes final.json.",
        usage="picie-jax eval --workdir RUN [--overcluster_k K] [--config.KEY=VALUE ...]",
        flags=("workdir", "overcluster_k", "config", "verbose"),
        examples=(
            "picie-jax eval --workdir runs/demo",
            "picie-jax eval --workdir runs/demo --overcluster_k 64 --config.eval.k_test=54",
        ),
        details="The run's saved config is used; --config.KEY=VALUE overrides apply to it "
        "(the recipe file itself is not read).",
    ),
    "segment": _Command(
        summary="Label images (files or folders) with a run's network and clusters.",
        usage="picie-jax segment --workdir RUN --out DIR [--strict] [--config.KEY=VALUE ...] "
        "IMAGE_OR_DIR [IMAGE_OR_DIR ...]",
        flags=("workdir", "out", "strict", "config", "verbose"),
        examples=(
            "picie-jax segment --workdir runs/demo --out labelled/ photo.jpg photos/",
            "picie-jax segment --workdir runs/demo --out labelled/ --config.eval.crf=True photos/",
        ),
        min_args=1,
        max_args=None,
        details="Writes NAME_labels.png (cluster ids, named by the run's matching.json) and "
        "NAME_overlay.png per image into --out. An unreadable image is skipped with a warning "
        "and named again at the end; the exit is non-zero when none could be labelled (or "
        "with --strict, at the first). --config.KEY=VALUE overrides apply to the run's saved "
        "config as eval's do (e.g. --config.eval.crf=True: dense-CRF refinement).",
    ),
    "convert": _Command(
        summary="Import an official PiCIE checkpoint (.pth.tar) as a new run.",
        usage="picie-jax convert --config FILE --workdir NEW_RUN CHECKPOINT",
        flags=("config", "workdir", "verbose"),
        examples=(
            "picie-jax convert --config configs/coco_stuff27.py --workdir runs/official "
            "checkpoint.pth.tar",
        ),
        min_args=1,
        max_args=1,
        details="The checkpoint is read without torch and without unpickling code. Score the "
        "new run with `picie-jax eval --workdir NEW_RUN`.",
    ),
    "study": _Command(
        summary="Train a config over seeds and sweep values; aggregate mean and std.",
        usage="picie-jax study [--config FILE] --workdir DIR [--seeds 1,2,3] "
        "[--sweep KEY=V1,V2 ...] [--list | --only I]",
        flags=("config", "workdir", "seeds", "sweep", "list", "only", "verbose"),
        examples=(
            "picie-jax study --seeds 1,2,3 --sweep train.lr=1e-4,1e-3 --workdir runs/lr_study",
            "picie-jax study --sweep train.lr=1e-4,1e-3 --workdir runs/lr_study --list",
        ),
        details="Writes study.md, study.json and study.png under --workdir. --list prints one "
        "--only command per run, for cluster jobs; a plain rerun aggregates.",
    ),
    "probe": _Command(
        summary="Train and score a linear probe on a run's frozen features; writes probe.json.",
        usage="picie-jax probe --workdir RUN [--config.probe.KEY=VALUE ...]",
        flags=("workdir", "config", "verbose"),
        examples=(
            "picie-jax probe --workdir runs/demo",
            "picie-jax probe --workdir runs/demo --config.probe.epochs=20 --config.probe.lr=1e-2",
        ),
        details="A 1x1 linear classifier is trained on the train split's labels (which the "
        "dataset must have) and scored on val without matching. The run's saved config is used; "
        "--config.KEY=VALUE may change config.probe.* and what eval may change. A run of 0 "
        "epochs is probed at its init (e.g. the ImageNet features).",
    ),
    "finetune": _Command(
        summary="Fine-tune a run's network with a linear head on labelled train images.",
        usage="picie-jax finetune --workdir RUN --out NEW_RUN [--config.finetune.KEY=VALUE ...]",
        flags=("workdir", "out", "config", "verbose"),
        examples=(
            "picie-jax finetune --workdir runs/demo --out runs/demo_ft10 "
            "--config.finetune.labelled_fraction=0.1",
        ),
        details="Uses a fixed subset (per seed) of config.finetune.labelled_fraction of the "
        "train labels; writes config.json, finetune.json and PNGs into --out. A run of 0 "
        "epochs starts from its init: train one with configs/imagenet_kmeans_synthetic.py (and "
        "--config.model.init=random) for the ImageNet (random) baseline.",
    ),
    "prepare": _Command(
        summary="Build a TFDS dataset from the user's local files (no download).",
        usage="picie-jax prepare --config FILE [--config.dataset.KEY=VALUE ...]",
        flags=("config", "verbose"),
        examples=(
            "picie-jax prepare --config configs/coco_stuff27.py "
            "--config.dataset.manual_dir=/raw/coco --config.dataset.data_dir=/data/tfds",
        ),
    ),
}
_HELP_FLAGS = ("--help", "-h", "-help", "--helpshort", "--helpfull")


# The placeholder each flag's value has in --help.
_METAVARS = {
    "workdir": "DIR",
    "out": "DIR",
    "overcluster_k": "K",
    "seeds": "S1,S2,...",
    "sweep": "KEY=V1,V2",
    "only": "I",
    "list": "",
    "strict": "",
    "verbose": "",
}


def _flag_lines(names):
  """Two-column lines `--flag VALUE  what it does (default)` for `names`."""
  rows = []
  for name in names:
    flag = flags.FLAGS[name]
    if name == "config":
      default = os.path.relpath(_DEFAULT_CONFIG, os.path.dirname(os.path.dirname(_DEFAULT_CONFIG)))
      rows.append(("--config FILE", f"{flag.help} Default: {default}."))
      rows.append(("--config.KEY=VALUE", "Override one field of the config (repeatable)."))
      continue
    text = flag.help.split(";\n")[0]  # absl appends a note to multi-flags
    if flag.default:
      text += f" Default: {flag.default_as_str.strip(chr(39))}."
    rows.append((f"--{name} {_METAVARS[name]}".rstrip(), text))
  indent = " " * 26
  return [
      textwrap.fill(text, 100, initial_indent=f"  {spelled:<22}  ", subsequent_indent=indent)
      for spelled, text in rows
  ]


def command_help(name):
  """The text of `picie-jax NAME --help`."""
  command = _COMMANDS[name]
  parts = [f"usage: {command.usage}", "", command.summary]
  if command.details:
    parts += ["", textwrap.fill(command.details, 100)]
  parts += ["", "flags:", *_flag_lines(command.flags), "", "examples:"]
  parts += [f"  {example}" for example in command.examples]
  return "\n".join(parts)


def general_help():
  """The text of `picie-jax --help`."""
  width = max(map(len, _COMMANDS))
  lines = ["usage: picie-jax COMMAND [flags]", "", "PiCIE unsupervised segmentation in JAX.", ""]
  lines.append("commands:")
  lines += [f"  {name:<{width}}  {c.summary}" for name, c in _COMMANDS.items()]
  lines += ["", "`picie-jax COMMAND --help` explains a command, its flags and an example."]
  return "\n".join(lines)


def _usage_error(message, command=None):
  """Prints the message and where to read more, and exits 2 (a usage error)."""
  usage = _COMMANDS[command].usage if command else "picie-jax COMMAND [flags]"
  more = f"picie-jax {command} --help" if command else "picie-jax --help"
  print(f"picie-jax: {message}\nusage: {usage}\n(see `{more}`)", file=sys.stderr, flush=True)
  sys.exit(2)


_PACKAGE_DIRS = tuple(
    os.path.dirname(os.path.abspath(f)) + os.sep for f in (configs.__file__, __file__)
)
# Raised by our code for the user (bad config, missing files, a diverging run): one line.
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)
# What to do about an OSError on a path (a missing one only when it is or is under a path the
# user gave: elsewhere it may be ours).
_PATH_ERROR_HINTS = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of it is a file, not a directory: choose another path",
    errno.EISDIR: "name a file, not a directory",
    errno.EACCES: "give this user access to it or choose another path",
    errno.EPERM: "give this user access to it or choose another path",
    errno.EROFS: "choose a path on a writable file system",
}


def _given_paths(argv):
  """(argument, absolute path) of every path given on the command line."""
  if not flags.FLAGS.is_parsed():
    return []
  config = _CONFIG.value
  given = [("--workdir", _WORKDIR.value), ("--out", _OUT.value)]
  for section, key in (
      ("dataset", "root"),
      ("dataset", "data_dir"),
      ("dataset", "manual_dir"),
      ("model", "init_checkpoint"),
  ):
    given.append((f"--config.{section}.{key}", config.get(section, {}).get(key)))
  if len(argv) > 1:
    given += [(f"the {argv[1]} argument", path) for path in argv[2:]]
  return [(argument, os.path.abspath(path)) for argument, path in given if path]


def _path_error(exc, argv):
  """One line for an OSError about a path (naming the argument it is, or is under), or None."""
  from picie_jax import reporting  # pylint: disable=g-import-not-at-top

  error = next(
      (
          e
          for e in reporting.exception_chain(exc)
          if isinstance(e, OSError) and e.errno in _PATH_ERROR_HINTS and e.filename
      ),
      None,
  )
  if error is None:
    return None
  path = os.path.abspath(os.fsdecode(error.filename))
  within = [(a, p) for a, p in _given_paths(argv) if path == p or path.startswith(p + os.sep)]
  if not within and error.errno == errno.ENOENT:
    return None
  where = ""
  if within:
    argument, given = max(within, key=lambda w: len(w[1]))
    where = f" ({argument})" if given == path else f" (under {argument} {given})"
  return f"error: {path}{where}: {error.strerror}; {_PATH_ERROR_HINTS[error.errno]}"


def _one_line(exc, argv=()):
  """(message, exit code) for an error the user can act on, or None for a bug (traceback)."""
  from picie_jax import preemption  # pylint: disable=g-import-not-at-top
  from picie_jax import reporting  # pylint: disable=g-import-not-at-top

  if isinstance(exc, preemption.Stopped):
    return preemption.resume_line(exc), exc.exit_code
  if isinstance(exc, reporting.UserError):
    return f"error: {exc}", 1
  full = reporting.no_space_error(exc)
  if full is not None:
    what = getattr(full, "filename", None) or "the run's outputs"
    return f"error: {reporting.DiskFull(what)}", 1
  path_error = _path_error(exc, argv)
  if path_error is not None:
    return path_error, 1
  raised_at = traceback.extract_tb(exc.__traceback__)[-1].filename if exc.__traceback__ else ""
  if isinstance(exc, _USER_ERRORS) and os.path.abspath(raised_at).startswith(_PACKAGE_DIRS):
    return f"error: {exc}", 1
  return None


def main(argv):
  try:
    _run_command(argv)
  except Exception as e:  # pylint: disable=broad-except
    reported = _one_line(e, argv)
    if reported is None:
      raise
    if _VERBOSE.value:
      traceback.print_exc()
    print(f"picie-jax: {reported[0]}", file=sys.stderr, flush=True)
    sys.exit(reported[1])


def _run_command(argv):
  if len(argv) < 2:
    _usage_error("no command given")
  command, positional = argv[1], argv[2:]
  if command not in _COMMANDS:
    _usage_error(f"unknown command {command!r}; the commands are: {', '.join(_COMMANDS)}")
  spec = _COMMANDS[command]
  if len(positional) < spec.min_args or (
      spec.max_args is not None and len(positional) > spec.max_args
  ):
    _usage_error(f"{command} takes {_arity(spec)}, got {len(positional)}", command)
  unread = [f"--{name}" for name in _flags_given() if name not in spec.flags]
  if unread:
    _usage_error(f"{command} does not read {', '.join(unread)}", command)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")  # leave accelerator memory to JAX
  if command == "prepare":
    from picie_jax.data import datasets  # pylint: disable=g-import-not-at-top

    print(f"prepared {_CONFIG.value.dataset.name} in {datasets.prepare(_CONFIG.value)}")
    return
  if not _WORKDIR.value:
    _usage_error(f"{command} needs --workdir DIR", command)
  if command in ("segment", "finetune") and not _OUT.value:
    _usage_error(f"{command} needs --out DIR", command)
  import jax  # pylint: disable=g-import-not-at-top

  from picie_jax import parallel  # pylint: disable=g-import-not-at-top

  parallel.maybe_initialize_distributed()
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if command == "segment":
    from picie_jax import segment  # pylint: disable=g-import-not-at-top

    written = segment.segment_images(
        _WORKDIR.value,
        _OUT.value,
        positional,
        strict=_STRICT.value,
        overrides=dict(config_flags.get_override_values(flags.FLAGS["config"])),
    )
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
  if command in ("probe", "finetune"):
    from picie_jax import finetune  # pylint: disable=g-import-not-at-top
    from picie_jax import probe  # pylint: disable=g-import-not-at-top

    overrides = dict(config_flags.get_override_values(flags.FLAGS["config"]))
    if command == "probe":
      final = {"probe": probe.probe_workdir(_WORKDIR.value, overrides)}
    else:
      final = {"finetune": finetune.finetune_workdir(_WORKDIR.value, _OUT.value, overrides)}
  elif command == "train":
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


def _flags_given():
  """The names of this module's flags set on the command line (`config` for --config.KEY=V)."""
  given = [name for name in _METAVARS if flags.FLAGS[name].present]
  if flags.FLAGS["config"].present or config_flags.get_override_values(flags.FLAGS["config"]):
    given.append("config")
  return given


def _arity(spec):
  if spec.max_args is None:
    return f"at least {spec.min_args} positional argument(s)"
  return f"{spec.max_args} positional argument(s)"


def _help_requested(argv):
  """The help text asked for by argv (`--help`, `-h`, `help [COMMAND]`), or None."""
  args = argv[1:]
  if args[:1] == ["help"]:
    args = [*args[1:], "--help"]
  if not any(arg in _HELP_FLAGS for arg in args):
    return None
  named = [arg for arg in args if arg in _COMMANDS]
  return command_help(named[0]) if named else general_help()


def run():
  text = _help_requested(sys.argv)
  if text is not None:
    print(text)
    sys.exit(0)
  app.run(main)


if __name__ == "__main__":
  run()
