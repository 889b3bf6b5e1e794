"""The fresh clusters of the final evaluation: their input, order and BatchNorm mode, against
the evaluation path and torch's BatchNorm2d."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from picie_jax import evaluate
from picie_jax import parallel
from picie_jax import steps
from picie_jax.data import datasets
from picie_jax.data import pipeline
from picie_jax.models import layers

MESH = parallel.make_mesh()


class PooledBatchNorm(nn.Module):
  """A stand-in network: stride-4 average pooling, then one BatchNorm (torch semantics)."""

  @nn.compact
  def __call__(self, images_bhwc, train):
    pooled = nn.avg_pool(images_bhwc, (4, 4), strides=(4, 4))
    return layers.BatchNorm()(pooled, use_running_average=not train)


@pytest.fixture
def fresh_setup(tiny_config):
  """(config, model, variables with non-trivial BN statistics, train source); eval.res lies
  between res1 and res2, so the evaluation input is resized twice."""
  config = tiny_config
  config.eval.res = 48
  model = PooledBatchNorm()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, config.res1, config.res1, 3)), False)
  rng = np.random.default_rng(0)
  variables = {
      "params": {"BatchNorm_0": {"scale": rng.uniform(0.5, 2, 3), "bias": rng.normal(size=3)}},
      "batch_stats": {"BatchNorm_0": {"mean": rng.uniform(0, 1, 3), "var": rng.uniform(0.5, 2, 3)}},
  }
  variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)
  return config, model, variables, datasets.build_source(config, "train")


def _fresh(config, model, variables, source, k=4):
  step_config = steps.step_config_from_config(config, MESH)
  return evaluate.fresh_centroids(
      model, variables, source, config, MESH, step_config, k, jax.random.PRNGKey(1), False
  )


def _recording(monkeypatch, name, seen):
  """Wraps steps.<name> to record each valid image of its batches by index, in order."""
  real = getattr(steps, name)

  def wrapper(model, variables, *args, **kwargs):
    batch = next(a for a in args if isinstance(a, dict))
    valid = np.asarray(batch["mask"])
    for index, image in zip(np.asarray(batch["index"])[valid], np.asarray(batch["image"])[valid]):
      seen.append((int(index), image))
    return real(model, variables, *args, **kwargs)

  monkeypatch.setattr(steps, name, wrapper)


def test_fresh_cluster_input_is_the_evaluation_input_in_a_seeded_order(fresh_setup, monkeypatch):
  config, model, variables, source = fresh_setup
  fresh_images, eval_images = [], []
  _recording(monkeypatch, "fresh_features", fresh_images)
  _recording(monkeypatch, "eval_step", eval_images)
  _fresh(config, model, variables, source)
  classifier = steps.classifier_from_centroids(jnp.eye(4, 3), "cosine")
  step_config = steps.step_config_from_config(config, MESH)
  evaluate.evaluate(model, variables, classifier, source, config, MESH, step_config, progress=False)
  order = [index for index, _ in fresh_images]
  np.testing.assert_array_equal(
      order, pipeline.epoch_order(source.num_examples, config.seed, 0, pipeline.FRESH_ORDER)
  )
  evaluated = dict(eval_images)
  assert sorted(evaluated) == sorted(order)
  for index, image in fresh_images:
    assert image.shape == (config.eval.res, config.eval.res, 3)
    np.testing.assert_array_equal(image, evaluated[index])


def _torch_fresh_pass(config, variables, source):
  """The official fresh pass in torch: the evaluation images (read here in index order,
  resized to res1 by torch's bilinear) in the fresh order, through pooling and a
  BatchNorm2d in train mode. Returns its (running_mean, running_var)."""
  images = np.concatenate([b["image"] for b in pipeline.pass_batches(source, 8, config.eval.res)])[
      : source.num_examples
  ]
  bn = torch.nn.BatchNorm2d(3, momentum=0.1)
  stats = variables["batch_stats"]["BatchNorm_0"]
  bn.running_mean.copy_(torch.tensor(np.asarray(stats["mean"])))
  bn.running_var.copy_(torch.tensor(np.asarray(stats["var"])))
  bn.train()
  order = pipeline.epoch_order(source.num_examples, config.seed, 0, pipeline.FRESH_ORDER)
  with torch.no_grad():
    for batch in order.reshape(-1, config.kmeans.batch_size):
      x = torch.tensor(images[batch], dtype=torch.float32).permute(0, 3, 1, 2) / 255
      x = torch.nn.functional.interpolate(x, size=config.res1, mode="bilinear", align_corners=False)
      bn(torch.nn.functional.avg_pool2d(x, 4))
  return bn.running_mean.numpy(), bn.running_var.numpy()


def test_train_mode_fresh_pass_moves_the_running_averages_as_torch(fresh_setup, monkeypatch):
  """eval.fresh_bn='train': batch statistics, one update per batch (momentum 0.1, unbiased
  variance), and the final evaluation scores with the moved statistics; 'eval' moves nothing."""
  config, model, variables, source = fresh_setup
  assert source.num_examples % config.kmeans.batch_size == 0  # no padded batch
  centroids_eval, _, unmoved = _fresh(config, model, variables, source)
  for a, b in zip(jax.tree.leaves(unmoved), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  config.eval.fresh_bn = "train"
  centroids_train, _, moved = _fresh(config, model, variables, source)
  want_mean, want_var = _torch_fresh_pass(config, variables, source)
  got = moved["batch_stats"]["BatchNorm_0"]
  np.testing.assert_allclose(got["mean"], want_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["var"], want_var, rtol=1e-5, atol=1e-6)
  assert not np.allclose(got["mean"], variables["batch_stats"]["BatchNorm_0"]["mean"])
  assert not np.allclose(centroids_train, centroids_eval, atol=1e-3)

  scored = []

  def record_scored_variables(model, variables, *args, **kwargs):
    scored.append(variables)
    return {}, None

  monkeypatch.setattr(evaluate, "evaluate", record_scored_variables)
  step_config = steps.step_config_from_config(config, MESH)
  evaluate.final_evaluation(
      model, variables, source, source, config, MESH, step_config, jax.random.PRNGKey(1), "/tmp"
  )
  (used,) = scored
  for a, b in zip(jax.tree.leaves(used["batch_stats"]), jax.tree.leaves(moved["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-6)
