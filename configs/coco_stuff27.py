"""PiCIE on COCO-Stuff-27 (curated IIC split), the paper's main recipe (DESIGN §1)."""

from configs import common


def get_config():
  c = common.get_config()
  c.dataset.name = "coco_stuff27"
  return c
