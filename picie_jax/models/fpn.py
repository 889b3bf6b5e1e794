"""PiCIE's Panoptic-FPN-style decoder and the full network f_theta (DESIGN §1 "Model")."""

from collections.abc import Callable
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from picie_jax import platform as platform_lib
from picie_jax.core import transforms
from picie_jax.models import efficientnet
from picie_jax.models import resnet
from picie_jax.models import vit
from picie_jax.models.layers import conv


def _torch_uniform_bias_init(fan_in):
  """torch.nn.Conv2d's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


# torch.nn.Conv2d's default weight init, kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
_torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class FPNDecoder(nn.Module):
  """1x1 laterals (with bias) of res5..res2 summed top-down with bilinear upsampling.

  o1 = layer1(res5); o_i = up(o_{i-1}) + layer_i(lateral) for res4, res3, res2; returns o4
  (stride 4). The 1x1 convs keep PyTorch's default init, as the reference does.
  """

  out_channels: int = 128
  dtype: Any = jnp.float32
  platform: str = platform_lib.CPU  # the platform compiled for (platform.platform_of(mesh))

  def _lateral(self, x_bhwc, name):
    return conv(
        self.out_channels,
        (1, 1),
        use_bias=True,
        dtype=self.dtype,
        kernel_init=_torch_default_kernel_init,
        bias_init=_torch_uniform_bias_init(x_bhwc.shape[-1]),
        platform=self.platform,
        name=name,
    )(x_bhwc)

  @nn.compact
  def __call__(self, feats):
    out = self._lateral(feats["res5"], "layer1")
    for name, level in (("layer2", "res4"), ("layer3", "res3"), ("layer4", "res2")):
      lateral = self._lateral(feats[level], name)
      out = transforms.resize_bilinear(out, lateral.shape[1:3]) + lateral
    return out


class Backbone(NamedTuple):
  """A backbone config.model.backbone can name: `make(width, dtype, platform)` builds the module
  (a dict res2..res5 of features); `normalize_input` maps images in [0, 1] as its pretrained
  weights expect.

  `fpn=False`: no FPN decoder; `make(model_config, dtype, platform)` builds the whole network
  f_theta, whose features are at `feature_stride` with `channels(model_config)` channels:
  IIC-res12's are the backbone's last kept stage, a ViT's its head's. With the FPN they are at
  stride 4 with config.model.fpn_channels.
  """

  make: Callable[[Any, Any, str], nn.Module]
  normalize_input: Callable[[jax.Array], jax.Array]
  fpn: bool = True
  feature_stride: int = 4
  channels: Callable[[Any], int] | None = None


def _resnet(depth):
  def make(width, dtype, platform):
    return resnet.ResNet(depth=depth, width=width, dtype=dtype, platform=platform)

  return Backbone(make, resnet.normalize_input)


def _efficientnet_lite0(width, dtype, platform):
  del width  # the architecture's own
  return efficientnet.EfficientNetLite0(dtype=dtype, platform=platform)


def _truncated_resnet(name):
  """A `resnet.TRUNCATED` ResNet without FPN: its last kept stage's features (IIC-res12)."""
  _, num_stages = resnet.TRUNCATED[name]

  def make(model_config, dtype, platform):
    return resnet.TruncatedResNetNet(name, width=model_config.width, dtype=dtype, platform=platform)

  return Backbone(
      make,
      resnet.normalize_input,
      fpn=False,
      feature_stride=2 ** (num_stages + 1),
      channels=lambda model_config: model_config.width * 2 ** (num_stages - 1),
  )


def _vit(name):
  """A DINO ViT with a head to config.model.fpn_channels (model.head, model.vit_*)."""
  arch = vit.ARCHITECTURES[name]

  def make(model_config, dtype, platform):
    del platform  # no platform-specific forms
    depth = model_config.vit_depth or arch.depth
    return vit.ViTNet(
        arch._replace(depth=depth),
        out_channels=model_config.fpn_channels,
        head=model_config.head,
        last_blocks=model_config.vit_last_blocks,
        dtype=dtype,
    )

  return Backbone(
      make,
      resnet.normalize_input,  # DINO's ImageNet mean and std
      fpn=False,
      feature_stride=arch.patch_size,
      channels=lambda model_config: model_config.fpn_channels,
  )


BACKBONES = {
    **{f"resnet{depth}": _resnet(depth) for depth in resnet.ARCHITECTURES},
    **{name: _truncated_resnet(name) for name in resnet.TRUNCATED},
    "efficientnet_lite0": Backbone(_efficientnet_lite0, efficientnet.normalize_input),
    **{name: _vit(name) for name in vit.ARCHITECTURES},
}


def backbone_spec(name):
  """The BACKBONES entry of config.model.backbone `name`; a ValueError listing the names else."""
  if name not in BACKBONES:
    raise ValueError(f"model.backbone={name!r} is not supported; use one of {', '.join(BACKBONES)}")
  return BACKBONES[name]


class PiCIENet(nn.Module):
  """f_theta: backbone + FPN decoder on images in [0, 1]; per-pixel float32 features at stride
  4, not normalised. Each backbone normalises its input the way its pretrained weights expect.

  `dtype` is the compute dtype of convolutions and activations (bfloat16 for mixed precision);
  parameters and BatchNorm statistics stay float32, and the features come out in float32 so
  the loss and k-means distances are computed in float32.
  """

  backbone_name: str = "resnet18"
  width: int = 64  # ResNet only
  out_channels: int = 128
  dtype: Any = jnp.float32
  platform: str = platform_lib.CPU  # the platform compiled for (platform.platform_of(mesh))

  def setup(self):
    self.backbone = backbone_spec(self.backbone_name).make(self.width, self.dtype, self.platform)
    self.decoder = FPNDecoder(
        out_channels=self.out_channels, dtype=self.dtype, platform=self.platform
    )

  def __call__(self, images_01_bhwc, train: bool):
    normalize = BACKBONES[self.backbone_name].normalize_input
    return self.decoder(self.backbone(normalize(images_01_bhwc), train)).astype(jnp.float32)


COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def feature_channels(cfg):
  """The channels of f_theta's features for the model config: the FPN's, or the backbone's own."""
  spec = backbone_spec(cfg.backbone)
  return cfg.fpn_channels if spec.fpn else spec.channels(cfg)


def model_from_config(cfg, platform):
  """f_theta from the model config (fields backbone, width, fpn_channels, dtype; a ViT's head,
  vit_depth, vit_last_blocks), with the forms
  of `platform` (platform.platform_of(mesh): the devices it will be compiled for): PiCIENet, or
  the backbone's own network for one without FPN."""
  spec = backbone_spec(cfg.backbone)
  for key in ("width", "fpn_channels"):
    value = getattr(cfg, key)
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"model.{key}={value!r} must be a positive integer")
  if cfg.dtype not in COMPUTE_DTYPES:
    raise ValueError(
        f"model.dtype={cfg.dtype!r} is not supported; use one of {', '.join(COMPUTE_DTYPES)}"
    )
  if not spec.fpn:
    return spec.make(cfg, COMPUTE_DTYPES[cfg.dtype], platform)
  return PiCIENet(
      backbone_name=cfg.backbone,
      width=cfg.width,
      out_channels=cfg.fpn_channels,
      dtype=COMPUTE_DTYPES[cfg.dtype],
      platform=platform,
  )
