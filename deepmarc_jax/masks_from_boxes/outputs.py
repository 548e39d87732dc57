"""What masks from boxes are written as: COCO results with RLE, an indexed label PNG, an overlay.

Conventions:
  * Box-relative masks [N, m, m] are pasted back at the original resolution with
    ops/masks.paste_box_mask; a pixel is foreground where its probability >= the threshold.
  * COCO results (the `loadRes` format): one entry per usable box with `bbox` (x, y, w, h
    pixels), `segmentation` (compressed RLE, counts as str) and `score`, the mean probability
    over the mask's pixels (0 for an empty mask): how sure the head is of that mask.
  * Label image: 0 = background, k = the k-th box given for that image (1-based, in the order
    given, skipped boxes keeping their number); where masks overlap, the pixel goes to the box
    with the higher probability there. 8-bit palette PNG up to 255 boxes, 16-bit beyond.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

from deepmarc_jax import viz
from deepmarc_jax.ops import masks as mask_ops


def paste(box_masks: np.ndarray, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """[N, m, m] box-relative probabilities, boxes [N, 4] y1x1y2x2 -> [N, height, width] float32."""
  pasted = [mask_ops.paste_box_mask(m, b, height, width) for m, b in zip(box_masks, boxes)]
  return np.stack(pasted) if pasted else np.zeros((0, height, width), np.float32)


def label_image(probabilities: np.ndarray, numbers: Sequence[int], threshold: float
                ) -> np.ndarray:
  """[N, H, W] pasted probabilities -> [H, W] labels: numbers[k] where box k's mask holds the
  pixel with the highest probability, 0 where no mask does."""
  height, width = probabilities.shape[1:]
  dtype = np.uint8 if max(numbers, default=0) < 256 else np.uint16
  if not len(probabilities):
    return np.zeros((height, width), dtype)
  best = probabilities.argmax(0)
  foreground = probabilities.max(0) >= threshold
  return np.where(foreground, np.asarray(numbers)[best], 0).astype(dtype)


def save_label_png(labels: np.ndarray, path) -> None:
  """An indexed PNG: palette colours for an 8-bit label image (index 0 black), else 16-bit."""
  if labels.dtype == np.uint8:
    image = Image.fromarray(labels, mode='P')
    colours = np.concatenate([np.zeros((1, 3), np.uint8), viz.palette(255)])
    image.putpalette(colours.reshape(-1).tolist())
  else:
    image = Image.fromarray(labels.astype(np.uint16))
  image.save(path, format='PNG')  # path may be a file object


def coco_results(image_id: int, probabilities: np.ndarray, boxes: np.ndarray,
                 category_ids: Sequence[int], threshold: float) -> list[dict]:
  """COCO results of one image: [N, H, W] probabilities, boxes [N, 4] y1x1y2x2 pixels."""
  results = []
  for probs, (y1, x1, y2, x2), category in zip(probabilities, boxes, category_ids):
    mask = probs >= threshold
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    results.append({
        'image_id': int(image_id), 'category_id': int(category),
        'bbox': [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
        'score': float(probs[mask].mean()) if mask.any() else 0.0,
        'segmentation': rle})
  return results


def overlay(image: np.ndarray, probabilities: np.ndarray, boxes: np.ndarray,
            numbers: Sequence[int], threshold: float) -> np.ndarray:
  """The image with each mask tinted, its box drawn and labelled with its number."""
  return viz.overlay(image, probabilities >= threshold, boxes, [str(n) for n in numbers])
