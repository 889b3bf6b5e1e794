"""PiCIE in PyTorch, the peer of the benchmarks: torchvision's ResNet-18 layout, the official
PiCIE FPN (`modules/fpn.py`), and the per-batch work of each phase (cluster, label, train, eval).

The network classes are also the reference of the parity tests (tests/torch_models.py imports
them; tests/test_convert.py checks that picie_jax computes the same function), so the peer
runs the same network as picie_jax. torchvision is not installable here, hence the restatement.
"""

import torch
from torch import nn
from torch.nn import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET18_CHANNELS = (64, 128, 256, 512)


class BasicBlock(nn.Module):
  """torchvision.models.resnet.BasicBlock."""

  def __init__(self, inplanes, planes, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(
          nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
  """torchvision resnet18 (fc included, as in resnet18-f37072fd.pth); forward gives res2..res5."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for stage, planes in enumerate(RESNET18_CHANNELS, start=1):
      stride = 1 if stage == 1 else 2
      setattr(
          self,
          f"layer{stage}",
          nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1)),
      )
      inplanes = planes
    self.fc = nn.Linear(512, 1000)

  def forward(self, x):
    x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
    out = {}
    for stage in range(1, 5):
      x = getattr(self, f"layer{stage}")(x)
      out[f"res{stage + 1}"] = x
    return out


class FPNDecoder(nn.Module):
  """The official PiCIE decoder: 1x1 laterals, bilinear (align_corners=False) top-down sum."""

  def __init__(self, in_channels, out_channels):
    super().__init__()
    for i, c in enumerate(reversed(in_channels), start=1):  # layer1 takes res5
      setattr(self, f"layer{i}", nn.Conv2d(c, out_channels, 1))

  def forward(self, feats):
    out = self.layer1(feats["res5"])
    for name, level in (("layer2", "res4"), ("layer3", "res3"), ("layer4", "res2")):
      lateral = getattr(self, name)(feats[level])
      out = (
          F.interpolate(out, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
          + lateral
      )
    return out


class PanopticFPN(nn.Module):

  def __init__(self, backbone, in_channels, out_channels=128):
    super().__init__()
    self.backbone = backbone
    self.decoder = FPNDecoder(in_channels, out_channels)

  def forward(self, x):
    return self.decoder(self.backbone(x))


def cross_entropy(logits_bkhw, labels_bhw, weights_k):
  """torch's CrossEntropyLoss(weight=w): sum_i w[y_i] l_i / sum_i w[y_i], as the reference."""
  return F.cross_entropy(logits_bkhw, labels_bhw, weight=weights_k)


def picie_loss(z1, z2, y1, y2, mu1, mu2, w1, w2):
  """The PiCIE loss of picie_jax.core.losses.picie_loss (use_cross=True) on NCHW features:
  within = (L(z1, y1, mu1) + L(z2, y2, mu2)) / 2, cross = (L(z1, y2, mu2) + L(z2, y1, mu1)) / 2,
  total = (within + cross) / 2, logits by the reference's frozen 1x1 conv with the centroids."""

  def clust(z, y, mu, w):
    return cross_entropy(F.conv2d(z, mu[:, :, None, None]), y, w)

  within = (clust(z1, y1, mu1, w1) + clust(z2, y2, mu2, w2)) / 2
  cross = (clust(z1, y2, mu2, w2) + clust(z2, y1, mu1, w1)) / 2
  return {"within": within, "cross": cross, "total": (within + cross) / 2}


class PiCIEPeer:
  """The per-batch work of each PiCIE phase in PyTorch on the ResNet-18 FPN, as the reference
  does it: views come ready from its data loader, labels are computed once per epoch (label
  pass) and given to the train step, which runs 2 views, within + cross loss and Adam.

  `channels_last` stores the network and inputs NHWC in memory (PyTorch's faster CPU layout).
  """

  def __init__(self, k, fpn_channels=128, lr=1e-4, channels_last=False, seed=0):
    torch.manual_seed(seed)
    self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
    self.net = PanopticFPN(ResNet18(), RESNET18_CHANNELS, fpn_channels).to(
        memory_format=self.memory_format
    )
    self.optimizer = torch.optim.Adam(self.net.parameters(), lr=lr)
    centroids = F.normalize(torch.randn(2, k, fpn_channels), dim=-1)
    self.centroids = [centroids[0], centroids[1]]
    self.weights = [torch.full((k,), 1.0 / k), torch.full((k,), 1.0 / k)]
    self.running_counts = [torch.zeros(k), torch.zeros(k)]
    self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

  def images(self, images_bchw_01):
    """A batch in the peer's memory format (done once, outside the timings)."""
    return images_bchw_01.contiguous(memory_format=self.memory_format)

  def features(self, images_bchw_01):
    """L2-normalised features (B, C, H/4, W/4) of images in [0, 1]."""
    return F.normalize(self.net((images_bchw_01 - self.mean) / self.std), dim=1)

  def assign(self, z_bchw, view):
    """Nearest centroid (squared L2, as faiss) of every pixel feature: (B, H, W) int64."""
    mu = self.centroids[view]
    sq = (
        (z_bchw * z_bchw).sum(1, keepdim=True)
        - 2 * F.conv2d(z_bchw, mu[:, :, None, None])
        + (mu * mu).sum(1)[None, :, None, None]
    )
    return sq.argmin(1)

  def cluster_step(self, view1, view2):
    """Cluster pass, one batch: both views' features (train-mode BN, no grad) and one
    mini-batch k-means update per view."""
    self.net.train()
    with torch.no_grad():
      for view, images in enumerate((view1, view2)):
        z = self.features(images)
        labels = self.assign(z, view).reshape(-1)
        points = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        k = self.centroids[view].shape[0]
        counts = torch.bincount(labels, minlength=k).float()
        sums = torch.zeros_like(self.centroids[view]).index_add_(0, labels, points)
        self.running_counts[view] += counts
        lr = (counts / self.running_counts[view].clamp(min=1))[:, None]
        means = sums / counts.clamp(min=1)[:, None]
        self.centroids[view] = torch.where(
            counts[:, None] > 0, (1 - lr) * self.centroids[view] + lr * means, self.centroids[view]
        )

  def label_step(self, view1, view2):
    """Label pass, one batch: both views' labels from eval-mode features (kept for training)."""
    self.net.eval()
    with torch.no_grad():
      return [
          self.assign(self.features(images), view) for view, images in enumerate((view1, view2))
      ]

  def train_step(self, view1, view2, labels1, labels2):
    """One PiCIE update from given views and labels; view 2's features are flipped into view
    1's frame (the equivariance transform G applied after f, here a horizontal flip)."""
    self.net.train()
    z1 = self.features(view1)
    z2 = torch.flip(self.features(view2), dims=(3,))
    out = picie_loss(
        z1,
        z2,
        labels1,
        labels2,
        self.centroids[0],
        self.centroids[1],
        self.weights[0],
        self.weights[1],
    )
    self.optimizer.zero_grad(set_to_none=True)
    out["total"].backward()
    self.optimizer.step()
    return out["total"].item()

  def eval_step(self, images, label_hw):
    """Inference: eval-mode features, centroid logits upsampled to the label size, argmax."""
    self.net.eval()
    with torch.no_grad():
      logits = F.conv2d(self.features(images), self.centroids[0][:, :, None, None])
      return F.interpolate(logits, size=label_hw, mode="bilinear", align_corners=False).argmax(1)
