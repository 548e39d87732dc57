"""Instance overlays as PNG: masks tinted in distinct colours, boxes and labels drawn; a model's
detections drawn on its input image."""
from __future__ import annotations

import colorsys
from collections.abc import Collection, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from deepmarc_jax.ops import masks as mask_ops


def palette(n: int) -> np.ndarray:
  """[n, 3] uint8 well-separated colours (golden-ratio hues)."""
  hues = (np.arange(n) * 0.618033988749895) % 1.0
  rgb = np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]).reshape(-1, 3)
  return (rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray | None = None,
            labels: Sequence[str] | None = None, alpha: float = 0.5) -> np.ndarray:
  """Draws instances on an image.

  Args:
    image: [H, W, 3] uint8.
    masks: [K, H, W] bool (or probabilities, thresholded at 0.5).
    boxes: optional [K, 4] (y1, x1, y2, x2) pixels.
    labels: optional K strings drawn at the boxes' top-left corners.
  Returns:
    [H, W, 3] uint8.
  """
  out = image.astype(np.float32)
  colours = palette(len(masks)).astype(np.float32)
  for mask, colour in zip(masks, colours):
    sel = np.asarray(mask) >= 0.5
    out[sel] = (1 - alpha) * out[sel] + alpha * colour
  pil = Image.fromarray(out.round().clip(0, 255).astype(np.uint8))
  draw = ImageDraw.Draw(pil)
  if boxes is not None:
    for k, (y1, x1, y2, x2) in enumerate(np.asarray(boxes, np.float32)):
      colour = tuple(int(c) for c in colours[k])
      draw.rectangle([x1, y1, max(x2 - 1, x1), max(y2 - 1, y1)], outline=colour)
      if labels is not None:
        draw.text((x1 + 1, y1), labels[k], fill=colour)
  return np.asarray(pil)


def save_grid(images: Sequence[np.ndarray], path: str, cols: int = 4, zoom: int = 1) -> None:
  """Tiles equally sized [H, W, 3] uint8 images into one PNG, enlarged `zoom` times."""
  if zoom > 1:
    images = [np.repeat(np.repeat(img, zoom, 0), zoom, 1) for img in images]
  rows = -(-len(images) // cols)
  h, w = images[0].shape[:2]
  grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
  for i, img in enumerate(images):
    r, c = divmod(i, cols)
    grid[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = img
  Image.fromarray(grid).save(path)


def draw_detections(image: np.ndarray, dets: Mapping[str, np.ndarray],
                    categories: Mapping[int, str], seen: Collection[int],
                    score_threshold: float = 0.5, show_scores: bool = True) -> np.ndarray:
  """One input image [S, S, 3] uint8 with its detections above `score_threshold`.

  dets: one image's boxes [D, 4] (input pixels), scores [D], classes [D], masks [D, m, m]
  probabilities. Labels are 'name score' ('name' without scores), with '*' marking unseen
  (box-only) classes.
  """
  size = image.shape[0]
  keep = np.nonzero((dets['scores'] >= score_threshold) & (dets['classes'] > 0))[0]
  masks = [mask_ops.paste_box_mask(dets['masks'][k], dets['boxes'][k], size, size)
           for k in keep]
  labels = []
  for k in keep:
    category = int(dets['classes'][k])
    label = categories.get(category, '?') + ('' if category in seen else '*')
    labels.append(f'{label} {dets["scores"][k]:.2f}' if show_scores else label)
  return overlay(image, np.asarray(masks).reshape(-1, size, size), dets['boxes'][keep], labels)


def caption(image: np.ndarray, text: str) -> np.ndarray:
  """[H, W, 3] uint8 with `text` in white on a dark strip along its bottom edge."""
  pil = Image.fromarray(np.asarray(image, np.uint8))
  draw = ImageDraw.Draw(pil)
  left, top, right, bottom = draw.textbbox((0, 0), text)
  height = bottom - top + 3
  draw.rectangle([0, pil.height - height, right - left + 4, pil.height], fill=(0, 0, 0))
  draw.text((2, pil.height - height + 1 - top), text, fill=(255, 255, 255))
  return np.asarray(pil)
