"""The jitted per-batch functions of every phase: views, features, labels, train and eval steps.

Everything here is pure: variables, centroids and batches in, arrays out. `StepConfig` carries the
static choices (views, classifier, metric, transform configs) so one code path serves PiCIE,
its ablations, MDC and the raw-pixel baseline.
"""

import functools
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import optax

from picie_jax import platform as platform_lib
from picie_jax.core import kmeans
from picie_jax.core import losses
from picie_jax.core import metrics
from picie_jax.core import transforms as T

FEATURE_STRIDE = 4


class StepConfig(NamedTuple):
  """The static choices of the per-batch steps (views, classifier, metric, transforms),
  hashable for jit: one code path serves PiCIE, its ablations, MDC and the pixel baseline."""

  num_views: int  # 2 for PiCIE, 1 for MDC
  use_cross: bool
  parametric: bool  # learned 1x1 classifier (MDC) instead of the centroids
  pixels: bool  # raw-pixel baseline: features are the image's colours, no network
  metric: str  # 'cosine' or 'l2'
  res1: int
  cached_labels: bool  # train_step takes the labels from batch['labels'] (the label cache)
  photometric: T.PhotometricConfig
  geometric: T.GeometricConfig
  # the devices the steps are compiled for: the label search's shard_map, and the platform
  # whose forms of the ops are traced (platform.platform_of), whatever the host's backend
  mesh: Mesh
  # reference_quirks: view 2 resized res2 -> res1 as PIL does (antialiased), not plain bilinear
  antialiased_view2: bool = False
  # reference_quirks on Cityscapes: its official loader trains on view 1 without P1 (its
  # 'train' mode passes the un-jittered image on); clustering and labels still see G(P1(x))
  jitter_train_view1: bool = True


def step_config_from_config(config, mesh):
  a = config.augment
  return StepConfig(
      num_views=1 if config.method == "mdc" else 2,
      use_cross=config.method == "picie" and config.train.cross_view_loss,
      parametric=config.train.classifier == "parametric",
      pixels=config.method == "pixel_kmeans",
      metric=config.kmeans.metric,
      res1=config.res1,
      cached_labels=config.train.labels == "cached",
      photometric=T.PhotometricConfig(
          brightness=a.brightness,
          contrast=a.contrast,
          saturation=a.saturation,
          hue=a.hue,
          jitter_p=a.jitter_p,
          grayscale_p=a.grayscale_p,
          blur_p=a.blur_p,
          blur_sigma=tuple(a.blur_sigma),
          blur_max_radius=a.blur_max_radius,
          reference_quirks=a.reference_quirks,
          enabled=a.photometric,
      ),
      geometric=T.GeometricConfig(
          min_scale=a.min_scale,
          max_scale=a.max_scale,
          hflip_p=a.hflip_p,
          vflip_p=a.vflip_p,
          enabled=a.geometric,
      ),
      mesh=mesh,
      antialiased_view2=a.reference_quirks,
      jitter_train_view1=not (a.reference_quirks and config.dataset.name == "cityscapes27"),
  )


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, and the optimizer that changes it (static, as
  flax's TrainState carries it). `params` = {'network': the model's params, 'classifier':
  (V, K, C+1) 1x1 convs, trained when parametric (MDC)}."""

  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: optax.OptState
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, variables, classifier, tx):
    """Step 0 of the network's `variables` ({'params', 'batch_stats'}) and `classifier`."""
    params = {"network": variables["params"], "classifier": classifier}
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        tx=tx,
    )

  @property
  def variables(self):
    """The network's {'params', 'batch_stats'}, as model.apply takes them."""
    return {"params": self.params["network"], "batch_stats": self.batch_stats}

  @property
  def classifier(self):
    return self.params["classifier"]

  def apply_gradients(self, grads, batch_stats):
    """One optimizer step of `grads` (shaped as `params`); the pass's BN statistics kept."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    return self.replace(
        step=self.step + 1,
        params=optax.apply_updates(self.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )

  def with_new_classifier(self, classifier):
    """`classifier` in place of the current one, with fresh optimizer moments (MDC's restart
    every epoch); the network's moments are kept."""
    params = {**self.params, "classifier": classifier}
    fresh = self.tx.init(params).inner_states["classifier"]
    inner_states = {**self.opt_state.inner_states, "classifier": fresh}
    return self.replace(params=params, opt_state=self.opt_state._replace(inner_states=inner_states))


@flax.struct.dataclass
class EpochTargets:
  """What the label phase fixes for an epoch: frozen variables, centroids and class weights."""

  frozen: dict  # {'params', 'batch_stats'} as after the cluster phase
  centroids: jax.Array  # (V, K, C)
  weights: jax.Array  # (V, K)


def with_bias_column(z):
  """Appends a constant 1 channel so a (K, C+1) matrix acts as a 1x1 conv with bias."""
  return jnp.concatenate([z, jnp.ones(z.shape[:-1] + (1,), z.dtype)], axis=-1)


def classifier_from_centroids(centroids_kc, metric):
  """(K, C+1) weights whose argmax is the reference's prediction for these centroids.

  cosine: logits <z, mu_k> (the reference's frozen 1x1 conv); l2: 2<z, mu_k> - |mu_k|^2,
  whose argmax is the nearest centroid.
  """
  if metric == "cosine":
    bias = jnp.zeros(centroids_kc.shape[:1], centroids_kc.dtype)
    return jnp.concatenate([centroids_kc, bias[:, None]], axis=-1)
  sq_norm = jnp.sum(centroids_kc * centroids_kc, axis=-1, keepdims=True)
  return jnp.concatenate([2 * centroids_kc, -sq_norm], axis=-1)


def init_classifier(key, num_views, k, channels):
  """The official `get_linear` init, one classifier per view: weight N(0, 0.01), zero bias."""
  weight = 0.01 * jax.random.normal(key, (num_views, k, channels), jnp.float32)
  return jnp.concatenate([weight, jnp.zeros((num_views, k, 1), jnp.float32)], axis=-1)


def _to_float_images(images_uint8):
  return images_uint8.astype(jnp.float32) / 255.0


def view_images(images_uint8, indices, epoch, key, step_config, train_phase=False):
  """The network inputs of each view in [0, 1], plus G's parameters (DESIGN §1 'two views').

  view 1 = G(P1(x)) resized to res1; view 2 = P2(x) resized to res1 (G comes after f).
  `train_phase`: the inputs of the loss, where `step_config.jitter_train_view1=False` drops P1.
  """
  x = _to_float_images(images_uint8)
  platform = platform_lib.platform_of(step_config.mesh)
  geo = T.batch_params(
      T.geometric_params, key, epoch, indices, T.GEOMETRIC_STREAM, step_config.geometric
  )
  streams = (T.VIEW1_PHOTOMETRIC_STREAM, T.VIEW2_PHOTOMETRIC_STREAM)[: step_config.num_views]
  views = []
  for view, stream in enumerate(streams):
    photo = T.batch_params(
        T.photometric_params, key, epoch, indices, stream, step_config.photometric
    )
    coloured = T.apply_colour(x, photo, step_config.photometric)  # P = blur(colour), blur in resize
    blur = T.blur_kernels(photo, step_config.photometric)
    if view == 0:
      if train_phase and not step_config.jitter_train_view1:
        views.append(T.apply_geometric(x, geo, step_config.res1))
      else:
        views.append(T.apply_geometric(coloured, geo, step_config.res1, blur, platform))
    elif step_config.antialiased_view2:
      views.append(T.resize_antialiased(coloured, step_config.res1, blur, platform))
    else:
      views.append(T.resize_bilinear(coloured, step_config.res1, blur, platform))
  return views, geo


def network_features(model, variables, images_01, train):
  """Raw f_theta features (B, h, w, C) and the batch statistics the pass leaves behind."""
  out, updates = model.apply(
      variables, images_01, train=train, mutable=["batch_stats"] if train else []
  )
  return out, (updates["batch_stats"] if train else variables["batch_stats"])


def pixel_features(images_01):
  """The raw-pixel baseline's 'features': colours averaged over each stride-4 cell."""
  b, h, w, c = images_01.shape
  s = FEATURE_STRIDE
  return images_01.reshape(b, h // s, s, w // s, s, c).mean(axis=(2, 4))


def _raw_features(model, variables, images_01, step_config, train):
  """(features (B, h, w, C), batch_stats): the network's, or the pixels' for the baseline."""
  if step_config.pixels:
    return pixel_features(images_01), variables.get("batch_stats")
  return network_features(model, variables, images_01, train)


def _in_metric_space(z, step_config):
  """Features as k-means and the classifier see them: L2-normalised for the cosine metric."""
  return kmeans.normalize_features(z) if step_config.metric == "cosine" else z


def _one_view_features(model, params, batch_stats, images_by_view, geo, view, step_config, train):
  """View `view`'s features in view 1's frame (G after f for view 2), in the metric's space."""
  z, batch_stats = _raw_features(
      model,
      {"params": params, "batch_stats": batch_stats},
      images_by_view[view],
      step_config,
      train,
  )
  if view == 1:
    z = T.apply_geometric(z, geo, z.shape[1])
  return _in_metric_space(z, step_config), batch_stats


def view_features(
    model, variables, images_uint8, indices, epoch, key, step_config, train, train_phase=False
):
  """Each view's features in the common frame of view 1, normalised for the cosine metric.

  `train_phase` as in view_images. variables['batch_stats'] is one tree, moved by view 1's
  pass and then view 2's (the train step), or a list of one tree per view, each moved by its
  own view's pass (the cluster phase's chains). Returns ([z_v (B, h, w, C) per view], the
  batch statistics in the form given, moved).
  """
  images_by_view, geo = view_images(
      images_uint8, indices, epoch, key, step_config, train_phase=train_phase
  )
  batch_stats = variables.get("batch_stats")
  per_view = isinstance(batch_stats, list)
  chains = list(batch_stats) if per_view else [batch_stats]
  feats = []
  for view in range(step_config.num_views):
    chain = view if per_view else 0
    z, chains[chain] = _one_view_features(
        model,
        variables.get("params"),
        chains[chain],
        images_by_view,
        geo,
        view,
        step_config,
        train,
    )
    feats.append(z)
  return feats, (chains if per_view else chains[0])


def evaluation_input(images_uint8, step_config):
  """The network input of evaluation and of the fresh clusters (one path, so the fresh
  centroids are fit on the images they are scored on): the eval-resolution batch in [0, 1],
  resized to res1."""
  return T.resize_bilinear(_to_float_images(images_uint8), step_config.res1)


def plain_features(model, variables, images_uint8, step_config, resize=True):
  """Features of un-augmented images in eval BN: the evaluation input, or with `resize=False`
  the images at their own size (segment's whole photos)."""
  if resize:
    images = evaluation_input(images_uint8, step_config)
  else:
    images = _to_float_images(images_uint8)
  z, _ = _raw_features(model, variables, images, step_config, train=False)
  return _in_metric_space(z, step_config)


def flatten_with_mask(z_bhwc, mask_b):
  """(B*h*w, C) points and their validity (padded images masked out)."""
  b, h, w, c = z_bhwc.shape
  return z_bhwc.reshape(b * h * w, c), jnp.repeat(mask_b, h * w)


@functools.partial(jax.jit, static_argnames=("model", "step_config", "train"))
def cluster_features(
    model, params, batch_stats_by_view, batch, epoch, key, *, step_config, train=True
):
  """Cluster phase: every view's flattened features from one read of the batch (BN in
  batch-stats mode by default, as the reference runs these passes under model.train()).

  View v's BN running averages move along its own chain `batch_stats_by_view[v]` (train.py
  combines the chains into the reference's two-pass result). Returns ([(points (N, C),
  mask (N,)) per view], [batch_stats per view]).
  """
  feats, chains = view_features(
      model,
      {"params": params, "batch_stats": list(batch_stats_by_view)},
      batch["image"],
      batch["index"],
      epoch,
      key,
      step_config,
      train,
  )
  return [flatten_with_mask(z, batch["mask"]) for z in feats], chains


@functools.partial(jax.jit, static_argnames=("model", "step_config", "train"))
def fresh_features(model, variables, batch, *, step_config, train=False):
  """Fresh-cluster pass: features of the evaluation input, flattened with their mask, and the
  batch statistics: in eval BN (left as they are), or with `train` in batch-statistics mode,
  the running averages moved by the batch (the reference's fresh clusters, under model.train())."""
  z, batch_stats = _raw_features(
      model, variables, evaluation_input(batch["image"], step_config), step_config, train
  )
  return flatten_with_mask(_in_metric_space(z, step_config), batch["mask"]), batch_stats


def labels_for_batch(model, targets, batch, epoch, key, step_config):
  """Label phase for one batch: nearest centroid of each view's eval-mode features.

  The same function produces the counts of the label phase and the labels inside train_step,
  so stored labels and recomputed labels cannot disagree.
  """
  feats, _ = view_features(
      model, targets.frozen, batch["image"], batch["index"], epoch, key, step_config, train=False
  )
  labels = []
  for view, z in enumerate(feats):
    b, h, w, c = z.shape
    assigned, _ = kmeans.assign_to_nearest(
        z.reshape(-1, c), targets.centroids[view], mesh=step_config.mesh
    )
    labels.append(assigned.reshape(b, h, w))
  return labels


def label_dtype(k):
  """The smallest integer dtype holding cluster indices 0..k-1: uint8, uint16 (K <= 65536; a
  PNG's 8- and 16-bit grayscale), else int32. The label cache's and segment's label maps'."""
  return jnp.uint8 if k <= 256 else jnp.uint16 if k <= 65536 else jnp.int32


@functools.partial(jax.jit, static_argnames=("model", "step_config", "k"))
def label_counts(model, targets, batch, epoch, key, *, step_config, k):
  """The label pass of one batch: (V, K) label counts (padded images excluded), for the
  balance weights, and the labels (B, V, h, w) in label_dtype(k), for the label cache."""
  labels = labels_for_batch(model, targets, batch, epoch, key, step_config)
  valid = batch["mask"][:, None, None]
  counts = jnp.stack(
      [
          jnp.zeros(k, jnp.int32)
          .at[y.reshape(-1)]
          .add(jnp.broadcast_to(valid, y.shape).reshape(-1).astype(jnp.int32))
          for y in labels
      ]
  )
  return counts, jnp.stack(labels, axis=1).astype(label_dtype(k))


@functools.cache
def make_optimizer(lr, weight_decay, train_classifier):
  """Adam (AdamW when weight_decay > 0; the reference uses Adam without decay) over the
  TrainState's params, partitioned by a mask: the network and the classifier keep their own
  moments and step counts (MDC restarts its classifier's every epoch); a classifier that is
  not trained (the centroids classify) gets zero updates.

  Cached: the optimizer is static in the jitted train step (part of the state's tree), so
  runs with the same settings in one process share one compiled step.
  """
  adam = optax.adamw(lr, weight_decay=weight_decay) if weight_decay > 0 else optax.adam(lr)
  return optax.partition(
      {"network": adam, "classifier": adam if train_classifier else optax.set_to_zero()},
      {"network": "network", "classifier": "classifier"},
  )


@functools.partial(jax.jit, static_argnames=("model", "res"))
def init_variables(model, key, res):
  """The model's variables for (1, res, res, 3) inputs (eval mode: BN statistics untouched)."""
  return model.init(key, jnp.zeros((1, res, res, 3)), train=False)


def loss_and_grads(model, state, targets, batch, labels, epoch, key, step_config):
  """The train phase's loss of a batch with its labels (both views' augmentation, train-mode
  features, within + cross terms) and its gradients: ((total, (losses, batch_stats)), grads
  shaped as state.params); the classifier's are zero unless step_config.parametric."""

  def loss_fn(params):
    feats, batch_stats = view_features(
        model,
        {"params": params["network"], "batch_stats": state.batch_stats},
        batch["image"],
        batch["index"],
        epoch,
        key,
        step_config,
        train=True,
        train_phase=True,
    )
    if step_config.parametric:
      weights = params["classifier"]
    else:
      weights = jnp.stack(
          [classifier_from_centroids(c, step_config.metric) for c in targets.centroids]
      )
    z = [with_bias_column(f) for f in feats]
    if step_config.num_views == 2:
      out = losses.picie_loss(
          z[0],
          z[1],
          labels[0],
          labels[1],
          weights[0],
          weights[1],
          targets.weights[0],
          targets.weights[1],
          batch["mask"],
          use_cross=step_config.use_cross,
      )
    else:
      within = losses.weighted_cross_entropy(
          losses.prototype_logits(z[0], weights[0]),
          labels[0],
          targets.weights[0],
          batch["mask"][:, None, None],
      )
      out = {"within": within, "cross": jnp.zeros_like(within), "total": within}
    return out["total"], (out, batch_stats)

  return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


@functools.partial(jax.jit, static_argnames=("model", "step_config"), donate_argnums=(1,))
def train_step(model, state, targets, batch, epoch, key, *, step_config):
  """One PiCIE/MDC update: views -> labels (frozen, no grad) -> features -> loss -> Adam.

  The labels come from the label cache (batch['labels'] (B, V, h, w)) when
  step_config.cached_labels, else they are recomputed here by the label pass's own function.
  Returns (new state, {'total', 'within', 'cross'} losses).
  """
  if step_config.cached_labels:
    labels = [batch["labels"][:, view].astype(jnp.int32) for view in range(step_config.num_views)]
  else:
    labels = jax.lax.stop_gradient(labels_for_batch(model, targets, batch, epoch, key, step_config))

  (_, (out, batch_stats)), grads = loss_and_grads(
      model, state, targets, batch, labels, epoch, key, step_config
  )
  return state.apply_gradients(grads, batch_stats), out


@functools.partial(jax.jit, static_argnames=("model", "step_config", "num_true"))
def eval_step(model, variables, classifier_kc1, batch, *, step_config, num_true):
  """Predictions at label resolution and the batch's (num_true, K) confusion histogram.

  logits at stride 4 are upsampled bilinearly to the label size, then argmax (DESIGN §1).
  """
  z = with_bias_column(plain_features(model, variables, batch["image"], step_config))
  logits = losses.prototype_logits(z, classifier_kc1)
  _, h, w = batch["label"].shape
  logits = T.resize_bilinear(logits, (h, w))
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  hist = metrics.confusion_histogram(
      batch["label"],
      pred,
      num_true,
      classifier_kc1.shape[0],
      mask=jnp.broadcast_to(batch["mask"][:, None, None], pred.shape),
  )
  return pred, hist


@functools.partial(jax.jit, static_argnames=("model", "step_config"))
def whole_image_logits(model, variables, classifier_kc1, images_uint8, *, step_config):
  """Classifier logits (B, H/4, W/4, K) of un-augmented images at their own size, eval BN.

  Unlike eval_step nothing is resized to res1: `segment` feeds whole photos of any shape
  (H, W multiples of 32).
  """
  z = plain_features(model, variables, images_uint8, step_config, resize=False)
  return losses.prototype_logits(with_bias_column(z), classifier_kc1)


@functools.partial(jax.jit, static_argnames="size_hw")
def upsampled_argmax(logits_hwk, size_hw):
  """int32 (H, W) argmax of one image's logits upsampled bilinearly to `size_hw`, as eval_step."""
  logits = T.resize_bilinear(logits_hwk[None], size_hw)[0]
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
