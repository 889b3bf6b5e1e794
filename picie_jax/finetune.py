"""`picie-jax finetune`: the paper's transfer claim ("PiCIE provides a better initialization
for supervised training"). The whole network of a run and a linear head are trained with
cross-entropy and Adam on a fixed subset of the labelled train split, then scored on val as
the linear probe is (probe.py: the same features, head, labels and scoring).

The network starts from the run's latest checkpoint, or from its config's init for a run of 0
epochs: `picie-jax train --config configs/imagenet_kmeans_synthetic.py` gives the ImageNet
init, the same with `--config.model.init=random` a random one. Inputs are un-augmented (the
train images at eval.res resized to res1); BatchNorm runs in train mode.
"""

import functools
import os
import time

import jax
import numpy as np
import optax

from picie_jax import parallel
from picie_jax import probe
from picie_jax import reporting
from picie_jax import rundir
from picie_jax import steps

FINETUNE_FILE = "finetune.json"


def labelled_subset(num_examples, fraction, seed):
  """The sorted indices of the train examples whose labels fine-tuning uses:
  max(1, round(fraction * N)) of them, fixed by the seed; a smaller fraction's subset is part
  of a larger one's (both are prefixes of one permutation)."""
  count = max(1, round(fraction * num_examples))
  order = np.random.default_rng([seed, 0x1ABE1]).permutation(num_examples)
  return np.sort(order[:count])


@functools.cache
def finetune_optimizer(lr, head_lr):
  """Adam over the network at `lr` and over the new head at `head_lr` (cached: it is static in
  the jitted step, as steps.make_optimizer)."""
  return optax.partition(
      {"network": optax.adam(lr), "classifier": optax.adam(head_lr)},
      {"network": "network", "classifier": "classifier"},
  )


@functools.partial(jax.jit, static_argnames=("model", "step_config"), donate_argnums=(1,))
def finetune_step(model, state, batch, *, step_config):
  """One Adam step of the network and the head (state.classifier) on a labelled batch, with
  train-mode features (BN statistics moved) in the metric's space; returns (state, loss)."""
  images = steps.evaluation_input(batch["image"], step_config)

  def loss_fn(params):
    variables = {"params": params["network"], "batch_stats": state.batch_stats}
    features, batch_stats = steps.network_features(model, variables, images, train=True)
    features = steps.in_metric_space(features, step_config)  # as the probe's features
    loss = probe.head_loss(params["classifier"], features, batch["label"], batch["mask"])
    return loss, batch_stats

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads, batch_stats), loss


def finetune_workdir(workdir, out, overrides=None):
  """Fine-tunes the network of the run in `workdir` on config.finetune.labelled_fraction of
  the train labels; writes out/config.json, out/finetune.json and
  out/finetune/finetune_{segmentation,confusion}.png. Returns the scores."""
  start = time.perf_counter()
  run, variables, network = probe.supervised_run(workdir, overrides or {}, "finetune")
  config = run.config
  if run.step_config.pixels:
    raise ValueError(
        f"{workdir} is a config.method='pixel_kmeans' run: it has no network to fine-tune"
    )
  os.makedirs(out, exist_ok=True)
  rundir.write_config(config, out)
  indices = labelled_subset(
      run.train_source.num_examples, config.finetune.labelled_fraction, config.seed
  )
  state = parallel.replicate(
      probe.head_state(
          run.train_source.num_classes,
          run.step_config.feature_channels,
          finetune_optimizer(config.finetune.lr, config.finetune.head_lr),
          network=jax.device_get(variables),
      ),
      run.mesh,
  )
  state, epoch_losses = probe.train_head(
      run,
      state,
      functools.partial(finetune_step, run.model, step_config=run.step_config),
      config.finetune,
      indices,
      "finetune",
  )
  scores = probe.score_head(
      run, state.variables, state.classifier, os.path.join(out, "finetune", "finetune")
  )
  results = {
      **scores,
      "finetuned_from": os.path.abspath(workdir),
      "network": network,
      "labelled_images": len(indices),
      "train_loss": epoch_losses,
      "label_downsampling": probe.LABEL_DOWNSAMPLING,
      "finetune": config.finetune.to_dict(),
      "seconds": time.perf_counter() - start,
  }
  reporting.write_json(os.path.join(out, FINETUNE_FILE), results)
  return results
