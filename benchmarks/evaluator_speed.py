"""Speed of `deepmarc_jax.evaluation.coco.CocoEvaluator`: adding predictions, COCOeval per backend.

Synthetic ground truth: `--images` images of 640x480 with 3..10 instances each (ellipse polygons
or boxes, random categories among the 80 COCO ids). Detections, `--dets` per image: every GT
instance with a jittered box (sometimes a wrong class), a box-relative ellipse or full mask and a
score in [0.3, 1], then false positives with random boxes, classes and ellipse masks and scores
in [0, 0.7].

Prints, for each mask size m, seconds per 1000 images for `add_predictions` (paste + threshold
+ RLE, the same code for both backends) and for `evaluate()` (COCOeval bbox + segm) with each
backend, and the largest difference between the backends' numbers. Not a test; results in
docs/benchmarks.md.

  .venv/bin/python benchmarks/evaluator_speed.py [--images 1000]
"""
from __future__ import annotations

import argparse
import math
import time

import numpy as np
from pycocotools import mask as mask_util

from deepmarc_jax.evaluation import coco as coco_eval
from deepmarc_jax.data.class_splits import COCO_IDS, VOC_IDS

HEIGHT, WIDTH = 480, 640


def _ellipse_polygon(rng: np.random.Generator, height: int, width: int) -> list[float]:
  cy, cx = rng.uniform(10, height - 10), rng.uniform(10, width - 10)
  ry = rng.uniform(4, min(120, cy, height - cy))
  rx = rng.uniform(4, min(160, cx, width - cx))
  angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
  return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], 1).ravel().tolist()


def _box_polygon(rng: np.random.Generator, height: int, width: int) -> list[float]:
  x1, y1 = rng.uniform(0, width - 10), rng.uniform(0, height - 10)
  x2, y2 = min(x1 + rng.uniform(5, 250), width), min(y1 + rng.uniform(5, 200), height)
  return [x1, y1, x2, y1, x2, y2, x1, y2]


def synthetic_gt(num_images: int, rng: np.random.Generator) -> dict:
  """A COCO instances dict of `num_images` 640x480 images with polygon instances."""
  images, annotations = [], []
  for image_id in range(1, num_images + 1):
    images.append({'id': image_id, 'height': HEIGHT, 'width': WIDTH, 'file_name': ''})
    for _ in range(rng.integers(3, 11)):
      shape = _ellipse_polygon if rng.random() < 0.7 else _box_polygon
      polygon = shape(rng, HEIGHT, WIDTH)
      rle = mask_util.frPyObjects([polygon], HEIGHT, WIDTH)[0]
      annotations.append({
          'id': len(annotations) + 1, 'image_id': image_id,
          'category_id': int(rng.choice(COCO_IDS)), 'segmentation': [polygon],
          'area': float(mask_util.area(rle)), 'bbox': mask_util.toBbox(rle).tolist(),
          'iscrowd': 0, 'is_ellipse': shape is _ellipse_polygon})
  categories = [{'id': c, 'name': f'category_{c}'} for c in COCO_IDS]
  return {'images': images, 'annotations': annotations, 'categories': categories}


def _ellipse_mask(size: int) -> np.ndarray:
  """[size, size] soft ellipse inscribed in the box: >= 0.5 exactly inside the ellipse."""
  centres = (np.arange(size) + 0.5) / size * 2 - 1
  radius2 = centres[:, None] ** 2 + centres[None, :] ** 2
  return np.clip(1 - 0.5 * radius2, 0, 1).astype(np.float32)


def synthetic_predictions(gt: dict, num_dets: int, mask_size: int,
                          rng: np.random.Generator) -> dict[str, np.ndarray]:
  """Model-format predictions for every GT image: image_ids [N], boxes [N, K, 4], ..."""
  num_images = len(gt['images'])
  boxes = np.zeros((num_images, num_dets, 4))
  classes = np.zeros((num_images, num_dets), np.int64)
  masks = np.zeros((num_images, num_dets, mask_size, mask_size), np.float32)
  scores = rng.uniform(0.0, 0.7, (num_images, num_dets))  # false positives
  by_image: dict[int, list[dict]] = {}
  for ann in gt['annotations']:
    by_image.setdefault(ann['image_id'], []).append(ann)
  ellipse = _ellipse_mask(mask_size)
  for i, image in enumerate(gt['images']):
    anns = by_image.get(image['id'], [])[:num_dets]
    for k, ann in enumerate(anns):
      x, y, w, h = ann['bbox']
      jitter = rng.normal(0, 0.05, 4) * [h, w, h, w]
      boxes[i, k] = np.array([y, x, y + h, x + w]) + jitter
      wrong = rng.random() < 0.1
      classes[i, k] = int(rng.choice(COCO_IDS)) if wrong else ann['category_id']
      masks[i, k] = ellipse if ann['is_ellipse'] else 1.0
      scores[i, k] = rng.uniform(0.3, 1.0)
    num_fp = num_dets - len(anns)
    y1, x1 = rng.uniform(0, HEIGHT - 10, num_fp), rng.uniform(0, WIDTH - 10, num_fp)
    boxes[i, len(anns):] = np.stack(
        [y1, x1, y1 + rng.uniform(5, 200, num_fp), x1 + rng.uniform(5, 250, num_fp)], 1)
    classes[i, len(anns):] = rng.choice(COCO_IDS, num_fp)
    masks[i, len(anns):] = ellipse
  return {'image_ids': np.array([img['id'] for img in gt['images']]),
          'boxes': boxes.astype(np.float32),
          'scores': scores.astype(np.float32),
          'classes': classes, 'masks': masks}


def _numbers(results: dict) -> np.ndarray:
  values = []
  for iou_type in coco_eval.IOU_TYPES:
    summary = results[iou_type]
    values += [summary[name] for name in coco_eval.STAT_NAMES]
    values += [summary[split][name] for split in coco_eval.SPLITS for name in coco_eval.STAT_NAMES]
    values += [summary['per_category'][name] for name in sorted(summary['per_category'])]
  return np.array(values)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--images', type=int, default=1000)
  parser.add_argument('--dets', type=int, default=100, help='detections per image')
  parser.add_argument('--mask-sizes', type=int, nargs='+', default=[28, 64])
  parser.add_argument('--batch', type=int, default=8)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  gt = synthetic_gt(args.images, rng)
  per_1000 = 1000 / args.images
  print(f'{args.images} images of {WIDTH}x{HEIGHT}, {len(gt["annotations"])} GT instances, '
        f'{args.dets} detections per image; seconds per 1000 images')
  for mask_size in args.mask_sizes:
    predictions = synthetic_predictions(gt, args.dets, mask_size, rng)
    results = {}
    for backend in coco_eval.BACKENDS:
      evaluator = coco_eval.CocoEvaluator(gt, seen_ids=VOC_IDS, backend=backend)
      start = time.perf_counter()
      for b in range(0, args.images, args.batch):
        evaluator.add_predictions(**{k: v[b:b + args.batch] for k, v in predictions.items()})
      add_seconds = time.perf_counter() - start
      start = time.perf_counter()
      results[backend] = evaluator.evaluate()
      eval_seconds = time.perf_counter() - start
      print(f'm={mask_size:3d}  {backend:16s}  add_predictions {add_seconds * per_1000:7.2f} s  '
            f'evaluate (bbox+segm) {eval_seconds * per_1000:7.2f} s  '
            f'segm AP {results[backend]["segm"]["AP"]:.4f}')
    a, b = (_numbers(results[backend]) for backend in coco_eval.BACKENDS)
    same_nan = np.array_equal(np.isnan(a), np.isnan(b))
    diff = np.nanmax(np.abs(a - b)) if same_nan else math.inf
    print(f'm={mask_size:3d}  max |difference| between backends over {len(a)} numbers: {diff:.2e}')


if __name__ == '__main__':
  main()
