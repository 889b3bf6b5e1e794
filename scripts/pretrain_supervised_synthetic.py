"""A labelled stand-in for the paper's ImageNet initialisation, for diagnostics only.

PiCIE starts from a pretrained backbone; from random init its first clusters carry no class
signal (docs/results.md). This script trains the synthetic demo network with ground-truth
labels on a synthetic split disjoint from train and val (seed 3000) for a few epochs and saves
Flax {'params', 'batch_stats'} for `--config.model.init_checkpoint`. It uses labels, so
numbers obtained from it are NOT unsupervised results; they show how the methods behave from
an initialisation that already carries some signal, as ImageNet features do.

  python scripts/pretrain_supervised_synthetic.py --out workdirs/pretrained.msgpack --epochs 2
"""

import argparse
import functools

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import synthetic as synthetic_config
from picie_jax import convert
from picie_jax import rundir
from picie_jax import steps
from picie_jax.core import losses
from picie_jax.core import transforms as T
from picie_jax.data import synthetic

_LOGIT_SCALE = 10.0  # a learned linear head on normalised features needs a temperature


@functools.partial(jax.jit, static_argnames=("run", "tx"))
def _step(run, tx, params, opt_state, batch_stats, images, labels, indices, epoch):
  num_classes = synthetic.NUM_CLASSES

  def loss_fn(p):
    model_params, head = p
    feats, new_stats = steps.view_features(
        run.model,
        {"params": model_params, "batch_stats": batch_stats},
        images,
        indices,
        epoch,
        run.augment_key,
        run.step_config,
        True,
        views=(0,),
    )
    geo = T.batch_params(
        T.geometric_params,
        run.augment_key,
        epoch,
        indices,
        T.GEOMETRIC_STREAM,
        run.step_config.geometric,
    )
    target = T.apply_geometric(jax.nn.one_hot(labels, num_classes), geo, feats[0].shape[1]).argmax(
        -1
    )
    logits = losses.prototype_logits(steps.with_bias_column(feats[0]), head) * _LOGIT_SCALE
    return losses.weighted_cross_entropy(logits, target, jnp.ones(num_classes)), new_stats

  (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, new_stats, loss


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", required=True)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument("--num-images", type=int, default=768)
  args = parser.parse_args()
  config = synthetic_config.get_config()
  run = rundir.Run(config, "/unused")
  state, _ = rundir.initial_state(
      run, convert.initial_variables(rundir.random_variables(run), config.model)
  )
  images, labels = synthetic.generate_split(3000, 0, args.num_images, config.dataset.synthetic_size)
  head = jnp.zeros((synthetic.NUM_CLASSES, config.model.fpn_channels + 1))
  params = (state.variables["params"], head)
  tx = optax.adam(config.train.lr)  # the run's optimizer (config.train.weight_decay is 0)
  opt_state, batch_stats = tx.init(params), state.batch_stats
  batch = config.train.batch_size
  for epoch in range(args.epochs):
    order = np.random.default_rng(epoch).permutation(args.num_images)
    for start in range(0, args.num_images - batch + 1, batch):
      idx = order[start : start + batch]
      params, opt_state, batch_stats, loss = _step(
          run,
          tx,
          params,
          opt_state,
          batch_stats,
          jnp.asarray(images[idx]),
          jnp.asarray(labels[idx].astype(np.int32)),
          jnp.asarray(idx),
          epoch,
      )
    print(f"epoch {epoch}: loss {float(loss):.3f}")
  with open(args.out, "wb") as f:
    f.write(
        flax.serialization.msgpack_serialize(
            {"params": jax.device_get(params[0]), "batch_stats": jax.device_get(batch_stats)}
        )
    )
  print("wrote", args.out)


if __name__ == "__main__":
  main()
