"""IIC-res12 on the synthetic scenes: IIC with ResNet-18's stem, layer1 and layer2 (no FPN,
stride 8), PiCIE §4.2's stand-in for IIC's shallow VGG-like network.

No ImageNet ResNet ships with a Python package, so it starts from a random init (the paper's
would start from ImageNet: set model.init='imagenet' and model.init_checkpoint). At res1 64 the
features are 8 x 8: T = 1.
"""

from configs import iic_synthetic


def get_config():
  c = iic_synthetic.get_config()
  c.model.backbone = "resnet18_res12"
  c.model.init = "random"
  return c
