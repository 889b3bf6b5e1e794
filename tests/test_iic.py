"""IIC's segmentation loss against a float64 loop over displacements, a PyTorch restatement of
the published IID_segmentation_loss(_uncollapsed), and known mutual-information values; its
heads against numpy, and IIC-res12 against the full ResNet-18."""

import math
import sys

import flax.traverse_util
import jax
import numpy as np
import pytest
import torch

from picie_jax.core import iic
from picie_jax.models import iic_heads
from picie_jax.models import resnet

EPS = sys.float_info.epsilon


def numpy_joint(y1, y2, mask, dy, dx):
  """J[i, j] = sum over pixels p with p and p+(dy, dx) inside and valid of y1[p+d, i] y2[p, j],
  in float64 loops over rows and columns."""
  _, height, width, k = y1.shape
  joint = np.zeros((k, k))
  for y in range(height):
    for x in range(width):
      ys, xs = y + dy, x + dx
      if not (0 <= ys < height and 0 <= xs < width):
        continue
      weight = mask[:, ys, xs] * mask[:, y, x]
      joint += np.einsum("b,bi,bj->ij", weight, y1[:, ys, xs], y2[:, y, x])
  return joint


def numpy_information_loss(joint, lamb):
  """The formula on one joint: normalise, symmetrise, marginals, EPS floor, the sum."""
  p = joint / joint.sum()
  p = (p + p.T) / 2
  p_i = np.maximum(p.sum(axis=1, keepdims=True), EPS)
  p_j = np.maximum(p.sum(axis=0, keepdims=True), EPS)
  p = np.maximum(p, EPS)
  return -np.sum(p * (np.log(p) - lamb * np.log(p_i) - lamb * np.log(p_j)))


def numpy_iic_loss(y1, y2, mask, half_window, lamb, per_displacement):
  y1, y2, mask = (np.asarray(a, np.float64) for a in (y1, y2, mask))
  shifts = range(-half_window, half_window + 1)
  joints = [numpy_joint(y1, y2, mask, dy, dx) for dy in shifts for dx in shifts]
  if not per_displacement:
    return numpy_information_loss(sum(joints), lamb)
  return np.mean([numpy_information_loss(j, lamb) for j in joints])


def torch_published_loss(x1_outs, x2_outs, mask_img1, lamb, half_t, uncollapsed):
  """The published code's arithmetic (github xu-ji/IIC, code/utils/segmentation/
  IID_losses.py), NCHW, for x2 already in x1's frame (its affine re-warp is our G) and no
  sparse translation. Restated here from its text, not imported."""
  bn, k, h, w = x1_outs.shape
  mask = mask_img1.view(bn, 1, h, w)
  x1 = (x1_outs * mask).permute(1, 0, 2, 3).contiguous()
  x2 = (x2_outs * mask).permute(1, 0, 2, 3).contiguous()
  p_i_j = torch.nn.functional.conv2d(x1, weight=x2, padding=(half_t, half_t))
  if uncollapsed:
    t_side = 2 * half_t + 1
    p_i_j = p_i_j.permute(2, 3, 0, 1)
    p_i_j = p_i_j / p_i_j.sum(dim=3, keepdim=True).sum(dim=2, keepdim=True)
    p_i_j = (p_i_j + p_i_j.permute(0, 1, 3, 2)) / 2.0
    p_i_mat = p_i_j.sum(dim=2, keepdim=True).repeat(1, 1, k, 1)
    p_j_mat = p_i_j.sum(dim=3, keepdim=True).repeat(1, 1, 1, k)
    norm = t_side * t_side
  else:
    p_i_j = p_i_j.sum(dim=2).sum(dim=2)
    p_i_j = p_i_j / float(p_i_j.sum())
    p_i_j = (p_i_j + p_i_j.t()) / 2.0
    p_i_mat = p_i_j.sum(dim=1).unsqueeze(1)
    p_j_mat = p_i_j.sum(dim=0).unsqueeze(0)
    norm = 1
  p_i_j[(p_i_j < EPS).data] = EPS
  p_i_mat[(p_i_mat < EPS).data] = EPS
  p_j_mat[(p_j_mat < EPS).data] = EPS
  loss = (-p_i_j * (torch.log(p_i_j) - lamb * torch.log(p_i_mat) - lamb * torch.log(p_j_mat))).sum()
  return loss / norm


def random_case(seed, batch=2, height=5, width=6, k=4, masked=True):
  """Logits of two correlated views (so the information is far from 0) and a mask with
  holes."""
  rng = np.random.default_rng(seed)
  logits1 = rng.normal(size=(batch, height, width, k)).astype(np.float32) * 3
  logits2 = logits1 + rng.normal(size=logits1.shape).astype(np.float32)
  mask = (rng.uniform(size=(batch, height, width)) > 0.3).astype(np.float32)
  if not masked:
    mask[:] = 1.0
  return logits1, logits2, mask


def loss_of_logits(logits1, logits2, mask, **kwargs):
  probs1, probs2 = jax.nn.softmax(logits1), jax.nn.softmax(logits2)
  return iic.iic_segmentation_loss(probs1, probs2, mask, **kwargs)[0]


@pytest.mark.parametrize("per_displacement", [True, False])
@pytest.mark.parametrize("half_window,lamb", [(0, 1.0), (1, 1.5), (2, 0.7)])
def test_loss_matches_float64_loops(half_window, lamb, per_displacement):
  logits1, logits2, mask = random_case(half_window)
  probs1, probs2 = jax.nn.softmax(logits1), jax.nn.softmax(logits2)
  loss, loss_no_lamb = iic.iic_segmentation_loss(
      probs1, probs2, mask, half_window=half_window, lamb=lamb, per_displacement=per_displacement
  )
  args = (np.asarray(probs1), np.asarray(probs2), mask, half_window)
  expected = numpy_iic_loss(*args, lamb, per_displacement)
  # The loss is a difference of O(1) entropies summed in float32: about 1e-7 absolute error.
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(
      float(loss_no_lamb), numpy_iic_loss(*args, 1.0, per_displacement), rtol=1e-5, atol=1e-6
  )


def test_displaced_joints_pair_view1_at_p_plus_t_with_view2_at_p():
  """One-hot maps: view 1 class 0 only at (1, 2), view 2 class 1 only at (0, 0); the single
  pair is found at displacement (1, 2) and nowhere else."""
  y1 = np.zeros((1, 3, 4, 2), np.float32)
  y2 = np.zeros((1, 3, 4, 2), np.float32)
  y1[0, 1, 2, 0] = 1.0
  y2[0, 0, 0, 1] = 1.0
  joints = np.asarray(iic.displaced_joints(y1, y2, np.ones((1, 3, 4)), half_window=2))
  expected = np.zeros_like(joints)
  expected[2 + 1, 2 + 2, 0, 1] = 1.0
  np.testing.assert_array_equal(joints, expected)


@pytest.mark.parametrize("uncollapsed", [True, False])
@pytest.mark.parametrize("half_window,lamb", [(0, 1.0), (2, 1.5)])
def test_loss_and_gradients_match_published_pytorch(half_window, lamb, uncollapsed):
  logits1, logits2, mask = random_case(10 + half_window, batch=3, height=6, width=7, k=5)
  kwargs = {"half_window": half_window, "lamb": lamb, "per_displacement": uncollapsed}
  loss, (grad1, grad2) = jax.value_and_grad(loss_of_logits, argnums=(0, 1))(
      logits1, logits2, mask, **kwargs
  )

  def nchw(a):
    return torch.tensor(np.moveaxis(a, -1, 1), dtype=torch.float64, requires_grad=True)

  t1, t2 = nchw(logits1), nchw(logits2)
  t_loss = torch_published_loss(
      torch.softmax(t1, dim=1),
      torch.softmax(t2, dim=1),
      torch.tensor(mask, dtype=torch.float64),
      lamb,
      half_window,
      uncollapsed,
  )
  t_loss.backward()
  np.testing.assert_allclose(float(loss), t_loss.item(), rtol=1e-5, atol=1e-6)
  for ours, theirs in ((grad1, t1.grad), (grad2, t2.grad)):
    theirs = np.moveaxis(theirs.numpy(), 1, -1)
    np.testing.assert_allclose(
        np.asarray(ours), theirs, rtol=1e-3, atol=1e-6 * np.abs(theirs).max()
    )


@pytest.mark.parametrize("per_displacement", [True, False])
@pytest.mark.parametrize("half_window", [0, 2])
def test_identical_one_hots_of_uniform_classes_give_minus_log_k(half_window, per_displacement):
  """Every image one class, classes used equally: each P_t is diag(1/K), so the loss is
  -I = -log K (lambda = 1) and -(2 lambda - 1) log K in general (EPS terms aside)."""
  k, height, width = 4, 5, 5
  one_hots = np.repeat(np.eye(k, dtype=np.float32), height * width, axis=0)
  y = one_hots.reshape(k, height, width, k)
  mask = np.ones((k, height, width), np.float32)
  for lamb in (1.0, 1.5):
    loss, loss_no_lamb = iic.iic_segmentation_loss(
        y, y, mask, half_window=half_window, lamb=lamb, per_displacement=per_displacement
    )
    np.testing.assert_allclose(float(loss), -(2 * lamb - 1) * math.log(k), rtol=1e-6)
    np.testing.assert_allclose(float(loss_no_lamb), -math.log(k), rtol=1e-6)


def test_masked_pixels_do_not_count():
  """Changing predictions where the mask is 0 changes neither loss nor gradient elsewhere; a
  fully masked batch gives a finite loss and zero gradients."""
  logits1, logits2, mask = random_case(20)
  changed = np.where(mask[..., None] > 0, logits1, logits1 + 5.0)
  kwargs = {"half_window": 1, "lamb": 1.2}
  np.testing.assert_allclose(
      float(loss_of_logits(changed, logits2, mask, **kwargs)),
      float(loss_of_logits(logits1, logits2, mask, **kwargs)),
      rtol=1e-6,
  )
  grad = jax.grad(loss_of_logits)(logits1, logits2, mask, **kwargs)
  assert np.all(np.asarray(grad)[mask == 0] == 0) and np.any(np.asarray(grad) != 0)
  nothing = np.zeros_like(mask)
  loss, grad = jax.value_and_grad(loss_of_logits)(logits1, logits2, nothing, **kwargs)
  assert np.isfinite(float(loss)) and not np.any(np.asarray(grad))


def test_loss_is_jittable_with_static_window():
  logits1, logits2, mask = random_case(30)
  jitted = jax.jit(loss_of_logits, static_argnames=("half_window", "per_displacement"))
  np.testing.assert_allclose(
      float(jitted(logits1, logits2, mask, half_window=1)),
      float(loss_of_logits(logits1, logits2, mask, half_window=1)),
      rtol=1e-6,
      atol=1e-7,
  )


def test_heads_are_bias_free_1x1_softmaxes_of_the_features():
  features = np.random.default_rng(40).normal(size=(2, 3, 4, 16)).astype(np.float32)
  heads = iic_heads.IICHeads(num_classes=5, num_overcluster=9)
  variables = heads.init(jax.random.key(0), features)
  assert jax.tree.map(np.shape, variables["params"]) == {
      "main": {"kernel": (1, 1, 16, 5)},
      "overcluster": {"kernel": (1, 1, 16, 9)},
  }
  probs = heads.apply(variables, features)
  for name, k in (("main", 5), ("overcluster", 9)):
    logits = features.astype(np.float64) @ np.asarray(variables["params"][name]["kernel"][0, 0])
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    assert probs[name].shape == (2, 3, 4, k) and probs[name].dtype == np.float32
    np.testing.assert_allclose(np.asarray(probs[name]), expected, rtol=1e-5, atol=1e-6)


def test_heads_init_as_iic_kaiming_normal_fan_in():
  heads = iic_heads.IICHeads(num_classes=27)
  kernels = heads.init(jax.random.key(1), np.zeros((1, 1, 1, 256), np.float32))["params"]
  assert kernels["overcluster"]["kernel"].shape[-1] == iic_heads.OVERCLUSTER_K == 45
  values = np.concatenate([np.ravel(k["kernel"]) for k in kernels.values()])  # 18,432 draws
  np.testing.assert_allclose(values.std(), math.sqrt(2.0 / 256), rtol=0.03)
  assert abs(values.mean()) < 3 * math.sqrt(2.0 / 256 / values.size)


def test_res12_is_resnet18_stopped_after_layer2():
  """IIC-res12's features are the full ResNet-18's res3 (stride 8) with the same variables,
  whose names are a subset of ResNet-18's (so ImageNet weights load by skipping layer3/4)."""
  images = np.random.default_rng(50).uniform(size=(2, 64, 64, 3)).astype(np.float32)
  res12 = resnet.TruncatedResNetNet("resnet18_res12", width=8)
  variables = res12.init(jax.random.key(2), images, train=False)
  full = resnet.ResNet(depth=18, width=8)
  full_variables = full.init(jax.random.key(3), images, train=False)
  flat_res12 = flax.traverse_util.flatten_dict(variables)
  flat_full = flax.traverse_util.flatten_dict(full_variables)
  kept = {(c, *path) for c, _, *path in flat_res12}
  assert kept == {
      p for p in flat_full if p[1] in ("conv1", "bn1") or p[1].startswith(("layer1", "layer2"))
  }
  for (collection, _, *path), value in flat_res12.items():
    flat_full[(collection, *path)] = value
  full_variables = flax.traverse_util.unflatten_dict(flat_full)
  for train in (False, True):
    out, updates = res12.apply(variables, images, train=train, mutable=["batch_stats"])
    expected, _ = full.apply(
        full_variables, resnet.normalize_input(images), train=train, mutable=["batch_stats"]
    )
    assert out.shape == (2, 8, 8, 16) and out.dtype == np.float32
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected["res3"]), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="model.backbone='resnet18'"):
    resnet.TruncatedResNetNet("resnet18").init(jax.random.key(0), images, train=False)
