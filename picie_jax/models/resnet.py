"""torchvision ResNet (v1.5) in Flax linen, NHWC, returning the res2..res5 feature maps.

Module names are torchvision's with '.' replaced by '_' (`layer1_0/downsample_1`), so a
torchvision state_dict maps onto the variables by a rename plus kernel transposes (OIHW -> HWIO),
which is `picie_jax.convert`'s job.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from picie_jax import platform as platform_lib
from picie_jax.models.layers import BatchNorm
from picie_jax.models.layers import conv
from picie_jax.models.layers import max_pool_3x3_s2

# depth -> (bottleneck blocks?, blocks per stage), as torchvision's resnet{18,34,50,101,152}.
ARCHITECTURES = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
BOTTLENECK_EXPANSION = 4
# Backbones that stop after a few stages and take no FPN: name -> (depth, stages kept). PiCIE's
# IIC-res12 (§4.2): ResNet-18's stem, layer1 and layer2, features res3 at stride 8.
TRUNCATED = {"resnet18_res12": (18, 2)}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), an untruncated normal.
_conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(features, kernel_size, stride, dtype, platform, name):
  """Bias-free square conv with torchvision's padding (k // 2 on each side, not 'SAME')."""
  pad = kernel_size // 2
  return conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding=((pad, pad), (pad, pad)),
      use_bias=False,
      dtype=dtype,
      kernel_init=_conv_kernel_init,
      platform=platform,
      name=name,
  )


class ResidualBlock(nn.Module):
  """torchvision BasicBlock (3x3, 3x3) or Bottleneck v1.5 (1x1, strided 3x3, 1x1 with 4x channels).

  A projection shortcut (`downsample_0` conv + `downsample_1` BN) is used when the stride or the
  channel count changes, as in torchvision.
  """

  planes: int
  stride: int
  bottleneck: bool
  dtype: Any = jnp.float32
  platform: str = platform_lib.CPU  # the platform compiled for (platform.platform_of(mesh))

  @nn.compact
  def __call__(self, x_bhwc, train: bool):
    if self.bottleneck:
      convs = (
          (self.planes, 1, 1),
          (self.planes, 3, self.stride),
          (self.planes * BOTTLENECK_EXPANSION, 1, 1),
      )
    else:
      convs = ((self.planes, 3, self.stride), (self.planes, 3, 1))
    y = x_bhwc
    for i, (features, kernel_size, stride) in enumerate(convs, start=1):
      y = _conv(features, kernel_size, stride, self.dtype, self.platform, name=f"conv{i}")(y)
      y = BatchNorm(dtype=self.dtype, name=f"bn{i}")(y, use_running_average=not train)
      if i < len(convs):
        y = nn.relu(y)
    out_channels = convs[-1][0]
    shortcut = x_bhwc
    if self.stride != 1 or x_bhwc.shape[-1] != out_channels:
      shortcut = _conv(
          out_channels, 1, self.stride, self.dtype, self.platform, name="downsample_0"
      )(x_bhwc)
      shortcut = BatchNorm(dtype=self.dtype, name="downsample_1")(
          shortcut, use_running_average=not train
      )
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """torchvision ResNet without the head: dict of res2..res5 at strides 4, 8, 16, 32.

  Channels are width * (1, 2, 4, 8), times 4 for bottleneck depths (50, 101, 152); width 64 is
  torchvision's, smaller widths give cheap CPU models. `num_stages` < 4 stops early (res2 up
  to res{num_stages + 1}), with torchvision's names for the stages it keeps.
  """

  depth: int = 18
  width: int = 64
  dtype: Any = jnp.float32
  num_stages: int = 4
  platform: str = platform_lib.CPU  # the platform compiled for (platform.platform_of(mesh))

  @nn.compact
  def __call__(self, images_bhwc, train: bool):
    if self.depth not in ARCHITECTURES:
      raise ValueError(
          f"ResNet depth {self.depth} is not supported; use one of {sorted(ARCHITECTURES)}"
      )
    bottleneck, blocks_per_stage = ARCHITECTURES[self.depth]
    x = _conv(self.width, 7, 2, self.dtype, self.platform, name="conv1")(
        images_bhwc.astype(self.dtype)
    )
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, use_running_average=not train))
    x = max_pool_3x3_s2(x, self.platform)
    features = {}
    for stage, num_blocks in enumerate(blocks_per_stage[: self.num_stages], start=1):
      for block in range(num_blocks):
        stride = 2 if stage > 1 and block == 0 else 1
        x = ResidualBlock(
            self.width * 2 ** (stage - 1),
            stride,
            bottleneck,
            self.dtype,
            self.platform,
            name=f"layer{stage}_{block}",
        )(x, train)
      features[f"res{stage + 1}"] = x
    return features


def normalize_input(images_01_bhwc):
  """(x - mean) / std per channel with the ImageNet statistics torchvision models expect."""
  return (images_01_bhwc - jnp.array(IMAGENET_MEAN, images_01_bhwc.dtype)) / jnp.array(
      IMAGENET_STD, images_01_bhwc.dtype
  )


class TruncatedResNetNet(nn.Module):
  """f_theta of a `TRUNCATED` backbone without FPN (IIC-res12): images in [0, 1] -> the last
  kept stage's float32 features, e.g. res3 (128 * width / 64 channels, stride 8).

  The ResNet sits under the name `backbone`, as in PiCIENet, so ImageNet weights load the same
  way (the state_dict's dropped stages skipped).
  """

  backbone_name: str = "resnet18_res12"
  width: int = 64
  dtype: Any = jnp.float32
  platform: str = platform_lib.CPU

  @nn.compact
  def __call__(self, images_01_bhwc, train: bool):
    if self.backbone_name not in TRUNCATED:
      raise ValueError(
          f"model.backbone={self.backbone_name!r} is not a truncated ResNet; use one of "
          f"{', '.join(TRUNCATED)}"
      )
    depth, num_stages = TRUNCATED[self.backbone_name]
    features = ResNet(depth, self.width, self.dtype, num_stages, self.platform, name="backbone")(
        normalize_input(images_01_bhwc), train
    )
    return features[f"res{num_stages + 1}"].astype(jnp.float32)
