"""Layers shared by the backbones, and the CPU forms of the ops XLA-CPU differentiates slowly."""

import functools
from typing import Any

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from picie_jax import platform as platform_lib


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
          raise ValueError(
              f"BatchNorm {self.name!r} in training mode needs more than one value "
              f"per channel, got input shape {x_bhwc.shape} (as torch refuses too)"
          )
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
      tap = x[
          :, i : i + (out_h - 1) * stride + 1 : stride, j : j + (out_w - 1) * stride + 1 : stride
      ]
      term = tap * kernel_kk1c[i, j, 0]
      out = term if out is None else out + term
  return out


class DepthwiseConv(nn.Module):
  """Bias-free depthwise k x k convolution, "SAME" padding; kernel (k, k, 1, C) as nn.Conv's."""

  kernel_size: int
  stride: int
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  platform: str = platform_lib.CPU  # the platform compiled for (platform.platform_of(mesh))

  @nn.compact
  def __call__(self, x_bhwc):
    channels = x_bhwc.shape[-1]
    kernel = self.param(
        "kernel", self.kernel_init, (self.kernel_size, self.kernel_size, 1, channels), jnp.float32
    )
    x, kernel = x_bhwc.astype(self.dtype), kernel.astype(self.dtype)
    if platform_lib.uses_cpu_forms(self.platform):
      return depthwise_conv_taps(x, kernel, self.stride)
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (self.stride, self.stride),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def _is_unpadded(padding):
  return padding in ("SAME", "VALID") or all(tuple(p) == (0, 0) for p in padding)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    *,
    platform,
):
  """`lax.conv_general_dilated` for nn.Conv, with 1x1 NHWC convolutions as a strided matmul on CPU
  (`platform`, the platform compiled for).

  XLA-CPU's weight gradient of a 1x1 convolution is 2-13x slower than the matmul's (e.g. 64 ->
  128 channels at 80^2, batch 8: 232 vs 149 ms of CPU time for forward + backward); the
  values are the same. Every other case goes to lax unchanged.
  """
  plain = (
      platform_lib.uses_cpu_forms(platform)
      and rhs.shape[:2] == (1, 1)
      and tuple(dimension_numbers or ()) == ("NHWC", "HWIO", "NHWC")
      and feature_group_count == 1
      and _is_unpadded(padding)
      and not any(d != 1 for d in (lhs_dilation or ()) + (rhs_dilation or ()))
  )
  if not plain:
    return jax.lax.conv_general_dilated(
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
    )
  sh, sw = window_strides
  return jnp.einsum("bhwc,co->bhwo", lhs[:, ::sh, ::sw], rhs[0, 0], precision=precision)


def conv(*args, platform, **kwargs):
  """nn.Conv whose convolutions take the forms of `platform` (conv_general_dilated above)."""
  return nn.Conv(
      *args,
      conv_general_dilated=functools.partial(conv_general_dilated, platform=platform),
      **kwargs,
  )


def _pool_taps(x_padded, out_h, out_w):
  """The 9 stride-2 views of a padded map, taps[i][j] (B, out_h, out_w, C)."""
  return [
      [x_padded[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2] for j in range(3)]
      for i in range(3)
  ]


def _add_stride2_taps(c0, c1, c2, axis):
  """Sums three taps' gradients (n positions each, offsets 0, 1, 2 at stride 2) onto the
  2n + 1 positions they came from along `axis`, by interleaving instead of scattering."""
  n = c0.shape[axis]

  def pad(a, low, high):
    widths = [(0, 0)] * a.ndim
    widths[axis] = (low, high)
    return jnp.pad(a, widths)

  even = pad(c0, 0, 1) + pad(c2, 1, 0)  # positions 0, 2, ..., 2n
  odd = pad(c1, 0, 1)  # positions 1, 3, ..., 2n - 1, and one unused slot
  shape = list(even.shape)
  shape[axis] = 2 * (n + 1)
  both = jnp.stack([even, odd], axis=axis + 1).reshape(shape)
  return jax.lax.slice_in_dim(both, 0, 2 * n + 1, axis=axis)


def _max_pool_xla(x_bhwc):
  return nn.max_pool(x_bhwc, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@jax.custom_vjp
def _max_pool_tap_grad(x_bhwc):
  return _max_pool_xla(x_bhwc)


def _max_pool_fwd(x_bhwc):
  out = _max_pool_xla(x_bhwc)
  return out, (x_bhwc, out)


def _max_pool_bwd(residuals, g):
  """Each output's gradient goes to the first maximum of its window in row-major order
  (torch's rule), built from the 9 taps at output resolution."""
  x, out = residuals
  _, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  taps = _pool_taps(padded, *out.shape[1:3])
  taken = jnp.zeros(out.shape, bool)
  grads = [[None] * 3 for _ in range(3)]
  for i in range(3):
    for j in range(3):
      first = (taps[i][j] == out) & ~taken
      taken = taken | first
      grads[i][j] = jnp.where(first, g, jnp.zeros_like(g))
  rows = [_add_stride2_taps(grads[0][j], grads[1][j], grads[2][j], axis=1) for j in range(3)]
  full = _add_stride2_taps(*rows, axis=2)
  return (full[:, 1 : h + 1, 1 : w + 1],)


_max_pool_tap_grad.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3_s2(x_bhwc, platform):
  """torchvision's stem max-pool (3x3, stride 2, padding 1 with -inf).

  On CPU (`platform`, the platform compiled for) the backward is built from the window's taps: XLA-CPU's select-and-scatter takes
  about twice as long (8 x 160^2 x 64: 404 vs 188 ms of CPU time).
  """
  if platform_lib.uses_cpu_forms(platform):
    return _max_pool_tap_grad(x_bhwc)
  return _max_pool_xla(x_bhwc)
