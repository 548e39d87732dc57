"""User boxes: parsed from text, JSON or a COCO annotation file, checked one by one.

Every box ends up as (y1, x1, y2, x2) in pixels of the original image (the ops/masks.py
convention: pixel (r, c) covers [r, r+1) x [c, c+1)). Formats of the input:

| format | a box is | what the numbers are |
|---|---|---|
| `xyxy` (default) | x1, y1, x2, y2 | pixels |
| `xywh` | x, y, width, height | pixels (COCO's `bbox`) |
| `yxyx_norm` | y1, x1, y2, x2 | fractions of the image height / width (the official Colab's) |

A box that cannot be used (not four finite numbers, inverted, of zero area, wholly outside the
image) is reported with the reason and skipped; a box partly outside is clipped to the image and
reported as clipped. The others still run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

FORMATS = ('xyxy', 'xywh', 'yxyx_norm')


class BoxInputError(ValueError):
  """A boxes argument or file that cannot be read at all (not one bad box)."""


@dataclasses.dataclass(frozen=True)
class Box:
  """One user box as given and as interpreted.

  given: the numbers as given; yxyx: (y1, x1, y2, x2) original-image pixels, clipped to the
  image, or None when the box is unusable; problem: why it is unusable, or a note such as
  'clipped to the image' (None when it is used as given).
  """
  given: tuple[Any, ...]
  yxyx: tuple[float, float, float, float] | None
  problem: str | None = None
  category_id: int = 1

  @property
  def usable(self) -> bool:
    return self.yxyx is not None


def parse_inline(text: str) -> list[list[Any]]:
  """'x1,y1,x2,y2 x1,y1,x2,y2' (boxes separated by spaces or ';') -> lists of number strings."""
  parts = [p for p in re.split(r'[;\s]+', text.strip()) if p]
  if not parts:
    raise BoxInputError('no boxes given')
  return [p.split(',') for p in parts]


def read_json(path: str) -> dict[str, list[Any]] | list[Any]:
  """A boxes JSON file: a list of boxes (one image), or {image file name: list of boxes}.

  A box is a list of four numbers or {"box": [four numbers], "category_id": id}.
  """
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise BoxInputError(f'{path}: cannot read boxes JSON: {e}') from e
  if not isinstance(data, (list, dict)):
    raise BoxInputError(f'{path}: expected a list of boxes or {{image: [boxes]}}, got '
                        f'{type(data).__name__}')
  return data


def read_coco_images(path: str) -> list[tuple[str, int, list[dict[str, Any]]]]:
  """[(file_name, image id, [{"box": bbox (xywh pixels), "category_id": id}, ...])] of the
  images a COCO instances JSON lists, in its order; images without annotations have []."""
  data = read_json(path)
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise BoxInputError(f'{path}: not a COCO instances file (no "images" list)')
  boxes = {}
  for image in data['images']:
    if not isinstance(image, dict) or 'id' not in image or 'file_name' not in image:
      raise BoxInputError(f'{path}: an image entry without "id" or "file_name": {image!r}')
    boxes[image['id']] = []
  for ann in data.get('annotations') or []:
    if not isinstance(ann, dict) or ann.get('image_id') not in boxes:
      raise BoxInputError(f'{path}: annotation {ann!r} names no listed image')
    boxes[ann['image_id']].append(
        {'box': ann.get('bbox'), 'category_id': ann.get('category_id', 1)})
  return [(image['file_name'], image['id'], boxes[image['id']]) for image in data['images']]


def read_coco(path: str) -> dict[str, list[dict[str, Any]]]:
  """{image file_name: its boxes} of a COCO instances JSON (see `read_coco_images`)."""
  return {name: raw for name, _, raw in read_coco_images(path)}


def interpret(raw: Sequence[Any], box_format: str, height: int, width: int) -> list[Box]:
  """Checks and converts raw boxes (see `read_json`) of an image of `height` x `width`."""
  if box_format not in FORMATS:
    raise BoxInputError(f'--box_format={box_format!r}; allowed: {", ".join(FORMATS)}')
  return [_interpret_one(item, box_format, height, width) for item in raw]


def _interpret_one(item: Any, box_format: str, height: int, width: int) -> Box:
  category_id = 1
  if isinstance(item, dict):
    category_id = item.get('category_id', 1)
    item = item.get('box')
  given = tuple(item) if isinstance(item, (list, tuple)) else (item,)
  if len(given) != 4:
    return Box(given, None, f'expected 4 numbers ({box_format}), got {len(given)}', category_id)
  try:
    a, b, c, d = (float(v) for v in given)
  except (TypeError, ValueError):
    return Box(given, None, f'not numbers: {given}', category_id)
  if not all(math.isfinite(v) for v in (a, b, c, d)):
    return Box(given, None, 'not finite (NaN or infinity)', category_id)
  if box_format == 'xyxy':
    y1, x1, y2, x2 = b, a, d, c
  elif box_format == 'xywh':
    if c < 0 or d < 0:
      return Box(given, None, f'negative width or height ({c}, {d})', category_id)
    y1, x1, y2, x2 = b, a, b + d, a + c
  else:  # yxyx_norm
    y1, x1, y2, x2 = a * height, b * width, c * height, d * width
  if y2 < y1 or x2 < x1:
    return Box(given, None, 'inverted (x2 < x1 or y2 < y1): '
               f'{"give x1,y1,x2,y2" if box_format == "xyxy" else "check --box_format"}',
               category_id)
  if y2 == y1 or x2 == x1:
    return Box(given, None, 'zero area', category_id)
  clipped = (max(y1, 0.0), max(x1, 0.0), min(y2, float(height)), min(x2, float(width)))
  if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
    return Box(given, None, f'outside the {width}x{height} image', category_id)
  problem = None
  if clipped != (y1, x1, y2, x2):
    problem = f'partly outside the {width}x{height} image: clipped'
  return Box(given, clipped, problem, category_id)


def boxes_for_image(source: dict[str, Any] | list[Any], image_path: str,
                    single_image: bool) -> list[Any] | None:
  """The raw boxes of one image from a JSON source: the list itself when the source is a list
  (and one image is given), else the entry of the image's path or file name (None if absent)."""
  if isinstance(source, list):
    if not single_image:
      raise BoxInputError('a list of boxes is for one image; give {image: [boxes]} for several')
    return source
  for key in (image_path, os.path.basename(image_path)):
    if key in source:
      return source[key]
  return None


def describe(box: Box, box_format: str) -> str:
  """One line: the box as given, and as used (x1, y1, x2, y2 pixels) or why not."""
  given = ','.join(str(v) for v in box.given)
  if not box.usable:
    return f'{box_format} [{given}]: skipped, {box.problem}'
  y1, x1, y2, x2 = box.yxyx
  note = f' ({box.problem})' if box.problem else ''
  return f'{box_format} [{given}] -> x1,y1,x2,y2 = {x1:.1f},{y1:.1f},{x2:.1f},{y2:.1f} px{note}'
