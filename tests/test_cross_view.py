"""Issue 18 part 5: one batch's within and cross losses, ours against the official loop re-stated
in PyTorch/PIL, from the same per-image draws and the same network.

Official (data/coco_train_dataset.py, data/custom_transforms.py, commons.py, train_picie.py):
  view 1 = RandomHorizontalTensorFlip(RandomResizedCrop(tensor(P1(x))))   (crop at res2, resized
           to res1 by F.interpolate(bilinear, align_corners=False), on the image)
  view 2 = tensor(PIL resize(P2(x), res1, BILINEAR)); its features go through the same crop and
           flip at res1 // 4 (RandomResizedCrop picks the size by the channel count)
  labels: eval mode, features L2-normalised, topk(1) of -(1 - 2<z, mu> + |mu|^2) (nearest
          centroid); weights = label counts / sum, per view
  loss:   train mode; cross = (CE_w2(classifier2(z1), y2) + CE_w1(classifier1(z2), y1)) / 2,
          within = (CE_w1(classifier1(z1), y1) + CE_w2(classifier2(z2), y2)) / 2, every pixel.
P = the uint8 colour jitter of test_reference_quirks, then PIL's GaussianBlur(radius=sigma).

The network is ours on both sides (its parity with torch is test_convert's), so every difference
measured here is the views', the geometric transform's of the features, the labels' or the loss's.
"""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageFilter
import pytest
import test_reference_quirks
import torch
from torch.nn import functional as F

from configs import synthetic as synthetic_config
from picie_jax import parallel
from picie_jax import steps
from picie_jax.core import losses
from picie_jax.core import transforms as T
from picie_jax.data import synthetic
from picie_jax.models import fpn

BATCH, K, RES1, EPOCH = 8, 8, 32, 0
KEY = jax.random.PRNGKey(0)


def _config():
  c = synthetic_config.get_config()
  c.update_from_flattened_dict(
      {
          "model.backbone": "resnet18",
          "model.init": "random",
          "model.width": 8,
          "model.fpn_channels": 16,
          "res1": RES1,
          "res2": 2 * RES1,
          "kmeans.k_train": K,
          "augment.reference_quirks": True,
      }
  )
  return c


def _draws(indices, step_config):
  """Each image's G, P1 and P2 parameters as our loop draws them, as numpy."""
  geo = T.batch_params(
      T.geometric_params, KEY, EPOCH, indices, T.GEOMETRIC_STREAM, step_config.geometric
  )
  photo = [
      T.batch_params(T.photometric_params, KEY, EPOCH, indices, stream, step_config.photometric)
      for stream in (T.VIEW1_PHOTOMETRIC_STREAM, T.VIEW2_PHOTOMETRIC_STREAM)
  ]
  return jax.device_get((geo, photo))


def _indices(step_config, blurred):
  """The first BATCH image indices whose views are all unblurred (`blurred=False`), or each
  blurred in at least one view (`blurred=True`)."""
  candidates = jnp.arange(16 * BATCH)
  _, (p1, p2) = _draws(candidates, step_config)
  has_blur = (p1["blur_sigma"] > 0) | (p2["blur_sigma"] > 0)
  return jnp.asarray(np.flatnonzero(has_blur == blurred)[:BATCH])


def _official_transform_inv(image_u8, photo, i):
  """TrainCOCO.transform_inv: the colour jitter on uint8, then PIL's GaussianBlur (its radius
  |3.8 (u - 0.5) + 0.1|: Pillow blurs a negative radius as its absolute value)."""
  jittered = test_reference_quirks._pil_colour_jitter(  # pylint: disable=protected-access
      image_u8, *(float(photo[k][i]) for k in ("brightness", "contrast", "saturation", "hue"))
  )
  image = Image.fromarray(jittered.astype(np.uint8))
  if photo["blur_sigma"][i] > 0:
    image = image.filter(ImageFilter.GaussianBlur(radius=float(photo["blur_sigma"][i])))
  return image


def _official_tensor(image):
  """transforms.ToTensor() (Normalize is per-channel affine, so it commutes with the crop and
  resize; the network normalises its input on both sides)."""
  return torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1)


def _official_eqv(x_bchw, geo, res_tar):
  """TrainCOCO.transform_eqv: RandomResizedCrop (side int(scale * S), i1 = int(round((S - side)
  * ws)) on rows, j1 on columns, F.interpolate to res_tar) then RandomHorizontalTensorFlip."""
  out = []
  for i in range(x_bchw.shape[0]):
    size = x_bchw.shape[-1]
    side = int(float(geo["scale"][i]) * size)
    top = int(round((size - side) * float(geo["offset_y"][i])))
    left = int(round((size - side) * float(geo["offset_x"][i])))
    crop = x_bchw[[i]][:, :, top : top + side, left : left + side]
    out.append(F.interpolate(crop, res_tar, mode="bilinear", align_corners=False))
  out = torch.cat(out)
  flip = torch.from_numpy(np.array(geo["hflip"]))[:, None, None, None]
  return torch.where(flip, out.flip([3]), out)


def _official_views(images_u8, geo, photo):
  """(view 1, view 2) NCHW in [0, 1] as TrainCOCO and train() build them."""
  p1, p2 = photo
  view1 = torch.stack(
      [_official_tensor(_official_transform_inv(x, p1, i)) for i, x in enumerate(images_u8)]
  )
  view2 = torch.stack(
      [
          _official_tensor(_official_transform_inv(x, p2, i).resize((RES1, RES1), Image.BILINEAR))
          for i, x in enumerate(images_u8)
      ]
  )
  return _official_eqv(view1, geo, RES1), view2


def _official_losses(network, views, geo, centroids):
  """compute_labels (eval mode) then train()'s within and cross losses (train mode), in torch:
  ({'within', 'cross'}, [labels (B, h, w) per view])."""
  mu = [torch.from_numpy(np.array(c)) for c in centroids]

  def features(train):
    z1 = network(views[0], train)
    z2 = _official_eqv(network(views[1], train), geo, RES1 // 4)
    return F.normalize(z1, dim=1, p=2), F.normalize(z2, dim=1, p=2)

  labels, weights = [], []
  for z, m in zip(features(train=False), mu):
    scores = -(1 - 2 * F.conv2d(z, m[:, :, None, None]) + (m * m).sum(1)[None, :, None, None])
    labels.append(scores.topk(1, dim=1)[1][:, 0])
    counts = torch.bincount(labels[-1].flatten(), minlength=len(m)).float()
    weights.append(counts / counts.sum())

  def criterion(z, view):  # CrossEntropyLoss(weight)(feature_flatten(classifier(z)), y.flatten())
    logits = F.conv2d(z, mu[view][:, :, None, None])
    flat = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])
    return F.cross_entropy(flat, labels[view].flatten(), weight=weights[view])

  z1, z2 = features(train=True)
  within = (criterion(z1, 0) + criterion(z2, 1)) / 2
  cross = (criterion(z1, 1) + criterion(z2, 0)) / 2
  return {"within": float(within), "cross": float(cross)}, [y.numpy() for y in labels]


class _Setup:
  """The model, its variables and our jitted pieces, compiled once for the module."""

  def __init__(self):
    config = _config()
    self.step_config = steps.step_config_from_config(config, parallel.make_mesh())
    self.model = fpn.model_from_config(config.model, "cpu")
    self.variables = steps.init_variables(self.model, jax.random.PRNGKey(1), RES1)
    # BN statistics away from (0, 1), so eval and train mode differ as they do in training
    self.variables = {
        **self.variables,
        "batch_stats": jax.tree.map(
            lambda s: s + 0.3 * jnp.abs(jax.random.normal(KEY, s.shape)),
            self.variables["batch_stats"],
        ),
    }
    self.view_images = jax.jit(
        lambda images, indices: steps.view_images(
            images, indices, EPOCH, KEY, self.step_config, train_phase=True
        )[0]
    )
    self.losses_of_views = jax.jit(self._losses_of_views)
    self.apply = jax.jit(self._apply, static_argnames="train")

  def _apply(self, x_bhwc, train):
    if not train:
      return self.model.apply(self.variables, x_bhwc, train=False)
    return self.model.apply(self.variables, x_bhwc, train=True, mutable=["batch_stats"])[0]

  def network(self, x_bchw, train):
    """Our network on torch NCHW images in [0, 1]: NCHW features."""
    z = self.apply(jnp.asarray(x_bchw.numpy().transpose(0, 2, 3, 1)), train=train)
    return torch.from_numpy(np.asarray(z).transpose(0, 3, 1, 2).copy())

  def _losses_of_views(self, views, batch, centroids):
    """Our label pass and loss (steps.label_counts' labels_for_batch, steps.loss_and_grads) with
    `views` as the network inputs: ({'within', 'cross', 'total'}, [labels per view])."""
    with pytest.MonkeyPatch.context() as patch:
      geo = T.batch_params(
          T.geometric_params,
          KEY,
          EPOCH,
          batch["index"],
          T.GEOMETRIC_STREAM,
          self.step_config.geometric,
      )
      patch.setattr(steps, "view_images", lambda *args, **kwargs: (views, geo))
      targets = steps.EpochTargets(
          frozen=self.variables, centroids=centroids, weights=jnp.ones((2, K))
      )
      labels = steps.labels_for_batch(self.model, targets, batch, EPOCH, KEY, self.step_config)
      counts = [jnp.bincount(y.reshape(-1), length=K) for y in labels]
      targets = targets.replace(weights=jnp.stack([losses.balance_weights(c) for c in counts]))
      state = steps.TrainState.create(
          self.variables,
          steps.init_classifier(KEY, 2, K, self.step_config.feature_channels),
          steps.make_optimizer(1e-4, 0.0, train_classifier=False),
      )
      (_, (out, _)), _ = steps.loss_and_grads(
          self.model, state, targets, batch, labels, EPOCH, KEY, self.step_config
      )
    return out, labels


@pytest.fixture(scope="module")
def setup():
  return _Setup()


def _batch(indices):
  images = np.stack([synthetic.generate_example(0, int(i), 2 * RES1)[0] for i in indices])
  return images, {"image": jnp.asarray(images), "index": indices, "mask": jnp.ones(BATCH, bool)}


def _both_ways(setup, blurred, centroids=None):
  """One batch through both loops from the same draws. Returns the views' differences (x255:
  mean, max per view) and {name: ({'within', 'cross'}, labels)} for ours and the official
  restatement, each on its own views and on the other's."""
  indices = _indices(setup.step_config, blurred)
  images, batch = _batch(indices)
  geo, photo = _draws(indices, setup.step_config)
  ours_views = setup.view_images(batch["image"], indices)
  official_views = _official_views(images, geo, photo)
  view_differences = [
      (float(d.mean()), float(d.max()))
      for d in (
          np.abs(np.asarray(o) - t.numpy().transpose(0, 2, 3, 1)) * 255
          for o, t in zip(ours_views, official_views)
      )
  ]
  if centroids is None:  # K pixels of each view's official eval features
    rng = np.random.default_rng(0)
    points = [
        z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).numpy()
        for z in _official_losses_features(setup, official_views, geo)
    ]
    centroids = jnp.asarray(np.stack([p[rng.choice(len(p), K, replace=False)] for p in points]))
  official_nhwc = [jnp.asarray(v.numpy().transpose(0, 2, 3, 1)) for v in official_views]
  ours_nchw = [torch.from_numpy(np.asarray(v).transpose(0, 3, 1, 2).copy()) for v in ours_views]
  runs = {
      "ours": setup.losses_of_views(list(ours_views), batch, centroids),
      "ours_on_official_views": setup.losses_of_views(official_nhwc, batch, centroids),
      "official": _official_losses(setup.network, official_views, geo, centroids),
      "official_on_our_views": _official_losses(setup.network, ours_nchw, geo, centroids),
  }
  return view_differences, {
      name: ({k: float(out[k]) for k in ("within", "cross")}, [np.asarray(y) for y in labels])
      for name, (out, labels) in runs.items()
  }


def _official_losses_features(setup, views, geo):
  """Each view's eval-mode features in view 1's frame, normalised, as compute_labels has them."""
  z1 = setup.network(views[0], train=False)
  z2 = _official_eqv(setup.network(views[1], train=False), geo, RES1 // 4)
  return F.normalize(z1, dim=1, p=2), F.normalize(z2, dim=1, p=2)


@pytest.fixture(scope="module")
def unblurred(setup):
  return _both_ways(setup, blurred=False)


@pytest.fixture(scope="module")
def blurred(setup):
  return _both_ways(setup, blurred=True)


@pytest.mark.parametrize("which", ["unblurred", "blurred"])
def test_same_views_give_the_official_labels_and_losses(which, request):
  """Given the same network inputs, our label pass and loss are the official ones: the pairing
  (classifier v with label v and weight v, cross = view 1's features against view 2's labels
  and back), G on view 2's features at res1 // 4, the normalisation, the nearest-centroid
  labels, the frequency weights and the every-pixel weighted mean; to float precision."""
  _, runs = request.getfixturevalue(which)
  for ours, official in (
      ("ours_on_official_views", "official"),
      ("ours", "official_on_our_views"),
  ):
    (ours_losses, ours_labels), (official_losses, official_labels) = runs[ours], runs[official]
    for y_ours, y_official in zip(ours_labels, official_labels):
      np.testing.assert_array_equal(y_ours, y_official)
    for term in ("within", "cross"):
      assert abs(ours_losses[term] - official_losses[term]) < 2e-6, (which, ours, term)


def test_views_differ_by_pils_rounding_and_its_blur_only(unblurred, blurred):
  """From the same draws, the views (x255) differ by what the quirks do not reproduce:
  unblurred, the jitter's float rounding at uint8 truncation (view 1: mean 0.003, max 1.8)
  and PIL's uint8 rounding of its 64 -> 32 resize (view 2: mean 0.29, max 1.3); blurred, PIL's
  box-blur approximation against our Gaussian taps (means 0.68 / 0.54, max 14 / 22)."""
  (v1_mean, v1_max), (v2_mean, v2_max) = unblurred[0]
  assert v1_mean < 0.01 and v1_max < 4 and 0.2 < v2_mean < 0.35 and v2_max < 2
  for mean, largest in blurred[0]:
    assert 0.3 < mean < 1.0 and largest < 30


def test_both_loops_give_the_same_losses_from_the_same_draws(unblurred, blurred):
  """Each loop on its own views: the within and cross losses of one batch differ by less than
  1e-3 (measured here: unblurred +0.00095 / +0.00063, blurred -0.00048 / -0.00073; on the
  trained synthetic demo network with its centroids, 16 images at res1 64, ours is lower by
  0.0001-0.0007), not the +0.05 cross offset issue 18 saw between the two trainings."""
  for runs in (unblurred[1], blurred[1]):
    for term in ("within", "cross"):
      assert abs(runs["ours"][0][term] - runs["official"][0][term]) < 2e-3, term
    for y_ours, y_official in zip(runs["ours"][1], runs["official"][1]):
      assert (y_ours == y_official).mean() > 0.97
