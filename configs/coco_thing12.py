"""PiCIE on COCO-Thing-12: the curated images, thing classes only (stuff ignored), K = 12."""

from configs import coco_stuff27


def get_config():
  c = coco_stuff27.get_config()
  c.dataset.name = "coco_thing12"
  c.kmeans.k_train = 12
  c.eval.k_test = 12
  return c
