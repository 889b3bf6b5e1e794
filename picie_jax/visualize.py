"""Pictures of results: coloured label maps, titled image | ground truth | prediction panels and
segmentation overlays with class legends, and confusion matrices. NumPy and Pillow only, so it
runs anywhere the package does."""

import os

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

_MAX_PALETTE = 2**24 - 1
_HEAT_DARK_RGB = np.array([8, 48, 107], dtype=np.float64)
_TEXT_RGB = (0, 0, 0)
_WHITE = 255
_IGNORED_NAME = "unlabelled / unmatched"
MIN_TILE = 192
PANEL_TITLES = ("image", "ground truth", "prediction")
OVERLAY_TITLES = ("image", "segmentation")


def palette(n):
  """(n, 3) uint8 distinct colours, deterministic; none is black (black marks ignored pixels).

  PASCAL VOC's colour map of ids 1..n: the bits of the id are dealt out round-robin to the
  high bits of R, G, B, a bijection on 24-bit ids, so every colour differs.
  """
  if not 0 <= n <= _MAX_PALETTE:
    raise ValueError(f"palette size n={n} must be in [0, {_MAX_PALETTE}]")
  ids = np.arange(1, n + 1, dtype=np.int64)
  rgb = np.zeros((n, 3), dtype=np.int64)
  for bit in range(8):
    for channel in range(3):
      rgb[:, channel] |= ((ids >> (3 * bit + channel)) & 1) << (7 - bit)
  return rgb.astype(np.uint8)


def colorize(labels_hw, pal):
  """(..., 3) uint8 colours of integer labels; labels outside [0, len(pal)) are drawn black."""
  labels = np.asarray(labels_hw)
  pal = np.asarray(pal, dtype=np.uint8)
  valid = (labels >= 0) & (labels < len(pal))
  colours = pal[np.where(valid, labels, 0)]
  colours[~valid] = 0
  return colours


def _resize_nearest(arrays_nhw, height, width):
  """Nearest-neighbour resize with pixel-centre alignment (as Pillow's NEAREST) of (N, H, W, ...)
  label maps or images; an integer upscale repeats each pixel exactly."""
  in_h, in_w = arrays_nhw.shape[1:3]
  rows = ((2 * np.arange(height) + 1) * in_h) // (2 * height)
  cols = ((2 * np.arange(width) + 1) * in_w) // (2 * width)
  return arrays_nhw[:, rows][:, :, cols]


def display_scale(height, width, min_tile=MIN_TILE):
  """Integer upscale factor that brings a tile's shorter side to at least `min_tile` pixels."""
  return max(1, -(-min_tile // min(height, width)))


def font_for_tile(height, width):
  """Pillow's default font at a size readable beside tiles of this size (14 px up to ~200 px)."""
  return ImageFont.load_default(size=max(14, min(height, width) // 14))


def _title_strip(titles, tile_width, gap, font):
  """(h, columns * (tile_width + gap) - gap, 3) uint8 strip with each title centred over its column."""
  ascent, descent = font.getmetrics()
  width = len(titles) * (tile_width + gap) - gap
  strip = Image.new("RGB", (width, ascent + descent + 2 * gap), (_WHITE,) * 3)
  draw = ImageDraw.Draw(strip)
  for col, title in enumerate(titles):
    centre = col * (tile_width + gap) + tile_width / 2
    draw.text((centre, gap + ascent), title, fill=_TEXT_RGB, font=font, anchor="ms")
  return np.asarray(strip)


def legend_image(entries, max_width, font, gap=4):
  """uint8 legend: a square swatch of each (RGB, name) entry's exact colour, its name to the right.

  Entries fill rows left to right, as many per row as fit in `max_width` (at least one).
  """
  swatch = font.size
  ascent, descent = font.getmetrics()
  row_height = max(swatch, ascent + descent) + gap
  entry_width = 2 * (swatch + gap) + max(font.getbbox(name)[2] for _, name in entries)
  per_row = max(1, min(len(entries), max_width // entry_width))
  num_rows = -(-len(entries) // per_row)
  legend = Image.new("RGB", (per_row * entry_width, num_rows * row_height + gap), (_WHITE,) * 3)
  draw = ImageDraw.Draw(legend)
  for i, (rgb, name) in enumerate(entries):
    row, col = divmod(i, per_row)
    left, top = col * entry_width + gap, row * row_height + gap
    draw.rectangle(
        (left, top, left + swatch - 1, top + swatch - 1), fill=tuple(int(c) for c in rgb)
    )
    draw.text((left + swatch + gap, top + swatch / 2), name, fill=_TEXT_RGB, font=font, anchor="lm")
  return np.asarray(legend)


def titled_grid(columns, titles, legend_entries, font, gap=4):
  """uint8 picture: `titles` over columns of tiles (one row per example), a legend below.

  `columns`: one (N, H, W, 3) uint8 array per column, all of one shape, `gap` white pixels
  apart; `legend_entries`: (RGB, name) pairs for `legend_image`.
  """
  num, height, width, _ = columns[0].shape
  titles_strip = _title_strip(titles, width, gap, font)
  legend = legend_image(legend_entries, titles_strip.shape[1], font, gap)
  grid_top = titles_strip.shape[0]
  legend_top = grid_top + num * (height + gap)
  canvas = np.full(
      (legend_top + legend.shape[0], max(titles_strip.shape[1], legend.shape[1]), 3),
      _WHITE,
      dtype=np.uint8,
  )
  canvas[:grid_top, : titles_strip.shape[1]] = titles_strip
  for col, tiles in enumerate(columns):
    for row in range(num):
      top, left = grid_top + row * (height + gap), col * (width + gap)
      canvas[top : top + height, left : left + width] = tiles[row]
  canvas[legend_top:, : legend.shape[1]] = legend
  return canvas


def segmentation_panel(
    images_nhwc_uint8, gt_nhw, pred_nhw, num_classes, class_names=None, min_tile=MIN_TILE, gap=4
):
  """uint8 picture: titled columns image | ground truth | prediction, one row per example, and a
  legend of the classes (`class_names`, else "class i"; one for black, ignored or unmatched, if any).

  Tiles are upscaled by an integer factor to at least `min_tile` pixels (nearest, so label maps
  stay crisp); label maps of another size (e.g. 1/4-resolution features) are resized nearest to
  the tile. Colours come from `palette(num_classes)`; ignored labels are black.
  """
  images = np.asarray(images_nhwc_uint8)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f"images_nhwc_uint8 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}"
    )
  num, height, width, _ = images.shape
  gt, pred = np.asarray(gt_nhw), np.asarray(pred_nhw)
  for name, labels in (("gt_nhw", gt), ("pred_nhw", pred)):
    if labels.ndim != 3 or labels.shape[0] != num:
      raise ValueError(f"{name} must be (N={num}, H, W) label maps, got shape {labels.shape}")
  names = list(class_names) if class_names else [f"class {i}" for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"class_names has {len(names)} names for num_classes={num_classes}")
  scale = display_scale(height, width, min_tile)
  tile_h, tile_w = height * scale, width * scale
  pal = palette(num_classes)
  gt_tiles, pred_tiles = (_resize_nearest(labels, tile_h, tile_w) for labels in (gt, pred))
  entries = list(zip(pal, names))
  if any(np.any((labels < 0) | (labels >= num_classes)) for labels in (gt, pred)):
    entries.append(((0, 0, 0), _IGNORED_NAME))
  columns = [
      _resize_nearest(images, tile_h, tile_w),
      colorize(gt_tiles, pal),
      colorize(pred_tiles, pal),
  ]
  return titled_grid(columns, PANEL_TITLES, entries, font_for_tile(tile_h, tile_w), gap)


def overlay_panel(image_hwc_uint8, labels_hw, names_by_label, alpha=0.5, min_tile=MIN_TILE, gap=4):
  """uint8 picture: titled image | its labels' colours blended over it (weight `alpha`), and a
  legend of the labels present. Label i is drawn in `palette(len(names_by_label))[i]`."""
  image, labels = np.asarray(image_hwc_uint8), np.asarray(labels_hw)
  if (
      image.dtype != np.uint8
      or image.ndim != 3
      or image.shape[-1] != 3
      or labels.shape != image.shape[:2]
  ):
    raise ValueError(
        f"overlay_panel needs a uint8 (H, W, 3) image and (H, W) labels, got "
        f"{image.dtype} {image.shape} and {labels.shape}"
    )
  pal = palette(len(names_by_label))
  blended = np.round((1 - alpha) * image + alpha * colorize(labels, pal)).astype(np.uint8)
  height, width = labels.shape
  scale = display_scale(height, width, min_tile)
  columns = [
      _resize_nearest(tile[None], height * scale, width * scale) for tile in (image, blended)
  ]
  entries = [(pal[i], names_by_label[i]) for i in np.unique(labels)]
  return titled_grid(
      columns, OVERLAY_TITLES, entries, font_for_tile(height * scale, width * scale), gap
  )


def _heat_colours(values):
  """uint8 RGB of values in [0, 1]: white at 0 to dark blue at 1."""
  rgb = _WHITE + values[..., None] * (_HEAT_DARK_RGB - _WHITE)
  return np.round(rgb).astype(np.uint8)


def _label_strip(names, cell, font):
  """Image (len(names)*cell tall) with one name per cell row, left-aligned, black on white."""
  widths = [font.getbbox(name)[2] for name in names]
  strip = Image.new("RGB", (max(widths) + 4, len(names) * cell), (_WHITE,) * 3)
  draw = ImageDraw.Draw(strip)
  for i, name in enumerate(names):
    top, bottom = font.getbbox(name)[1::2]
    draw.text((2, i * cell + (cell - top - bottom) / 2), name, fill=_TEXT_RGB, font=font)
  return strip


def confusion_matrix_image(hist, class_names=None, cell=16):
  """uint8 heat map of a row-normalised confusion histogram, `cell` pixels per entry.

  Rows are true classes, columns predictions; a row with no pixels stays white. With
  `class_names` (one per row) the rows are labelled on the left and the columns on top
  (by name if the histogram is square, else by cluster index), in Pillow's default font.
  """
  hist = np.asarray(hist, dtype=np.float64)
  if hist.ndim != 2:
    raise ValueError(f"hist must be 2-D (true, pred), got shape {hist.shape}")
  row_totals = hist.sum(axis=1, keepdims=True)
  fractions = hist / np.where(row_totals > 0, row_totals, 1)
  heat = np.repeat(np.repeat(_heat_colours(fractions), cell, axis=0), cell, axis=1)
  if class_names is None:
    return heat
  num_rows, num_cols = hist.shape
  if len(class_names) != num_rows:
    raise ValueError(f"class_names has {len(class_names)} names for {num_rows} histogram rows")
  col_names = list(class_names) if num_rows == num_cols else [str(j) for j in range(num_cols)]
  font = ImageFont.load_default()
  row_strip = np.asarray(_label_strip(list(class_names), cell, font))
  col_strip = np.asarray(_label_strip(col_names, cell, font).transpose(Image.Transpose.ROTATE_90))
  left, top = row_strip.shape[1], col_strip.shape[0]
  canvas = np.full((top + heat.shape[0], left + heat.shape[1], 3), _WHITE, dtype=np.uint8)
  canvas[top:, :left] = row_strip
  canvas[:top, left:] = col_strip
  canvas[top:, left:] = heat
  return canvas


def save_png(path, array):
  """Write a uint8 (H, W), (H, W, 3) or (H, W, 4) array, or a uint16 (H, W) label map, as a PNG,
  creating parent folders."""
  array = np.asarray(array)
  rgb_or_gray = array.dtype == np.uint8 and (
      array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))
  )
  if not (rgb_or_gray or (array.dtype == np.uint16 and array.ndim == 2)):
    raise ValueError(
        f"save_png({path!r}) needs uint8 (H, W[, 3|4]) or uint16 (H, W), "
        f"got {array.dtype} {array.shape}"
    )
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  Image.fromarray(array).save(path, format="PNG")
