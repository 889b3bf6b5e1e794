"""Visualisation: colours, panel layout (against Pillow's nearest resize), heat map, PNG round trip."""
import numpy as np
import pytest
from PIL import Image

from picie_jax import visualize

WHITE = [255, 255, 255]


def test_palette_is_distinct_deterministic_and_never_black():
    pal = visualize.palette(1000)
    assert pal.shape == (1000, 3) and pal.dtype == np.uint8
    assert len({tuple(c) for c in pal}) == 1000
    assert not np.any(np.all(pal == 0, axis=1))
    np.testing.assert_array_equal(pal, visualize.palette(1000))
    # PASCAL VOC colour map of ids 1..5, as published.
    np.testing.assert_array_equal(visualize.palette(5),
                                  [[128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128], [128, 0, 128]])


def test_colorize_draws_ignored_labels_black():
    pal = visualize.palette(3)
    labels = np.array([[0, 1, 2], [-1, 3, 255]])
    colours = visualize.colorize(labels, pal)
    assert colours.shape == (2, 3, 3) and colours.dtype == np.uint8
    np.testing.assert_array_equal(colours[0], pal)
    np.testing.assert_array_equal(colours[1], np.zeros((3, 3)))


def pil_nearest(labels_hw, height, width):
    return np.asarray(Image.fromarray(labels_hw.astype(np.int32)).resize((width, height), Image.NEAREST))


def test_segmentation_panel_layout_and_nearest_resize_of_labels():
    rng = np.random.default_rng(0)
    num, height, width, gap, num_classes = 2, 7, 9, 3, 4
    images = rng.integers(0, 256, size=(num, height, width, 3), dtype=np.uint8)
    gt = rng.integers(0, num_classes, size=(num, height, width))
    gt[0, 0, 0] = 255
    pred_small = rng.integers(0, num_classes, size=(num, 3, 4))
    panel = visualize.segmentation_panel(images, gt, pred_small, num_classes, gap=gap)
    assert panel.dtype == np.uint8 and panel.shape == (num * height + gap, 3 * width + 2 * gap, 3)
    pal = visualize.palette(num_classes)
    for row in range(num):
        top = row * (height + gap)
        tiles = [panel[top:top + height, col * (width + gap):col * (width + gap) + width] for col in range(3)]
        np.testing.assert_array_equal(tiles[0], images[row])
        np.testing.assert_array_equal(tiles[1], visualize.colorize(gt[row], pal))
        np.testing.assert_array_equal(tiles[2], visualize.colorize(pil_nearest(pred_small[row], height, width), pal))
    assert np.all(panel[height:height + gap] == 255)
    assert np.all(panel[:, width:width + gap] == 255)
    np.testing.assert_array_equal(panel[0, width + gap], [0, 0, 0])  # ignored 255 drawn black


def test_segmentation_panel_rejects_mismatched_batch():
    images = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="pred_nhw"):
        visualize.segmentation_panel(images, np.zeros((2, 4, 4), int), np.zeros((3, 4, 4), int), 3)


def test_confusion_matrix_image_is_row_normalised_heat_map():
    hist = np.array([[2, 2, 0],
                     [0, 0, 0],
                     [0, 0, 7]])
    cell = 3
    image = visualize.confusion_matrix_image(hist, cell=cell)
    assert image.shape == (9, 9, 3) and image.dtype == np.uint8

    def cell_colour(i, j):
        block = image[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].reshape(-1, 3)
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


def test_save_png_rejects_float(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        visualize.save_png(str(tmp_path / "x.png"), np.zeros((2, 2), np.float32))
