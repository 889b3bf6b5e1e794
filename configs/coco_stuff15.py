"""PiCIE on COCO-Stuff-15: the curated images, stuff classes only (things ignored), K = 15."""

from configs import coco_stuff27


def get_config():
  c = coco_stuff27.get_config()
  c.dataset.name = "coco_stuff15"
  c.kmeans.k_train = 15
  c.eval.k_test = 15
  return c
