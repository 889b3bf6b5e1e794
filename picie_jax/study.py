"""Reproducibility studies: one config over seeds x sweep points, each (seed, point) its own
resumable run in DIR/<run name>, then mean ± std per sweep point of every number in the runs'
final.json: DIR/study.json, DIR/study.md and the plot DIR/study.png.

On a cluster, start the runs as independent jobs with `--only INDEX` (`--list` prints each
index with its command), then the same command without `--only` skips the finished runs and
only aggregates.
"""

import ast
import copy
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import time

import flax.traverse_util
import ml_collections
import numpy as np

from picie_jax import reporting
from picie_jax import rundir
from picie_jax import train

STUDY_JSON, STUDY_MD, STUDY_PNG = "study.json", "study.md", "study.png"
WALL_FILE = "study_wall_s.json"  # in each run directory: seconds of each train call the study made
# (column title, metric key): the columns of study.md and the series of the plot.
_SCORES = (
    ("pixel acc (%)", "final.acc"),
    ("mIoU (%)", "final.miou"),
    ("thing mIoU", "final.thing_miou"),
    ("stuff mIoU", "final.stuff_miou"),
)
# Where final.json keeps a run's final scores: fresh clusters, or IIC's main head.
FINAL_SCORES = ("fresh", "main_head")
_WALL = ("wall (s)", "wall_s")
_BRACKETS = {"(": ")", "[": "]", "{": "}"}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a study: its directory name, seed, sweep values ((key, value), ...), config."""

  name: str
  seed: int
  point: tuple
  config: ml_collections.ConfigDict


def parse_seeds(texts):
  """['1', '2'] (from --seeds 1,2) -> [1, 2]; distinct integers."""
  try:
    seeds = [int(t) for t in texts]
  except ValueError as e:
    raise ValueError(f"--seeds {','.join(texts)}: seeds are integers ({e})") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"--seeds {','.join(texts)}: give one or more distinct seeds")
  return seeds


def parse_sweep(config, text):
  """'train.lr=1e-4,1e-3' -> ('train.lr', (0.0001, 0.001)), each value of the field's type.

  Values split at commas outside brackets, so a tuple field takes '(0.1,2.0),(0.5,1.0)'.
  """
  key, sep, values_text = text.partition("=")
  if not (sep and key and values_text):
    raise ValueError(f"--sweep {text!r}: expected KEY=V1,V2,... (e.g. train.lr=1e-4,1e-3)")
  if key == "seed":
    raise ValueError("--sweep seed=...: give the seeds with --seeds")
  current = _field(config, key)
  values = tuple(_typed(v, current, key) for v in _split_top_level(values_text, text))
  if len({repr(v) for v in values}) != len(values):
    raise ValueError(f"--sweep {text!r}: a value is repeated")
  return key, values


def plan(config, seeds, sweep_texts):
  """The study's runs, sweep point by sweep point (the grid of all --sweep flags), then seed.

  Each run's config is `config` (with its --config.* overrides) plus its seed and sweep values.
  """
  seeds = parse_seeds(seeds)
  sweeps = [parse_sweep(config, text) for text in sweep_texts]
  keys = [key for key, _ in sweeps]
  if len(set(keys)) != len(keys):
    raise ValueError(f"--sweep names a key twice: {keys}; give all its values in one flag")
  runs = []
  for values in itertools.product(*(values for _, values in sweeps)):
    point = tuple(zip(keys, values))
    for seed in seeds:
      run_config = copy.deepcopy(config)
      run_config.seed = seed
      run_config.update_from_flattened_dict(dict(point))
      runs.append(RunSpec(_run_name(point, seed), seed, point, run_config))
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise ValueError(
        f"two runs would share a directory name ({names}): sweep values that "
        "differ only in punctuation; give distinct values"
    )
  return runs


def is_done(config, run_dir):
  """Whether `run_dir` holds the finished run of `config`.

  final.json alone is not enough: it can be older than the latest (interrupted) train call in
  the directory, or belong to another config (a run with no epochs keeps no checkpoint for
  train to refuse a changed config on). So: final.json not older than config.json (train
  writes config.json first and final.json last), no results-changing field differs, and the
  same num_epochs (a resumed run may raise it: then train continues the run).
  A changed config in a run with checkpoints is then refused by train itself.
  """
  final, saved = (os.path.join(run_dir, n) for n in ("final.json", "config.json"))
  return (
      os.path.isfile(final)
      and os.path.isfile(saved)
      and os.path.getmtime(final) >= os.path.getmtime(saved)
      and not rundir.config_changes(config, run_dir)
      and rundir.saved_config(run_dir).num_epochs == config.num_epochs
  )


def run_commands(runs, workdir, argv):
  """One line per run: index, directory, done/pending, and the command that runs only it
  (`argv` is the study's own command line, e.g. sys.argv)."""
  base = ["picie-jax"] + _without_flags(argv[1:], ("list", "only"))
  return [
      f"{i}\t{os.path.join(workdir, r.name)}\t"
      f"{'done' if is_done(r.config, os.path.join(workdir, r.name)) else 'pending'}\t"
      + shlex.join(base + [f"--only={i}"])
      for i, r in enumerate(runs)
  ]


def run_study(runs, workdir, only=None):
  """Trains (or resumes) every unfinished run in turn and aggregates; returns the summary.

  With `only`, trains just that run and returns None (the aggregate waits for all runs).
  """
  if only is not None:
    if not 0 <= only < len(runs):
      raise ValueError(f"--only={only}: the study has runs 0..{len(runs) - 1} (see --list)")
    _run_one(runs[only], workdir, only, len(runs))
    return None
  for index, spec in enumerate(runs):
    _run_one(spec, workdir, index, len(runs))
  return aggregate(runs, workdir)


def _run_one(spec, workdir, index, total):
  run_dir = os.path.join(workdir, spec.name)
  if is_done(spec.config, run_dir):
    reporting.say(f"study run {index + 1}/{total} {run_dir}: done, skipped")
    return
  reporting.say(f"study run {index + 1}/{total} {run_dir}: training")
  start = time.perf_counter()
  try:
    train.train_and_evaluate(spec.config, run_dir)
  finally:  # an interrupted call's seconds count too: they are part of the run's cost
    if os.path.isdir(run_dir):
      calls = _read_json(os.path.join(run_dir, WALL_FILE)) or {"train_calls_s": []}
      calls["train_calls_s"].append(round(time.perf_counter() - start, 3))
      reporting.write_json(os.path.join(run_dir, WALL_FILE), calls)


def aggregate(runs, workdir):
  """Writes study.json, study.md and study.png from the runs' final.json; returns the summary.

  Per run: seed, sweep values, resolved config, metrics (every number of final.json, flattened
  to 'fresh.acc' etc., its final scores (FINAL_SCORES) again as 'final.acc' etc., plus wall_s).
  Per sweep point: n and {metric: {mean, std}} with the
  sample std (n-1; null for n=1); a metric that is null (NaN) in any run is null.
  """
  records = []
  for index, spec in enumerate(runs):
    run_dir = os.path.join(workdir, spec.name)
    if not is_done(spec.config, run_dir):
      raise FileNotFoundError(
          f"{run_dir} is not finished: run the study without --only, or "
          f"its run {index} with --only={index}"
      )
    final = _read_json(os.path.join(run_dir, "final.json"))
    scored = [key for key in FINAL_SCORES if key in final]
    metrics = _numbers({**final, "final": final[scored[0]]} if scored else final)
    calls = _read_json(os.path.join(run_dir, WALL_FILE))
    metrics["wall_s"] = sum(calls["train_calls_s"]) if calls else None
    records.append(
        {
            "name": spec.name,
            "seed": spec.seed,
            "sweep": dict(spec.point),
            "config": json.loads(spec.config.to_json_best_effort()),
            "metrics": metrics,
        }
    )
  points = []
  for point, group in itertools.groupby(zip(runs, records), key=lambda pair: pair[0].point):
    group = [record for _, record in group]
    keys = list(dict.fromkeys(k for record in group for k in record["metrics"]))
    points.append(
        {
            "sweep": dict(point),
            "label": _point_label(point),
            "n": len(group),
            "seeds": [r["seed"] for r in group],
            "runs": [r["name"] for r in group],
            "metrics": {k: mean_std([r["metrics"].get(k) for r in group]) for k in keys},
        }
    )
  summary = {"sweep_keys": [key for key, _ in runs[0].point], "runs": records, "points": points}
  if reporting.is_main_process():
    reporting.write_json(os.path.join(workdir, STUDY_JSON), summary)
    with open(os.path.join(workdir, STUDY_MD), "w") as f:
      f.write(markdown(summary))
    write_plot(summary, os.path.join(workdir, STUDY_PNG))
  return summary


def mean_std(values):
  """{'mean', 'std'} of numbers (None = NaN): sample std (ddof=1), None when n = 1 or NaN."""
  x = np.array([np.nan if v is None else v for v in values], np.float64)
  mean = float(np.mean(x))
  std = float(np.std(x, ddof=1)) if len(x) > 1 else math.nan
  return {"mean": _finite_or_none(mean), "std": _finite_or_none(std)}


def format_mean_std(stats, digits=1):
  """'56.8 ± 4.0'; the mean alone when there is no std; '—' when there is no mean."""
  if stats is None or stats["mean"] is None:
    return "—"
  if stats["std"] is None:
    return f"{stats['mean']:.{digits}f}"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(summary):
  """study.md: the per-point table (mean ± std over seeds), then one row per run."""
  columns = _SCORES + (_WALL,)
  seeds = sorted({r["seed"] for r in summary["runs"]})
  lines = [
      f"# Study: {len(summary['runs'])} runs, seeds {seeds}, sweep "
      f"{', '.join(summary['sweep_keys']) or '(none)'}",
      "",
      "Final evaluation (`final.json`: `fresh` clusters, or IIC's `main_head`): mean ± sample "
      "std (n − 1) over the seeds of each sweep point; wall = seconds of the study's train calls.",
      "",
  ]
  lines += _table(
      ["sweep point", "n"] + [title for title, _ in columns],
      [
          [p["label"], str(p["n"])]
          + [
              format_mean_std(p["metrics"].get(key), 0 if key == "wall_s" else 1)
              for _, key in columns
          ]
          for p in summary["points"]
      ],
  )
  lines += ["", "## Runs", ""]
  lines += _table(
      ["run", "seed"] + [title for title, _ in columns],
      [
          [f"`{r['name']}`", str(r["seed"])]
          + [
              _format_number(r["metrics"].get(key), 0 if key == "wall_s" else 1)
              for _, key in columns
          ]
          for r in summary["runs"]
      ],
  )
  return "\n".join(lines) + "\n"


def write_plot(summary, path):
  """Scores vs sweep point with ± std error bars; with no sweep, one bar per score."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  from matplotlib.backends import backend_agg  # pylint: disable=g-import-not-at-top

  points = summary["points"]
  series = [
      (title, key, [p["metrics"].get(key) or {"mean": None, "std": None} for p in points])
      for title, key in _SCORES
  ]
  series = [s for s in series if any(st["mean"] is not None for st in s[2])]
  fig = figure.Figure(figsize=(7, 4.5), layout="constrained")
  ax = fig.subplots()
  ax.set_title(f"mean ± std over {points[0]['n']} seeds per point")
  ax.set_ylabel("score (%)")
  if not series:
    ax.text(0.5, 0.5, "no scores in final.json", ha="center", transform=ax.transAxes)
  elif len(points) == 1:
    stats = [s[2][0] for s in series]
    ax.bar(
        [s[0] for s in series],
        [st["mean"] for st in stats],
        yerr=[st["std"] or 0.0 for st in stats],
        capsize=5,
        color="tab:blue",
    )
  else:
    x = np.arange(len(points))
    offsets = np.linspace(-0.1, 0.1, len(series))  # side by side, so error bars stay apart
    for (title, _, stats), offset in zip(series, offsets):
      ax.errorbar(
          x + offset,
          [np.nan if st["mean"] is None else st["mean"] for st in stats],
          yerr=[st["std"] or 0.0 for st in stats],
          marker="o",
          capsize=4,
          label=title,
      )
    one_key = len(summary["sweep_keys"]) == 1
    ax.set_xticks(
        x,
        [
            ", ".join(_value_text(v) for v in p["sweep"].values()) if one_key else p["label"]
            for p in points
        ],
        rotation=0 if one_key else 20,
        ha="center" if one_key else "right",
    )
    ax.set_xlabel(", ".join(summary["sweep_keys"]))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
  backend_agg.FigureCanvasAgg(fig).print_png(path)


def _field(config, key):
  """The value of `config.<key>`; an error naming the key when it is not a field."""
  node = config
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ValueError(
          f"--sweep {key}=...: config.{key} is not a config field "
          "(configs/common.py lists them all)"
      )
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    raise ValueError(f"--sweep {key}=...: config.{key} is a group of fields; sweep one of them")
  return node


def _typed(text, current, key):
  """`text` as a value of the type of config.<key>'s current value."""
  kind = type(current)
  try:
    if kind is bool:
      word = text.strip().lower()
      if word not in ("true", "false", "1", "0"):
        raise ValueError(word)
      return word in ("true", "1")
    if kind in (int, float, str):
      return kind(text)
    if kind is tuple:
      value = ast.literal_eval(text)
      if not isinstance(value, (tuple, list)):
        raise ValueError(value)
      return tuple(value)
  except (ValueError, SyntaxError):
    raise ValueError(
        f"--sweep {key}=...: {text!r} is not a valid {kind.__name__} "
        f"(config.{key} is {current!r})"
    ) from None
  raise ValueError(
      f"--sweep {key}=...: config.{key} is a {kind.__name__} "
      f"({current!r}); a sweep sets bool, int, float, str and tuple fields"
  )


def _split_top_level(values_text, flag_text):
  """'a,(b,c),d' -> ['a', '(b,c)', 'd']."""
  parts, depth, start = [], [], 0
  for i, char in enumerate(values_text):
    if char in _BRACKETS:
      depth.append(_BRACKETS[char])
    elif depth and char == depth[-1]:
      depth.pop()
    elif char == "," and not depth:
      parts.append(values_text[start:i])
      start = i + 1
  parts.append(values_text[start:])
  if depth or any(not p.strip() for p in parts):
    raise ValueError(f"--sweep {flag_text!r}: an empty value or unbalanced brackets")
  return [p.strip() for p in parts]


def _value_text(value):
  return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _point_label(point):
  return ", ".join(f"{key}={_value_text(value)}" for key, value in point) or "(no sweep)"


def _run_name(point, seed):
  """'train.lr=0.001_seed1': readable, and a single path component."""
  parts = [
      f"{key}={re.sub(r'[^A-Za-z0-9.+-]+', '_', _value_text(v)).strip('_')}" for key, v in point
  ]
  return "_".join(parts + [f"seed{seed}"])


def _numbers(tree):
  """{'fresh': {'acc': 1.0, 'per_class_iou': [...]}} -> {'fresh.acc': 1.0}: the numbers (and
  nulls, i.e. NaN) of nested dicts; lists and strings are left out."""
  return {
      key: _finite_or_none(value)
      for key, value in flax.traverse_util.flatten_dict(tree, sep=".").items()
      if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
  }


def _finite_or_none(value):
  return None if value is None or not math.isfinite(value) else value


def _format_number(value, digits):
  return "—" if value is None else f"{value:.{digits}f}"


def _table(header, rows):
  return ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"] + [
      "| " + " | ".join(row) + " |" for row in rows
  ]


def _read_json(path):
  """The JSON in `path`, None when there is no such file."""
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _without_flags(args, names):
  """`args` less the flags `--name`, `--name=v`, `--noname` and `--name v` for each name."""
  kept, skip_next = [], False
  for arg in args:
    if skip_next:
      skip_next = False
      continue
    flag = arg.lstrip("-").split("=", 1)[0]
    if arg.startswith("-") and (flag in names or flag in {f"no{n}" for n in names}):
      skip_next = "=" not in arg and flag == "only"
      continue
    kept.append(arg)
  return kept
