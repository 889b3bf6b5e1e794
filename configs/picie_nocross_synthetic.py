"""Ablation: PiCIE's two views but within-view loss only (no invariance/equivariance coupling)."""

from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.train.cross_view_loss = False
  return c
