"""DINO ViTs in the loop: a DINO-format file (real key names) converted and trained on with a
frozen backbone, MDC and IIC on a ViT end to end, and the optimizer-side freeze."""

import json

from conftest import TINY_OVERRIDES
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch_models import DinoViT
from torch_models import randomize_

from configs import vit_synthetic
from picie_jax import convert
from picie_jax import evaluate
from picie_jax import rundir
from picie_jax import steps
from picie_jax import train


def tiny_vit_config(**overrides):
  """ViT-S/8 cut to one block at res1 32 (4 x 4 tokens): a run of seconds per epoch."""
  config = vit_synthetic.get_config()
  config.update_from_flattened_dict(
      {
          **TINY_OVERRIDES,
          "model.backbone": "vit_small_patch8",
          "model.vit_depth": 1,
          "num_epochs": 1,
          **overrides,
      }
  )
  return config


def test_picie_on_a_frozen_dino_file_trains_the_head_and_evaluates(tmp_path):
  path = tmp_path / "dino_deitsmall8_pretrain.pth"
  dino = randomize_(DinoViT(patch_size=8, dim=384, depth=1, num_heads=6), seed=3)
  torch.save({**dino.state_dict(), "head.last_layer.weight_g": torch.ones(8, 1)}, path)
  config = tiny_vit_config(
      **{
          "model.init": "imagenet",
          "model.init_checkpoint": str(path),
          "model.freeze_backbone": True,
          "model.head": "stego",
      }
  )
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  run = rundir.Run(rundir.saved_config(str(workdir)), str(workdir))
  state, _, _ = rundir.restore_latest(run)
  fresh = rundir.random_variables(run)["params"]
  from_file = convert.load_imagenet_backbone(
      {"params": fresh["backbone"]}, str(path), "vit_small_patch8"
  )
  trained = state.params["network"]
  for got, want in zip(jax.tree.leaves(trained["backbone"]), jax.tree.leaves(from_file["params"])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert not np.allclose(trained["head_mlp_1"]["kernel"], fresh["head_mlp_1"]["kernel"])
  results = evaluate.evaluate_workdir(str(workdir))
  assert np.isfinite(results["epoch_clusters"]["miou"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "mdc", "train.cross_view_loss": False},
        {"method": "iic", "iic.half_window": 1},
    ],
    ids=["mdc", "iic"],
)
def test_baselines_train_on_a_vit(tmp_path, overrides):
  train.train_and_evaluate(tiny_vit_config(**overrides), str(tmp_path))
  with open(tmp_path / "metrics.jsonl") as f:
    (record,) = [json.loads(line) for line in f]
  for key in ("train_loss_total", "acc", "miou"):
    assert np.isfinite(record[key]), key


def test_frozen_backbone_gets_no_update_and_no_moments():
  params = {
      "network": {"backbone": {"w": jnp.ones(5)}, "head": {"w": jnp.ones(3)}},
      "classifier": jnp.ones(2),
  }
  tx = steps.make_optimizer(1e-2, 0.0, True, freeze_backbone=True)
  opt_state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
  assert np.all(updates["network"]["backbone"]["w"] == 0)
  assert np.all(updates["network"]["head"]["w"] != 0)
  moments = [x.size for x in jax.tree.leaves(opt_state) if x.dtype == jnp.float32]
  assert sum(moments) == 2 * (3 + 2)  # Adam's mu and nu of the head and the classifier only


def test_an_unfrozen_optimizer_keeps_the_state_layout_of_older_checkpoints():
  """Without freeze_backbone the optimizer state is Adam per partition as before ViTs existed,
  so checkpoints written then restore (orbax refuses a tree with an extra 'frozen' state)."""
  params = {"network": {"backbone": {"w": jnp.ones(5)}}, "classifier": jnp.ones(2)}
  adam = optax.adam(1e-2)
  older = optax.partition(
      {"network": adam, "classifier": optax.set_to_zero()},
      {"network": "network", "classifier": "classifier"},
  )
  now = steps.make_optimizer(1e-2, 0.0, False).init(params)
  assert jax.tree.structure(now) == jax.tree.structure(older.init(params))
