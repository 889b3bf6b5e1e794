"""IIC's two per-pixel softmax heads (Ji et al. 2019, `SegmentationNet10aTwoHead`): the main
head over the K classes scored at evaluation (IIC's head B) and the auxiliary overclustering
head over more clusters (head A, 45 in PiCIE's IIC baseline), both on the same feature map.

Each head is a bias-free 1x1 convolution and a softmax, initialised as IIC's (kaiming normal,
fan_in, ReLU gain). Unlike the published head, the 1x1 conv has no padding of 1 (which there
adds a one-pixel border of bias-free zeros, softmax 1/K, before a bilinear resize to the input
size): predictions stay at the feature map's size and stride.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from picie_jax import platform as platform_lib
from picie_jax.models import layers

OVERCLUSTER_K = 45  # PiCIE §4.2: IIC "with the auxiliary overclustering loss with K = 45"

# torch kaiming_normal_(mode='fan_in', nonlinearity='relu'): N(0, 2 / fan_in), untruncated.
_head_kernel_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class IICHeads(nn.Module):
  """features (B, h, w, C) -> {'main': (B, h, w, num_classes), 'overcluster': (B, h, w,
  num_overcluster)} per-pixel class probabilities in float32."""

  num_classes: int
  num_overcluster: int = OVERCLUSTER_K
  dtype: Any = jnp.float32
  platform: str = platform_lib.CPU

  @nn.compact
  def __call__(self, features_bhwc):
    def head(k, name):
      logits = layers.conv(
          k,
          (1, 1),
          use_bias=False,
          dtype=self.dtype,
          kernel_init=_head_kernel_init,
          platform=self.platform,
          name=name,
      )(features_bhwc.astype(self.dtype))
      return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    return {
        "main": head(self.num_classes, "main"),
        "overcluster": head(self.num_overcluster, "overcluster"),
    }
