"""Draws docs/synthetic_examples.png: synthetic scenes (image | coloured labels) in a small grid.

Usage: python scripts/make_synthetic_grid.py [--out docs/synthetic_examples.png] [--seed 0] [--count 6]
"""

import argparse
import os

import numpy as np
from PIL import Image
from PIL import ImageDraw

from picie_jax.data import synthetic

# One distinct colour per class (stuff in muted tones, things in saturated ones).
PALETTE_RGB = np.array(
    [
        (70, 110, 170),
        (110, 170, 90),
        (170, 130, 60),
        (140, 90, 150),
        (230, 40, 40),
        (250, 200, 0),
        (0, 200, 220),
        (255, 110, 200),
    ],
    np.uint8,
)
LEGEND_HEIGHT = 44


def labels_to_rgb(labels_hw):
  """Colours a label map with PALETTE_RGB."""
  if labels_hw.max() >= len(PALETTE_RGB):
    raise ValueError(f"label {labels_hw.max()} has no palette colour ({len(PALETTE_RGB)} colours)")
  return PALETTE_RGB[labels_hw]


def make_grid(seed, count, size, columns):
  """A grid of (image | label colours) pairs with a class legend below; returns a PIL image."""
  images, labels = synthetic.generate_split(seed, 0, count, size)
  pairs = [np.concatenate([im, labels_to_rgb(lb)], axis=1) for im, lb in zip(images, labels)]
  rows = -(-count // columns)
  gap = 4
  cell_h, cell_w = size + gap, 2 * size + gap
  canvas = np.full((rows * cell_h + LEGEND_HEIGHT, columns * cell_w, 3), 255, np.uint8)
  for i, pair in enumerate(pairs):
    r, c = divmod(i, columns)
    canvas[r * cell_h : r * cell_h + size, c * cell_w : c * cell_w + 2 * size] = pair
  grid = Image.fromarray(canvas)
  draw = ImageDraw.Draw(grid)
  x, y = 4, rows * cell_h + 4
  for class_id, name in enumerate(synthetic.CLASS_NAMES):
    text_w = draw.textlength(name)
    if x + 16 + text_w > grid.width:
      x, y = 4, y + 18
    draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(v) for v in PALETTE_RGB[class_id]))
    draw.text((x + 16, y), name, fill=(0, 0, 0))
    x += int(16 + text_w + 12)
  return grid


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument(
      "--out",
      default=os.path.join(os.path.dirname(__file__), "..", "docs", "synthetic_examples.png"),
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--count", type=int, default=6)
  parser.add_argument("--size", type=int, default=128)
  parser.add_argument("--columns", type=int, default=3)
  args = parser.parse_args()
  make_grid(args.seed, args.count, args.size, args.columns).save(args.out, optimize=True)
  print(f"wrote {args.out} ({os.path.getsize(args.out) // 1024} KiB)")


if __name__ == "__main__":
  main()
