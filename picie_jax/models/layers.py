"""Layers shared by the backbones."""
import functools
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp


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


def running_average_decays(model, variables, images_bhwc):
  """A tree shaped like variables['batch_stats'] whose leaves are their BatchNorm's momentum
  (the factor each train-mode pass multiplies the running average by), found by tracing one
  eval-mode apply on `images_bhwc` (nothing is computed)."""
  momenta = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm):
      momenta[context.module.path] = context.module.momentum
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.apply, train=False), variables, images_bhwc)
  flat = flax.traverse_util.flatten_dict(variables["batch_stats"])
  return flax.traverse_util.unflatten_dict({path: momenta[path[:-1]] for path in flat})


def same_padding(size, kernel_size, stride):
  """TensorFlow "SAME" padding (low, high) of one axis: the extra pixel goes bottom/right."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel_size - size, 0)
  return total // 2, total - total // 2


def depthwise_conv_taps(x_bhwc, kernel_kk1c, stride):
  """Depthwise convolution with "SAME" padding as a sum over the k*k kernel taps.

  Equal to `lax.conv_general_dilated(..., feature_group_count=C)`; on XLA-CPU this form is
  2-14x faster for forward + backward at the EfficientNet shapes (grouped convolutions have no
  fast CPU kernel there), so the CPU uses it.
  """
  k = kernel_kk1c.shape[0]
  _, h, w, _ = x_bhwc.shape
  pads = [same_padding(h, k, stride), same_padding(w, k, stride)]
  x = jnp.pad(x_bhwc, ((0, 0), pads[0], pads[1], (0, 0)))
  out_h, out_w = -(-h // stride), -(-w // stride)
  out = None
  for i in range(k):
    for j in range(k):
      tap = x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
      term = tap * kernel_kk1c[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """Bias-free depthwise k x k convolution, "SAME" padding; kernel (k, k, 1, C) as nn.Conv's."""
  kernel_size: int
  stride: int
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_bhwc):
    channels = x_bhwc.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (self.kernel_size, self.kernel_size, 1, channels), jnp.float32)
    x, kernel = x_bhwc.astype(self.dtype), kernel.astype(self.dtype)
    if jax.default_backend() == "cpu":
      return depthwise_conv_taps(x, kernel, self.stride)
    return jax.lax.conv_general_dilated(
        x, kernel, (self.stride, self.stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
