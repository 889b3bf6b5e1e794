"""torchvision ResNet (v1.5) in Flax linen, NHWC, returning the res2..res5 feature maps.

Module names are torchvision's with '.' replaced by '_' (`layer1_0/downsample_1`), so a
torchvision state_dict maps onto the variables by a rename (`torch_state_dict_names`) plus
kernel transposes (OIHW -> HWIO).
"""
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

# depth -> (bottleneck blocks?, blocks per stage), as torchvision's resnet{18,34,50,101,152}.
ARCHITECTURES = {
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}
BOTTLENECK_EXPANSION = 4

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), an untruncated normal.
_conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm2d on NHWC: normalises with the biased batch variance, tracks the unbiased one.

  Flax's nn.BatchNorm tracks the biased variance; torch's running_var is unbiased (n/(n-1)),
  which matters for the small spatial maps of res5. Running averages follow
  `stat <- momentum * stat + (1 - momentum) * batch_stat` (momentum 0.9 == torch's 0.1) and are
  not touched by `init`. Statistics are computed in float32 whatever the compute dtype.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc, use_running_average: bool):
    channels = x_bhwc.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
    x = x_bhwc.astype(jnp.float32)
    if use_running_average:
      mean, var = running_mean.value, running_var.value
    else:
      reduce_axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=reduce_axes)
      var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)
      if not self.is_initializing():
        n = x.size // channels
        if n < 2:
          raise ValueError(f"BatchNorm {self.name!r} in training mode needs more than one value "
                           f"per channel, got input shape {x_bhwc.shape} (as torch refuses too)")
        m = self.momentum
        running_mean.value = m * running_mean.value + (1 - m) * mean
        running_var.value = m * running_var.value + (1 - m) * var * (n / (n - 1))
    y = (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias
    return y.astype(self.dtype)


def _conv(features, kernel_size, stride, dtype, name):
  """Bias-free square conv with torchvision's padding (k // 2 on each side, not 'SAME')."""
  pad = kernel_size // 2
  return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                 kernel_init=_conv_kernel_init, name=name)


class ResidualBlock(nn.Module):
  """torchvision BasicBlock (3x3, 3x3) or Bottleneck v1.5 (1x1, strided 3x3, 1x1 with 4x channels).

  A projection shortcut (`downsample_0` conv + `downsample_1` BN) is used when the stride or the
  channel count changes, as in torchvision.
  """
  planes: int
  stride: int
  bottleneck: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc, train: bool):
    if self.bottleneck:
      convs = ((self.planes, 1, 1), (self.planes, 3, self.stride),
               (self.planes * BOTTLENECK_EXPANSION, 1, 1))
    else:
      convs = ((self.planes, 3, self.stride), (self.planes, 3, 1))
    y = x_bhwc
    for i, (features, kernel_size, stride) in enumerate(convs, start=1):
      y = _conv(features, kernel_size, stride, self.dtype, name=f"conv{i}")(y)
      y = BatchNorm(dtype=self.dtype, name=f"bn{i}")(y, use_running_average=not train)
      if i < len(convs):
        y = nn.relu(y)
    out_channels = convs[-1][0]
    shortcut = x_bhwc
    if self.stride != 1 or x_bhwc.shape[-1] != out_channels:
      shortcut = _conv(out_channels, 1, self.stride, self.dtype, name="downsample_0")(x_bhwc)
      shortcut = BatchNorm(dtype=self.dtype, name="downsample_1")(
          shortcut, use_running_average=not train)
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """torchvision ResNet without the head: dict of res2..res5 at strides 4, 8, 16, 32.

  Channels are width * (1, 2, 4, 8), times 4 for bottleneck depths (50, 101, 152); width 64 is
  torchvision's, smaller widths give cheap CPU models.
  """
  depth: int = 18
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_bhwc, train: bool):
    if self.depth not in ARCHITECTURES:
      raise ValueError(f"ResNet depth {self.depth} is not supported; use one of "
                       f"{sorted(ARCHITECTURES)}")
    bottleneck, blocks_per_stage = ARCHITECTURES[self.depth]
    x = _conv(self.width, 7, 2, self.dtype, name="conv1")(images_bhwc.astype(self.dtype))
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x, use_running_average=not train))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
    features = {}
    for stage, num_blocks in enumerate(blocks_per_stage, start=1):
      for block in range(num_blocks):
        stride = 2 if stage > 1 and block == 0 else 1
        x = ResidualBlock(self.width * 2**(stage - 1), stride, bottleneck, self.dtype,
                          name=f"layer{stage}_{block}")(x, train)
      features[f"res{stage + 1}"] = x
    return features


_TORCH_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


def torch_state_dict_names(variables):
  """Maps each flattened variable path, e.g. ('params', 'backbone', 'layer1_0', 'conv1', 'kernel'),
  to its PyTorch state_dict name ('backbone.layer1.0.conv1.weight').

  Works for ResNet, FPNDecoder and PiCIENet variables; tensors still need layout changes
  (conv kernels HWIO <-> OIHW), which is the importer's job.
  """
  names = {}
  for path in flax.traverse_util.flatten_dict(variables):
    collection, *modules, leaf = path
    if (collection, leaf) not in _TORCH_LEAF_NAMES:
      raise ValueError(f"variable {'/'.join(path)} has no PyTorch counterpart")
    names[path] = ".".join([m.replace("_", ".") for m in modules]
                           + [_TORCH_LEAF_NAMES[collection, leaf]])
  return names
