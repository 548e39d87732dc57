"""Synthetic seen/unseen "shapes": a small COCO-format instance-segmentation dataset.

It is the embedded default dataset of the CPU demo: a Mask R-CNN trained on it with mask
supervision for the *seen* classes only should still segment the *unseen* ones, which is the
partially supervised setting Deep-MARC is about. Its default style is learnable by a small model
trained from scratch in CPU minutes at 128 px, but not segmentable by looking up a colour: object
and background colours are random, backgrounds are painted by random texture generators (flat
colours, gradients, stripes and checkerboards at random angles, smooth noise) and objects occlude
each other. How objects are drawn is a `Style` (below).

Classes (COCO category ids, so `data.mask_classes='voc'` selects exactly the seen half):

| seen (VOC ids)  | unseen (non-VOC ids) |
|-----------------|----------------------|
| 1 circle        | 8 square             |
| 2 triangle      | 10 hexagon           |
| 3 star          | 11 cross             |
| 4 ring          | 13 crescent          |
| 5 L-shape       | 14 heart             |

Each half has round and polygonal, convex and non-convex, solid and thin shapes (round convex:
circle / hexagon; convex polygon: triangle / square; spiky polygon: star / cross; thin curved:
ring / crescent; non-convex solid-ish: L-shape / heart), so neither half is systematically
harder.

Output (`generate`): `out_dir/annotations/instances_<split>.json` and JPEGs `out_dir/<split>/
000001.jpg`, ... Masks are the exactly visible pixels of each object (drawn without
anti-aliasing; later objects occlude earlier ones); instances left with too little visible area
are dropped from the annotations (their pixels stay in the image as clutter). Unoccluded polygons
that lie inside the image are stored as COCO polygons (rasterised by pycocotools to exactly the
drawn pixels), everything else as compressed RLE. Generation is deterministic: image i of split s
depends only on (seed, s, i, image_size, max_objects, style).

Styles (`STYLES`): 'upright' (the default, the CPU demo's dataset: upright flat-coloured
objects, 20-60% of the side, up to 3) and 'textured' (rotated, stretched objects of 6-60% painted
with every texture, up to 8, heavy occlusion: much slower to learn from scratch).

Command line:
  python -m deepmarc_jax.data.shapes --out_dir=DIR [--num_train=1000 --num_val=200
      --image_size=128 --seed=0 --style=upright --max_objects=N] [--sample_png=PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import time
import types
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES: list[dict[str, Any]] = [
    {'id': 1, 'name': 'circle', 'supercategory': 'shape'},
    {'id': 2, 'name': 'triangle', 'supercategory': 'shape'},
    {'id': 3, 'name': 'star', 'supercategory': 'shape'},
    {'id': 4, 'name': 'ring', 'supercategory': 'shape'},
    {'id': 5, 'name': 'L-shape', 'supercategory': 'shape'},
    {'id': 8, 'name': 'square', 'supercategory': 'shape'},
    {'id': 10, 'name': 'hexagon', 'supercategory': 'shape'},
    {'id': 11, 'name': 'cross', 'supercategory': 'shape'},
    {'id': 13, 'name': 'crescent', 'supercategory': 'shape'},
    {'id': 14, 'name': 'heart', 'supercategory': 'shape'},
]
SEEN_IDS: tuple[int, ...] = (1, 2, 3, 4, 5)
UNSEEN_IDS: tuple[int, ...] = (8, 10, 11, 13, 14)
CATEGORY_NAMES: dict[int, str] = {c['id']: c['name'] for c in CATEGORIES}

DEFAULT_SPLITS: Mapping[str, int] = types.MappingProxyType({'train': 1000, 'validation': 200})

# Object side as a fraction of the image side (log-uniform), and the stretch range.
_MAX_LOG_ASPECT = 0.35  # the most any style stretches (bounds implicit shapes' windows)
# An instance is annotated only if at least this much of it (inside the image) stays visible.
_MIN_VISIBLE_FRACTION = 0.25
_MIN_VISIBLE_PIXELS = 10
_MAX_PIXEL_NOISE = 0.03  # std of the per-image Gaussian pixel noise, in [0, 1] intensity units
_JPEG_QUALITY = 90
# Split k (in the order given) gets image and annotation ids k * _ID_STRIDE + 1, 2, ...
_ID_STRIDE = 10_000_000

Texture = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (y [h, 1], x [1, w]) -> [h, w, 3]
Field = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (y [h, 1], x [1, w]) -> [h, w]


# ----------------------------------------------------------------------------------------------
# Textures: closures (y [h, 1], x [1, w] pixel-centre coordinates) -> [h, w, 3] float in [0, 1].
# The same generators paint backgrounds and objects.
# ----------------------------------------------------------------------------------------------

def _colour(rng: np.random.Generator) -> np.ndarray:
  return rng.uniform(0.0, 1.0, 3)


def _mix(c1: np.ndarray, c2: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Per-pixel blend c1 + t (c2 - c1); t [h, w] in [0, 1] -> [h, w, 3]."""
  return c1 + (c2 - c1) * t[..., None]


def _projection(theta: float, y: np.ndarray, x: np.ndarray) -> np.ndarray:
  return x * np.cos(theta) + y * np.sin(theta)


def _flat_texture(rng: np.random.Generator, side: int) -> Texture:
  del side
  c = _colour(rng)
  return lambda y, x: np.broadcast_to(c, np.broadcast_shapes(y.shape, x.shape) + (3,))


def _gradient_texture(rng: np.random.Generator, side: int) -> Texture:
  c1, c2 = _colour(rng), _colour(rng)
  theta = rng.uniform(0, 2 * np.pi)
  length = side * rng.uniform(0.4, 1.5)
  centre = rng.uniform(0, side, 2)

  def texture(y, x):
    t = 0.5 + _projection(theta, y - centre[0], x - centre[1]) / length
    return _mix(c1, c2, np.clip(t, 0.0, 1.0))
  return texture


def _stripes_texture(rng: np.random.Generator, side: int) -> Texture:
  c1, c2 = _colour(rng), _colour(rng)
  theta = rng.uniform(0, np.pi)
  period = max(3.0, side * rng.uniform(0.04, 0.2))
  phase = rng.uniform(0, 2 * np.pi)
  sharpness = rng.uniform(1.0, 6.0)  # 1: sinusoidal, larger: hard-edged stripes

  def texture(y, x):
    s = np.sin(2 * np.pi * _projection(theta, y, x) / period + phase)
    return _mix(c1, c2, np.clip(0.5 + 0.5 * sharpness * s, 0.0, 1.0))
  return texture


def _checker_texture(rng: np.random.Generator, side: int) -> Texture:
  c1, c2 = _colour(rng), _colour(rng)
  theta = rng.uniform(0, np.pi / 2)
  cell = max(2.5, side * rng.uniform(0.04, 0.15))
  offset = rng.uniform(0, 2 * cell, 2)

  def texture(y, x):
    u = np.floor((_projection(theta, y, x) + offset[0]) / cell)
    v = np.floor((_projection(theta + np.pi / 2, y, x) + offset[1]) / cell)
    return _mix(c1, c2, np.mod(u + v, 2.0))
  return texture


def _smooth_field(rng: np.random.Generator, side: int, waves: int = 4) -> Field:
  """Random smooth scalar field in [0, 1]: a sum of sinusoids with random directions."""
  amplitude = rng.uniform(0.5, 1.0, waves)
  wavelength = side * rng.uniform(0.1, 0.6, waves)
  theta = rng.uniform(0, 2 * np.pi, waves)
  phase = rng.uniform(0, 2 * np.pi, waves)
  gain = rng.uniform(1.0, 2.0) / amplitude.sum()

  def field(y, x):
    total = sum(a * np.sin(2 * np.pi * _projection(t, y, x) / w + p)
                for a, w, t, p in zip(amplitude, wavelength, theta, phase))
    return np.clip(0.5 + 0.5 * gain * total, 0.0, 1.0)
  return field


def _noise_texture(rng: np.random.Generator, side: int) -> Texture:
  c1, c2, c3 = _colour(rng), _colour(rng), _colour(rng)
  hue, shade = _smooth_field(rng, side), _smooth_field(rng, side)

  def texture(y, x):
    base = _mix(c1, c2, hue(y, x))
    return base + (c3 - base) * (0.6 * shade(y, x)[..., None])
  return texture


_TEXTURES = (_flat_texture, _gradient_texture, _stripes_texture, _checker_texture,
             _noise_texture)
_TEXTURE_PROBS = (0.15, 0.15, 0.25, 0.15, 0.3)


def _sample_texture(rng: np.random.Generator, side: int,
                    probs: Sequence[float] = _TEXTURE_PROBS) -> Texture:
  return _TEXTURES[rng.choice(len(_TEXTURES), p=probs)](rng, side)


@dataclasses.dataclass(frozen=True)
class Style:
  """How objects are drawn (backgrounds always use every texture, `_TEXTURE_PROBS`).

  Attributes:
    rotate: random in-plane rotation of each object; otherwise shapes stand upright.
    max_log_aspect: |log| of the random x/y stretch.
    size_range: object side as a fraction of the image side (log-uniform).
    object_texture_probs: probabilities of (flat, gradient, stripes, checker, noise) objects.
    max_objects: default upper bound of objects per image (uniform in 1..max_objects).
  """
  rotate: bool
  max_log_aspect: float
  size_range: tuple[float, float]
  object_texture_probs: tuple[float, ...]
  max_objects: int


STYLES: Mapping[str, Style] = types.MappingProxyType({
    # The CPU demo's dataset: a detector trained from scratch must learn it in minutes. Upright,
    # mid-sized, flat-coloured objects on any background texture: segmenting still means
    # telling a uniform region from a textured one, not looking up a colour. 'textured', and
    # even gradient-painted, smaller or more numerous objects, train far slower from scratch
    # (docs/design.md, "Why upright").
    'upright': Style(rotate=False, max_log_aspect=0.14, size_range=(0.2, 0.6),
                     object_texture_probs=(1.0, 0.0, 0.0, 0.0, 0.0), max_objects=3),
    # The harder original: rotated, stretched, tiny to large objects painted with the
    # background's own texture generators, up to 8 per image with heavy occlusion.
    'textured': Style(rotate=True, max_log_aspect=0.35, size_range=(0.06, 0.6),
                      object_texture_probs=_TEXTURE_PROBS, max_objects=8),
})
DEFAULT_STYLE = 'upright'


def _style(name: str) -> Style:
  if name not in STYLES:
    raise ValueError(f'style={name!r}: expected one of {sorted(STYLES)}')
  return STYLES[name]


# ----------------------------------------------------------------------------------------------
# Shapes in unit coordinates (about [-1, 1]^2; v points down like image rows).
# Polygonal shapes are vertex arrays, rasterised by pycocotools so that COCO polygons decode to
# exactly the drawn pixels; round shapes are implicit functions evaluated at pixel centres.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _UnitShape:
  """A shape in unit coordinates: `polygon` [N, 2] (u, v) vertices, or `inside(u, v)`."""
  polygon: np.ndarray | None = None
  inside: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
  extent: float = 1.0  # radius of a disc around the origin that contains the shape


def _regular_polygon(sides: int, start: float = -np.pi / 2) -> np.ndarray:
  angles = start + 2 * np.pi * np.arange(sides) / sides
  return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _circle(rng):
  del rng
  return _UnitShape(inside=lambda u, v: u * u + v * v <= 1.0)


def _triangle(rng):
  del rng
  return _UnitShape(polygon=_regular_polygon(3))


def _star(rng):
  inner = rng.uniform(0.38, 0.5)
  radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
  return _UnitShape(polygon=_regular_polygon(10) * radii[:, None])


def _ring(rng):
  inner2 = rng.uniform(0.5, 0.7) ** 2
  return _UnitShape(inside=lambda u, v: (u * u + v * v <= 1.0) & (u * u + v * v >= inner2))


def _l_shape(rng):
  w = rng.uniform(0.7, 1.0)  # arm width; the L spans [-1, 1]^2
  corners = np.array([(-1, -1), (-1 + w, -1), (-1 + w, 1 - w), (1, 1 - w), (1, 1), (-1, 1)])
  return _UnitShape(polygon=0.75 * corners, extent=0.75 * np.sqrt(2))


def _square(rng):
  del rng
  return _UnitShape(polygon=_regular_polygon(4, start=np.pi / 4))


def _hexagon(rng):
  del rng
  return _UnitShape(polygon=_regular_polygon(6))


def _cross(rng):
  a = rng.uniform(0.25, 0.36)  # arm half-width
  quarter = np.array([(a, -1), (a, -a), (1, -a)])
  rotations = [np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
               for t in np.pi / 2 * np.arange(4)]
  return _UnitShape(polygon=np.concatenate([quarter @ r.T for r in rotations]),
                    extent=np.hypot(1, a))


def _crescent(rng):
  offset, radius = rng.uniform(0.35, 0.55), rng.uniform(0.75, 0.9)

  def inside(u, v):
    return (u * u + v * v <= 1.0) & ((u - offset) ** 2 + v * v > radius * radius)
  return _UnitShape(inside=inside)


def _heart(rng):
  del rng

  def inside(u, v):
    x, y = 1.15 * u, 0.12 - 1.15 * v  # the classic heart curve, lobes up, centred
    return (x * x + y * y - 1.0) ** 3 - x * x * y ** 3 <= 0.0
  return _UnitShape(inside=inside, extent=1.15)


_SHAPES: dict[int, Callable[[np.random.Generator], _UnitShape]] = {
    1: _circle, 2: _triangle, 3: _star, 4: _ring, 5: _l_shape,
    8: _square, 10: _hexagon, 11: _cross, 13: _crescent, 14: _heart,
}


# ----------------------------------------------------------------------------------------------
# Placing and rasterising one object.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Object:
  """A sampled object: class, unit shape, pose (image xy, pixels) and texture."""
  category_id: int
  shape: _UnitShape
  cx: float
  cy: float
  half_size: float  # half the nominal side, pixels
  angle: float
  aspect: float  # x stretch; y is stretched by 1 / aspect
  texture: Texture


def _sample_object(rng: np.random.Generator, side: int, style: Style) -> _Object:
  category_id = int(rng.choice(list(_SHAPES)))
  shape = _SHAPES[category_id](rng)
  size = side * np.exp(rng.uniform(*np.log(style.size_range)))
  cx, cy = rng.uniform(0, side, 2)
  angle = rng.uniform(0, 2 * np.pi) if style.rotate else 0.0
  aspect = np.exp(rng.uniform(-style.max_log_aspect, style.max_log_aspect))
  return _Object(category_id, shape, cx, cy, size / 2, angle, aspect,
                 _sample_texture(rng, side, style.object_texture_probs))


def _scales(obj: _Object) -> tuple[float, float]:
  return obj.half_size * np.sqrt(obj.aspect), obj.half_size / np.sqrt(obj.aspect)


def _polygon_xy(obj: _Object) -> np.ndarray:
  """[N, 2] image (x, y) vertices, rounded to 0.01 px as they are stored in the JSON."""
  sx, sy = _scales(obj)
  u, v = obj.shape.polygon[:, 0] * sx, obj.shape.polygon[:, 1] * sy
  c, s = np.cos(obj.angle), np.sin(obj.angle)
  return np.round(np.stack([obj.cx + c * u - s * v, obj.cy + s * u + c * v], axis=1), 2)


def _paste(window: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
  """Places a window mask whose top-left pixel is (y0, x0) into an [H, W] bool mask."""
  out = np.zeros((height, width), bool)
  h, w = window.shape
  ya, yb, xa, xb = max(y0, 0), min(y0 + h, height), max(x0, 0), min(x0 + w, width)
  if ya < yb and xa < xb:
    out[ya:yb, xa:xb] = window[ya - y0:yb - y0, xa - x0:xb - x0]
  return out


def _rasterize_polygon(xy: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W] bool mask of a polygon, as pycocotools decodes it, clipped to the image.

  pycocotools mishandles polygons that cross the image border, so the polygon is rasterised in a
  window that contains it (its rasterisation is invariant to integer shifts) and pasted.
  """
  x0, y0 = (int(np.floor(v)) - 2 for v in xy.min(axis=0))
  x1, y1 = (int(np.ceil(v)) + 3 for v in xy.max(axis=0))
  local = (xy - np.array([x0, y0])).ravel().tolist()
  rle = mask_utils.frPyObjects([local], y1 - y0, x1 - x0)
  return _paste(mask_utils.decode(rle)[..., 0].astype(bool), y0, x0, height, width)


def _rasterize_implicit(obj: _Object, height: int, width: int) -> np.ndarray:
  """[H, W] bool mask: pixels whose centre is inside the shape."""
  radius = obj.shape.extent * obj.half_size * np.exp(_MAX_LOG_ASPECT / 2) + 1
  ya, yb = max(int(obj.cy - radius), 0), min(int(obj.cy + radius) + 1, height)
  xa, xb = max(int(obj.cx - radius), 0), min(int(obj.cx + radius) + 1, width)
  if ya >= yb or xa >= xb:
    return np.zeros((height, width), bool)
  dy = (np.arange(ya, yb) + 0.5 - obj.cy)[:, None]
  dx = (np.arange(xa, xb) + 0.5 - obj.cx)[None, :]
  c, s = np.cos(obj.angle), np.sin(obj.angle)
  sx, sy = _scales(obj)
  window = obj.shape.inside((c * dx + s * dy) / sx, (c * dy - s * dx) / sy)
  return _paste(window, ya, xa, height, width)


def _full_mask(obj: _Object, side: int) -> np.ndarray:
  if obj.shape.polygon is not None:
    return _rasterize_polygon(_polygon_xy(obj), side, side)
  return _rasterize_implicit(obj, side, side)


def _paint(image: np.ndarray, mask: np.ndarray, texture: Texture) -> None:
  """Paints `texture` into `image` [H, W, 3] on `mask`, evaluating it on the mask's box only."""
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if not rows.size:
    return
  ya, yb, xa, xb = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
  y = (np.arange(ya, yb) + 0.5)[:, None]
  x = (np.arange(xa, xb) + 0.5)[None, :]
  window = mask[ya:yb, xa:xb]
  image[ya:yb, xa:xb][window] = texture(y, x)[window]


# ----------------------------------------------------------------------------------------------
# One image.
# ----------------------------------------------------------------------------------------------

def _split_key(split: str) -> int:
  return zlib.crc32(split.encode('utf-8'))


def render_image(seed: int, split: str, index: int, *, image_size: int = 128,
                 max_objects: int | None = None,
                 style: str = DEFAULT_STYLE) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Draws image `index` of `split` (what `generate` writes, before JPEG compression).

  Args:
    seed: dataset seed (non-negative).
    split: split name; it seeds the images together with `seed` and `index`.
    index: 0-based image index within the split.
    image_size: side S of the square image.
    max_objects: objects drawn are uniform in 1..max_objects (some may end up unannotated);
      None: the style's default.
    style: a `STYLES` name: how objects are drawn.

  Returns:
    image: [S, S, 3] uint8 RGB.
    instances: the annotated objects, in drawing order (later ones occlude earlier ones), each
      {'category_id': int, 'mask': [S, S] bool visible pixels, 'full_mask': [S, S] bool whole
      shape inside the image, 'polygon': [x1, y1, x2, y2, ...] (image pixel coordinates, pixel
      (r, c) covering [c, c+1) x [r, r+1)) when the instance is stored as a COCO polygon, else
      None}. Visible masks are pairwise disjoint.
  """
  drawing = _style(style)
  max_objects = drawing.max_objects if max_objects is None else max_objects
  rng = np.random.default_rng([seed, _split_key(split), index])
  side = image_size
  image = np.empty((side, side, 3), np.float64)
  _paint(image, np.ones((side, side), bool), _sample_texture(rng, side))
  owner = np.full((side, side), -1, np.int32)
  objects, full_masks = [], []
  for k in range(int(rng.integers(1, max_objects + 1))):
    obj = _sample_object(rng, side, drawing)
    mask = _full_mask(obj, side)
    _paint(image, mask, obj.texture)
    owner[mask] = k
    objects.append(obj)
    full_masks.append(mask)
  image += rng.normal(0.0, rng.uniform(0, _MAX_PIXEL_NOISE), image.shape)
  image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)

  instances = []
  for k, (obj, full) in enumerate(zip(objects, full_masks)):
    visible = owner == k
    area = int(visible.sum())
    if area < max(_MIN_VISIBLE_PIXELS, _MIN_VISIBLE_FRACTION * full.sum()):
      continue
    instances.append({'category_id': obj.category_id, 'mask': visible, 'full_mask': full,
                      'polygon': _exportable_polygon(obj, visible, full)})
  return image, instances


def _exportable_polygon(obj: _Object, visible: np.ndarray,
                        full: np.ndarray) -> list[float] | None:
  """The COCO polygon of an unoccluded polygonal object inside the image, if it decodes exactly."""
  if obj.shape.polygon is None or not np.array_equal(visible, full):
    return None
  xy = _polygon_xy(obj)
  side = visible.shape[0]
  if xy.min() < 0 or xy.max() > side - 1:
    return None
  polygon = [float(v) for v in xy.ravel()]
  decoded = mask_utils.decode(mask_utils.frPyObjects([polygon], side, side))[..., 0]
  return polygon if np.array_equal(decoded.astype(bool), visible) else None


def _annotation(instance: dict[str, Any], ann_id: int, image_id: int) -> dict[str, Any]:
  """COCO annotation dict of one rendered instance."""
  mask = instance['mask']
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  bbox = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
  if instance['polygon'] is not None:
    segmentation = [instance['polygon']]
  else:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    segmentation = {'size': [int(s) for s in rle['size']], 'counts': rle['counts'].decode('ascii')}
  return {'id': ann_id, 'image_id': image_id, 'category_id': instance['category_id'],
          'segmentation': segmentation, 'area': int(mask.sum()), 'bbox': bbox, 'iscrowd': 0}


# ----------------------------------------------------------------------------------------------
# The dataset.
# ----------------------------------------------------------------------------------------------

def _check_args(splits: Mapping[str, int], image_size: int, seed: int, max_objects: int) -> None:
  if not 32 <= image_size <= 4096:
    raise ValueError(f'image_size={image_size}: expected 32..4096 (64..512 is the tested range)')
  if seed < 0:
    raise ValueError(f'seed={seed}: must be non-negative')
  if max_objects < 1:
    raise ValueError(f'max_objects={max_objects}: must be >= 1')
  for name, count in splits.items():
    if not name or os.sep in name or count < 0 or count * max_objects >= _ID_STRIDE:
      raise ValueError(f'split {name!r} with {count} images: need a plain name and 0 <= count '
                       f'and count * max_objects < {_ID_STRIDE}')


def generate(out_dir: str, *, splits: Mapping[str, int] = DEFAULT_SPLITS, image_size: int = 128,
             seed: int = 0, max_objects: int | None = None,
             style: str = DEFAULT_STYLE) -> dict[str, str]:
  """Writes the shapes dataset in COCO format and returns {split: instances JSON path}.

  Layout: `out_dir/annotations/instances_<split>.json`, images `out_dir/<split>/000001.jpg`...
  (`file_name` is relative to the split folder). Split k in `splits` order gets image and
  annotation ids k * 10^7 + 1, 2, ..., so splits can be merged. Image contents depend only on
  (seed, split name, image index, image_size, max_objects, style); the same arguments give
  byte-identical files.

  Args:
    out_dir: output folder (created; existing files with the same names are overwritten).
    splits: split name -> number of images.
    image_size: side of the square RGB images, pixels.
    seed: non-negative dataset seed.
    max_objects: at most this many objects per image (uniform in 1..max_objects); None: the
      style's default.
    style: a `STYLES` name: how objects are drawn.
  """
  max_objects = _style(style).max_objects if max_objects is None else max_objects
  _check_args(splits, image_size, seed, max_objects)
  os.makedirs(os.path.join(out_dir, 'annotations'), exist_ok=True)
  paths = {}
  for split_index, (split, count) in enumerate(splits.items()):
    paths[split] = _generate_split(out_dir, split, split_index * _ID_STRIDE, count,
                                   image_size=image_size, seed=seed, max_objects=max_objects,
                                   style=style)
  return paths


def _generate_split(out_dir: str, split: str, id_offset: int, count: int, *, image_size: int,
                    seed: int, max_objects: int, style: str) -> str:
  """Renders and writes one split; returns its JSON path."""
  image_dir = os.path.join(out_dir, split)
  os.makedirs(image_dir, exist_ok=True)
  images, annotations = [], []
  for index in range(count):
    image, instances = render_image(seed, split, index, image_size=image_size,
                                    max_objects=max_objects, style=style)
    image_id, file_name = id_offset + index + 1, f'{index + 1:06d}.jpg'
    Image.fromarray(image).save(os.path.join(image_dir, file_name), format='JPEG',
                                quality=_JPEG_QUALITY, subsampling=0)
    images.append({'id': image_id, 'file_name': file_name, 'height': image_size,
                   'width': image_size})
    for instance in instances:
      annotations.append(_annotation(instance, id_offset + len(annotations) + 1, image_id))
  data = {
      'info': {'description': 'deepmarc_jax synthetic shapes', 'version': '1.0',
               'seed': seed, 'image_size': image_size, 'max_objects': max_objects, 'style': style,
               'seen_ids': list(SEEN_IDS), 'unseen_ids': list(UNSEEN_IDS)},
      'images': images,
      'annotations': annotations,
      'categories': [dict(c) for c in CATEGORIES],
  }
  path = os.path.join(out_dir, 'annotations', f'instances_{split}.json')
  with open(path, 'w') as f:
    json.dump(data, f, separators=(',', ':'))
  return path


# ----------------------------------------------------------------------------------------------
# Sample picture.
# ----------------------------------------------------------------------------------------------

_PALETTE = ('#1f77b4', '#2ca02c', '#17becf', '#9467bd', '#0b5394',  # seen: cool colours
            '#d62728', '#ff7f0e', '#e377c2', '#bcbd22', '#8c564b')  # unseen: warm colours


def _category_colours() -> dict[int, np.ndarray]:
  from matplotlib import colors  # pylint: disable=g-import-not-at-top
  ids = list(SEEN_IDS) + list(UNSEEN_IDS)
  return {i: np.array(colors.to_rgb(c)) for i, c in zip(ids, _PALETTE)}


def _overlay(image: np.ndarray, masks: Sequence[np.ndarray], colours: Sequence[np.ndarray],
             alpha: float = 0.35) -> np.ndarray:
  """Image [H, W, 3] uint8 with masks filled (alpha) and outlined in their colours -> float."""
  out = image.astype(np.float64) / 255
  for mask, colour in zip(masks, colours):
    out[mask] = (1 - alpha) * out[mask] + alpha * colour
    interior = mask.copy()
    interior[1:-1, 1:-1] &= (mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:])
    out[mask & ~interior] = colour
  return out


def save_sample_png(json_path: str, image_dir: str, png_path: str, *, rows: int = 3,
                    cols: int = 4, panel_inches: float = 2.56, dpi: int = 100) -> None:
  """Writes a rows x cols grid of images with instance masks overlaid and labelled.

  Seen classes have cool colours and plain labels, unseen ones warm colours and labels marked
  with '*'; a legend names them all.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(json_path)
  colours = _category_colours()
  fig = Figure(figsize=(cols * panel_inches, rows * panel_inches + 0.55), dpi=dpi)
  fig.subplots_adjust(left=0.005, right=0.995, top=0.995, bottom=0.55 / (rows * panel_inches
                                                                         + 0.55) + 0.005,
                      wspace=0.02, hspace=0.02)
  for k, image_id in enumerate(sorted(coco.getImgIds())[:rows * cols]):
    info = coco.loadImgs(image_id)[0]
    image = np.asarray(Image.open(os.path.join(image_dir, info['file_name'])).convert('RGB'))
    anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
    masks = [coco.annToMask(a).astype(bool) for a in anns]
    ax = fig.add_subplot(rows, cols, k + 1)
    ax.imshow(_overlay(image, masks, [colours[a['category_id']] for a in anns]),
              interpolation='nearest')
    for a in anns:
      x, y = a['bbox'][:2]
      star = '' if a['category_id'] in SEEN_IDS else '*'
      ax.text(x, y, CATEGORY_NAMES[a['category_id']] + star, fontsize=5.5, color='white',
              va='bottom' if y > 0.08 * info['height'] else 'top', ha='left', clip_on=True,
              bbox=dict(boxstyle='square,pad=0.1', lw=0, fc=colours[a['category_id']]))
    ax.set_axis_off()
  handles = [Patch(color=colours[i], label=CATEGORY_NAMES[i] + ('' if i in SEEN_IDS else '*'))
             for i in list(SEEN_IDS) + list(UNSEEN_IDS)]
  fig.legend(handles=handles, loc='lower center', ncol=5, fontsize=6.5, frameon=False,
             title='seen (ids 1-5, VOC split)  |  unseen* (ids 8-14, non-VOC split)',
             title_fontsize=7, handlelength=1.2, columnspacing=1.0, borderaxespad=0.2)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi)
  # Palette PNG: a fraction of the size of the RGB one, with no visible difference here.
  picture = Image.open(buffer).convert('RGB').quantize(colors=256, method=Image.Quantize.MEDIANCUT)
  os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
  picture.save(png_path, format='PNG', optimize=True)


# ----------------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> dict[str, str]:
  parser = argparse.ArgumentParser(
      prog='python -m deepmarc_jax.data.shapes',
      description='Generates the synthetic seen/unseen shapes dataset in COCO format.')
  parser.add_argument('--out_dir', required=True, help='output folder')
  parser.add_argument('--num_train', type=int, default=DEFAULT_SPLITS['train'])
  parser.add_argument('--num_val', type=int, default=DEFAULT_SPLITS['validation'],
                      help="images in the 'validation' split")
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--style', default=DEFAULT_STYLE, choices=sorted(STYLES))
  parser.add_argument('--max_objects', type=int, default=None,
                      help="at most this many objects per image (default: the style's)")
  parser.add_argument('--sample_png', default=None,
                      help='also write a 4x3 grid of validation images with masks overlaid')
  args = parser.parse_args(argv)
  start = time.perf_counter()
  splits = {'train': args.num_train, 'validation': args.num_val}
  paths = generate(args.out_dir, splits={name: n for name, n in splits.items() if n > 0},
                   image_size=args.image_size, seed=args.seed, max_objects=args.max_objects,
                   style=args.style)
  seconds = time.perf_counter() - start
  for split, path in paths.items():
    with open(path) as f:
      data = json.load(f)
    print(f'{split}: {len(data["images"])} images, {len(data["annotations"])} instances -> {path}')
  print(f'generated in {seconds:.1f} s')
  if args.sample_png:
    sample_split = 'validation' if 'validation' in paths else 'train'
    save_sample_png(paths[sample_split], os.path.join(args.out_dir, sample_split), args.sample_png)
    print(f'sample picture: {args.sample_png} ({os.path.getsize(args.sample_png) / 1024:.0f} KiB)')
  return paths


if __name__ == '__main__':
  main()
