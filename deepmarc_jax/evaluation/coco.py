"""COCO evaluation of instance-segmentation predictions: bbox and segm AP, overall and per split.

`CocoEvaluator` collects predictions image by image and scores them with COCOeval:

  * Batched model outputs (`add_predictions`): boxes (y1, x1, y2, x2) in original-image pixel
    coordinates and box-relative m x m mask probabilities, in the convention of
    `deepmarc_jax.ops.masks`. Each mask is pasted into its image with `paste_box_mask`,
    thresholded at `>= mask_threshold` and run-length encoded.
  * COCO-format result dicts (`add_coco_results`): full-image masks from any model.

`evaluate()` returns, for 'bbox' and 'segm': the standard COCO stats AP, AP50, AP75, APs, APm,
APl; the AP of every category; and the same six stats over the 'seen' and the 'unseen' category
splits. A split's AP is the unweighted mean of its categories' AP, i.e. exactly what COCOeval
gives with `params.catIds` restricted to the split (the tests check this against such a rerun);
it is read off the full run's precision array instead of re-running COCOeval.

Conventions:
  * Only evaluated images are scored (`params.imgIds`): those that received a valid example in
    `add_predictions` or were named in `add_coco_results`. An evaluated image without detections
    still counts, its ground truth becomes misses. If nothing was added at all, every GT image
    counts as evaluated (so AP is 0, not an error).
  * Stats that COCOeval reports as -1 (no ground truth in that area range, category or split)
    are NaN here, and null in the JSON written by `write_json`. Categories without ground truth
    in the evaluated images are omitted from 'per_category'.
  * Size ranges (small/medium/large): a ground-truth instance's size is always the 'area' field
    of its annotation (for COCO, the area of its mask). Which area a detection has is the
    `detection_area` convention (`DETECTION_AREAS`). Of COCOeval's stats it changes only APs,
    APm and APl: a detection's area only decides whether an unmatched detection counts as a
    false positive in a size range.
      'mask': the pixel count of its thresholded mask, for bbox and segm alike. What Model
        Garden's COCOEvaluator, the official Deep-MARC evaluator, does: its `COCOWrapper.loadRes`
        with include_mask sets every detection's area to `mask.area(segmentation)`, and bbox
        and segm COCOeval share those detections. The default.
      'box': the area w * h of its box, for bbox and segm alike: what `COCO.loadRes` does with
        results that carry both 'bbox' and 'segmentation'.
      'per_iou_type': box area for bbox, mask area for segm: `COCO.loadRes` of box-only and of
        segmentation-only result lists. Detectron2 and mmdetection drop 'bbox' from their segm
        results to get this; the TF Object Detection API's box and mask COCO evaluators (Deep-MAC's
        official evaluation) load boxes and masks apart and so do the same.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as mask_util

from deepmarc_jax import atomic
from deepmarc_jax.ops.masks import paste_box_mask

IOU_TYPES = ('bbox', 'segm')
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')
BACKENDS = ('faster_coco_eval', 'pycocotools')
SPLITS = ('seen', 'unseen')
# Which area a detection has in COCOeval's size ranges (module docstring); the first is the default.
DETECTION_AREAS = ('mask', 'box', 'per_iou_type')
# A window covering less than this fraction of its image is run-length encoded from the window
# alone (cost ~ window area); larger ones go through pycocotools on the full image (~ image area).
_WINDOW_RLE_MAX_FRACTION = 0.25
def _silent(*args, **kwargs) -> None:
  del args, kwargs


def _backend(name: str):
  """Returns the (COCO, COCOeval) classes of a backend."""
  if name == 'faster_coco_eval':
    from faster_coco_eval import COCO, COCOeval_faster  # pylint: disable=g-import-not-at-top
    return COCO, COCOeval_faster
  if name == 'pycocotools':
    from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
    from pycocotools.cocoeval import COCOeval  # pylint: disable=g-import-not-at-top
    return COCO, COCOeval
  raise ValueError(f'backend={name!r}: expected one of {BACKENDS}')


def _coco_from_dataset(coco_cls, dataset: dict[str, Any]):
  """Builds a COCO API object (either backend) from an in-memory dataset dict."""
  coco = coco_cls()
  coco.dataset = dataset
  with contextlib.redirect_stdout(io.StringIO()):
    coco.createIndex()
  return coco


def _window_run_lengths(window: np.ndarray, top: int, left: int, height: int,
                        width: int) -> np.ndarray:
  """Column-major COCO run lengths of an image that is zero outside `window`.

  Args:
    window: [h, w] bool, placed at rows top..top+h-1 and columns left..left+w-1.
    height, width: image size.
  Returns:
    [n] int64 counts alternating 0-runs and 1-runs, starting with a (possibly empty) 0-run.
  """
  h, w = window.shape
  padded = np.zeros((h + 2, w), bool)
  padded[1:-1] = window
  rows, cols = np.nonzero(padded[1:] != padded[:-1])  # run starts and (exclusive) ends
  bounds = np.sort((cols + left) * height + rows + top)  # alternating start, end in flat order
  # A run ending at the bottom of a column and one starting at the top of the next are one run.
  joined = np.nonzero(bounds[1:-1:2] == bounds[2::2])[0]
  bounds = np.delete(bounds, np.concatenate([2 * joined + 1, 2 * joined + 2]))
  counts = np.diff(bounds, prepend=0, append=height * width)
  return counts[:-1] if len(counts) > 1 and counts[-1] == 0 else counts


def window_rle(window: np.ndarray, top: int, left: int, height: int, width: int) -> dict:
  """Compressed COCO RLE of a [height, width] image that is zero outside `window`.

  Identical to `pycocotools.mask.encode` of the full image (Fortran-ordered uint8).

  Args:
    window: [h, w] bool, placed at rows top..top+h-1 and columns left..left+w-1.
    height, width: image size.
  Returns:
    {'size': [height, width], 'counts': bytes}.
  """
  h, w = window.shape
  if h * w > _WINDOW_RLE_MAX_FRACTION * height * width:
    full = np.zeros((height, width), np.uint8, order='F')
    full[top:top + h, left:left + w] = window
    return mask_util.encode(full)
  counts = _window_run_lengths(window, top, left, height, width)
  return mask_util.frPyObjects({'counts': counts.tolist(), 'size': [height, width]}, height, width)


def paste_to_rle(box_mask: np.ndarray, box: np.ndarray, height: int, width: int,
                 threshold: float) -> dict:
  """RLE of `paste_box_mask(box_mask, box, height, width) >= threshold`, computed in the box.

  The paste runs on the integer-aligned window of pixels the box can touch, with the box shifted
  by the window's integer origin; the shift is exact in float64, so the result is bit-identical
  to pasting into the full image. Requires threshold > 0 (pixels outside the box are 0).

  Args:
    box_mask: [m_h, m_w] box-relative mask probabilities.
    box: [4] float64 (y1, x1, y2, x2) in pixel coordinates of the image.
    height, width: image size.
    threshold: a pixel is foreground when its pasted value is >= threshold.
  Returns:
    Compressed COCO RLE {'size': [height, width], 'counts': bytes}.
  """
  y1, x1, y2, x2 = (float(v) for v in box)
  top, bottom = max(math.floor(y1), 0), min(math.ceil(y2), height)
  left, right = max(math.floor(x1), 0), min(math.ceil(x2), width)
  if bottom <= top or right <= left:
    return window_rle(np.zeros((0, 0), bool), 0, 0, height, width)
  shifted = (y1 - top, x1 - left, y2 - top, x2 - left)
  window = paste_box_mask(box_mask, shifted, bottom - top, right - left) >= threshold
  return window_rle(window, top, left, height, width)


def _check_batch(image_ids, boxes, scores, classes, masks, example_valid):
  """Converts a prediction batch to numpy and checks its shapes (ValueError if wrong)."""
  image_ids = np.asarray(image_ids)
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  classes = np.asarray(classes)
  masks = np.asarray(masks, np.float32)
  if image_ids.ndim != 1:
    raise ValueError(f'image_ids must be [B], got shape {image_ids.shape}')
  batch = image_ids.shape[0]
  example_valid = (np.ones(batch, bool) if example_valid is None
                   else np.asarray(example_valid, bool))
  if boxes.ndim != 3 or boxes.shape[0] != batch or boxes.shape[2] != 4:
    raise ValueError(f'boxes must be [B={batch}, K, 4], got shape {boxes.shape}')
  num_dets = boxes.shape[1]
  expected = {'scores': (scores, (batch, num_dets)), 'classes': (classes, (batch, num_dets)),
              'example_valid': (example_valid, (batch,))}
  for name, (array, shape) in expected.items():
    if array.shape != shape:
      raise ValueError(f'{name} must have shape {shape} (B, K from boxes), got {array.shape}')
  if masks.ndim != 4 or masks.shape[:2] != (batch, num_dets):
    raise ValueError(f'masks must be [B={batch}, K={num_dets}, m, m], got shape {masks.shape}')
  for name, array in (('image_ids', image_ids), ('classes', classes)):
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f'{name} must be integers, got dtype {array.dtype}')
  return image_ids, boxes, scores, classes, masks, example_valid


def _kept_detections(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                     example_valid: np.ndarray) -> np.ndarray:
  """[B, K] bool: valid example, class != 0, finite score and box, y2 > y1 and x2 > x1."""
  return (example_valid[:, None] & (classes != 0) & np.isfinite(scores)
          & np.isfinite(boxes).all(-1)
          & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1]))


def _mean_valid(values: np.ndarray) -> float:
  """Mean over entries > -1 (COCOeval's 'no ground truth' marker); NaN if there are none."""
  valid = values[values > -1]
  return float(valid.mean()) if valid.size else math.nan


def _stats_from_precision(precision: np.ndarray, params, cat_indices: Sequence[int]) -> dict:
  """COCOeval's stats[0:6] restricted to some categories.

  Args:
    precision: [T, R, K, A, M] COCOeval `eval['precision']` (IoU thresholds, recall thresholds,
      categories, area ranges all/small/medium/large, max detections).
    params: the COCOeval params the precision was accumulated with.
    cat_indices: indices into the K axis.
  Returns:
    {'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl'} at maxDets 100, NaN where nothing is valid.
  """
  p = precision[..., list(params.maxDets).index(100)][:, :, list(cat_indices)]  # [T, R, k, A]
  iou50 = np.isclose(params.iouThrs, 0.5)
  iou75 = np.isclose(params.iouThrs, 0.75)
  return {'AP': _mean_valid(p[..., 0]), 'AP50': _mean_valid(p[iou50, ..., 0]),
          'AP75': _mean_valid(p[iou75, ..., 0]), 'APs': _mean_valid(p[..., 1]),
          'APm': _mean_valid(p[..., 2]), 'APl': _mean_valid(p[..., 3])}


class CocoEvaluator:
  """Accumulates predictions for COCO images and scores them with COCOeval (bbox and segm).

  Usage:
    evaluator = CocoEvaluator('instances_val2017.json', seen_ids=class_splits.VOC_IDS)
    for batch in ...:
      evaluator.add_predictions(**model_outputs)  # image_ids, boxes, scores, classes, masks
    results = evaluator.evaluate()
    print(format_table(results)); write_json(results, f'{workdir}/eval.json')
    evaluator.reset()  # before the next round
  """

  def __init__(self, annotations: str | os.PathLike | Mapping[str, Any], *,
               seen_ids: Iterable[int] | None = None, unseen_ids: Iterable[int] | None = None,
               mask_threshold: float = 0.5, backend: str = 'faster_coco_eval',
               detection_area: str = DETECTION_AREAS[0], verbose: bool = False):
    """Loads the ground truth.

    Args:
      annotations: path of a COCO instances JSON, or the loaded dict (copied, not modified).
      seen_ids: category ids of the 'seen' split (masks trained); ids the GT does not have are
        ignored. None: all GT categories.
      unseen_ids: category ids of the 'unseen' split; None: the GT categories not in seen_ids.
      mask_threshold: pasted mask probabilities >= this are foreground; in (0, 1].
      backend: 'faster_coco_eval' (default, same numbers, faster) or 'pycocotools'.
      detection_area: the area a detection has in the small/medium/large ranges: 'mask'
        (default, the official Deep-MARC evaluator's), 'box' or 'per_iou_type' (box for bbox,
        mask for segm); see the module docstring.
      verbose: let COCOeval print its progress and summary.
    """
    if not 0.0 < mask_threshold <= 1.0:
      raise ValueError(f'mask_threshold must be in (0, 1], got {mask_threshold}')
    if detection_area not in DETECTION_AREAS:
      raise ValueError(f'detection_area={detection_area!r}: expected one of {DETECTION_AREAS}')
    self._coco_cls, self._cocoeval_cls = _backend(backend)
    self.backend = backend
    self.mask_threshold = float(mask_threshold)
    self.detection_area = detection_area
    self.verbose = verbose
    if isinstance(annotations, Mapping):
      dataset = copy.deepcopy(dict(annotations))
    else:
      with open(annotations) as f:
        dataset = json.load(f)
    self._gt = _coco_from_dataset(self._coco_cls, dataset)
    self._image_sizes = {int(img['id']): (int(img['height']), int(img['width']))
                         for img in dataset['images']}
    self._category_names = {int(cat['id']): cat['name'] for cat in dataset['categories']}
    self.split_ids = self._resolve_splits(seen_ids, unseen_ids)
    self.reset()

  def _resolve_splits(self, seen_ids, unseen_ids) -> dict[str, list[int]]:
    """{'seen': ids, 'unseen': ids}, each sorted and restricted to the GT categories."""
    gt_ids = sorted(self._category_names)
    seen = gt_ids if seen_ids is None else [c for c in gt_ids if c in {int(i) for i in seen_ids}]
    if unseen_ids is None:
      unseen = [c for c in gt_ids if c not in seen]
    else:
      unseen = [c for c in gt_ids if c in {int(i) for i in unseen_ids}]
    overlap = sorted(set(seen) & set(unseen))
    if overlap:
      raise ValueError(f'category ids {overlap} are in both the seen and the unseen split')
    return {'seen': seen, 'unseen': unseen}

  def reset(self) -> None:
    """Forgets all predictions (the ground truth stays loaded)."""
    self._results: list[dict[str, Any]] = []
    self._evaluated: set[int] = set()

  @property
  def results(self) -> list[dict[str, Any]]:
    """The COCO result dicts added so far (segmentation: compressed RLE with bytes counts)."""
    return self._results

  @property
  def evaluated_image_ids(self) -> list[int]:
    """Sorted ids of the images that will be scored."""
    return sorted(self._evaluated)

  def _check_image_ids(self, image_ids: Iterable[int]) -> None:
    unknown = sorted({int(i) for i in image_ids} - self._image_sizes.keys())
    if unknown:
      raise ValueError(f'image ids {unknown[:10]} are not in the ground truth '
                       f'({len(self._image_sizes)} images)')

  def _check_category_ids(self, category_ids: Iterable[int]) -> None:
    unknown = sorted({int(c) for c in category_ids} - self._category_names.keys())
    if unknown:
      raise ValueError(f'category ids {unknown} are not ground-truth categories (class 0 means '
                       f'no detection); GT ids are {sorted(self._category_names)}')

  def add_predictions(self, image_ids, boxes, scores, classes, masks,
                      example_valid=None) -> None:
    """Adds a batch of model predictions (numpy or jax arrays).

    Detections with class 0, a non-finite score or box, or y2 <= y1 or x2 <= x1 are dropped;
    examples with example_valid False are ignored entirely. Every valid example's image counts
    as evaluated, with or without detections.

    Args:
      image_ids: [B] int COCO image ids; each image may be added only once.
      boxes: [B, K, 4] (y1, x1, y2, x2) in continuous pixel coordinates of the original image
        (pixel (r, c) covers [r, r+1) x [c, c+1)).
      scores: [B, K] detection scores.
      classes: [B, K] int COCO category ids, 0 = padding / no detection.
      masks: [B, K, m, m] box-relative mask probabilities (see deepmarc_jax.ops.masks).
      example_valid: optional [B] bool, False for padding examples.
    Raises:
      ValueError: wrong shapes or dtypes, an image id or category id the GT does not have, or an
        image that already received predictions.
    """
    image_ids, boxes, scores, classes, masks, example_valid = _check_batch(
        image_ids, boxes, scores, classes, masks, example_valid)
    valid_ids = [int(i) for i in image_ids[example_valid]]
    self._check_image_ids(valid_ids)
    repeated = sorted({i for i in valid_ids if valid_ids.count(i) > 1} | (
        set(valid_ids) & self._evaluated))
    if repeated:
      raise ValueError(f'image ids {repeated} received predictions more than once')
    keep = _kept_detections(boxes, scores, classes, example_valid)
    self._check_category_ids(np.unique(classes[keep]))
    self._evaluated.update(valid_ids)
    for b, k in zip(*np.nonzero(keep)):
      image_id = int(image_ids[b])
      height, width = self._image_sizes[image_id]
      y1, x1, y2, x2 = boxes[b, k]
      self._results.append({
          'image_id': image_id, 'category_id': int(classes[b, k]),
          'score': float(scores[b, k]),
          'bbox': [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
          'segmentation': paste_to_rle(masks[b, k], boxes[b, k], height, width,
                                       self.mask_threshold)})

  def add_coco_results(self, results: Iterable[Mapping[str, Any]],
                       image_ids: Iterable[int] = ()) -> None:
    """Adds full-image detections in COCO result format.

    Args:
      results: dicts with 'image_id', 'category_id', 'score' and 'segmentation' (polygons,
        uncompressed or compressed RLE, in original-image coordinates); 'bbox' [x, y, w, h] is
        optional (default: the mask's bounding box).
      image_ids: further images to count as evaluated although they have no result here (the
        images of `results` always count).
    Raises:
      ValueError: an unknown image or category id, a result without a required key, or an RLE
        whose size is not the image size.
    """
    results = list(results)
    for result in results:
      missing = {'image_id', 'category_id', 'score', 'segmentation'} - result.keys()
      if missing:
        raise ValueError(f'COCO result {dict(result)!r:.200} lacks keys {sorted(missing)}')
    image_ids = {int(r['image_id']) for r in results} | {int(i) for i in image_ids}
    self._check_image_ids(image_ids)
    self._check_category_ids(r['category_id'] for r in results)
    self._evaluated.update(image_ids)
    for result in results:
      rle = self._to_rle(result['segmentation'], int(result['image_id']))
      bbox = result.get('bbox')
      self._results.append({
          'image_id': int(result['image_id']), 'category_id': int(result['category_id']),
          'score': float(result['score']),
          'bbox': [float(v) for v in (mask_util.toBbox(rle) if bbox is None else bbox)],
          'segmentation': rle})

  def _to_rle(self, segmentation, image_id: int) -> dict:
    """Compressed RLE of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    height, width = self._image_sizes[image_id]
    if isinstance(segmentation, list):
      return mask_util.merge(mask_util.frPyObjects(segmentation, height, width))
    if list(segmentation['size']) != [height, width]:
      raise ValueError(f'image {image_id}: RLE size {segmentation["size"]} is not the image '
                       f'size {[height, width]}')
    if isinstance(segmentation['counts'], list):
      return mask_util.frPyObjects(segmentation, height, width)
    return segmentation

  def _detections(self, iou_type: str):
    """COCO API object of the detections, each with the area `self.detection_area` gives it."""
    use_mask = self.detection_area == 'mask' or (
        self.detection_area == 'per_iou_type' and iou_type == 'segm')
    if use_mask:  # one RLE per call: pycocotools' area() fails on > 255 RLEs
      areas = [mask_util.area(r['segmentation']) for r in self._results]
    else:
      areas = [r['bbox'][2] * r['bbox'][3] for r in self._results]
    anns = []
    for i, (result, area) in enumerate(zip(self._results, areas)):
      ann = {'id': i + 1, 'iscrowd': 0, 'area': float(area), **result}
      if iou_type == 'bbox':
        del ann['segmentation']
      anns.append(ann)
    return _coco_from_dataset(self._coco_cls, {
        'images': self._gt.dataset['images'], 'categories': self._gt.dataset['categories'],
        'annotations': anns})

  def _run_cocoeval(self, iou_type: str, image_ids: list[int]):
    """Runs COCOeval (evaluate, accumulate, summarize) on the evaluated images."""
    kwargs = {}
    if self.backend == 'faster_coco_eval':
      kwargs['print_function'] = print if self.verbose else _silent
    evaluator = self._cocoeval_cls(self._gt, self._detections(iou_type), iou_type, **kwargs)
    evaluator.params.imgIds = image_ids
    output = contextlib.nullcontext() if self.verbose else contextlib.redirect_stdout(
        io.StringIO())
    with output:
      evaluator.evaluate()
      evaluator.accumulate()
      evaluator.summarize()
    return evaluator

  def _summary(self, evaluator) -> dict[str, Any]:
    """Stats, per-split stats and per-category AP of one finished COCOeval."""
    stats = [float(s) if s > -1 else math.nan for s in evaluator.stats[:len(STAT_NAMES)]]
    summary: dict[str, Any] = dict(zip(STAT_NAMES, stats))
    precision = evaluator.eval['precision']
    index = {int(c): k for k, c in enumerate(evaluator.params.catIds)}
    for split in SPLITS:
      summary[split] = _stats_from_precision(
          precision, evaluator.params, [index[c] for c in self.split_ids[split]])
    per_category = {}
    for cat_id, k in index.items():
      ap = _stats_from_precision(precision, evaluator.params, [k])['AP']
      if not math.isnan(ap):
        per_category[self._category_names[cat_id]] = ap
    summary['per_category'] = per_category
    return summary

  def evaluate(self) -> dict[str, Any]:
    """Scores the predictions added so far.

    Returns:
      {'bbox': s, 'segm': s, 'num_images': int, 'num_detections': int, 'backend': str,
       'detection_area': str, 'split_ids': {'seen': [...], 'unseen': [...]}} where s holds
      'AP', 'AP50', 'AP75', 'APs', 'APm', 'APl' (floats in [0, 1], NaN if undefined), 'seen'
      and 'unseen' (the same six stats over each split) and 'per_category' ({category name:
      AP@[.5:.95]}).
    """
    image_ids = self.evaluated_image_ids
    if not image_ids:
      logging.warning('CocoEvaluator.evaluate: no predictions were added; scoring all %d GT '
                      'images as having no detections.', len(self._image_sizes))
      image_ids = sorted(self._image_sizes)
    results: dict[str, Any] = {
        iou_type: self._summary(self._run_cocoeval(iou_type, image_ids))
        for iou_type in IOU_TYPES}
    results.update(num_images=len(image_ids), num_detections=len(self._results),
                   backend=self.backend, detection_area=self.detection_area,
                   split_ids=copy.deepcopy(self.split_ids))
    return results


def add_gt_box_predictions(evaluator: CocoEvaluator, batch: Mapping[str, np.ndarray],
                           masks: np.ndarray) -> None:
  """Adds masks predicted at a batch's own ground-truth boxes, as detections of score 1.

  Args:
    evaluator: receives the predictions.
    batch: an eval batch of the batch contract (numpy): 'image_id', 'image_info', 'gt_boxes'
      (input-image pixels), 'gt_classes', 'gt_valid', 'gt_is_crowd', 'example_valid'.
    masks: [B, N, m, m] box-relative mask probabilities for the N GT slots. Padding and crowd
      slots are left out.
  """
  real = batch['gt_valid'] & ~batch['gt_is_crowd']
  scale = batch['image_info'][:, 2, None, None]  # input pixels per original pixel
  evaluator.add_predictions(batch['image_id'], batch['gt_boxes'] / scale,
                            real.astype(np.float32), np.where(real, batch['gt_classes'], 0),
                            masks, batch['example_valid'])


def _json_compatible(value):
  """Recursively: NaN/inf -> None, numpy scalars -> Python, tuples -> lists."""
  if isinstance(value, Mapping):
    return {str(k): _json_compatible(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_compatible(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(results: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Writes `evaluate()` results as JSON (NaN -> null), creating parent folders. Atomic: a
  process killed while writing leaves no half file (a resumed run takes an existing
  eval_<step>.json as done); a failed write (a full disk) raises OSError naming `path`."""
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  text = json.dumps(_json_compatible(results), indent=2, allow_nan=False)
  atomic.write_text(path, text)


def format_table(results: Mapping[str, Any]) -> str:
  """A small text table of `evaluate()` results, in percent ('-' where undefined)."""
  columns = (('AP', lambda s: s['AP']), ('AP50', lambda s: s['AP50']),
             ('AP75', lambda s: s['AP75']), ('seen AP', lambda s: s['seen']['AP']),
             ('unseen AP', lambda s: s['unseen']['AP']))
  # 'segm_gt_boxes' (eval_loop.evaluate_model with eval.gt_box_masks): masks from the GT boxes.
  row_labels = {'bbox': 'bbox', 'segm': 'segm', 'segm_gt_boxes': 'segm@GT'}
  lines = ['       ' + ''.join(f'{name:>11}' for name, _ in columns)]
  for name, label in row_labels.items():
    if name not in results:
      continue
    cells = (get(results[name]) for _, get in columns)
    lines.append(f'{label:<7}' + ''.join(
        f'{"-":>11}' if v is None or math.isnan(v) else f'{100 * v:>11.2f}' for v in cells))
  if 'segm_gt_boxes' in results:
    lines.append('segm@GT: masks predicted from the ground-truth boxes (no detector)')
  return '\n'.join(lines)
