"""Procedural scenes with per-pixel labels: the embedded default dataset (numpy only, ~3 ms per 128-px image).

A scene is a "stuff" layout (a warped Voronoi partition of 2-4 regions, each filled with one of
four textures) with 2-5 solid "things" (disc, square, triangle, ring) pasted on top at scales that
vary 3.75x. Every region's two colours, every thing's colour, the global brightness, contrast,
white balance and a lighting ramp are random per image, so raw colour says nothing about the
class: stuff is identified by its pattern (stripe orientation, checker, blobs) and things by
being untextured and by their shape. See docs/synthetic.md.

All lengths are in "base pixels" of a 128-px image; other sizes render the same scene at another
resolution. Splits are disjoint index ranges (or different seeds) chosen by the caller.
"""

import functools

import numpy as np

CLASS_NAMES = (
    "stripes_horizontal",
    "stripes_vertical",
    "checker",
    "blobs",
    "disc",
    "square",
    "triangle",
    "ring",
)
STUFF_CLASSES = (0, 1, 2, 3)
THING_CLASSES = (4, 5, 6, 7)
NUM_CLASSES = len(CLASS_NAMES)

BASE_SIZE = 128
MIN_SIZE = 16
THING_RADIUS_RANGE = (8.0, 30.0)  # base px; circumradius-like size of a thing
THING_REACH = 1.25  # every thing lies within THING_REACH * radius of its centre
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@functools.lru_cache(maxsize=8)
def _base_grid_yx(size):
  """Pixel-centre coordinates (y, x) of a size x size image, in base pixels; read-only."""
  coords = (np.arange(size, dtype=np.float32) + 0.5) * (BASE_SIZE / size)
  y, x = np.meshgrid(coords, coords, indexing="ij")
  y.flags.writeable = False
  x.flags.writeable = False
  return y, x


def _wave(y, x, period, angle, phase):
  """cos of a plane wave with the given period (base px), direction angle (rad) and phase."""
  k = np.float32(2 * np.pi / period)
  return np.cos(
      k * (np.float32(np.cos(angle)) * x + np.float32(np.sin(angle)) * y) + np.float32(phase)
  )


def _stuff_pattern(rng, stuff_class, y, x):
  """Texture intensity in [0, 1] of one stuff class over the grid; periods 6-14 base px."""
  phase = rng.uniform(0, 2 * np.pi, 3)
  jitter = np.deg2rad(rng.uniform(-8, 8))
  if stuff_class in (0, 1):  # stripes: a wave varying along y (horizontal) or x (vertical)
    angle = (np.pi / 2 if stuff_class == 0 else 0.0) + jitter
    return 0.5 + 0.5 * _wave(y, x, rng.uniform(6, 11), angle, phase[0])
  if stuff_class == 2:  # checker: product of two orthogonal waves
    period = rng.uniform(9, 14)
    return 0.5 + 0.5 * _wave(y, x, period, jitter, phase[0]) * _wave(
        y, x, period, jitter + np.pi / 2, phase[1]
    )
  if stuff_class == 3:  # blobs: three waves 60 degrees apart, a quasi-hexagonal field of spots
    period = rng.uniform(8, 13)
    angle0 = rng.uniform(0, np.pi)
    total = sum(
        _wave(y, x, period, angle0 + i * np.pi / 3 + rng.uniform(-0.15, 0.15), phase[i])
        for i in range(3)
    )
    return np.clip(0.5 + total * np.float32(0.3), 0, 1)
  raise ValueError(f"stuff_class={stuff_class} is not one of STUFF_CLASSES={STUFF_CLASSES}")


def _contrasting_colour_pair(rng):
  """Two random RGB colours in [0,1] whose luminance differs by >= 0.25 (so the texture shows in grey)."""
  pairs = rng.uniform(0, 1, (8, 2, 3)).astype(np.float32)
  luma_gap = np.abs((pairs[:, 0] - pairs[:, 1]) @ _LUMA)
  ok = np.flatnonzero(luma_gap >= 0.25)
  return pairs[ok[0] if ok.size else np.argmax(luma_gap)]


def _stuff_layer(rng, y, x):
  """Stuff image (h,w,3 float32) and labels: a coordinate-warped Voronoi partition of 2-4 seeds."""
  n_regions = int(rng.integers(2, 5))
  seeds_yx = rng.uniform(0, BASE_SIZE, (n_regions, 2)).astype(np.float32)
  amp, wavelength = rng.uniform(2, 10), rng.uniform(40, 90)
  warp_phase = rng.uniform(0, 2 * np.pi, 2)
  yw = y + np.float32(amp) * _wave(y, x, wavelength, 0.0, warp_phase[0])  # shifts y along x
  xw = x + np.float32(amp) * _wave(y, x, wavelength, np.pi / 2, warp_phase[1])  # shifts x along y
  dist2 = (yw[None] - seeds_yx[:, 0, None, None]) ** 2 + (
      xw[None] - seeds_yx[:, 1, None, None]
  ) ** 2
  region_hw = np.argmin(dist2, axis=0)
  region_class = rng.integers(0, len(STUFF_CLASSES), n_regions)
  patterns = np.stack([_stuff_pattern(rng, STUFF_CLASSES[c], y, x) for c in region_class])
  colours = np.stack([_contrasting_colour_pair(rng) for _ in range(n_regions)])  # (n, 2, 3)
  t_hw = np.take_along_axis(patterns, region_hw[None], axis=0)[0]
  low, high = colours[region_hw, 0], colours[region_hw, 1]
  image_hw3 = low + (high - low) * t_hw[..., None]
  labels_hw = np.asarray(STUFF_CLASSES, np.uint8)[region_class][region_hw]
  return image_hw3, labels_hw


def _thing_signed_distance(thing_class, dy, dx, radius, angle):
  """Signed distance (base px, < 0 inside) of a thing centred at the origin."""
  c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
  u, v = c * dx + s * dy, -s * dx + c * dy
  if thing_class == 4:  # disc
    return np.sqrt(u * u + v * v) - radius
  if thing_class == 5:  # square, half-side = 0.8 radius
    return np.maximum(np.abs(u), np.abs(v)) - np.float32(0.8 * radius)
  if thing_class == 6:  # equilateral triangle, circumradius 1.2 radius (area near the others')
    edges = [
        np.float32(np.cos(a)) * u + np.float32(np.sin(a)) * v
        for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)
    ]
    return np.maximum(np.maximum(edges[0], edges[1]), edges[2]) - np.float32(0.6 * radius)
  if thing_class == 7:  # ring, inner radius 0.55 radius
    return np.abs(np.sqrt(u * u + v * v) - np.float32(0.775 * radius)) - np.float32(0.225 * radius)
  raise ValueError(f"thing_class={thing_class} is not one of THING_CLASSES={THING_CLASSES}")


def _place_things(rng):
  """Draws 2-5 things as (class, radius, cy, cx, angle, colour), not overlapping one another.

  Radii are log-uniform in THING_RADIUS_RANGE; a thing whose centre finds no free spot in
  10 draws is dropped, so every thing is whole and its area measures its scale.
  """
  things = []
  for _ in range(int(rng.integers(2, 6))):
    thing_class = THING_CLASSES[int(rng.integers(len(THING_CLASSES)))]
    radius = float(np.exp(rng.uniform(*np.log(THING_RADIUS_RANGE))))
    centres = rng.uniform(0.6 * radius, BASE_SIZE - 0.6 * radius, (10, 2))
    free = [
        all(np.hypot(cy - t[2], cx - t[3]) > THING_REACH * (radius + t[1]) for t in things)
        for cy, cx in centres
    ]
    angle, colour = rng.uniform(0, 2 * np.pi), rng.uniform(0, 1, 3).astype(np.float32)
    if any(free):
      cy, cx = centres[free.index(True)]
      things.append((thing_class, radius, cy, cx, angle, colour))
  return things


def _paste_things(things, image_hw3, labels_hw, y, x):
  """Pastes solid-colour things (in place), anti-aliased over one output pixel."""
  px = BASE_SIZE / labels_hw.shape[0]  # base px per output pixel
  for thing_class, radius, cy, cx, angle, colour in things:
    reach = THING_REACH * radius
    r0, r1 = (max(0, int((c - reach) / px) - 1) for c in (cy, cx))
    box = (slice(r0, int((cy + reach) / px) + 2), slice(r1, int((cx + reach) / px) + 2))
    sd = _thing_signed_distance(
        thing_class, y[box] - np.float32(cy), x[box] - np.float32(cx), np.float32(radius), angle
    )
    cover = np.clip(0.5 - sd / np.float32(px), 0, 1)[..., None]
    image_hw3[box] += (colour - image_hw3[box]) * cover
    labels_hw[box][sd < 0] = thing_class


def _photometric(rng, image_hw3, y, x):
  """Random contrast, brightness, white balance, a linear lighting ramp and pixel noise."""
  mean = image_hw3.mean(axis=(0, 1))
  contrast, brightness = rng.uniform(0.5, 1.2), rng.uniform(0.6, 1.4)
  white_balance = rng.uniform(0.8, 1.2, 3).astype(np.float32)
  ramp_angle, ramp_strength = rng.uniform(0, 2 * np.pi), rng.uniform(0, 0.8)
  ramp = (np.float32(np.cos(ramp_angle)) * x + np.float32(np.sin(ramp_angle)) * y) / BASE_SIZE
  light_hw = 1 + np.float32(ramp_strength) * (ramp - ramp.mean())
  image_hw3 = (image_hw3 - mean) * np.float32(contrast) + mean
  image_hw3 *= light_hw[..., None] * (np.float32(brightness) * white_balance)
  image_hw3 += rng.standard_normal(image_hw3.shape, dtype=np.float32) * np.float32(0.02)
  return np.clip(image_hw3 * 255 + 0.5, 0, 255).astype(np.uint8)


def generate_example(seed, index, size=BASE_SIZE):
  """One scene: (image (size,size,3) uint8, labels (size,size) uint8 in [0, NUM_CLASSES)).

  Deterministic from (seed, index) through np.random.default_rng([seed, index]).
  """
  if size < MIN_SIZE:
    raise ValueError(f"size={size} is below MIN_SIZE={MIN_SIZE}: textures would alias away")
  if seed < 0 or index < 0:
    raise ValueError(f"seed={seed} and index={index} must be non-negative")
  rng = np.random.default_rng([seed, index])
  y, x = _base_grid_yx(size)
  image_hw3, labels_hw = _stuff_layer(rng, y, x)
  _paste_things(_place_things(rng), image_hw3, labels_hw, y, x)
  return _photometric(rng, image_hw3, y, x), labels_hw


def generate_split(seed, start, count, size=BASE_SIZE):
  """Scenes start..start+count-1: (images (count,size,size,3) uint8, labels (count,size,size) uint8)."""
  if count < 0:
    raise ValueError(f"count={count} must be non-negative")
  images = np.empty((count, size, size, 3), np.uint8)
  labels = np.empty((count, size, size), np.uint8)
  for i in range(count):
    images[i], labels[i] = generate_example(seed, start + i, size)
  return images, labels
