"""PiCIE on Cityscapes-27 on a frozen DINO ViT-S/8 with STEGO's head (code width 100, STEGO's
for Cityscapes); see picie_vit_s8_coco_stuff27.py."""

from configs import cityscapes27
from configs import picie_vit_s8_coco_stuff27


def get_config():
  return picie_vit_s8_coco_stuff27.use_dino_vit_s8(cityscapes27.get_config(), code_width=100)
