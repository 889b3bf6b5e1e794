"""PiCIE on the synthetic scenes with a DINO ViT-S/8 from random weights, in minutes on CPU.

The architecture is ViT-S/8's (384 wide, 6 heads, patch 8: features at stride 8, 8 x 8 at
res1 64) cut to 2 of its 12 blocks (model.vit_depth): no DINO weights ship with a package, and
12 blocks from scratch would cost minutes per epoch on 2 cores without learning more on these
scenes; 256 training images (the demo's 768 would triple the minutes). The whole ViT trains
(nothing pretrained to freeze); the head is the 1x1 projection.
MDC and IIC on it: --config.method=mdc --config.train.cross_view_loss=False, or
--config.method=iic --config.iic.half_window=1.
"""

from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.model.backbone = "vit_small_patch8"
  c.model.vit_depth = 2
  c.model.init = "random"
  c.dataset.num_train = 256
  return c
