"""No training: fresh-cluster k-means on the initial ImageNet features of the demo's network.

The row every trained method must beat: it measures what the ImageNet init alone gives.
"""

from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.num_epochs = 0
  return c
