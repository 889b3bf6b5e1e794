"""bfloat16 mixed precision (config.model.dtype): what runs in bf16, and that training in it is
comparable to float32."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from picie_jax import train
from picie_jax.models import fpn


def _model(dtype):
  return fpn.PiCIENet("resnet18", width=8, out_channels=16, dtype=dtype)


def test_bfloat16_convolutions_float32_params_features_and_batch_stats():
  images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
  variables = _model(jnp.float32).init(jax.random.key(1), images, train=False)
  jaxpr = str(
      jax.make_jaxpr(
          lambda v, x: _model(jnp.bfloat16).apply(v, x, train=True, mutable=["batch_stats"])
      )(variables, images)
  )
  assert "bf16[2,32,32,8]" in jaxpr  # the stem convolution's output
  out, updates = _model(jnp.bfloat16).apply(variables, images, train=True, mutable=["batch_stats"])
  assert out.dtype == jnp.float32
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
  want, _ = _model(jnp.float32).apply(variables, images, train=True, mutable=["batch_stats"])
  rel = np.linalg.norm(out - want) / np.linalg.norm(want)
  assert 1e-4 < rel < 3e-2  # rounded to bf16 (8 mantissa bits), and no more than that


def test_bfloat16_training_is_comparable_to_float32(tiny_config, tmp_path):
  """One tiny epoch in each precision: the same losses to 1% and fresh-cluster scores within
  a few points (the bf16 rounding of ~0.4% per op changes which pixels sit on a boundary)."""
  results = {}
  for dtype in ("float32", "bfloat16"):
    config = tiny_config.copy_and_resolve_references()
    config.num_epochs, config.model.dtype = 1, dtype
    final = train.train_and_evaluate(config, str(tmp_path / dtype))
    with open(tmp_path / dtype / "metrics.jsonl") as f:
      record = [json.loads(line) for line in f][-1]
    results[dtype] = (record, final["fresh"])
  (f32, f32_fresh), (bf16, bf16_fresh) = results["float32"], results["bfloat16"]
  for key in ("train_loss_within", "train_loss_cross", "kmeans_init_loss_view1"):
    np.testing.assert_allclose(bf16[key], f32[key], rtol=1e-2, err_msg=key)
  assert abs(bf16_fresh["acc"] - f32_fresh["acc"]) < 3.0
  assert abs(bf16_fresh["miou"] - f32_fresh["miou"]) < 2.0
