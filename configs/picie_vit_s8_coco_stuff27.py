"""PiCIE on COCO-Stuff-27 on DINO's ViT-S/8, the backbone STEGO and its successors start from.

As STEGO, the DINO backbone is frozen and only a head trains: STEGO's segmentation head (a 1x1
projection plus a two-layer 1x1 MLP, summed) to STEGO's code width (70 on COCO-Stuff, 100 on
Cityscapes). The rest is PiCIE's recipe (k-means, losses, lr, res1 320: 40 x 40 tokens).
Weights: DINO's `dino_deitsmall8_pretrain.pth` (set model.init_checkpoint to its path).
"""

from configs import coco_stuff27


def use_dino_vit_s8(c, code_width):
  """Sets config `c` to a frozen DINO ViT-S/8 with STEGO's head of `code_width` channels."""
  c.model.backbone = "vit_small_patch8"
  c.model.init = "imagenet"
  c.model.init_checkpoint = "dino_deitsmall8_pretrain.pth"
  c.model.freeze_backbone = True
  c.model.head = "stego"
  c.model.fpn_channels = code_width
  return c


def get_config():
  return use_dino_vit_s8(coco_stuff27.get_config(), code_width=70)
