"""Raw-pixel k-means on the synthetic scenes: the floor any learned feature must clear."""

from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.method = "pixel_kmeans"
  c.kmeans.metric = "l2"
  c.num_epochs = 0
  return c
