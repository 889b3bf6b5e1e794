"""PiCIE on Cityscapes-27: train on test+train_extra, evaluate on val+train (DESIGN §1)."""

from configs import common


def get_config():
  c = common.get_config()
  c.dataset.name = "cityscapes27"
  c.train.lr = 1e-3
  return c
