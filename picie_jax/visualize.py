"""Pictures of results: coloured label maps, image | ground truth | prediction panels, and
confusion matrices. NumPy and Pillow only, so it runs anywhere the package does."""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_MAX_PALETTE = 2**24 - 1
_HEAT_DARK_RGB = np.array([8, 48, 107], dtype=np.float64)
_TEXT_RGB = (0, 0, 0)
_WHITE = 255


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


def _resize_nearest(labels_nhw, height, width):
    """Nearest-neighbour resize with pixel-centre alignment (as Pillow's NEAREST) of label maps."""
    in_h, in_w = labels_nhw.shape[1:3]
    rows = ((2 * np.arange(height) + 1) * in_h) // (2 * height)
    cols = ((2 * np.arange(width) + 1) * in_w) // (2 * width)
    return labels_nhw[:, rows][:, :, cols]


def segmentation_panel(images_nhwc_uint8, gt_nhw, pred_nhw, num_classes, gap=4):
    """uint8 grid, one row per example: image | ground truth | prediction, `gap` white pixels apart.

    Label maps of another size (e.g. 1/4-resolution features) are resized nearest to the image.
    Colours come from `palette(num_classes)`; ignored labels are black.
    """
    images = np.asarray(images_nhwc_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images_nhwc_uint8 must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    num, height, width, _ = images.shape
    gt, pred = np.asarray(gt_nhw), np.asarray(pred_nhw)
    for name, labels in (("gt_nhw", gt), ("pred_nhw", pred)):
        if labels.ndim != 3 or labels.shape[0] != num:
            raise ValueError(f"{name} must be (N={num}, H, W) label maps, got shape {labels.shape}")
    pal = palette(num_classes)
    columns = [images,
               colorize(_resize_nearest(gt, height, width), pal),
               colorize(_resize_nearest(pred, height, width), pal)]
    canvas = np.full((num * height + (num - 1) * gap, len(columns) * width + (len(columns) - 1) * gap, 3),
                     _WHITE, dtype=np.uint8)
    for col, tiles in enumerate(columns):
        for row in range(num):
            top, left = row * (height + gap), col * (width + gap)
            canvas[top:top + height, left:left + width] = tiles[row]
    return canvas


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


def save_png(path, array_uint8):
    """Write a uint8 (H, W), (H, W, 3) or (H, W, 4) array as a PNG, creating parent folders."""
    array = np.asarray(array_uint8)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"save_png({path!r}) needs uint8 (H, W[, 3|4]), got {array.dtype} {array.shape}")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
