"""`picie-jax probe`: the field's linear probe (STEGO's protocol) of a run's frozen network.

A 1x1 linear classifier with bias is trained with cross-entropy and Adam on the network's
un-augmented eval-mode features of the train split (as evaluation sees them: images at
eval.res resized to res1, features L2-normalised for the cosine metric), against the train
labels taken at the feature resolution by nearest sampling (`labels_at_features`); unlabelled
pixels are ignored. It is scored on val as `eval` scores clusters (logits upsampled
bilinearly to the label size) but without matching: output k is class k.

The pieces `finetune` shares are here too: the run's network, the labelled train batches, the
head's loss and its scoring.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from picie_jax import config_check
from picie_jax import convert
from picie_jax import evaluate
from picie_jax import parallel
from picie_jax import reporting
from picie_jax import rundir
from picie_jax import steps
from picie_jax.core import losses
from picie_jax.data import pipeline

PROBE_FILE = "probe.json"
LABEL_DOWNSAMPLING = "nearest"  # the label pixel nearest each feature pixel's centre


def labels_at_features(labels_bhw, height, width):
  """The (B, height, width) labels of the feature pixels: for each, the label pixel nearest its
  centre (feature row i covers label rows [i H/h, (i+1) H/h); row floor((i + 1/2) H/h) is
  taken). Ignored labels (< 0) stay ignored."""
  _, label_h, label_w = labels_bhw.shape
  rows = ((np.arange(height) + 0.5) * label_h / height).astype(np.int32)
  cols = ((np.arange(width) + 0.5) * label_w / width).astype(np.int32)
  return labels_bhw[:, rows][:, :, cols]


def head_loss(head_kc1, features_bhwc, labels_bhw, mask_b):
  """Mean cross-entropy of the linear head's logits over the valid pixels: label in
  [0, K) at the feature resolution (labels_at_features), image not padding."""
  _, h, w, _ = features_bhwc.shape
  logits = losses.prototype_logits(steps.with_bias_column(features_bhwc), head_kc1)
  labels = labels_at_features(labels_bhw, h, w)
  uniform = jnp.ones(head_kc1.shape[0], jnp.float32)
  return losses.weighted_cross_entropy(logits, labels, uniform, mask_b[:, None, None])


def head_state(num_classes, channels, tx, network=None):
  """A TrainState of a zero (num_classes, channels+1) head and the optimizer `tx` over it and
  the `network` variables (the fine-tuned ones), or over the head alone (the probe: the frozen
  network is passed apart)."""
  network = network or {"params": {}, "batch_stats": {}}
  head = jnp.zeros((num_classes, channels + 1), jnp.float32)
  return steps.TrainState.create(network, head, tx)


def probe_update(state, features_bhwc, labels_bhw, mask_b):
  """One Adam step of the head (state.classifier) on fixed features; returns (state, loss)."""
  loss, grads = jax.value_and_grad(
      lambda params: head_loss(params["classifier"], features_bhwc, labels_bhw, mask_b)
  )(state.params)
  return state.apply_gradients(grads, state.batch_stats), loss


@functools.partial(jax.jit, static_argnames=("model", "step_config"), donate_argnums=(2,))
def probe_step(model, variables, state, batch, *, step_config):
  """The frozen network's features of a labelled batch (eval mode, no gradient) and one step
  of the probe on them."""
  features = steps.plain_features(model, variables, batch["image"], step_config)
  return probe_update(state, features, batch["label"], batch["mask"])


def supervised_run(workdir, overrides, block):
  """(run, network variables, where they came from) of the run in `workdir` for the
  supervised command whose config block is `block` ('probe' or 'finetune').

  `overrides` ({dotted key: value}) may change `block`.* and what `eval` may change
  (evaluate.EVAL_OVERRIDABLE). The network is the latest checkpoint's or, for a run of 0
  epochs (it saves none), the init its config names (config.model.init: the ImageNet
  features of configs/imagenet_kmeans_synthetic.py, or a random network).
  """
  config = rundir.saved_config(workdir)
  own = {k: v for k, v in overrides.items() if k.startswith(f"{block}.")}
  for line in evaluate.apply_eval_overrides(
      config, {k: overrides[k] for k in overrides if k not in own}
  ):
    reporting.say(f"{block} overrides {line}")
  config.update_from_flattened_dict(own)
  config_check.validate(config)
  run = rundir.Run(config, workdir)
  config_check.check_batch_sizes(
      config, run.mesh.size, jax.process_count(), keys=(f"{block}.batch_size",)
  )
  require_train_labels(run.train_source)
  if run.val_source is None:
    raise FileNotFoundError(f"nothing to score the {block} on: {run.no_evaluation_reason}")
  if config.num_epochs == 0:  # never trained, nothing saved
    variables = convert.initial_variables(rundir.random_variables(run), config.model)
    return run, parallel.replicate(variables, run.mesh), f"init ({config.model.init})"
  state, _, meta = rundir.restore_latest(run)
  return run, state.variables, f"checkpoint after {meta.epoch} epochs"


def require_train_labels(source):
  """The linear probe and fine-tuning learn from the train labels: one error without them."""
  if not source.has_labels:
    raise ValueError(
        f"{source.name} has no train labels: the linear probe and fine-tuning train on them "
        "(evaluation alone needs only val labels)"
    )


def labelled_batches(run, batch_size, indices, epoch):
  """The train examples `indices` with their labels, at eval.res, in the seeded order of
  `epoch`; the last batch padded and masked."""
  order = indices[pipeline.epoch_order(len(indices), run.config.seed, epoch)]
  host_indices = pipeline.batch_indices(order, batch_size, **run.hosts)
  return pipeline.make_batches(
      run.train_source, host_indices, run.config.eval.res, with_labels=True
  )


def train_head(run, state, step_fn, block_config, indices, desc):
  """`block_config.epochs` epochs of `step_fn(state, batch) -> (state, loss)` over the
  labelled train examples `indices`; returns (state, mean loss of each epoch)."""
  epoch_losses = []
  for epoch in range(block_config.epochs):
    bar = run.progress(f"{desc} epoch {epoch}", len(indices), block_config.batch_size)
    batches = labelled_batches(run, block_config.batch_size, indices, epoch)
    total, count = jnp.zeros(()), 0
    for batch in parallel.prefetch_to_device(batches, run.mesh):
      state, loss = step_fn(state, batch)
      total, count = total + loss, count + 1
      bar.update(1)
    bar.close()
    epoch_losses.append(float(total) / max(count, 1))
    reporting.say(f"{desc} epoch {epoch}: loss {epoch_losses[-1]:.4f}")
  return state, epoch_losses


def head_step_config(step_config):
  """The StepConfig that scores a learned linear head on the network of `step_config`: a
  parametric classifier (not IIC's heads nor the centroids) on the very features the head was
  trained on (steps.in_metric_space: raw for IIC, L2-normalised for the cosine metric)."""
  return step_config._replace(parametric=True)


def score_head(run, variables, head_kc1, vis_prefix):
  """Acc / mIoU of the head's class predictions on val (no matching), with its pictures."""
  head_config = head_step_config(run.step_config)
  scores, _ = evaluate.evaluate(
      run.model,
      variables,
      head_kc1,
      run.val_source,
      run.config,
      run.mesh,
      head_config,
      predicts_classes=True,
      vis_prefix=vis_prefix,
      progress=run.config.progress,
  )
  del scores["cluster_to_class"]  # the identity
  return {"k": head_kc1.shape[0], **scores}


def probe_workdir(workdir, overrides=None):
  """Trains and scores the linear probe of the run in `workdir`; writes workdir/probe.json and
  workdir/probe/probe_{segmentation,confusion}.png. Returns the scores."""
  start = time.perf_counter()
  run, variables, network = supervised_run(workdir, overrides or {}, "probe")
  config = run.config
  state = parallel.replicate(
      head_state(
          run.train_source.num_classes,
          run.step_config.feature_channels,
          steps.make_optimizer(config.probe.lr, 0.0, True),
      ),
      run.mesh,
  )
  state, epoch_losses = train_head(
      run,
      state,
      functools.partial(probe_step, run.model, variables, step_config=run.step_config),
      config.probe,
      np.arange(run.train_source.num_examples),
      "probe",
  )
  scores = score_head(run, variables, state.classifier, os.path.join(workdir, "probe", "probe"))
  results = {
      **scores,
      "network": network,
      "train_loss": epoch_losses,
      "label_downsampling": LABEL_DOWNSAMPLING,
      "probe": config.probe.to_dict(),
      "seconds": time.perf_counter() - start,
  }
  reporting.write_json(os.path.join(workdir, PROBE_FILE), results)
  return results
