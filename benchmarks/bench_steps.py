"""Times the jitted per-batch functions of picie_jax.steps for a config: images/s and compile.

For each phase one random batch of the size the run would use is built, sharded with
`Run.shard`, and timed (median over --repeats interleaved rounds, after a first call that
traces and compiles):
  cluster_features  both views' train-mode features, one pass (kmeans.batch_size at res2)
  label_counts      the label phase's counting pass (kmeans.batch_size images at res2)
  train_step        two views fwd/bwd + Adam, labels per train.labels (train.batch_size at res2)
  eval_step         prediction + confusion histogram (eval.batch_size images at eval.res)
Targets are `train.initial_state`'s with random unit centroids. The config's dataset is
replaced by a few tiny synthetic images: no step reads it, so any recipe runs without its files.

  python benchmarks/bench_steps.py
  python benchmarks/bench_steps.py --config-module configs.coco_stuff27 \\
      --override train.batch_size=8 kmeans.batch_size=8 eval.batch_size=8
"""
import argparse
import ast
import importlib
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from picie_jax import config_check
from picie_jax import parallel
from picie_jax import steps
from picie_jax import train
from picie_jax.core import kmeans

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
_QUICK_BATCH = 4


def parse_override(config, item):
  """'a.b=v' -> ('a.b', v converted to the type of config.a.b)."""
  key, sep, text = item.partition("=")
  if not sep:
    raise SystemExit(f"--override {item!r}: expected key=value")
  node = config
  for part in key.split("."):
    if part not in node:
      raise SystemExit(f"--override {item!r}: config has no field {key!r}")
    node = node[part]
  if isinstance(node, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise SystemExit(f"--override {item!r}: {key} is a bool, give true or false")
    return key, text.lower() in ("true", "1")
  if isinstance(node, (tuple, list)):
    return key, type(node)(ast.literal_eval(text))
  return key, type(node)(text)


def load_config(module_name, overrides, quick):
  config = importlib.import_module(module_name).get_config()
  if quick:
    config.update_from_flattened_dict({"kmeans.batch_size": _QUICK_BATCH,
                                       "train.batch_size": _QUICK_BATCH,
                                       "eval.batch_size": _QUICK_BATCH})
  config.update_from_flattened_dict(dict(parse_override(config, o) for o in overrides))
  config.progress = False
  config_check.validate(config)
  return config


def without_dataset(config):
  """A copy of `config` whose data sources are 4 synthetic 16-px images (cheap to build)."""
  config = config.copy_and_resolve_references()
  config.dataset.update({"name": "synthetic", "num_train": 4, "num_val": 4,
                         "synthetic_size": 16})
  return config


def random_batch(run, rng, batch_size, side, num_labels=0):
  """A sharded batch of random uint8 images (B, side, side, 3) with index and mask, and
  int32 labels in [0, num_labels) when num_labels > 0."""
  batch = {"image": rng.integers(0, 256, (batch_size, side, side, 3), dtype=np.uint8),
           "index": np.arange(batch_size, dtype=np.int32),
           "mask": np.ones(batch_size, bool)}
  if num_labels:
    batch["label"] = rng.integers(0, num_labels, (batch_size, side, side), dtype=np.int32)
  return run.shard(batch)


def random_targets(run, targets, rng):
  """`targets` with random unit-norm centroids of the same (V, K, C) shape."""
  centroids = kmeans.normalize_features(
      rng.standard_normal(targets.centroids.shape).astype(np.float32))
  return targets.replace(centroids=parallel.replicate(centroids, run.mesh))


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config-module", default="configs.synthetic",
                      help="module with get_config(), e.g. configs.coco_stuff27")
  parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                      help="config fields to change, e.g. train.batch_size=8 res1=128")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
  parser.add_argument("--quick", action="store_true",
                      help=f"batch size {_QUICK_BATCH} for every phase (before --override)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(RESULTS_DIR, "steps.json"))
  args = parser.parse_args()
  if args.repeats < 1:
    raise SystemExit(f"--repeats={args.repeats} must be >= 1")

  config = load_config(args.config_module, args.override, args.quick)
  run = train.Run(without_dataset(config), workdir="")
  rng = np.random.default_rng(args.seed)
  state, targets = train.initial_state(run)
  targets = random_targets(run, targets, rng)
  frozen = targets.frozen  # not donated: the variables of the non-training steps
  classifier = parallel.replicate(
      steps.classifier_from_centroids(targets.centroids[0], config.kmeans.metric), run.mesh)
  # The recipes' k_test equals their number of true classes; it sizes the confusion histogram.
  num_true = config.eval.k_test
  sizes = {"cluster_features": (config.kmeans.batch_size, config.res2),
           "label_counts": (config.kmeans.batch_size, config.res2),
           "train_step": (config.train.batch_size, config.res2),
           "eval_step": (config.eval.batch_size, config.eval.res)}
  batches = {name: random_batch(run, rng, b, side, num_true if name == "eval_step" else 0)
             for name, (b, side) in sizes.items()}
  if method.cached_labels:  # train.labels='cached': the label cache's rows come with the batch
    _, batches["train_step"]["labels"] = steps.label_counts(
        run.model, targets, batches["train_step"], 0, run.augment_key, method=method, k=run.k)
  epoch, key, method = 0, run.augment_key, run.method

  def train_once():
    nonlocal state  # train_step donates its state: carry the returned one forward
    state, out = steps.train_step(run.model, state, targets, batches["train_step"], epoch, key,
                                  method=method, tx=run.tx)
    return out

  fns = {
      "cluster_features": lambda: steps.cluster_features(
          run.model, frozen["params"], [frozen["batch_stats"]] * run.num_views,
          batches["cluster_features"], epoch, key, method=method),
      "label_counts": lambda: steps.label_counts(
          run.model, targets, batches["label_counts"], epoch, key, method=method, k=run.k),
      "train_step": train_once,
      "eval_step": lambda: steps.eval_step(run.model, frozen, classifier, batches["eval_step"],
                                           method=method, num_true=num_true),
  }
  first_call_s = {}
  for name, fn in fns.items():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first_call_s[name] = time.perf_counter() - start
  times = {name: [] for name in fns}
  for _ in range(args.repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)

  rows = {}
  for name, t in times.items():
    median_s = statistics.median(t)
    rows[name] = {"batch_size": sizes[name][0], "side": sizes[name][1],
                  "ms_per_batch": 1e3 * median_s, "images_per_s": sizes[name][0] / median_s,
                  "first_call_s": first_call_s[name],
                  "compile_s_estimate": first_call_s[name] - median_s,
                  "raw_seconds": t}
  print(f"steps: {args.config_module} {' '.join(args.override)}{' --quick' if args.quick else ''}"
        f" | {config.method}, {config.model.backbone} width {config.model.width}, res1 {config.res1},"
        f" K {run.k} | {jax.default_backend()} ({jax.devices()[0].device_kind}, "
        f"{jax.device_count()} device(s)), median of {args.repeats}")
  print(f"{'step':<17}{'batch':>6}{'side':>6}{'ms/batch':>11}{'images/s':>11}{'compile s':>11}")
  for name, r in rows.items():
    print(f"{name:<17}{r['batch_size']:>6}{r['side']:>6}{r['ms_per_batch']:>11.1f}"
          f"{r['images_per_s']:>11.1f}{r['compile_s_estimate']:>11.1f}")
  print("compile s = first call (trace + compile + one run) - median run")

  result = {
      "args": vars(args), "config": config.to_dict(),
      "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
      "device_count": jax.device_count(), "host_cores": os.cpu_count(),
      "machine": platform.platform(), "steps": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
