"""MDC baseline on the synthetic scenes: one view, no cross-view loss, same k-means and budget."""

from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.method = "mdc"
  c.train.cross_view_loss = False
  return c
