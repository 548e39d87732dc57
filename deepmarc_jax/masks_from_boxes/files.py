"""Image files and their boxes in, mask files out: the loop behind `segment.py`.

Each image is handled on its own: an unreadable file or a source that names no boxes for it is
reported and the next image runs. Per image NAME (its file name without extension, made unique
with its position when two images share one): NAME_labels.png, NAME_overlay.png and, on request,
NAME_probabilities.npz; for all images together results.json (COCO results).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from deepmarc_jax.masks_from_boxes import boxes as boxes_lib
from deepmarc_jax.masks_from_boxes import outputs

# Larger images are refused before their pixels are allocated (PIL's decompression-bomb check).
MAX_IMAGE_PIXELS = 100_000_000


class ImageReadError(ValueError):
  """An image file that cannot be used, with the reason."""


def read_image(path: str | io.BytesIO, name: str | None = None) -> np.ndarray:
  """[H, W, 3] uint8 RGB pixels as stored (no EXIF rotation: COCO's convention), of a file or
  an in-memory upload; ImageReadError's message starts with `name` (default: the path)."""
  name = name or str(path)
  previous = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      with Image.open(path) as image:
        image.load()
        return np.asarray(image.convert('RGB'))
  except FileNotFoundError as e:
    raise ImageReadError(f'{name}: no such file') from e
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
    raise ImageReadError(f'{name}: too large (over {MAX_IMAGE_PIXELS:,} pixels)') from e
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageReadError(f'{name}: not a readable image ({e})') from e
  finally:
    Image.MAX_IMAGE_PIXELS = previous


@dataclasses.dataclass
class Summary:
  images_done: int = 0
  boxes_done: int = 0
  boxes_skipped: int = 0
  failed: list[str] = dataclasses.field(default_factory=list)
  results_path: str = ''


def _stems(paths: Sequence[str]) -> list[str]:
  stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
  return [s if stems.count(s) == 1 else f'{s}_{i + 1}' for i, s in enumerate(stems)]


def segment_files(segmenter, jobs: Sequence[tuple[str, Any, str, int]], out_dir: str,
                  threshold: float, save_probabilities: bool = False,
                  log: Callable[[str], Any] = print) -> Summary:
  """Segments each job (image path, raw boxes or None, box format, COCO image id)."""
  os.makedirs(out_dir, exist_ok=True)
  summary, results = Summary(), []
  for (path, raw, box_format, image_id), stem in zip(jobs, _stems([j[0] for j in jobs])):
    try:
      image = read_image(path)
    except ImageReadError as e:
      log(f'image {path}: skipped, {e}')
      summary.failed.append(path)
      continue
    height, width = image.shape[:2]
    if raw is None:
      log(f'image {path}: skipped, the boxes name no boxes for it')
      summary.failed.append(path)
      continue
    boxes = boxes_lib.interpret(raw, box_format, height, width)
    log(f'image {path} ({width}x{height}), {len(boxes)} box(es):')
    for k, box in enumerate(boxes, 1):
      log(f'  {k}: {boxes_lib.describe(box, box_format)}')
    masks = segmenter.masks(segmenter.encode(image), boxes)
    numbers, yxyx, probabilities = masks.numbers, masks.boxes, masks.probabilities
    summary.boxes_skipped += len(boxes) - len(numbers)
    outputs.save_label_png(masks.labels(threshold), os.path.join(out_dir, f'{stem}_labels.png'))
    Image.fromarray(outputs.overlay(image, probabilities, yxyx, numbers, threshold)).save(
        os.path.join(out_dir, f'{stem}_overlay.png'))
    if save_probabilities:
      np.savez_compressed(os.path.join(out_dir, f'{stem}_probabilities.npz'),
                          box_masks=masks.box_masks, boxes_yxyx=yxyx, numbers=np.asarray(numbers),
                          probabilities=probabilities.astype(np.float16))
    results += masks.coco_results(image_id, threshold)
    summary.images_done += 1
    summary.boxes_done += len(numbers)
  summary.results_path = os.path.join(out_dir, 'results.json')
  with open(summary.results_path, 'w') as f:
    json.dump(results, f)
  return summary
