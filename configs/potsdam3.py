"""PiCIE on Potsdam-3 (IIC's name): the 200x200 tiles, 3 classes (roads+cars, buildings+clutter,
vegetation+trees); train on labelled_train, evaluate on labelled_test (STEGO's split;
picie_jax/data/potsdam.py gives the sources).

PiCIE has no Potsdam recipe: the COCO one with every side 224 (res2, res1, eval.res), the
multiple of 32 (config_check) nearest above the tiles' 200, so no label pixel is dropped, and
STEGO's training resolution. COCO's 640/320 would upsample a tile 1.6-3.2 times.
"""

from configs import common


def get_config():
  c = common.get_config()
  c.dataset.name = "potsdam3"
  c.res2 = 224
  c.res1 = 224
  c.eval.res = 224
  c.kmeans.k_train = 3
  c.eval.k_test = 3
  return c
