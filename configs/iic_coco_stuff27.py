"""IIC on COCO-Stuff-27 as PiCIE §4.2 trains it: the ResNet-18 FPN of PiCIE's recipe, IIC's
main head over 27 classes and the auxiliary overclustering head over 45 (common.py's config.iic:
T = 6 feature pixels, i.e. IIC's 10 of 128 input pixels at res1 320 / stride 4).

For IIC-res12 set model.backbone='resnet18_res12' (stride 8: iic.half_window=3).
"""

from configs import coco_stuff27


def get_config():
  c = coco_stuff27.get_config()
  c.method = "iic"
  return c
