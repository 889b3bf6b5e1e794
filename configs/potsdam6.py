"""PiCIE on Potsdam (6 classes; IIC's "Potsdam"): the ISPRS classes, else as potsdam3.py."""

from configs import potsdam3


def get_config():
  c = potsdam3.get_config()
  c.dataset.name = "potsdam6"
  c.kmeans.k_train = 6
  c.eval.k_test = 6
  return c
