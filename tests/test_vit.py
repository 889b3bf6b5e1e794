"""DINO ViT in Flax against a PyTorch restatement of DINO's `vision_transformer.py`, through
the converter (random weights saved with torch.save, real state_dict names)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from picie_jax import convert
from picie_jax.models import vit
from tests import torch_models

TINY = vit.Architecture(patch_size=8, embed_dim=32, num_heads=4, depth=2, pretrain_size=32)


def tiny_torch_vit(seed=0):
  model = torch_models.DinoViT(patch_size=8, dim=32, depth=2, num_heads=4, img_size=32)
  return torch_models.randomize_(model, seed).eval()


def converted(torch_model, tmp_path, arch, name="vit_small_patch8", extra=None):
  """The Flax ViT's variables from torch_model's state_dict, saved and read back."""
  path = tmp_path / "dino.pth"
  torch.save({**torch_model.state_dict(), **(extra or {})}, path)
  flax_model = vit.VisionTransformer(arch)
  shapes = jax.eval_shape(flax_model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return convert.load_imagenet_backbone(dict(shapes), str(path), name)


def relative_error(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("in_size,out_grid", [(4, 6), (4, 5), (14, 40), (28, 20), (5, 5)])
def test_bicubic_matrix_is_torch_interpolate(in_size, out_grid):
  table = np.random.default_rng(0).normal(size=(in_size, in_size))
  scale = (out_grid + 0.1) / in_size
  want = F.interpolate(
      torch.tensor(table)[None, None], scale_factor=(scale, scale), mode="bicubic"
  )[0, 0].numpy()
  m = vit.torch_bicubic_matrix(in_size, out_grid, scale)
  np.testing.assert_allclose(m @ table @ m.T, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hw", [(32, 32), (48, 40), (32, 24)])
@pytest.mark.parametrize("last_blocks", [1, 2])
def test_vit_matches_dino(tmp_path, hw, last_blocks):
  """(32, 32): the stored 4 x 4 grid; (48, 40) and (32, 24): position embeddings resized."""
  torch_model = tiny_torch_vit()
  variables = converted(torch_model, tmp_path, TINY)
  images = np.random.default_rng(1).normal(size=(2, *hw, 3)).astype(np.float32)
  with torch.no_grad():
    layers = torch_model.get_intermediate_layers(
        torch.tensor(images).permute(0, 3, 1, 2), n=last_blocks
    )
  want = torch.cat([t[:, 1:] for t in layers], -1).numpy()
  got = vit.VisionTransformer(TINY, last_blocks).apply(variables, jnp.asarray(images))
  assert got.shape == (2, hw[0] // 8, hw[1] // 8, 32 * last_blocks)
  err = relative_error(np.asarray(got).reshape(want.shape), want)
  print(f"{hw} last_blocks={last_blocks}: relative error {err:.2e}")
  assert err < 1e-4


def test_vit_bfloat16_is_close(tmp_path):
  torch_model = tiny_torch_vit()
  variables = converted(torch_model, tmp_path, TINY)
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 48, 40, 3)), jnp.float32)
  full = vit.VisionTransformer(TINY).apply(variables, images)
  half = vit.VisionTransformer(TINY, dtype=jnp.bfloat16).apply(variables, images)
  assert half.dtype == jnp.bfloat16
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  err = relative_error(np.asarray(half, np.float32), np.asarray(full))
  print(f"bfloat16: relative error {err:.2e}")
  assert np.all(np.isfinite(np.asarray(half, np.float32))) and err < 5e-2


def test_converter_skips_dino_head_and_names_bad_keys(tmp_path):
  torch_model = tiny_torch_vit()
  head = {"head.mlp.0.weight": torch.zeros(4, 32), "head.last_layer.weight_g": torch.ones(4, 1)}
  converted(torch_model, tmp_path, TINY, extra=head)  # DINO's head is not "unexpected"
  state = torch_model.state_dict()
  del state["blocks.1.attn.qkv.bias"]
  state["blocks.2.norm1.weight"] = torch.ones(32)
  state["pos_embed"] = torch.zeros(1, 5, 32)
  torch.save(state, tmp_path / "bad.pth")
  shapes = jax.eval_shape(
      vit.VisionTransformer(TINY).init, jax.random.key(0), jnp.zeros((1, 32, 32, 3))
  )
  with pytest.raises(ValueError) as info:
    convert.load_imagenet_backbone(dict(shapes), str(tmp_path / "bad.pth"), "vit_small_patch8")
  message = str(info.value)
  for part in (
      "bad.pth",
      "missing keys: blocks.1.attn.qkv.bias",
      "unexpected keys: blocks.2.norm1.weight",
      "pos_embed: file (1, 5, 32), model needs (1, 17, 32)",
  ):
    assert part in message


@pytest.mark.parametrize(
    "name,dim,depth,heads,patch",
    [
        ("vit_small_patch8", 384, 12, 6, 8),
        ("vit_base_patch8", 768, 12, 12, 8),
        ("vit_small_patch16", 384, 12, 6, 16),
    ],
)
def test_real_variants_have_dinos_names_and_shapes(name, dim, depth, heads, patch):
  """Every variable of the full-size ViT has DINO's state_dict name and shape (eval_shape)."""
  torch_model = torch_models.DinoViT(patch_size=patch, dim=dim, depth=depth, num_heads=heads)
  want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
  shapes = jax.eval_shape(
      vit.VisionTransformer(vit.ARCHITECTURES[name]).init,
      jax.random.key(0),
      jnp.zeros((1, 320, 320, 3)),
  )
  names = convert.torch_names(dict(shapes), name)
  flat = flax.traverse_util.flatten_dict(dict(shapes))
  got = {names[p]: convert._torch_shape(flat[p].shape) for p in flat}
  assert got == want
