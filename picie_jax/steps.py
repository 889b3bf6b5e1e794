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
from picie_jax.core import crf
from picie_jax.core import iic
from picie_jax.core import kmeans
from picie_jax.core import losses
from picie_jax.core import metrics
from picie_jax.core import transforms as T
from picie_jax.models import fpn
from picie_jax.models import iic_heads

IIC_HEADS = ("overcluster", "main")  # each IIC epoch: a pass training each head, in this order
# STEGO's CRF input for its clusters: softmax(2 * cosine similarity) (src/eval_segmentation.py:
# cluster_probe(code, 2, log_probs=True); modules.py ClusterLookup: softmax(alpha * inner))
CRF_COSINE_SCALE = 2.0


class IICConfig(NamedTuple):
  """IIC's static choices (config.iic): the heads' sizes and each head's loss settings."""

  k: int  # the main head's classes (config.kmeans.k_train)
  overcluster_k: int
  half_window: int  # T, in feature pixels
  lamb_overcluster: float
  lamb_main: float
  per_displacement: bool

  def lamb(self, head):
    return self.lamb_main if head == "main" else self.lamb_overcluster


def iic_config_from_config(config):
  """config.iic as an IICConfig, or None unless config.method == 'iic'."""
  if config.method != "iic":
    return None
  c = config.iic
  return IICConfig(
      k=config.kmeans.k_train,
      overcluster_k=c.overcluster_k,
      half_window=c.half_window,
      lamb_overcluster=c.lamb_overcluster,
      lamb_main=c.lamb_main,
      per_displacement=c.per_displacement,
  )


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
  # f_theta's features: stride (the pixel baseline's cells too) and channels (3 for pixels)
  feature_stride: int
  feature_channels: int
  # the devices the steps are compiled for: the label search's shard_map, and the platform
  # whose forms of the ops are traced (platform.platform_of), whatever the host's backend
  mesh: Mesh
  # reference_quirks: view 2 resized res2 -> res1 as PIL does (antialiased), not plain bilinear
  antialiased_view2: bool = False
  # reference_quirks on Cityscapes: its official loader trains on view 1 without P1 (its
  # 'train' mode passes the un-jittered image on); clustering and labels still see G(P1(x))
  jitter_train_view1: bool = True
  iic: IICConfig | None = None  # IIC (config.method='iic'): heads and loss instead of clusters


def step_config_from_config(config, mesh):
  a = config.augment
  pixels = config.method == "pixel_kmeans"
  return StepConfig(
      num_views=1 if config.method == "mdc" else 2,
      use_cross=config.method == "picie" and config.train.cross_view_loss,
      parametric=config.train.classifier == "parametric",
      pixels=pixels,
      metric=config.kmeans.metric,
      res1=config.res1,
      cached_labels=config.train.labels == "cached" and config.method != "iic",
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
      feature_stride=fpn.backbone_spec(config.model.backbone).feature_stride,
      feature_channels=3 if pixels else fpn.feature_channels(config.model),
      mesh=mesh,
      antialiased_view2=a.reference_quirks,
      jitter_train_view1=not (a.reference_quirks and config.dataset.name == "cityscapes27"),
      iic=iic_config_from_config(config),
  )


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, and the optimizer that changes it (static, as
  flax's TrainState carries it). `params` = {'network': the model's params, 'classifier':
  (V, K, C+1) 1x1 convs, trained when parametric (MDC); or IIC's heads' params, trained}. The
  network's tree is the same for every method."""

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
  """What the label phase fixes for an epoch: frozen variables, centroids and class weights;
  with PiCIE + H (config.kmeans.k_overcluster > 0) also the overclustering's, else None."""

  frozen: dict  # {'params', 'batch_stats'} as after the cluster phase
  centroids: jax.Array  # (V, K, C)
  weights: jax.Array  # (V, K)
  overcluster_centroids: jax.Array | None = None  # (V, K_H, C)
  overcluster_weights: jax.Array | None = None  # (V, K_H)

  def centroid_sets(self):
    """[(centroids (V, K, C), weights (V, K))]: the main clustering's, then the overclustering's
    (PiCIE + H); the order of the label sets in labels_for_batch."""
    sets = [(self.centroids, self.weights)]
    if self.overcluster_centroids is not None:
      sets.append((self.overcluster_centroids, self.overcluster_weights))
    return sets


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


def iic_heads_module(step_config):
  """IIC's two heads for the step config's sizes, in the forms of its mesh's platform."""
  return iic_heads.IICHeads(
      num_classes=step_config.iic.k,
      num_overcluster=step_config.iic.overcluster_k,
      platform=platform_lib.platform_of(step_config.mesh),
  )


def init_iic_heads(key, step_config):
  """IIC's heads' params ({'main', 'overcluster'} bias-free 1x1 kernels) on f_theta's features."""
  features = jnp.zeros((1, 1, 1, step_config.feature_channels), jnp.float32)
  return iic_heads_module(step_config).init(key, features)["params"]


def head_probabilities(heads_params, z_bhwc, step_config, head):
  """IIC head `head`'s ('main' or 'overcluster') per-pixel class probabilities (B, h, w, K)."""
  return iic_heads_module(step_config).apply({"params": heads_params}, z_bhwc)[head]


def num_clusters(classifier):
  """The clusters a classifier predicts: (K, C+1) weights' K, or IIC's main head's."""
  if isinstance(classifier, dict):
    return classifier["main"]["kernel"].shape[-1]
  return classifier.shape[0]


def initial_classifier(key, step_config, k):
  """The 'classifier' params a run starts with: IIC's heads, or the (V, K, C+1) 1x1 convs
  (MDC's learned classifier; placeholders where the centroids classify)."""
  if step_config.iic is not None:
    return init_iic_heads(key, step_config)
  return init_classifier(key, step_config.num_views, k, step_config.feature_channels)


def trains_classifier(step_config):
  """Whether the optimizer updates the 'classifier' params: MDC's learned one, IIC's heads."""
  return step_config.parametric or step_config.iic is not None


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


def pixel_features(images_01, stride):
  """The raw-pixel baseline's 'features': colours averaged over each `stride` x `stride` cell."""
  b, h, w, c = images_01.shape
  s = stride
  return images_01.reshape(b, h // s, s, w // s, s, c).mean(axis=(2, 4))


def _raw_features(model, variables, images_01, step_config, train):
  """(features (B, h, w, C), batch_stats): the network's, or the pixels' for the baseline."""
  if step_config.pixels:
    return pixel_features(images_01, step_config.feature_stride), variables.get("batch_stats")
  return network_features(model, variables, images_01, train)


def in_metric_space(z, step_config):
  """Features as k-means and the classifier see them: L2-normalised for the cosine metric.
  IIC's heads see the raw features, as IIC's do."""
  if step_config.metric == "cosine" and step_config.iic is None:
    return kmeans.normalize_features(z)
  return z


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
  return in_metric_space(z, step_config), batch_stats


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
  return in_metric_space(z, step_config)


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
  return flatten_with_mask(in_metric_space(z, step_config), batch["mask"]), batch_stats


def labels_for_batch(model, targets, batch, epoch, key, step_config):
  """Label phase for one batch: nearest centroid of each view's eval-mode features, for each
  of targets.centroid_sets() (PiCIE + H: the overclustering's after the main one's), so
  [labels (B, h, w) per view] per set, concatenated.

  The same function produces the counts of the label phase and the labels inside train_step,
  so stored labels and recomputed labels cannot disagree.
  """
  feats, _ = view_features(
      model, targets.frozen, batch["image"], batch["index"], epoch, key, step_config, train=False
  )
  labels = []
  for centroids, _ in targets.centroid_sets():
    for view, z in enumerate(feats):
      b, h, w, c = z.shape
      assigned, _ = kmeans.assign_to_nearest(
          z.reshape(-1, c), centroids[view], mesh=step_config.mesh
      )
      labels.append(assigned.reshape(b, h, w))
  return labels


def label_dtype(k):
  """The smallest integer dtype holding cluster indices 0..k-1: uint8, uint16 (K <= 65536; a
  PNG's 8- and 16-bit grayscale), else int32. The label cache's and segment's label maps'."""
  return jnp.uint8 if k <= 256 else jnp.uint16 if k <= 65536 else jnp.int32


@functools.partial(jax.jit, static_argnames=("model", "step_config"))
def label_counts(model, targets, batch, epoch, key, *, step_config):
  """The label pass of one batch: per centroid set of targets.centroid_sets(), its (V, K) label
  counts (padded images excluded), for the balance weights; and the labels (B, S * V, h, w) of
  the S sets in label_dtype of the largest K, for the label cache."""
  labels = labels_for_batch(model, targets, batch, epoch, key, step_config)
  valid = batch["mask"][:, None, None]
  counts, ks = [], []
  for index, (centroids, _) in enumerate(targets.centroid_sets()):
    v, k = centroids.shape[:2]
    ks.append(k)
    counts.append(
        jnp.stack(
            [
                jnp.zeros(k, jnp.int32)
                .at[y.reshape(-1)]
                .add(jnp.broadcast_to(valid, y.shape).reshape(-1).astype(jnp.int32))
                for y in labels[index * v : (index + 1) * v]
            ]
        )
    )
  return counts, jnp.stack(labels, axis=1).astype(label_dtype(max(ks)))


@functools.cache
def make_optimizer(lr, weight_decay, train_classifier, freeze_backbone=False):
  """Adam (AdamW when weight_decay > 0; the reference uses Adam without decay) over the
  TrainState's params, partitioned by a mask: the network and the classifier keep their own
  moments and step counts (MDC restarts its classifier's every epoch); a classifier that is
  not trained (the centroids classify) gets zero updates, and so does the network's
  `backbone` with `freeze_backbone` (config.model.freeze_backbone), which keeps no moments.

  Cached: the optimizer is static in the jitted train step (part of the state's tree), so
  runs with the same settings in one process share one compiled step.
  """
  adam = optax.adamw(lr, weight_decay=weight_decay) if weight_decay > 0 else optax.adam(lr)

  transforms = {"network": adam, "classifier": adam if train_classifier else optax.set_to_zero()}
  if not freeze_backbone:  # the optimizer state of checkpoints written before ViTs existed
    return optax.partition(transforms, {"network": "network", "classifier": "classifier"})

  def labels(params):
    network = {name: "frozen" if name == "backbone" else "network" for name in params["network"]}
    return {"network": network, "classifier": "classifier"}

  return optax.partition({**transforms, "frozen": optax.set_to_zero()}, labels)


@functools.partial(jax.jit, static_argnames=("model", "res"))
def init_variables(model, key, res):
  """The model's variables for (1, res, res, 3) inputs (eval mode: BN statistics untouched);
  'batch_stats' is empty for a network without BatchNorm (a ViT)."""
  return {"batch_stats": {}, **model.init(key, jnp.zeros((1, res, res, 3)), train=False)}


def _with_overcluster_loss(out, z, overcluster_labels, targets, mask_b, step_config):
  """PiCIE + H: the same within + cross loss against the overclustering's labels, centroids
  and weights, added to the main loss with equal weight (`out['total']`); its terms are
  reported as 'overcluster_{within,cross,total}'."""
  mu = [classifier_from_centroids(c, step_config.metric) for c in targets.overcluster_centroids]
  extra = losses.picie_loss(
      z[0],
      z[1],
      overcluster_labels[0],
      overcluster_labels[1],
      mu[0],
      mu[1],
      targets.overcluster_weights[0],
      targets.overcluster_weights[1],
      mask_b,
      use_cross=step_config.use_cross,
  )
  return {
      **{k: v for k, v in out.items() if k != "total"},
      **{f"overcluster_{k}": v for k, v in extra.items()},
      "total": out["total"] + extra["total"],
  }


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
      if targets.overcluster_centroids is not None:
        out = _with_overcluster_loss(out, z, labels[2:], targets, batch["mask"], step_config)
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


def iic_loss_and_grads(model, state, batch, epoch, key, step_config, head):
  """IIC's loss of a batch for head `head` and its gradients, as loss_and_grads returns them.

  Both views' train-mode features go through the head; view 2's probabilities are brought into
  view 1's frame by G (IIC re-warps its second view's predictions the same way), padded images
  masked. The losses: 'total' (the head's loss, with its lambda) and 'mutual_information' (of
  the two views' predictions, averaged over the displacements as the loss is).
  """
  cfg = step_config.iic

  def loss_fn(params):
    images_by_view, geo = view_images(
        batch["image"], batch["index"], epoch, key, step_config, train_phase=True
    )
    batch_stats, probs = state.batch_stats, []
    for view, images in enumerate(images_by_view):
      z, batch_stats = network_features(
          model, {"params": params["network"], "batch_stats": batch_stats}, images, train=True
      )
      p = head_probabilities(params["classifier"], z, step_config, head)
      probs.append(T.apply_geometric(p, geo, p.shape[1]) if view == 1 else p)
    mask = jnp.broadcast_to(batch["mask"][:, None, None], probs[0].shape[:3])
    loss, loss_at_one = iic.iic_segmentation_loss(
        probs[0],
        probs[1],
        mask,
        half_window=cfg.half_window,
        lamb=cfg.lamb(head),
        per_displacement=cfg.per_displacement,
    )
    return loss, ({"total": loss, "mutual_information": -loss_at_one}, batch_stats)

  return jax.value_and_grad(loss_fn, has_aux=True)(state.params)


@functools.partial(jax.jit, static_argnames=("model", "step_config", "head"), donate_argnums=(1,))
def train_step(model, state, targets, batch, epoch, key, *, step_config, head=None):
  """One update: PiCIE/MDC's views -> labels (frozen, no grad) -> features -> loss -> Adam, or
  IIC's (step_config.iic) loss of head `head` ('overcluster' or 'main'; no labels, `targets`
  unused).

  The labels come from the label cache (batch['labels'] (B, V, h, w)) when
  step_config.cached_labels, else they are recomputed here by the label pass's own function.
  Returns (new state, losses: {'total', 'within', 'cross'}, or IIC's {'total',
  'mutual_information'}).
  """
  if step_config.iic is not None:
    (_, (out, batch_stats)), grads = iic_loss_and_grads(
        model, state, batch, epoch, key, step_config, head
    )
    return state.apply_gradients(grads, batch_stats), out
  if step_config.cached_labels:
    labels = [batch["labels"][:, i].astype(jnp.int32) for i in range(batch["labels"].shape[1])]
  else:
    labels = jax.lax.stop_gradient(labels_for_batch(model, targets, batch, epoch, key, step_config))

  (_, (out, batch_stats)), grads = loss_and_grads(
      model, state, targets, batch, labels, epoch, key, step_config
  )
  return state.apply_gradients(grads, batch_stats), out


def prediction_scores(model, variables, classifier, images_uint8, step_config, resize=True):
  """Per-pixel scores (B, h, w, K) whose argmax is the prediction, of un-augmented images in
  eval BN (`resize` as plain_features): the (K, C+1) classifier's logits, or for an IIC run
  without a parametric classifier IIC's main head's probabilities (`classifier` = the heads'
  params). A parametric classifier on an IIC run's (raw) features is a probe's head."""
  z = plain_features(model, variables, images_uint8, step_config, resize=resize)
  if _iic_heads_predict(step_config):
    return head_probabilities(classifier, z, step_config, "main")
  return losses.prototype_logits(with_bias_column(z), classifier)


def _iic_heads_predict(step_config):
  return step_config.iic is not None and not step_config.parametric


def crf_probabilities(scores_bhwk, images_uint8, step_config):
  """Dense-CRF class probabilities (core.crf, STEGO's parameters) of prediction_scores
  upsampled to the images' size. The CRF starts from the softmax of: 2 x the cosine clusters'
  logits <z, mu_k> (STEGO's cluster probe: softmax(2 cos)), the log of IIC's probabilities, or
  the logits of l2 centroids (-|z - mu_k|^2 + const) and of MDC's learned classifier as they are.
  """
  if _iic_heads_predict(step_config):
    logits = jnp.log(scores_bhwk)
  elif step_config.metric == "cosine" and not step_config.parametric:
    logits = CRF_COSINE_SCALE * scores_bhwk
  else:
    logits = scores_bhwk
  return crf.dense_crf(logits, images_uint8)


@functools.partial(jax.jit, static_argnames=("model", "step_config", "num_true", "use_crf"))
def eval_step(model, variables, classifier, batch, *, step_config, num_true, use_crf=False):
  """Predictions at label resolution and the batch's (num_true, K) confusion histogram.

  The scores at the feature stride are upsampled bilinearly to the label size, then argmax
  (DESIGN §1), with `use_crf` after dense-CRF refinement on the image (crf_probabilities);
  `classifier` as prediction_scores takes it.
  """
  logits = prediction_scores(model, variables, classifier, batch["image"], step_config)
  _, h, w = batch["label"].shape
  logits = T.resize_bilinear(logits, (h, w))
  if use_crf:
    logits = crf_probabilities(logits, batch["image"], step_config)
  pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  hist = metrics.confusion_histogram(
      batch["label"],
      pred,
      num_true,
      logits.shape[-1],
      mask=jnp.broadcast_to(batch["mask"][:, None, None], pred.shape),
  )
  return pred, hist


@functools.partial(jax.jit, static_argnames=("model", "step_config", "use_crf"))
def whole_image_logits(model, variables, classifier, images_uint8, *, step_config, use_crf=False):
  """prediction_scores (B, H/s, W/s, K) of un-augmented images at their own size, eval BN; with
  `use_crf` the dense-CRF probabilities (B, H, W, K) of those scores upsampled to the images.

  Unlike eval_step nothing is resized to res1: `segment` feeds whole photos of any shape
  (H, W multiples of 32).
  """
  scores = prediction_scores(model, variables, classifier, images_uint8, step_config, resize=False)
  if use_crf:
    upsampled = T.resize_bilinear(scores, images_uint8.shape[1:3])
    return crf_probabilities(upsampled, images_uint8, step_config)
  return scores


@functools.partial(jax.jit, static_argnames="size_hw")
def upsampled_argmax(logits_hwk, size_hw):
  """int32 (H, W) argmax of one image's logits upsampled bilinearly to `size_hw`, as eval_step."""
  logits = T.resize_bilinear(logits_hwk[None], size_hw)[0]
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)
