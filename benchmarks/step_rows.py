"""Per-batch rows of picie_jax's phases (train step and its parts, cluster, label, inference)
for a config, each timed interleaved with its PyTorch peer where there is one.

The config's dataset is swapped for 4 tiny synthetic images (no step reads it), so recipes
like COCO run without their files; batches are random uint8 images at the phase's size and
targets random unit centroids, as the steps' cost does not depend on the values.
"""

import ast
import functools
import importlib

import jax
import numpy as np
import optax

from benchmarks import timing
from picie_jax import config_check
from picie_jax import parallel
from picie_jax import rundir
from picie_jax import steps
from picie_jax.core import kmeans
from picie_jax.models import fpn

# Where these shapes come from: the COCO recipe (configs/coco_stuff27.py) at CPU batch sizes,
# and the demo (configs/synthetic.py) as it runs.
SHAPES = {
    "coco": {
        "config": "configs.coco_stuff27",
        "overrides": {"train.batch_size": 8, "kmeans.batch_size": 8, "eval.batch_size": 16},
    },
    "demo": {"config": "configs.synthetic", "overrides": {}},
}


def parse_override(config, item):
  """'a.b=v' -> ('a.b', v converted to the type of config.a.b); a missing field is an error
  that names it (MissingField, so its rows are skipped with the reason)."""
  key, sep, text = item.partition("=")
  if not sep:
    raise SystemExit(f"--override {item!r}: expected key=value")
  node = config
  for part in key.split("."):
    if part not in node:
      raise MissingField(f"--override {item!r}: this checkout's config has no field {key!r}")
    node = node[part]
  if isinstance(node, bool):
    if text.lower() not in ("true", "false", "1", "0"):
      raise SystemExit(f"--override {item!r}: {key} is a bool, give true or false")
    return key, text.lower() in ("true", "1")
  if isinstance(node, (tuple, list)):
    return key, type(node)(ast.literal_eval(text))
  return key, type(node)(text)


class MissingField(Exception):
  """An --override names a config field this checkout does not have."""


def load_config(shape, overrides=()):
  """The shape's config with its overrides, then the user's `key=value` overrides."""
  config = importlib.import_module(SHAPES[shape]["config"]).get_config()
  config.update_from_flattened_dict(SHAPES[shape]["overrides"])
  config.update_from_flattened_dict(dict(parse_override(config, o) for o in overrides))
  config.progress = False
  config_check.validate(config)
  return config


def without_dataset(config):
  """A copy of `config` whose data sources are 4 synthetic 16-px images (cheap to build)."""
  config = config.copy_and_resolve_references()
  config.dataset.update({"name": "synthetic", "num_train": 4, "num_val": 4, "synthetic_size": 16})
  return config


def random_batch(run, rng, batch_size, side, num_labels=0):
  """A sharded batch of random uint8 images (B, side, side, 3) with index and mask, and
  int32 labels in [0, num_labels) when num_labels > 0."""
  batch = {
      "image": rng.integers(0, 256, (batch_size, side, side, 3), dtype=np.uint8),
      "index": np.arange(batch_size, dtype=np.int32),
      "mask": np.ones(batch_size, bool),
  }
  if num_labels:
    batch["label"] = rng.integers(0, num_labels, (batch_size, side, side), dtype=np.int32)
  return parallel.shard_host_batch(batch, run.mesh)


def random_targets(run, targets, rng):
  """`targets` with random unit-norm centroids of the same (V, K, C) shape."""
  centroids = kmeans.normalize_features(
      rng.standard_normal(targets.centroids.shape).astype(np.float32)
  )
  return targets.replace(centroids=parallel.replicate(centroids, run.mesh))


def adam_update(tx, params, opt_state, grads):
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


class JaxSteps:
  """picie_jax's per-batch functions for one config, with random batches and targets."""

  def __init__(self, config, seed=0):
    self.config = config
    self.run = run = rundir.Run(without_dataset(config), workdir="")
    rng = np.random.default_rng(seed)
    self.state, targets = rundir.initial_state(run)
    self.targets = random_targets(run, targets, rng)
    self.classifier = parallel.replicate(
        steps.classifier_from_centroids(self.targets.centroids[0], config.kmeans.metric), run.mesh
    )
    self.num_true = config.eval.k_test  # the recipes' k_test is their number of true classes
    self.sizes = {
        "train": (config.train.batch_size, config.res2),
        "cluster": (config.kmeans.batch_size, config.res2),
        "eval": (config.eval.batch_size, config.eval.res),
    }
    self.batches = {
        name: random_batch(run, rng, b, side, self.num_true if name == "eval" else 0)
        for name, (b, side) in self.sizes.items()
    }
    if run.step_config.cached_labels:  # train.labels='cached': the label cache's rows come with it
      self.batches["train"]["labels"] = steps.label_counts(
          run.model,
          self.targets,
          self.batches["train"],
          0,
          run.augment_key,
          step_config=run.step_config,
      )[1]
    self.kmeans_state = kmeans.MiniBatchState(
        self.targets.centroids[0], jax.numpy.ones(run.k, jax.numpy.float32)
    )
    self._views = jax.jit(steps.view_images, static_argnames="step_config")
    self._labels = jax.jit(steps.labels_for_batch, static_argnames=("model", "step_config"))
    self._loss_grads = jax.jit(steps.loss_and_grads, static_argnames=("model", "step_config"))
    self._adam = jax.jit(adam_update, static_argnames="tx")
    # Set by label_recompute and views_forward_backward (called in that order, after a first
    # train_step): computed from the initial state they would compile once more for nothing.
    self.labels = self.grads = None

  def calls(self):
    """{row: functools.partial of a jitted function with the row's current arguments}: the rows
    that are one jitted call, so one object both runs the row and lowers it (compiled_memory)."""
    r, b = self.run, self.batches
    return {
        "picie_jax/train_step": functools.partial(
            steps.train_step,
            r.model,
            self.state,
            self.targets,
            b["train"],
            0,
            r.augment_key,
            step_config=r.step_config,
        ),
        "picie_jax/views": functools.partial(
            self._views, b["train"]["image"], b["train"]["index"], 0, r.augment_key, r.step_config
        ),
        "picie_jax/label_recompute": functools.partial(
            self._labels, r.model, self.targets, b["train"], 0, r.augment_key, r.step_config
        ),
        "picie_jax/label_step": functools.partial(
            steps.label_counts,
            r.model,
            self.targets,
            b["cluster"],
            0,
            r.augment_key,
            step_config=r.step_config,
        ),
        "picie_jax/eval_step": functools.partial(
            steps.eval_step,
            r.model,
            self.targets.frozen,
            self.classifier,
            b["eval"],
            step_config=r.step_config,
            num_true=self.num_true,
        ),
    }

  def train_step(self):
    self.state, out = self.calls()["picie_jax/train_step"]()
    return out

  def views(self):
    return self.calls()["picie_jax/views"]()

  def label_recompute(self):
    self.labels = self.calls()["picie_jax/label_recompute"]()
    return self.labels

  def views_forward_backward(self):
    r = self.run
    out = self._loss_grads(
        r.model,
        self.state,
        self.targets,
        self.batches["train"],
        self.labels,
        0,
        r.augment_key,
        r.step_config,
    )
    self.grads = out[1]
    return out

  def optimizer(self):
    return self._adam(self.state.tx, self.state.params, self.state.opt_state, self.grads)

  def cluster_step(self):
    """One batch of the cluster pass: both views' train-mode features (one read of the batch)
    and one mini-batch k-means update per view."""
    r = self.run
    frozen = self.targets.frozen
    views, _ = steps.cluster_features(
        r.model,
        frozen["params"],
        [frozen["batch_stats"]] * r.num_views,
        self.batches["cluster"],
        0,
        r.augment_key,
        step_config=r.step_config,
    )
    return [
        kmeans.minibatch_update(
            self.kmeans_state, points, mask, mesh=r.mesh, chunk_size=self.config.kmeans.chunk_size
        )
        for points, mask in views
    ]

  def label_step(self):
    return self.calls()["picie_jax/label_step"]()

  def eval_step(self):
    return self.calls()["picie_jax/eval_step"]()


def compile_call(call):
  """The compiled executable of a jitted call (a `JaxSteps.calls` partial); after the call has
  run, a cache hit rather than a second compile."""
  return call.func.lower(*call.args, **call.keywords).compile()


def compiled_memory(compiled):
  """XLA's buffer sizes in bytes (temp, argument, output, alias, generated code) of a compiled
  executable, from its `memory_analysis()`; None where the backend reports none."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return {
      f"{name}_bytes": int(getattr(stats, f"{name}_size_in_bytes"))
      for name in ("temp", "argument", "output", "alias", "generated_code")
  }


def torch_peers(config, seed=0):
  """{'nchw': PiCIEPeer, 'channels_last': PiCIEPeer} for a ResNet-18 config, with inputs;
  raises timing.MissingPeer without torch and ValueError for a backbone the peer lacks."""
  torch = timing.require("torch", "the PyTorch peer")
  from benchmarks import torch_picie  # pylint: disable=import-outside-toplevel

  if config.model.backbone != "resnet18" or config.model.width != 64:
    raise ValueError(
        f"the PyTorch peer is the ResNet-18 FPN; this config has "
        f"model.backbone={config.model.backbone!r} width {config.model.width}"
    )
  gen = torch.Generator().manual_seed(seed)
  res1, stride = config.res1, fpn.backbone_spec(config.model.backbone).feature_stride
  k = config.kmeans.k_train

  def images(b, side):
    return torch.rand(b, 3, side, side, generator=gen)

  def labels(b):
    return torch.randint(0, k, (b, res1 // stride, res1 // stride), generator=gen)

  peers = {}
  for layout in ("nchw", "channels_last"):
    peer = torch_picie.PiCIEPeer(
        k,
        config.model.fpn_channels,
        config.train.lr,
        channels_last=layout == "channels_last",
        seed=seed,
    )
    bt, bc, be = (config.train.batch_size, config.kmeans.batch_size, config.eval.batch_size)
    peer.inputs = {
        "train": [peer.images(images(bt, res1)) for _ in range(2)] + [labels(bt), labels(bt)],
        "cluster": [peer.images(images(bc, res1)) for _ in range(2)],
        "eval": peer.images(images(be, res1)),
    }
    peers[layout] = peer
  return peers


def step_groups(jax_steps, peers):
  """{group: {name: fn}}: the functions timed together (interleaved) in each group."""
  j = jax_steps
  groups = {
      "train": {
          "picie_jax/train_step": j.train_step,
          "picie_jax/views": j.views,
          "picie_jax/label_recompute": j.label_recompute,
          "picie_jax/views_forward_backward": j.views_forward_backward,
          "picie_jax/optimizer": j.optimizer,
      },
      "cluster": {"picie_jax/cluster_step": j.cluster_step},
      "label": {"picie_jax/label_step": j.label_step},
      "eval": {"picie_jax/eval_step": j.eval_step},
  }
  eval_hw = (j.config.eval.res, j.config.eval.res)
  for layout, p in peers.items():
    t, c = p.inputs["train"], p.inputs["cluster"]
    groups["train"][f"torch_{layout}/train_step"] = lambda p=p, t=t: p.train_step(*t)
    groups["train"][f"torch_{layout}/train_labels"] = lambda p=p, t=t: p.label_step(t[0], t[1])
    groups["cluster"][f"torch_{layout}/cluster_step"] = lambda p=p, c=c: p.cluster_step(*c)
    groups["label"][f"torch_{layout}/label_step"] = lambda p=p, c=c: p.label_step(*c)
    groups["eval"][f"torch_{layout}/eval_step"] = lambda p=p: p.eval_step(p.inputs["eval"], eval_hw)
  return groups
