"""Reading COCO-format instance data (JSON + image folder) into checked, builder-ready examples.

This is the only place that interprets COCO annotations: the TFDS builder, the synthetic
dataset and the tests all go through `read_coco_split`.

Bad input. A problem with one image or one annotation is either fatal (`on_bad_input='error'`:
a `BadInputError` naming the JSON, the image or annotation id, the reason and the detail) or
skipped (`on_bad_input='skip'`): `ReadStats` counts it by reason and every read logs one
summary line (absl; a warning when anything was skipped), e.g.
`.../instances_train.json: kept 118 of 120 images and 1180 of 1190 annotations; skipped 2
images: 1 missing_image, 1 unreadable_image; skipped 10 annotations: 7 of skipped images,
2 duplicate_annotation_id, 1 non_finite_coordinates`. Never is an example kept that is known
to be wrong. Problems with the file as a whole stop the read under either policy: a missing,
unparsable or structurally malformed JSON, a JSON larger than `max_json_bytes` (it is read
into memory whole; the message says how to raise the limit), no images, a labelled split
without annotations (absent key or empty list: see `CocoSplit.labelled` for unlabelled
splits), and a read that skipped every image, or every annotation of a labelled split.

Skip reasons, per image: `missing_image`, `unreadable_image`, `image_too_large` (the header's
height x width is over PIL's `Image.MAX_IMAGE_PIXELS`: refused before any pixel is decoded),
`unsupported_image_mode` (e.g. float or 32-bit TIFFs, LAB), `image_size_mismatch` (with a hint
when the file's EXIF orientation turns it), `duplicate_image_id` (exact repeats of an entry
keep the first; entries that disagree are all skipped, with their annotations). Per annotation:
`missing_annotation_id`, `duplicate_annotation_id` (the first in file order is kept),
`unknown_image_id`, `unknown_category`, `malformed_box`, `non_finite_coordinates` (NaN or
infinite box or polygon coordinates), `degenerate_box` (zero or negative width or height),
`box_outside_image`, `malformed_iscrowd`, `missing_segmentation`, `malformed_polygon`,
`polygon_out_of_range` (vertices more than one image size outside the image),
`degenerate_polygon` (no part with 3 or more points), `malformed_rle`, `rle_size_mismatch`,
`empty_mask`.

Conventions. Boxes partly outside the image are clipped to it; masks are rasterised at the
image size. Polygon parts of fewer than 3 points enclose nothing and are dropped. Pixels are
read as stored, as COCO does: EXIF orientation is not applied, so the JSON's height and width
are the stored ones. Grayscale, palette, CMYK and alpha images become RGB (alpha is dropped,
not composited); 16-bit grayscale keeps its high byte (scaled, not clipped; PIL reduces 16-bit
colour PNGs the same way). RGB JPEGs are stored as they are; everything else as decoded RGB.

Masks are returned as uncompressed COCO run lengths (`mask_rle`): column-major runs that
alternate 0 and 1, starting with a (possibly empty) run of zeros. They are compact, and the
tf.data pipeline expands them with one vectorised `tf.repeat`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging
from PIL import Image
from pycocotools import mask as mask_utils

ON_BAD_INPUT = ('skip', 'error')
# A COCO JSON is parsed into memory whole, and Python's objects take several times the file's
# size; larger files are refused with a message saying how to raise the limit.
DEFAULT_MAX_JSON_MB = 512

_POLICY_HINT = ("(on_bad_input='skip' skips and counts such entries instead: "
                '--config.data.on_bad_input=skip with run.py, '
                'coco_instances/<config>/on_bad_input=skip with tfds build)')
_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_RGB_CONVERTIBLE_MODES = ('1', 'L', 'LA', 'P', 'PA', 'RGB', 'RGBA', 'RGBX', 'RGBa', 'CMYK',
                          'YCbCr')


class BadInputError(ValueError):
  """The dataset has an input problem: fatal for the file, or `on_bad_input='error'`."""


@dataclasses.dataclass
class ReadStats:
  """What a read kept and what it skipped, by reason.

  Every image entry of the JSON is kept or in `skipped_images`; every annotation entry is kept,
  in `skipped_annotations`, or counted in `annotations_of_skipped_images`.
  """
  images: int = 0
  instances: int = 0
  image_entries: int = 0
  annotation_entries: int = 0
  skipped_images: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  skipped_annotations: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)
  annotations_of_skipped_images: int = 0
  labelled: bool = True
  categories: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  @property
  def skipped(self) -> collections.Counter:
    """Problems found, by reason (images and annotations)."""
    return self.skipped_images + self.skipped_annotations

  def as_dict(self) -> dict[str, Any]:
    return {'images': self.images, 'instances': self.instances, 'skipped': dict(self.skipped),
            'image_entries': self.image_entries, 'annotation_entries': self.annotation_entries,
            'annotations_of_skipped_images': self.annotations_of_skipped_images,
            'labelled': self.labelled}

  def summary(self) -> str:
    """One line: what was kept of what, and what was skipped, by reason."""
    text = (f'kept {self.images} of {self.image_entries} images and {self.instances} of '
            f'{self.annotation_entries} annotations')
    if self.skipped_images:
      text += (f'; skipped {sum(self.skipped_images.values())} images: '
               + _by_reason(self.skipped_images))
    dropped = sum(self.skipped_annotations.values()) + self.annotations_of_skipped_images
    if dropped:
      parts = ([f'{self.annotations_of_skipped_images} of skipped images']
               if self.annotations_of_skipped_images else [])
      if self.skipped_annotations:
        parts.append(_by_reason(self.skipped_annotations))
      text += f'; skipped {dropped} annotations: ' + ', '.join(parts)
    if not self.labelled:
      text += ' (unlabelled split)'
    return text


def _by_reason(counter: collections.Counter) -> str:
  return ', '.join(f'{n} {reason}'
                   for reason, n in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclasses.dataclass(frozen=True)
class CocoSplit:
  """One split: an instances JSON and the folder its `file_name`s are relative to.

  `labelled=False` marks a split meant to have no annotations (like COCO's test2017, whose
  `image_info_test2017.json` has no "annotations" key): it may lack them; a labelled split
  without annotations is an error.
  """
  annotations: str
  images: str
  labelled: bool = True


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: int | float) -> bool:
  return isinstance(value, int) or math.isfinite(value)  # ints of any size are finite


def _as_int(value: Any) -> int | None:
  """An int, or an integral float (as some exporters write ids and sizes); else None."""
  if isinstance(value, bool):
    return None
  if isinstance(value, int):
    return value
  if isinstance(value, float) and math.isfinite(value) and value.is_integer():
    return int(value)
  return None


def load_coco_json(path: str, *,
                   max_bytes: int | None = DEFAULT_MAX_JSON_MB * 2**20) -> dict[str, Any]:
  """Loads and structurally checks a COCO instances JSON; errors name the file.

  A file over `max_bytes` is refused before it is read (None: no limit). The "annotations"
  list may be absent; `read_coco_split` decides whether that is allowed.
  """
  try:
    size = os.path.getsize(path)
  except FileNotFoundError:
    raise BadInputError(f'{path}: annotation file not found') from None
  if max_bytes is not None and size > max_bytes:
    raise BadInputError(
        f'{path}: the file is {size / 2**20:,.1f} MiB ({size:,} bytes), over the '
        f'{max_bytes / 2**20:,.1f} MiB limit for a COCO JSON, which is parsed into memory '
        'whole (Python needs several times the file size). If this machine has the memory, '
        'raise the limit: --config.data.max_json_mb=N with run.py, '
        'coco_instances/<config>/max_json_mb=N with tfds build, CocoInstances(max_json_mb=N) '
        'in Python; or split the file.')
  try:
    with open(path, 'rb') as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadInputError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(data, dict):
    raise BadInputError(f'{path}: expected a JSON object with images/annotations/categories')
  for key in ('images', 'categories'):
    if not isinstance(data.get(key), list):
      raise BadInputError(f'{path}: missing or malformed "{key}" list')
  if 'annotations' in data and not isinstance(data['annotations'], list):
    raise BadInputError(f'{path}: "annotations" must be a list')
  if not data['images']:
    raise BadInputError(f'{path}: the "images" list is empty')
  for image in data['images']:
    if not isinstance(image, dict):
      raise BadInputError(f'{path}: image entry {image!r} is not an object')
    missing = [k for k in ('id', 'file_name', 'height', 'width') if k not in image]
    if missing:
      raise BadInputError(f'{path}: image entry {image.get("id", "?")} lacks {missing}')
    if _as_int(image['id']) is None:
      raise BadInputError(f'{path}: image entry {image["id"]!r}: "id" must be an integer')
    if not isinstance(image['file_name'], str) or not image['file_name']:
      raise BadInputError(f'{path}: image {image["id"]}: "file_name" must be a non-empty '
                          'string')
    for key in ('height', 'width'):
      value = _as_int(image[key])
      if value is None or value <= 0:
        raise BadInputError(f'{path}: image {image["id"]}: "{key}" is {image[key]!r}, not a '
                            'positive integer')
  seen = {}
  for cat in data['categories']:
    if not isinstance(cat, dict) or 'id' not in cat or 'name' not in cat:
      raise BadInputError(f'{path}: category entry {cat} lacks "id" or "name"')
    cat_id = _as_int(cat['id'])
    if cat_id is None:
      raise BadInputError(f'{path}: category {cat["name"]!r}: "id" {cat["id"]!r} is not an '
                          'integer')
    if cat_id in seen:
      raise BadInputError(f'{path}: category id {cat_id} is listed twice ({seen[cat_id]!r} '
                          f'and {cat["name"]!r})')
    seen[cat_id] = cat['name']
  for k, ann in enumerate(data.get('annotations', [])):
    if not isinstance(ann, dict):
      raise BadInputError(f'{path}: annotation entry #{k} is {ann!r}, not an object')
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


def compressed_rle_counts(counts: str | bytes) -> list[int] | None:
  """Run lengths of a compressed COCO RLE string (pycocotools' `rleFrString`), None if it does
  not parse. Checked here because pycocotools decodes without bounds checks."""
  data = counts.encode('ascii', 'replace') if isinstance(counts, str) else bytes(counts)
  out: list[int] = []
  p = 0
  while p < len(data):
    x, k, more = 0, 0, True
    while more:
      if p >= len(data) or k > 12:
        return None  # ends inside a number, or a number longer than 64 bits
      c = data[p] - 48
      if not 0 <= c < 64:
        return None
      x |= (c & 0x1f) << (5 * k)
      more = bool(c & 0x20)
      p += 1
      k += 1
      if not more and c & 0x10:
        x |= -1 << (5 * k)
    if len(out) > 2:
      x += out[-2]
    out.append(x)
  return out


_Report = Callable[[str, str, str], None]


class _Reporter:
  """Applies the skip-or-error policy and counts skips, per image or per annotation."""

  def __init__(self, on_bad_input: str, json_path: str, stats: ReadStats):
    if on_bad_input not in ON_BAD_INPUT:
      raise ValueError(f'on_bad_input={on_bad_input!r}; allowed: {ON_BAD_INPUT}')
    self.policy, self.json_path, self.stats = on_bad_input, json_path, stats

  def image(self, reason: str, where: str, detail: str = '') -> None:
    self._report(self.stats.skipped_images, reason, where, detail)

  def annotation(self, reason: str, where: str, detail: str = '') -> None:
    self._report(self.stats.skipped_annotations, reason, where, detail)

  def _report(self, counter, reason: str, where: str, detail: str) -> None:
    if self.policy == 'error':
      raise BadInputError(f'{self.json_path}: {where}: {reason}{": " + detail if detail else ""}'
                          f' {_POLICY_HINT}')
    counter[reason] += 1


def read_coco_split(split: CocoSplit, *, on_bad_input: str = 'skip',
                    stats: ReadStats | None = None,
                    max_json_bytes: int | None = DEFAULT_MAX_JSON_MB * 2**20,
                    ) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields (image_id, example) for each usable image of a COCO split, in image-id order.

  An example holds `image` (JPEG bytes or [H, W, 3] uint8), `image/id`, `image/filename` and
  `objects` with per-instance `id`, `bbox` (ymin, xmin, ymax, xmax normalised to [0, 1], from
  the JSON `bbox` clipped to the image), `category_id` (the JSON's id, e.g. COCO 1..90),
  `is_crowd`, `area` (the JSON's when positive and finite, else mask pixels) and `mask_rle`
  (see module docstring). Images with no (usable) annotations are kept with empty `objects`.
  The module docstring lists what is checked; `stats` receives the counts, and the read ends
  with one summary log line.
  """
  stats = stats if stats is not None else ReadStats()
  path = split.annotations
  report = _Reporter(on_bad_input, path, stats)
  data = load_coco_json(path, max_bytes=max_json_bytes)
  annotations = data.get('annotations')
  stats.labelled = split.labelled
  if split.labelled and not annotations:
    what = ('has no "annotations" key' if annotations is None else
            'has an empty "annotations" list')
    raise BadInputError(
        f'{path}: {what}, and the split is labelled: it would build a dataset without '
        'instances. If the split is meant to be unlabelled (like COCO test2017), declare it: '
        'CocoInstancesConfig(unlabelled_splits=(...)), or with the custom config name the file '
        'annotations/image_info_<split>.json instead of instances_<split>.json.')
  annotations = annotations or []
  stats.image_entries, stats.annotation_entries = len(data['images']), len(annotations)
  category_ids = {_as_int(c['id']) for c in data['categories']}
  stats.categories = [{'id': _as_int(c['id']), 'name': str(c['name']),
                       'supercategory': str(c.get('supercategory', ''))}
                      for c in sorted(data['categories'], key=lambda c: _as_int(c['id']))]

  entries = collections.defaultdict(list)  # image id -> its entries in the JSON
  for info in data['images']:
    entries[_as_int(info['id'])].append(info)
  images = _unique_images(entries, split.images, report)
  anns_by_image = _group_annotations(annotations, entries, report)
  for image_id in entries.keys() - images.keys():  # conflicting duplicates: all skipped
    stats.annotations_of_skipped_images += len(anns_by_image.pop(image_id, []))

  for image_id in sorted(images):
    info = images[image_id]
    file_path = os.path.join(split.images, info['file_name'])
    anns = anns_by_image.pop(image_id, [])
    height, width = _as_int(info['height']), _as_int(info['width'])
    try:
      image = _read_image(file_path, (height, width))
    except _ImageProblem as problem:
      report.image(problem.reason, f'image {image_id} ({file_path})', problem.detail)
      stats.annotations_of_skipped_images += len(anns)
      continue
    objects = [obj for ann in anns
               if (obj := _read_instance(ann, height, width, category_ids,
                                         report.annotation)) is not None]
    stats.images += 1
    stats.instances += len(objects)
    yield image_id, {
        'image': image,
        'image/id': image_id,
        'image/filename': info['file_name'],
        'objects': _stack_objects(objects),
    }

  logging.log(logging.WARNING if stats.skipped or stats.annotations_of_skipped_images
              else logging.INFO, '%s: %s', path, stats.summary())
  if not stats.images:
    raise BadInputError(f'{path}: every image was skipped ({stats.summary()})')
  if split.labelled and not stats.instances:
    raise BadInputError(f'{path}: every annotation was skipped ({stats.summary()}); a labelled '
                        'split without instances is not built')


def _unique_images(entries: dict[int, list[dict[str, Any]]], image_dir: str,
                   report: _Reporter) -> dict[int, dict[str, Any]]:
  """One entry per image id: exact repeats keep the first; disagreeing entries are dropped."""
  images = {}
  for image_id, infos in entries.items():
    first = infos[0]
    same = all((im['file_name'], _as_int(im['height']), _as_int(im['width'])) ==
               (first['file_name'], _as_int(first['height']), _as_int(first['width']))
               for im in infos)
    if same:
      images[image_id] = first
    for info in infos[1:] if same else infos:
      where = f'image {image_id} ({os.path.join(image_dir, info["file_name"])})'
      if same:
        detail = f'the entry is listed {len(infos)} times; the first is kept'
      else:
        others = sorted({f'{im["file_name"]} ({im["height"]}x{im["width"]})'
                         for im in infos if im is not info})
        detail = (f'id {image_id} is also given to {", ".join(others)}: every entry with this '
                  'id is skipped, with its annotations')
      report.image('duplicate_image_id', where, detail)
  return images


def _group_annotations(annotations: list[dict[str, Any]], image_ids, report: _Reporter
                       ) -> dict[int, list[dict[str, Any]]]:
  """Annotations by image id; unidentifiable, duplicate and orphan annotations are reported."""
  anns_by_image = collections.defaultdict(list)
  first_image_of = {}  # annotation id -> image id of its first occurrence
  for k, ann in enumerate(annotations):
    ann_id, image_id = _as_int(ann.get('id')), _as_int(ann.get('image_id'))
    if ann_id is None:
      report.annotation('missing_annotation_id',
                        f'annotation entry #{k} (image {ann.get("image_id")!r})',
                        f'"id" is {ann.get("id")!r}, not an integer')
      continue
    where = f'annotation {ann_id} of image {ann.get("image_id")!r}'
    if ann_id in first_image_of:
      report.annotation('duplicate_annotation_id', where,
                        f'id {ann_id} is also used by an annotation of image '
                        f'{first_image_of[ann_id]!r}; '
                        'the first in file order is kept')
      continue
    first_image_of[ann_id] = ann.get('image_id')
    if image_id not in image_ids:
      report.annotation('unknown_image_id', where,
                        f'image_id {ann.get("image_id")!r} is not in "images"')
      continue
    anns_by_image[image_id].append(ann)
  return anns_by_image


class _ImageProblem(Exception):

  def __init__(self, reason: str, detail: str):
    super().__init__(reason, detail)
    self.reason, self.detail = reason, detail


def _read_image(path: str, expected_hw: tuple[int, int]) -> bytes | np.ndarray:
  """The image as JPEG bytes to pass through, or an RGB array to re-encode.

  Only the header is parsed until the size is known to be acceptable (no decompression bomb)
  and equal to the JSON's. RGB JPEGs pass through untouched; other modes become RGB (module
  docstring). Raises `_ImageProblem`.
  """
  if not os.path.isfile(path):
    raise _ImageProblem('missing_image', 'file not found')
  limit = Image.MAX_IMAGE_PIXELS
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', Image.DecompressionBombWarning)
      img = Image.open(path)  # parses the header only
  except Image.DecompressionBombError as e:
    raise _ImageProblem('image_too_large', f'{e}; nothing was decoded') from None
  except Exception as e:  # PIL raises many types for corrupt files
    raise _ImageProblem('unreadable_image', f'{type(e).__name__}: {e}') from None
  with img:
    height, width = img.height, img.width
    if limit and height * width > limit:
      raise _ImageProblem(
          'image_too_large', f'its header says {height}x{width} = {height * width:,} pixels, '
          f'over PIL.Image.MAX_IMAGE_PIXELS = {limit:,} (a decompression-bomb guard); nothing '
          'was decoded')
    if (height, width) != expected_hw:
      detail = f'file is {height}x{width}, JSON says {expected_hw[0]}x{expected_hw[1]}'
      orientation = _exif_orientation(img)
      if orientation in (5, 6, 7, 8) and (width, height) == expected_hw:
        detail += (f' (the file has EXIF orientation {orientation}, a quarter turn, which COCO '
                   'does not apply: pixels are read as stored, so the JSON must give the '
                   'stored height and width)')
      raise _ImageProblem('image_size_mismatch', detail)
    mode, fmt = img.mode, img.format
    sixteen_bit = mode in _SIXTEEN_BIT_MODES or (mode == 'I' and fmt == 'PNG')
    if not sixteen_bit and mode not in _RGB_CONVERTIBLE_MODES:
      raise _ImageProblem('unsupported_image_mode', f'{fmt} image in PIL mode {mode!r}')
    try:
      img.load()  # fully decode: truncated files fail here, not later in tf.data
    except Exception as e:  # pylint: disable=broad-except
      raise _ImageProblem('unreadable_image', f'{type(e).__name__}: {e}') from None
    if fmt == 'JPEG' and mode == 'RGB':
      with open(path, 'rb') as f:
        return f.read()
    if sixteen_bit:  # keep the high byte: scaled to 8 bits, not clipped
      gray = (np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
      return np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(img.convert('RGB'))


def _exif_orientation(img: Image.Image) -> int | None:
  try:
    return img.getexif().get(0x0112)
  except Exception:  # pylint: disable=broad-except
    return None


def _read_instance(ann: dict[str, Any], height: int, width: int, category_ids: set[int],
                   report: _Report) -> dict[str, Any] | None:
  """Checks and converts one annotation; None when it is skipped."""
  where = f'annotation {ann["id"]} of image {ann["image_id"]}'
  if _as_int(ann.get('category_id')) not in category_ids:
    report('unknown_category', where, f'category_id {ann.get("category_id")!r} is not in '
           '"categories"')
    return None
  bbox = ann.get('bbox')
  if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
    report('malformed_box', where, f'bbox {bbox!r}')
    return None
  if not all(_is_finite(v) for v in bbox):
    report('non_finite_coordinates', where, f'bbox {bbox!r} is not finite')
    return None
  x, y, w, h = bbox
  if not (w > 0 and h > 0):
    report('degenerate_box', where, f'bbox {bbox} (x, y, width, height) has no area')
    return None
  y1, x1 = min(max(y, 0.0), height), min(max(x, 0.0), width)
  y2, x2 = min(max(y + h, 0.0), height), min(max(x + w, 0.0), width)
  if not (y2 > y1 and x2 > x1):
    report('box_outside_image', where,
           f'bbox {bbox} (x, y, width, height) lies wholly outside the {height}x{width} image')
    return None
  iscrowd = ann.get('iscrowd', 0)
  # JSON true / false as well: some exporters write booleans.
  if not (isinstance(iscrowd, bool) or (_is_number(iscrowd) and iscrowd in (0, 1))):
    report('malformed_iscrowd', where, f'iscrowd {iscrowd!r} is not 0, 1, true or false')
    return None
  mask, reason, detail = _segmentation_to_mask(ann.get('segmentation'), height, width)
  if mask is None:
    report(reason, where, detail)
    return None
  area = ann.get('area')
  return {
      'id': _as_int(ann['id']),
      'bbox': np.array([y1 / height, x1 / width, y2 / height, x2 / width], np.float32),
      'category_id': _as_int(ann['category_id']),
      'is_crowd': bool(iscrowd),
      # COCOeval bins objects by the JSON's area (polygon area for official COCO).
      'area': np.float32(area if _is_number(area) and _is_finite(area) and 0 < area < 2**62
                         else mask.sum()),
      'mask_rle': rle_counts(mask),
  }


def _segmentation_to_mask(segm: Any, height: int, width: int
                          ) -> tuple[np.ndarray | None, str, str]:
  """Decodes polygons / RLE into a [H, W] mask, or (None, reason, detail) when unusable."""
  if isinstance(segm, list):
    return _polygons_to_mask(segm, height, width)
  if isinstance(segm, dict) and 'counts' in segm and 'size' in segm:
    size, counts = segm['size'], segm['counts']
    if not (isinstance(size, list) and len(size) == 2
            and all(_as_int(v) is not None for v in size)):
      return None, 'malformed_rle', f'size {size!r} is not [height, width]'
    if [_as_int(v) for v in size] != [height, width]:
      return None, 'rle_size_mismatch', f'RLE size {size}, image {height}x{width}'
    if isinstance(counts, (str, bytes)):
      counts = compressed_rle_counts(counts)
      if counts is None:
        return None, 'malformed_rle', 'the compressed counts string does not parse'
    elif not (isinstance(counts, list) and all(_as_int(c) is not None for c in counts)):
      return None, 'malformed_rle', 'counts are neither a string nor a list of integers'
    counts = [_as_int(c) for c in counts]
    if any(c < 0 for c in counts):
      return None, 'malformed_rle', 'negative run length'
    if sum(counts) != height * width:
      return None, 'rle_size_mismatch', (f'run lengths sum to {sum(counts)}, not '
                                         f'{height}x{width} = {height * width}')
    mask = decode_rle_counts(np.asarray(counts, np.int64), height, width)
  else:
    return None, 'missing_segmentation', f'segmentation {str(segm)[:80]!r}'
  if not mask.any():
    return None, 'empty_mask', 'the segmentation covers no pixel of the image'
  return mask, '', ''


def _polygons_to_mask(segm: list[Any], height: int, width: int
                      ) -> tuple[np.ndarray | None, str, str]:
  if not segm:
    return None, 'missing_segmentation', 'empty polygon list'
  polygons = []
  for k, poly in enumerate(segm):
    if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
      return None, 'malformed_polygon', f'polygon {k} is not a list of numbers'
    if len(poly) % 2:
      return None, 'malformed_polygon', f'polygon {k} has an odd number ({len(poly)}) of values'
    bad = [i for i, v in enumerate(poly) if not _is_finite(v)]
    if bad:
      return None, 'non_finite_coordinates', (f'polygon {k} has {poly[bad[0]]} at index '
                                              f'{bad[0]} ({len(bad)} non-finite values)')
    xs, ys = poly[0::2], poly[1::2]
    if xs and (min(xs) < -width or max(xs) > 2 * width or min(ys) < -height
               or max(ys) > 2 * height):
      return None, 'polygon_out_of_range', (
          f'polygon {k} spans x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)}: more than one '
          f'image size outside the {height}x{width} image')
    if len(poly) >= 6:  # fewer than 3 points enclose nothing
      polygons.append([float(v) for v in poly])
  if not polygons:
    return None, 'degenerate_polygon', ('no polygon part has 3 or more points (values per '
                                        f'part: {[len(p) for p in segm]})')
  rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  mask = mask_utils.decode(rle)
  if not mask.any():
    return None, 'empty_mask', 'the polygons cover no pixel of the image'
  return mask, '', ''


def _stack_objects(objects: list[dict[str, Any]]) -> dict[str, Any]:
  """List of per-instance dicts -> dict of per-field lists/arrays (TFDS Sequence input)."""
  if not objects:
    return {'id': np.zeros([0], np.int64), 'bbox': np.zeros([0, 4], np.float32),
            'category_id': np.zeros([0], np.int64), 'is_crowd': np.zeros([0], bool),
            'area': np.zeros([0], np.float32), 'mask_rle': []}
  return {key: [obj[key] for obj in objects] for key in objects[0]}
