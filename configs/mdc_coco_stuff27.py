"""MDC on COCO-Stuff-27 as the official train_mdc.sh: one view, a learned 1x1 classifier
re-initialised every epoch, otherwise the PiCIE recipe."""

from configs import coco_stuff27


def get_config():
  c = coco_stuff27.get_config()
  c.method = "mdc"
  c.train.cross_view_loss = False
  c.train.classifier = "parametric"
  return c
