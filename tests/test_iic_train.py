"""IIC in the loop (config.method='iic'): its train step against an independent recomputation
(FPN and IIC-res12), the network's variables as PiCIE's, and a tiny run end to end with its
evaluation by the main head."""

import json

from conftest import TINY_OVERRIDES
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_iic import numpy_iic_loss

from configs import iic_synthetic
from configs import synthetic
from picie_jax import config_check
from picie_jax import evaluate
from picie_jax import parallel
from picie_jax import rundir
from picie_jax import steps
from picie_jax import train
from picie_jax.core import transforms as T
from picie_jax.data import pipeline


def tiny_iic_config(**overrides):
  config = iic_synthetic.get_config()
  config.update_from_flattened_dict({**TINY_OVERRIDES, **overrides})
  return config


def numpy_softmax(logits):
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("backbone,side", [("resnet18", 32 // 4), ("resnet18_res12", 32 // 8)])
def test_train_step_loss_is_the_heads_mi_of_the_two_views(backbone, side):
  """One IIC step of each head: its losses against the features of a plain train-mode apply,
  the head in float64 numpy, G on view 2's probabilities and the float64 loss, with the last
  image padded; the first step does not move the other head's kernel (zero gradient)."""
  config = tiny_iic_config(**{"model.backbone": backbone, "iic.lamb_main": 1.3})
  run = rundir.Run(config, "/tmp/unused")
  assert run.step_config.feature_stride == 32 // side
  state, targets = rundir.initial_state(run)
  host_batch = next(pipeline.pass_batches(run.train_source, 4, config.res2))
  host_batch["mask"] = host_batch["mask"].copy()
  host_batch["mask"][-1] = False
  batch = parallel.shard_host_batch(host_batch, run.mesh)
  for head in steps.IIC_HEADS:
    (v1, v2), geo = steps.view_images(
        batch["image"], batch["index"], 0, run.augment_key, run.step_config, train_phase=True
    )
    probs = []
    batch_stats = state.batch_stats
    for view, images in enumerate((v1, v2)):
      z, updates = run.model.apply(
          {"params": state.params["network"], "batch_stats": batch_stats},
          images,
          train=True,
          mutable=["batch_stats"],
      )
      batch_stats = updates["batch_stats"]
      kernel = np.asarray(state.classifier[head]["kernel"][0, 0], np.float64)
      p = numpy_softmax(np.asarray(z, np.float64) @ kernel)
      if view == 1:
        p = np.asarray(T.apply_geometric(jnp.asarray(p, jnp.float32), geo, side), np.float64)
      assert p.shape[1:3] == (side, side)
      probs.append(p)
    mask = np.broadcast_to(host_batch["mask"][:, None, None], probs[0].shape[:3])
    lamb = 1.3 if head == "main" else 1.0
    expected = numpy_iic_loss(probs[0], probs[1], mask, 1, lamb, True)
    mutual_information = -numpy_iic_loss(probs[0], probs[1], mask, 1, 1.0, True)

    before = jax.tree.map(np.array, state.classifier)
    state, out = steps.train_step(
        run.model, state, targets, batch, 0, run.augment_key, step_config=run.step_config, head=head
    )
    np.testing.assert_allclose(float(out["total"]), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        float(out["mutual_information"]), mutual_information, rtol=1e-4, atol=1e-5
    )
    if head == steps.IIC_HEADS[0]:  # later, Adam's momentum moves it (one Adam, as IIC's)
      (other,) = set(steps.IIC_HEADS) - {head}
      np.testing.assert_array_equal(state.classifier[other]["kernel"], before[other]["kernel"])
    assert np.any(np.asarray(state.classifier[head]["kernel"]) != before[head]["kernel"])


def test_network_variables_are_picies():
  """IIC's heads live in the state's 'classifier' params: the network's tree is PiCIE's."""
  iic_state, _ = rundir.initial_state(rundir.Run(tiny_iic_config(), "/tmp/unused"))
  picie = synthetic.get_config()
  picie.update_from_flattened_dict(TINY_OVERRIDES)
  picie_state, _ = rundir.initial_state(rundir.Run(picie, "/tmp/unused"))
  shapes = lambda tree: jax.tree.map(np.shape, tree)  # noqa: E731
  assert shapes(iic_state.variables) == shapes(picie_state.variables)
  assert shapes(iic_state.classifier) == {
      "main": {"kernel": (1, 1, 16, 8)},
      "overcluster": {"kernel": (1, 1, 16, 45)},
  }


def test_res12_features_set_the_stride_and_channels():
  run = rundir.Run(tiny_iic_config(**{"model.backbone": "resnet18_res12"}), "/tmp/unused")
  assert (run.step_config.feature_stride, run.step_config.feature_channels) == (8, 16)
  variables = rundir.random_variables(run)
  z = run.model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=False)
  assert z.shape == (1, 4, 4, 16)


@pytest.fixture(scope="module")
def iic_run(tmp_path_factory):
  """A tiny one-epoch IIC run: (workdir, final)."""
  workdir = tmp_path_factory.mktemp("iic")
  return workdir, train.train_and_evaluate(tiny_iic_config(num_epochs=1), str(workdir))


def test_iic_run_trains_both_heads_and_scores_the_main_head(iic_run):
  workdir, final = iic_run
  with open(workdir / "metrics.jsonl") as f:
    (record,) = [json.loads(line) for line in f]
  assert record["step"] == 2 * 3  # a pass per head, 48 images / batch 16
  assert not any(k.startswith("kmeans") for k in record)
  for key in ("train_loss_total", "train_loss_mutual_information", "acc", "miou"):
    assert np.isfinite(record[key]), key
  assert set(final) == {"main_head"} and final["main_head"]["k"] == 8
  assert final["main_head"]["acc"] == record["acc"]  # the last epoch's head, scored the same
  with open(workdir / "final.json") as f:
    assert json.load(f)["main_head"]["miou"] == final["main_head"]["miou"]
  with open(workdir / "matching.json") as f:
    assert sorted(json.load(f)["cluster_to_class"]) == list(range(8))
  for name in ("final_main_head_segmentation.png", "vis/epoch000_confusion.png"):
    assert (workdir / name).stat().st_size > 0, name


def test_eval_of_an_iic_run_scores_its_main_head_again(iic_run):
  workdir, final = iic_run
  results = evaluate.evaluate_workdir(str(workdir))
  assert set(results) == {"main_head"}
  assert results["main_head"]["acc"] == final["main_head"]["acc"]


def test_iic_config_errors_name_the_key():
  config = tiny_iic_config(**{"iic.lamb_main": 0.0, "train.classifier": "parametric"})
  config.iic.half_window = -1
  with pytest.raises(ValueError) as e:
    config_check.validate(config)
  for key in ("iic.lamb_main", "iic.half_window", "train.classifier"):
    assert f"config.{key}" in str(e.value), key
