"""MDC on Cityscapes-27 as the official train_mdc_cityscapes.sh (one view, learned classifier)."""

from configs import cityscapes27


def get_config():
  c = cityscapes27.get_config()
  c.method = "mdc"
  c.train.cross_view_loss = False
  c.train.classifier = "parametric"
  return c
