"""The demo default: PiCIE on the embedded synthetic scenes, sized for a 2-core CPU (minutes).

It starts, as the paper does, from ImageNet weights: the EfficientNet-Lite0 that a pip
dependency installs (no download), and fine-tunes it with the paper's learning rate for a
pretrained backbone (1e-4, the COCO recipe).
"""

from configs import common


def get_config():
  c = common.get_config()
  c.dataset.name = "synthetic"
  c.dataset.num_train = 768
  c.dataset.num_val = 128
  c.dataset.synthetic_size = 128
  c.model.backbone = "efficientnet_lite0"
  c.model.init = "imagenet"
  c.model.fpn_channels = 64
  c.res2 = 128
  c.res1 = 64
  c.num_epochs = 6
  c.kmeans.k_train = 8
  c.kmeans.batch_size = 128
  c.kmeans.num_init_batches = 2
  c.train.batch_size = 32
  c.train.lr = 1e-4
  c.augment.blur_max_radius = 3
  c.eval.res = 64
  c.eval.k_test = 8
  c.eval.batch_size = 64
  c.log_every_steps = 10
  c.checkpoint_every_steps = 50
  return c
