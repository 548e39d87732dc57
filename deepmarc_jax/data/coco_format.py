"""Reading COCO-format instance data (JSON + image folder) into checked, builder-ready examples.

This is the only place that interprets COCO annotations: the TFDS builder, the synthetic
dataset and the tests all go through `read_coco_split`. Every problem with the input is either
fatal (`on_bad_input='error'`: a `BadInputError` naming the file and the image/annotation id)
or skipped and counted (`on_bad_input='skip'`: `ReadStats` says what was dropped and why).

Masks are returned as uncompressed COCO run lengths (`mask_rle`): column-major runs that
alternate 0 and 1, starting with a (possibly empty) run of zeros. They are compact, and the
tf.data pipeline expands them with one vectorised `tf.repeat`.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

ON_BAD_INPUT = ('skip', 'error')


class BadInputError(ValueError):
  """The dataset has an input problem and `on_bad_input='error'`."""


@dataclasses.dataclass
class ReadStats:
  """What a read kept and what it skipped, by reason."""
  images: int = 0
  instances: int = 0
  skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  categories: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def as_dict(self) -> dict[str, Any]:
    return {'images': self.images, 'instances': self.instances, 'skipped': dict(self.skipped)}


@dataclasses.dataclass(frozen=True)
class CocoSplit:
  """One split: an instances JSON and the folder its `file_name`s are relative to."""
  annotations: str
  images: str


def load_coco_json(path: str) -> dict[str, Any]:
  """Loads and structurally checks a COCO instances JSON; errors name the file."""
  try:
    with open(path, 'rb') as f:
      data = json.load(f)
  except FileNotFoundError:
    raise BadInputError(f'{path}: annotation file not found') from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadInputError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(data, dict):
    raise BadInputError(f'{path}: expected a JSON object with images/annotations/categories')
  for key in ('images', 'categories'):
    if not isinstance(data.get(key), list):
      raise BadInputError(f'{path}: missing or malformed "{key}" list')
  if not isinstance(data.setdefault('annotations', []), list):
    raise BadInputError(f'{path}: "annotations" must be a list')
  for image in data['images']:
    missing = [k for k in ('id', 'file_name', 'height', 'width') if k not in image]
    if missing:
      raise BadInputError(f'{path}: image entry {image.get("id", "?")} lacks {missing}')
  for cat in data['categories']:
    if 'id' not in cat or 'name' not in cat:
      raise BadInputError(f'{path}: category entry {cat} lacks "id" or "name"')
  return data


def rle_counts(mask: np.ndarray) -> np.ndarray:
  """Uncompressed COCO run lengths of a [H, W] binary mask (column-major, zeros first)."""
  flat = np.asarray(mask, np.uint8).ravel(order='F')
  change = np.flatnonzero(np.diff(flat)) + 1
  bounds = np.concatenate([[0], change, [flat.size]])
  counts = np.diff(bounds)
  if flat.size and flat[0] == 1:  # runs must start with zeros
    counts = np.concatenate([[0], counts])
  return counts.astype(np.int32)


def decode_rle_counts(counts: np.ndarray, height: int, width: int) -> np.ndarray:
  """Inverse of `rle_counts`: [H, W] uint8 mask."""
  values = np.arange(len(counts)) % 2
  return np.repeat(values, counts).astype(np.uint8).reshape((width, height)).T


def _segmentation_to_mask(segm: Any, height: int, width: int) -> tuple[np.ndarray | None, str]:
  """Decodes polygons / RLE into a [H, W] mask, or (None, reason) when unusable."""
  if isinstance(segm, list):
    polygons = [p for p in segm
                if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in p)]
    if not polygons:
      return None, 'degenerate_polygon'
    rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  elif isinstance(segm, dict) and 'counts' in segm and 'size' in segm:
    if list(segm['size']) != [height, width]:
      return None, 'rle_size_mismatch'
    rle = segm
    if isinstance(segm['counts'], list):  # uncompressed RLE (crowd regions)
      if sum(segm['counts']) != height * width:
        return None, 'rle_size_mismatch'
      rle = mask_utils.frPyObjects(segm, height, width)
    elif isinstance(segm['counts'], str):
      rle = dict(segm, counts=segm['counts'].encode('ascii'))
  else:
    return None, 'missing_segmentation'
  mask = mask_utils.decode(rle)
  if not mask.any():
    return None, 'empty_mask'
  return mask, ''


def _read_image(path: str) -> tuple[bytes | np.ndarray, tuple[int, int]]:
  """Returns the image as JPEG bytes to pass through, or an RGB array to re-encode, + (h, w).

  RGB JPEGs are passed through untouched; grayscale, CMYK, palette and alpha images are
  converted to RGB (they would otherwise decode with the wrong channel count).
  """
  with open(path, 'rb') as f:
    data = f.read()
  with Image.open(io.BytesIO(data)) as img:
    img.load()  # fully decode: truncated files fail here, not later in tf.data
    size = (img.height, img.width)
    if img.format == 'JPEG' and img.mode == 'RGB':
      return data, size
    return np.asarray(img.convert('RGB')), size


class _Reporter:
  """Applies the skip-or-error policy and counts skips."""

  def __init__(self, on_bad_input: str, json_path: str, stats: ReadStats):
    if on_bad_input not in ON_BAD_INPUT:
      raise ValueError(f'on_bad_input={on_bad_input!r}; allowed: {ON_BAD_INPUT}')
    self.policy, self.json_path, self.stats = on_bad_input, json_path, stats

  def __call__(self, reason: str, where: str, detail: str = '') -> None:
    if self.policy == 'error':
      raise BadInputError(f'{self.json_path}: {where}: {reason}{": " + detail if detail else ""}'
                          " (set data.on_bad_input='skip' to skip and count such entries)")
    self.stats.skipped[reason] += 1


def read_coco_split(split: CocoSplit, *, on_bad_input: str = 'skip',
                    stats: ReadStats | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (image_id, example) for each usable image of a COCO split, in image-id order.

  An example holds `image` (JPEG bytes or [H, W, 3] uint8), `image/id`, `image/filename` and
  `objects` with per-instance `id`, `bbox` (ymin, xmin, ymax, xmax normalised to [0, 1], from
  the JSON `bbox` clipped to the image), `category_id` (the JSON's id, e.g. COCO 1..90),
  `is_crowd`, `area` (mask pixels) and `mask_rle` (see module docstring).

  Images with no (usable) annotations are kept with empty `objects`.
  """
  stats = stats if stats is not None else ReadStats()
  data = load_coco_json(split.annotations)
  report = _Reporter(on_bad_input, split.annotations, stats)
  category_ids = {int(c['id']) for c in data['categories']}
  stats.categories = [{'id': int(c['id']), 'name': str(c['name']),
                       'supercategory': str(c.get('supercategory', ''))}
                      for c in sorted(data['categories'], key=lambda c: int(c['id']))]
  anns_by_image = collections.defaultdict(list)
  image_ids = {int(im['id']) for im in data['images']}
  for ann in data['annotations']:
    if ann.get('image_id') not in image_ids:
      report('unknown_image_id', f'annotation {ann.get("id")}',
             f'image_id {ann.get("image_id")} is not in "images"')
      continue
    anns_by_image[int(ann['image_id'])].append(ann)

  for info in sorted(data['images'], key=lambda im: int(im['id'])):
    image_id = int(info['id'])
    path = os.path.join(split.images, info['file_name'])
    where = f'image {image_id} ({path})'
    if not os.path.exists(path):
      report('missing_image', where, 'file not found')
      continue
    try:
      image, (height, width) = _read_image(path)
    except Exception as e:  # PIL raises many types for corrupt files
      report('unreadable_image', where, f'{type(e).__name__}: {e}')
      continue
    if (height, width) != (int(info['height']), int(info['width'])):
      report('image_size_mismatch', where,
             f'file is {height}x{width}, JSON says {info["height"]}x{info["width"]}')
      continue
    objects = [obj for ann in anns_by_image[image_id]
               if (obj := _read_instance(ann, height, width, category_ids, report)) is not None]
    stats.images += 1
    stats.instances += len(objects)
    yield image_id, {
        'image': image,
        'image/id': image_id,
        'image/filename': info['file_name'],
        'objects': _stack_objects(objects),
    }


def _read_instance(ann: dict[str, Any], height: int, width: int, category_ids: set[int],
                   report: _Reporter) -> dict[str, Any] | None:
  """Checks and converts one annotation; None when it is skipped."""
  where = f'annotation {ann.get("id")} of image {ann.get("image_id")}'
  if ann.get('category_id') not in category_ids:
    report('unknown_category', where, f'category_id {ann.get("category_id")} is not in '
           '"categories"')
    return None
  bbox = ann.get('bbox')
  if (not isinstance(bbox, list) or len(bbox) != 4
      or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
    report('malformed_box', where, f'bbox {bbox!r}')
    return None
  x, y, w, h = bbox
  y1, x1 = min(max(y, 0.0), height), min(max(x, 0.0), width)
  y2, x2 = min(max(y + h, 0.0), height), min(max(x + w, 0.0), width)
  if not (y2 > y1 and x2 > x1):
    report('degenerate_box', where, f'bbox {bbox} has no area inside the {height}x{width} image')
    return None
  mask, reason = _segmentation_to_mask(ann.get('segmentation'), height, width)
  if mask is None:
    report(reason, where)
    return None
  return {
      'id': int(ann.get('id', -1)),
      'bbox': np.array([y1 / height, x1 / width, y2 / height, x2 / width], np.float32),
      'category_id': int(ann['category_id']),
      'is_crowd': bool(ann.get('iscrowd', 0)),
      # COCOeval bins objects by the JSON's area (polygon area for official COCO).
      'area': np.float32(ann['area'] if isinstance(ann.get('area'), (int, float))
                         and ann['area'] > 0 else mask.sum()),
      'mask_rle': rle_counts(mask),
  }


def _stack_objects(objects: list[dict[str, Any]]) -> dict[str, Any]:
  """List of per-instance dicts -> dict of per-field lists/arrays (TFDS Sequence input)."""
  if not objects:
    return {'id': np.zeros([0], np.int64), 'bbox': np.zeros([0, 4], np.float32),
            'category_id': np.zeros([0], np.int64), 'is_crowd': np.zeros([0], bool),
            'area': np.zeros([0], np.float32), 'mask_rle': []}
  return {key: [obj[key] for obj in objects] for key in objects[0]}
