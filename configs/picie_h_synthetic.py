"""PiCIE + H on the synthetic scenes: the demo's PiCIE with an auxiliary overclustering of the
same features into K_H = 24 clusters each epoch (3 K: an overclustering, as the paper's 45 is for
K = 27), its within + cross loss added to the main one with equal weight (docs/design.md)."""

from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.kmeans.k_overcluster = 24
  return c
