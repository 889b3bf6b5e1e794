"""Visualisation: colours, panel layout (against Pillow's nearest resize), heat map, PNG round trip."""

import numpy as np
from PIL import Image
import pytest

from picie_jax import visualize

WHITE = [255, 255, 255]


def test_palette_is_distinct_deterministic_and_never_black():
  pal = visualize.palette(1000)
  assert pal.shape == (1000, 3) and pal.dtype == np.uint8
  assert len({tuple(c) for c in pal}) == 1000
  assert not np.any(np.all(pal == 0, axis=1))
  np.testing.assert_array_equal(pal, visualize.palette(1000))
  # PASCAL VOC colour map of ids 1..5, as published.
  np.testing.assert_array_equal(
      visualize.palette(5), [[128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128]]
  )


def test_colorize_draws_ignored_labels_black():
  pal = visualize.palette(3)
  labels = np.array([[0, 1, 2], [-1, 3, 255]])
  colours = visualize.colorize(labels, pal)
  assert colours.shape == (2, 3, 3) and colours.dtype == np.uint8
  np.testing.assert_array_equal(colours[0], pal)
  np.testing.assert_array_equal(colours[1], np.zeros((3, 3)))


def pil_nearest(labels_hw, height, width):
  return np.asarray(
      Image.fromarray(labels_hw.astype(np.int32)).resize((width, height), Image.NEAREST)
  )


def upscale(tile, factor):
  return np.repeat(np.repeat(tile, factor, axis=0), factor, axis=1)


def find_tile(canvas, tile):
  """(top, left) of the one place where `tile` appears exactly in `canvas`."""
  height, width = tile.shape[:2]
  found = [
      (top, left)
      for top, left in np.argwhere(np.all(canvas == tile[0, 0], axis=-1))
      if np.array_equal(canvas[top : top + height, left : left + width], tile)
  ]
  assert len(found) == 1, found
  return found[0]


def dark_columns(region):
  """Column indices of a region holding near-black (text) pixels."""
  return np.flatnonzero(np.any(np.all(region < 100, axis=-1), axis=0))


def swatch_boxes(region, colours):
  """Per colour: (top, left, size) of its pixels in `region`, asserted to form a filled square."""
  boxes = []
  for colour in colours:
    rows, cols = np.nonzero(np.all(region == colour, axis=-1))
    assert rows.size, f"no swatch of colour {colour}"
    top, left, size = rows.min(), cols.min(), rows.max() - rows.min() + 1
    assert (
        cols.max() - left + 1 == size and rows.size == size * size
    ), f"{colour} is not a filled square"
    boxes.append((top, left, size))
  return boxes


def text_width_right_of(region, box, max_space=10):
  """Width of the text starting just right of a swatch (ends at a white run > max_space)."""
  top, left, size = box
  columns = dark_columns(region[top : top + size, left + size :])
  if not columns.size or columns[0] > max_space:
    return 0
  breaks = np.flatnonzero(np.diff(columns) > max_space)
  end = columns[breaks[0]] if breaks.size else columns[-1]
  return end - columns[0] + 1


PANEL_CASE = dict(num=2, height=7, width=9, gap=3, num_classes=4, min_tile=100)
FACTOR = 15  # the smallest integer bringing the 7-px side to min_tile=100


def panel_case(class_names=None):
  rng = np.random.default_rng(0)
  c = PANEL_CASE
  images = rng.integers(0, 256, size=(c["num"], c["height"], c["width"], 3), dtype=np.uint8)
  gt = rng.integers(0, c["num_classes"], size=(c["num"], c["height"], c["width"]))
  gt[0, 0, 0] = 255
  pred_small = rng.integers(0, c["num_classes"], size=(c["num"], 3, 5))  # odd: no nearest ties
  panel = visualize.segmentation_panel(
      images,
      gt,
      pred_small,
      c["num_classes"],
      class_names=class_names,
      min_tile=c["min_tile"],
      gap=c["gap"],
  )
  return images, gt, pred_small, panel


def test_segmentation_panel_upscales_tiles_and_resizes_labels_nearest():
  images, gt, pred_small, panel = panel_case()
  c = PANEL_CASE
  factor = FACTOR
  tile_h, tile_w, gap = factor * c["height"], factor * c["width"], c["gap"]
  assert panel.dtype == np.uint8 and min(tile_h, tile_w) >= c["min_tile"]
  top0, left0 = find_tile(panel, upscale(images[0], factor))
  assert left0 == 0 and top0 > 0  # a title strip above the tiles
  pal = visualize.palette(c["num_classes"])
  for row in range(c["num"]):
    top = top0 + row * (tile_h + gap)
    lefts = [col * (tile_w + gap) for col in range(3)]
    tiles = [panel[top : top + tile_h, left : left + tile_w] for left in lefts]
    np.testing.assert_array_equal(tiles[0], upscale(images[row], factor))
    np.testing.assert_array_equal(tiles[1], visualize.colorize(upscale(gt[row], factor), pal))
    np.testing.assert_array_equal(
        tiles[2], visualize.colorize(pil_nearest(pred_small[row], tile_h, tile_w), pal)
    )
    assert np.all(panel[top : top + tile_h, tile_w : tile_w + gap] == 255)
  assert np.all(panel[top0 + tile_h : top0 + tile_h + gap, : 3 * tile_w + 2 * gap] == 255)
  np.testing.assert_array_equal(panel[top0, tile_w + gap], [0, 0, 0])  # ignored 255 drawn black


def test_segmentation_panel_titles_each_column():
  images, _, _, panel = panel_case()
  c = PANEL_CASE
  tile_w = FACTOR * c["width"]
  top0, _ = find_tile(panel, upscale(images[0], FACTOR))
  widths = []
  for col in range(3):
    left = col * (tile_w + c["gap"])
    columns = dark_columns(panel[:top0, left : left + tile_w])
    assert columns.size, f"no title over column {col}"
    widths.append(columns.max() - columns.min() + 1)
    assert abs((columns.min() + columns.max()) / 2 - tile_w / 2) <= 3  # centred
  image_w, ground_truth_w, prediction_w = widths
  assert image_w < prediction_w < ground_truth_w  # "image" < "prediction" < "ground truth"


def test_segmentation_panel_legend_shows_palette_swatches_with_names():
  c = PANEL_CASE
  names = ["a", "a much longer class name", "bb", "ccc"]
  images, _, _, panel = panel_case(class_names=names)
  top0, _ = find_tile(panel, upscale(images[0], FACTOR))
  legend = panel[top0 + c["num"] * (FACTOR * c["height"] + c["gap"]) :]
  pal = visualize.palette(c["num_classes"])
  boxes = swatch_boxes(legend, pal)
  assert all(size >= 10 for _, _, size in boxes)
  widths = [text_width_right_of(legend, box) for box in boxes]
  assert widths[0] > 0 and widths[1] > 3 * max(widths[0], widths[2], widths[3])
  assert widths[0] < widths[2] < widths[3]
  _, _, _, default_panel = panel_case()
  default_legend = default_panel[top0 + c["num"] * (FACTOR * c["height"] + c["gap"]) :]
  default_widths = [
      text_width_right_of(default_legend, box) for box in swatch_boxes(default_legend, pal)
  ]
  assert (
      max(default_widths) - min(default_widths) <= 3 < min(default_widths) - widths[3]
  )  # "class i"
  with pytest.raises(ValueError, match="class_names"):
    panel_case(class_names=names[:2])


def test_overlay_panel_blends_and_lists_only_present_labels():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, size=(50, 60, 3), dtype=np.uint8)
  labels = np.zeros((50, 60), np.int64)
  labels[:, 30:] = 3
  names = [f"cluster {i}" for i in range(5)]
  panel = visualize.overlay_panel(image, labels, names, min_tile=100, gap=4)
  pal = visualize.palette(5)
  factor = 2
  top0, left0 = find_tile(panel, upscale(image, factor))
  blended = np.round(0.5 * image + 0.5 * pal[labels]).astype(np.uint8)
  top1, left1 = find_tile(panel, upscale(blended, factor))
  assert (top1, left1) == (top0, left0 + factor * 60 + 4)
  legend = panel[top0 + factor * 50 + 4 :]
  boxes = swatch_boxes(legend, pal[[0, 3]])
  assert all(text_width_right_of(legend, box) > 0 for box in boxes)
  for absent in (1, 2, 4):
    assert not np.any(np.all(legend == pal[absent], axis=-1))


def test_segmentation_panel_rejects_mismatched_batch():
  images = np.zeros((2, 4, 4, 3), np.uint8)
  with pytest.raises(ValueError, match="pred_nhw"):
    visualize.segmentation_panel(images, np.zeros((2, 4, 4), int), np.zeros((3, 4, 4), int), 3)


def test_confusion_matrix_image_is_row_normalised_heat_map():
  hist = np.array([[2, 2, 0], [0, 0, 0], [0, 0, 7]])
  cell = 3
  image = visualize.confusion_matrix_image(hist, cell=cell)
  assert image.shape == (9, 9, 3) and image.dtype == np.uint8

  def cell_colour(i, j):
    block = image[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell].reshape(-1, 3)
    assert np.all(block == block[0])
    return block[0].tolist()

  half_blue = np.round(255 + 0.5 * (np.array([8, 48, 107]) - 255)).tolist()
  assert cell_colour(0, 0) == cell_colour(0, 1) == half_blue
  assert cell_colour(0, 2) == WHITE
  assert all(cell_colour(1, j) == WHITE for j in range(3))  # empty row stays white
  assert cell_colour(2, 2) == [8, 48, 107]


def test_confusion_matrix_image_with_names_adds_label_margins():
  hist = np.array([[5, 1], [2, 3]])
  plain = visualize.confusion_matrix_image(hist, cell=16)
  named = visualize.confusion_matrix_image(hist, class_names=["person", "sky"], cell=16)
  top, left = named.shape[0] - plain.shape[0], named.shape[1] - plain.shape[1]
  assert top > 0 and left > 0
  np.testing.assert_array_equal(named[top:, left:], plain)
  assert np.any(named[top:, :left] < 128)  # row names drawn
  assert np.any(named[:top, left:] < 128)  # column names drawn
  with pytest.raises(ValueError, match="class_names"):
    visualize.confusion_matrix_image(hist, class_names=["person"])


@pytest.mark.parametrize("shape", [(5, 7, 3), (5, 7), (4, 6, 4)])
def test_save_png_reloads_identically(tmp_path, shape):
  array = np.random.default_rng(1).integers(0, 256, size=shape, dtype=np.uint8)
  path = str(tmp_path / "sub" / "image.png")
  visualize.save_png(path, array)
  with Image.open(path) as reloaded:
    assert reloaded.format == "PNG"
    np.testing.assert_array_equal(np.asarray(reloaded), array)


def test_save_png_writes_uint16_label_maps(tmp_path):
  labels = np.arange(300 * 2, dtype=np.uint16).reshape(20, 30)
  path = str(tmp_path / "labels.png")
  visualize.save_png(path, labels)
  with Image.open(path) as reloaded:
    np.testing.assert_array_equal(np.asarray(reloaded), labels)


def test_save_png_rejects_float(tmp_path):
  with pytest.raises(ValueError, match="uint8"):
    visualize.save_png(str(tmp_path / "x.png"), np.zeros((2, 2), np.float32))
