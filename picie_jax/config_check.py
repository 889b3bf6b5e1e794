"""Validation of a resolved config: every bad value is reported with its config key.

`validate` needs no devices; `check_batch_sizes` is called where the run's mesh is known.
"""

from picie_jax.data import datasets
from picie_jax.data import formats
from picie_jax.data import pipeline
from picie_jax.models import fpn
from picie_jax.models import vit

# Batch sizes that change a run's results (mini-batch k-means updates, gradient steps): they
# must split over the devices as given. eval.batch_size does not change results: passes pad it
# to the devices (parallel.padded_batch_size).
_BATCH_SIZES = ("kmeans.batch_size", "train.batch_size")

_CHOICES = {
    "method": ("picie", "mdc", "pixel_kmeans", "iic"),
    "dataset.name": tuple(datasets.DATASETS),
    "kmeans.metric": ("cosine", "l2"),
    "model.backbone": tuple(fpn.BACKBONES),
    "model.init": ("random", "imagenet", "checkpoint"),
    "model.dtype": tuple(fpn.COMPUTE_DTYPES),
    "model.head": vit.HEADS,
    "kmeans.init": ("random", "kmeans++"),
    "train.classifier": ("nonparametric", "parametric"),
    "dataset.on_bad_file": pipeline.ON_BAD_FILE,
    "train.labels": ("cached", "recompute"),
    "kmeans.buffer_dtype": ("float32", "bfloat16"),
    "eval.fresh_bn": ("eval", "train"),
}
_POSITIVE_INTS = (
    "res1",
    "res2",
    "kmeans.k_train",
    "kmeans.batch_size",
    "kmeans.num_init_batches",
    "kmeans.iters",
    "train.batch_size",
    "eval.res",
    "eval.batch_size",
    "eval.k_test",
    "eval.every_epochs",
    "iic.overcluster_k",
    "log_every_steps",
    "checkpoint_every_steps",
    "model.width",
    "model.fpn_channels",
    "model.vit_last_blocks",
    "probe.epochs",
    "probe.batch_size",
    "finetune.epochs",
    "finetune.batch_size",
)
_NON_NEGATIVE_INTS = (
    "num_epochs",
    "dataset.num_train",
    "dataset.num_val",
    "eval.num_vis",
    "eval.overcluster_k",
    "augment.blur_max_radius",
    "kmeans.init_pixels_per_image",
    "kmeans.chunk_size",
    "kmeans.k_overcluster",
    "iic.half_window",
    "model.vit_depth",
)
_PROBABILITIES = (
    "augment.jitter_p",
    "augment.grayscale_p",
    "augment.blur_p",
    "augment.hflip_p",
    "augment.vflip_p",
)


def _get(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def validate(config):
  """Raises ValueError naming `config.<key>` for the first invalid value."""
  errors = []
  for key, choices in _CHOICES.items():
    if _get(config, key) not in choices:
      errors.append(f"config.{key}={_get(config, key)!r} must be one of {choices}")
  for key in _POSITIVE_INTS + _NON_NEGATIVE_INTS:
    value = _get(config, key)
    low = 1 if key in _POSITIVE_INTS else 0
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      errors.append(f"config.{key}={value!r} must be an integer >= {low}")
  for key in _PROBABILITIES:
    value = _get(config, key)
    if not 0.0 <= value <= 1.0:
      errors.append(f"config.{key}={value!r} must be a probability in [0, 1]")
  for key in ("train.lr", "probe.lr", "finetune.lr", "finetune.head_lr"):
    if _get(config, key) <= 0:
      errors.append(f"config.{key}={_get(config, key)!r} must be > 0")
  if not 0.0 < config.finetune.labelled_fraction <= 1.0:
    errors.append(
        f"config.finetune.labelled_fraction={config.finetune.labelled_fraction!r} must be in "
        "(0, 1]: the share of the train split whose labels fine-tuning uses"
    )
  a = config.augment
  if not 0.0 < a.min_scale <= a.max_scale <= 1.0:
    errors.append(
        f"config.augment.min_scale={a.min_scale!r}, max_scale={a.max_scale!r} must "
        "satisfy 0 < min_scale <= max_scale <= 1"
    )
  for key in ("res1", "eval.res"):
    if isinstance(_get(config, key), int) and _get(config, key) % 32:
      errors.append(
          f"config.{key}={_get(config, key)!r} must be a multiple of 32 "
          "(the backbone's stride) so views and labels align"
      )
  if isinstance(config.res1, int) and isinstance(config.res2, int) and config.res2 < config.res1:
    errors.append(
        f"config.res2={config.res2!r} must be >= config.res1={config.res1!r}: views "
        "are cut from the res2 base image and resized to res1"
    )
  num_classes = config.dataset.num_classes
  if not isinstance(num_classes, int) or not 0 <= num_classes <= formats.IGNORE_VALUE:
    errors.append(
        f"config.dataset.num_classes={num_classes!r} must be an integer in "
        f"0..{formats.IGNORE_VALUE} (label value {formats.IGNORE_VALUE} marks unlabelled pixels)"
    )
  if config.dataset.name == "image_folder" and not config.dataset.root:
    errors.append(
        "config.dataset.root is empty: set it to the folder holding train/images "
        "(and val/images, val/labels)"
    )
  if config.model.init == "random" and config.model.init_checkpoint:
    errors.append(
        f"config.model.init_checkpoint={config.model.init_checkpoint!r} is set but "
        "config.model.init='random': set init to 'imagenet' or 'checkpoint'"
    )
  if (
      config.model.init in ("imagenet", "checkpoint")
      and config.model.width != 64
      and config.model.backbone.startswith("resnet")
  ):
    errors.append(
        f"config.model.width={config.model.width!r}: pretrained ResNet weights need "
        "width 64 (or set config.model.init='random')"
    )
  if config.model.backbone in vit.ARCHITECTURES:
    depth = config.model.vit_depth or vit.ARCHITECTURES[config.model.backbone].depth
    if isinstance(config.model.vit_last_blocks, int) and config.model.vit_last_blocks > depth:
      errors.append(
          f"config.model.vit_last_blocks={config.model.vit_last_blocks!r} must be <= the "
          f"ViT's {depth} blocks (config.model.vit_depth)"
      )
  if config.method == "mdc" and config.train.cross_view_loss:
    errors.append(
        "config.train.cross_view_loss=True needs two views; MDC (config.method='mdc') "
        "has one: set it to False"
    )
  if config.method != "pixel_kmeans" and config.num_epochs > 0 and config.kmeans.k_train < 2:
    errors.append("config.kmeans.k_train must be >= 2")
  for key in ("iic.lamb_overcluster", "iic.lamb_main"):
    if not _get(config, key) > 0:
      errors.append(f"config.{key}={_get(config, key)!r} must be > 0")
  if config.kmeans.k_overcluster == 1:
    errors.append("config.kmeans.k_overcluster=1 must be 0 (off) or >= 2")
  if config.kmeans.k_overcluster and config.train.classifier == "parametric":
    errors.append(
        "config.kmeans.k_overcluster (PiCIE + H) classifies with its centroids: set "
        "config.train.classifier='nonparametric'"
    )
  if config.kmeans.k_overcluster and config.method != "picie":
    errors.append(
        f"config.kmeans.k_overcluster={config.kmeans.k_overcluster!r} (PiCIE + H) needs "
        f"config.method='picie', not {config.method!r}: set it to 0"
    )
  if config.method == "iic" and config.train.classifier == "parametric":
    errors.append(
        "config.train.classifier='parametric' is MDC's; IIC (config.method='iic') classifies "
        "with its own heads: set it to 'nonparametric'"
    )
  if errors:
    raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def check_batch_sizes(config, num_devices, num_hosts, keys=_BATCH_SIZES):
  """Raises ValueError naming every batch size (of `keys`, a run's by default) that does not
  split evenly over the hosts and the devices of the mesh (JAX would fail mid-run, after an
  epoch, without naming the key), with the nearest larger batch that does. For the train batch
  it also gives the linearly scaled lr (Goyal et al. 2017): a changed batch is a changed
  recipe, so the user decides."""
  errors = []
  for key in keys:
    batch = _get(config, key)
    if batch % num_devices == 0 and batch % num_hosts == 0:
      continue
    fit = -(-batch // num_devices) * num_devices
    advice = f"--config.{key}={fit}"
    if key == "train.batch_size":
      advice += f" --config.train.lr={config.train.lr * fit / batch:.3g} (linear scaling)"
    errors.append(
        f"config.{key}={batch!r} must be a multiple of the {num_devices} devices (on "
        f"{num_hosts} processes) of this run: e.g. {advice}"
    )
  if errors:
    raise ValueError("invalid config for this machine:\n  " + "\n  ".join(errors))
