"""PiCIE + H on COCO-Stuff-27: PiCIE's recipe with an auxiliary overclustering of the same
features into K_H = 45 clusters each epoch (the K of the paper's IIC overclustering head),
its within + cross loss added to the main one with equal weight (docs/design.md)."""

from configs import coco_stuff27


def get_config():
  c = coco_stuff27.get_config()
  c.kmeans.k_overcluster = 45
  return c
