"""IIC baseline on the synthetic scenes: the demo's network (EfficientNet-Lite0 FPN, ImageNet
init) with IIC's two heads and loss instead of PiCIE's clustering, same data and budget.

T = 1 feature pixel: IIC's 10 of 128 input pixels, at res1 64 / stride 4 (16 feature pixels).
"""

from configs import synthetic


def get_config():
  c = synthetic.get_config()
  c.method = "iic"
  c.iic.half_window = 1
  return c
