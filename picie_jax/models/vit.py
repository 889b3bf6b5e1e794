"""DINO's Vision Transformer (facebookresearch/dino `vision_transformer.py`) and f_theta on it.

The architecture is DINO's: a patch-embedding convolution (stride = patch), a CLS token, learned
position embeddings resized bicubically to the input's patch grid as DINO's
`interpolate_pos_encoding` does, pre-norm blocks (LayerNorm eps 1e-6, multi-head attention with
a biased qkv projection, exact-GELU MLP of ratio 4) and a final LayerNorm. The features are the
patch tokens of the last block(s) after the final norm, as `get_intermediate_layers` gives them
to STEGO. Variable names follow DINO's state_dict (`convert.torch_names` maps them).
"""

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from picie_jax.models import resnet


class Architecture(NamedTuple):
  """A DINO ViT: patch side, token width, heads, blocks; position embeddings for 224^2 inputs."""

  patch_size: int
  embed_dim: int
  num_heads: int
  depth: int = 12
  pretrain_size: int = 224  # DINO's img_size: pos_embed holds (224 / patch)^2 + 1 tokens


ARCHITECTURES = {
    "vit_small_patch8": Architecture(8, 384, 6),
    "vit_base_patch8": Architecture(8, 768, 12),
    "vit_small_patch16": Architecture(16, 384, 6),
}

_TORCH_BICUBIC_A = -0.75  # torch's (and OpenCV's) cubic convolution coefficient


def _cubic_weights(t):
  """torch's `get_cubic_upsample_coefficients`: the four taps' weights at fraction t in [0, 1]."""
  a = _TORCH_BICUBIC_A

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return (far(t + 1), near(t), near(1 - t), far(2 - t))


def torch_bicubic_matrix(in_size, out_size, scale_factor):
  """(out_size, in_size) float64 matrix of torch's `interpolate(mode='bicubic',
  align_corners=False, scale_factor=...)` along one axis.

  With a scale factor given, torch maps output pixel i to the source coordinate
  (i + 0.5) / scale_factor - 0.5 (not in/out), clamps the taps to the border, and uses Keys'
  cubic with a = -0.75 without antialiasing; `jax.image.resize` differs on both counts.
  """
  matrix = np.zeros((out_size, in_size))
  for i in range(out_size):
    source = (i + 0.5) / scale_factor - 0.5
    base = min(math.floor(source), in_size - 1)
    t = min(max(source - base, 0.0), 1.0)
    for tap, weight in enumerate(_cubic_weights(t)):
      matrix[i, min(max(base - 1 + tap, 0), in_size - 1)] += weight
  return matrix


def interpolate_pos_encoding(pos_embed, grid_hw, image_hw):
  """DINO's `interpolate_pos_encoding`: pos_embed (1, 1 + N, C) for a square grid of N patches
  -> (1, 1 + h*w, C) for the (h, w) grid of an image of `image_hw` pixels.

  As DINO, the table is used as it is for a square image with N patches, and otherwise resized
  bicubically with scale factors (h + 0.1) / sqrt(N), (w + 0.1) / sqrt(N) (the 0.1 avoids
  floating-point error in the output size; it also shifts the sampling grid, which is kept).
  """
  num_patches = pos_embed.shape[1] - 1
  h, w = grid_hw
  if h * w == num_patches and image_hw[0] == image_hw[1]:
    return pos_embed
  side = math.sqrt(num_patches)
  table_side = int(side)
  matrices = []
  for out_side in (h, w):
    scale_factor = (out_side + 0.1) / side
    size = math.floor(float(table_side) * scale_factor)
    if size != out_side:
      raise ValueError(f"position embeddings resize to {size}, not the patch grid's {out_side}")
    matrices.append(jnp.asarray(torch_bicubic_matrix(table_side, size, scale_factor), jnp.float32))
  table = pos_embed[0, 1:].reshape(table_side, table_side, -1).astype(jnp.float32)
  resized = jnp.einsum("hi,wj,ijc->hwc", matrices[0], matrices[1], table)
  return jnp.concatenate([pos_embed[:, :1], resized.reshape(1, h * w, -1)], axis=1)


# DINO's trunc_normal_(std=.02) cuts at +-2 (100 std): in effect a normal. Biases start at zero.
_DINO_INIT = nn.initializers.normal(0.02)


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, kernel_init=_DINO_INIT, name=name)


def _layer_norm(dtype, name):
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False, name=name)


class Attention(nn.Module):
  """Multi-head self-attention: qkv (biased) -> softmax(q k^T / sqrt(head_dim)) v -> proj."""

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btc):
    b, t, c = x_btc.shape
    head_dim = c // self.num_heads
    qkv = _dense(3 * c, self.dtype, "qkv")(x_btc)
    q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, self.num_heads, head_dim), 2, 0)
    out = jax.nn.dot_product_attention(q, k, v, scale=head_dim**-0.5)
    return _dense(c, self.dtype, "proj")(out.reshape(b, t, c))


class Mlp(nn.Module):
  """fc1 -> exact (erf) GELU -> fc2, hidden width ratio * C."""

  ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btc):
    c = x_btc.shape[-1]
    y = _dense(self.ratio * c, self.dtype, "fc1")(x_btc)
    return _dense(c, self.dtype, "fc2")(nn.gelu(y, approximate=False))


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_btc):
    x = x_btc + Attention(self.num_heads, self.dtype, name="attn")(
        _layer_norm(self.dtype, "norm1")(x_btc)
    )
    return x + Mlp(dtype=self.dtype, name="mlp")(_layer_norm(self.dtype, "norm2")(x))


class VisionTransformer(nn.Module):
  """DINO's ViT on normalised images (B, H, W, 3) -> the patch tokens of the last `last_blocks`
  blocks, each after the final norm, concatenated: (B, H/p, W/p, last_blocks * embed_dim)."""

  arch: Architecture
  last_blocks: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_bhwc):
    arch, p = self.arch, self.arch.patch_size
    if not 1 <= self.last_blocks <= arch.depth:
      raise ValueError(f"last_blocks={self.last_blocks} must be in 1..{arch.depth} (the depth)")
    b, height, width, _ = images_bhwc.shape
    x = nn.Conv(arch.embed_dim, (p, p), (p, p), "VALID", dtype=self.dtype, name="patch_embed")(
        images_bhwc.astype(self.dtype)
    )
    grid_hw = x.shape[1:3]
    x = x.reshape(b, -1, arch.embed_dim)
    cls_token = self.param("cls_token", _DINO_INIT, (1, 1, arch.embed_dim), jnp.float32)
    table_side = arch.pretrain_size // p
    pos_embed = self.param(
        "pos_embed", _DINO_INIT, (1, table_side**2 + 1, arch.embed_dim), jnp.float32
    )
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, arch.embed_dim)).astype(x.dtype), x], 1)
    x = x + interpolate_pos_encoding(pos_embed, grid_hw, (height, width)).astype(x.dtype)
    norm = _layer_norm(self.dtype, "norm")
    outputs = []
    for i in range(arch.depth):
      x = Block(arch.num_heads, self.dtype, name=f"blocks_{i}")(x)
      if arch.depth - i <= self.last_blocks:
        outputs.append(norm(x)[:, 1:])
    return jnp.concatenate(outputs, -1).reshape(b, *grid_hw, -1)


HEADS = ("linear", "stego")


class ViTNet(nn.Module):
  """f_theta on a DINO ViT: images in [0, 1] -> float32 features (B, H/p, W/p, out_channels).

  The ViT (under `backbone`) sees ImageNet-normalised images, as DINO was trained. The head
  (`head`) maps its tokens to the feature width: 'linear', a 1x1 projection; 'stego', STEGO's
  segmentation head, a 1x1 projection plus a two-layer 1x1 MLP (ReLU) of the tokens, summed
  (without STEGO's Dropout2d). `depth` < the architecture's gives cheap CPU models.
  """

  arch: Architecture
  out_channels: int = 128
  head: str = "linear"
  last_blocks: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images_01_bhwc, train: bool):
    del train  # no BatchNorm, no dropout
    if self.head not in HEADS:
      raise ValueError(f"model.head={self.head!r} is not supported; use one of {', '.join(HEADS)}")
    tokens = VisionTransformer(self.arch, self.last_blocks, self.dtype, name="backbone")(
        resnet.normalize_input(images_01_bhwc)
    )

    def dense(features, name):
      return nn.Dense(features, dtype=self.dtype, name=name)

    out = dense(self.out_channels, "head_linear")(tokens)
    if self.head == "stego":
      hidden = nn.relu(dense(tokens.shape[-1], "head_mlp_0")(tokens))
      out = out + dense(self.out_channels, "head_mlp_1")(hidden)
    return out.astype(jnp.float32)
