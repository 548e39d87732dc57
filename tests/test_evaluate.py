"""Tests of deepmarc_jax.evaluation.coco against direct pycocotools computations and hand-worked cases.

Real data: the 10 official COCO val2017 images of coco_mini_seg (77 instances, one crowd RLE,
multi-polygon objects), located beside the checkout in shared/data/.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from deepmarc_jax.evaluation import coco as coco_eval
from deepmarc_jax.data.class_splits import VOC_IDS
from deepmarc_jax.ops.masks import crop_mask_to_box, mask_iou, paste_box_mask

DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'coco_mini_seg'
VAL_JSON = DATA / 'annotations' / 'instances_val2017_subset10.json'
# Every non-crowd val instance survives crop + paste with IoU > 0.95 from m = 50 on (0.9525;
# 52 gives 0.9504, 48 only 0.943). The worst is a thin diagonal baseball bat (129x171 box, 2839
# pixels): a resolution limit, not a convention problem. m = 64 leaves a margin (worst 0.970).
FEEDBACK_MASK_SIZE = 64


def _quiet(fn, *args):
  with contextlib.redirect_stdout(io.StringIO()):
    return fn(*args)


@pytest.fixture(scope='module')
def gt() -> COCO:
  assert VAL_JSON.exists(), f'test data missing: {VAL_JSON}'
  return _quiet(COCO, str(VAL_JSON))


def _box(ann: dict) -> np.ndarray:
  """(y1, x1, y2, x2) of a COCO annotation's [x, y, w, h] bbox."""
  x, y, w, h = ann['bbox']
  return np.array([y, x, y + h, x + w])


def _batches(detections: dict[int, list[tuple]], image_ids: list[int], batch_size: int,
             mask_size: int):
  """Packs {image_id: [(box, score, class, mask), ...]} into padded model-format batches.

  The last batch is padded with example_valid=False examples that carry a real image id and
  confident detections (which must be ignored).
  """
  num_dets = max([len(d) for d in detections.values()] + [1])
  for start in range(0, len(image_ids), batch_size):
    ids = image_ids[start:start + batch_size]
    batch = {'image_ids': np.full(batch_size, image_ids[0]),
             'boxes': np.tile([10.0, 10.0, 50.0, 60.0], (batch_size, num_dets, 1)),
             'scores': np.ones((batch_size, num_dets)),
             'classes': np.full((batch_size, num_dets), 1),
             'masks': np.ones((batch_size, num_dets, mask_size, mask_size), np.float32),
             'example_valid': np.arange(batch_size) < len(ids)}
    for b, image_id in enumerate(ids):
      batch['image_ids'][b] = image_id
      batch['classes'][b] = 0
      for k, (box, score, cls, mask) in enumerate(detections.get(image_id, [])):
        batch['boxes'][b, k], batch['scores'][b, k] = box, score
        batch['classes'][b, k], batch['masks'][b, k] = cls, mask
    yield batch


def _values(results: dict) -> dict[str, float]:
  """Every number of an evaluate() result, flattened."""
  out = {}
  for iou_type in coco_eval.IOU_TYPES:
    summary = results[iou_type]
    for name in coco_eval.STAT_NAMES:
      out[f'{iou_type}/{name}'] = summary[name]
      for split in coco_eval.SPLITS:
        out[f'{iou_type}/{split}/{name}'] = summary[split][name]
    for name, ap in summary['per_category'].items():
      out[f'{iou_type}/per_category/{name}'] = ap
  return out


def _assert_close(actual: dict[str, float], expected: dict[str, float], tol: float) -> None:
  assert actual.keys() == expected.keys()
  for key, value in expected.items():
    if math.isnan(value):
      assert math.isnan(actual[key]), key
    else:
      assert actual[key] == pytest.approx(value, abs=tol), key


def _cocoeval_stats(gt: COCO, dets: COCO, iou_type: str, image_ids, cat_ids=None) -> np.ndarray:
  """Reference: the 12 COCOeval stats, optionally on some categories (-1 where undefined)."""
  reference = COCOeval(gt, dets, iou_type)
  reference.params.imgIds = list(image_ids)
  if cat_ids is not None:
    reference.params.catIds = list(cat_ids)
  _quiet(lambda: (reference.evaluate(), reference.accumulate(), reference.summarize()))
  return np.asarray(reference.stats, np.float64)


def _coco_stats(gt: COCO, results: list[dict], iou_type: str, image_ids, cat_ids=None):
  """Reference: loadRes + COCOeval stats[0:6] (-1 -> NaN), optionally on some categories."""
  dets = _quiet(gt.loadRes, copy.deepcopy(results))
  stats = _cocoeval_stats(gt, dets, iou_type, image_ids, cat_ids)
  return [math.nan if s == -1 else float(s) for s in stats[:6]]


def _ground_truth_detections(gt: COCO, mask_size: int) -> dict[int, list[tuple]]:
  detections = {}
  for ann in gt.dataset['annotations']:
    if ann['iscrowd']:
      continue
    box = _box(ann)
    mask = crop_mask_to_box(gt.annToMask(ann), box, mask_size)
    detections.setdefault(ann['image_id'], []).append((box, 1.0, ann['category_id'], mask))
  return detections


def _assert_perfect(results: dict) -> None:
  for iou_type in coco_eval.IOU_TYPES:
    summary = results[iou_type]
    for name in ('AP', 'AP50', 'AP75'):
      assert summary[name] == pytest.approx(1.0), (iou_type, name)
    for name in ('APs', 'APm', 'APl'):
      assert math.isnan(summary[name]) or summary[name] == pytest.approx(1.0), (iou_type, name)
    for split in coco_eval.SPLITS:
      assert summary[split]['AP'] == pytest.approx(1.0), (iou_type, split)
    assert all(ap == pytest.approx(1.0) for ap in summary['per_category'].values())


def test_feedback_mask_size_preserves_ground_truth(gt):
  anns = gt.dataset['annotations']
  assert sum(a['iscrowd'] for a in anns) == 1  # the data exercises crowd regions ...
  assert sum(not a['iscrowd'] and len(a['segmentation']) > 1 for a in anns) == 6  # and parts
  ious = []
  for ann in gt.dataset['annotations']:
    if ann['iscrowd']:
      continue
    image = gt.imgs[ann['image_id']]
    mask = gt.annToMask(ann)
    crop = crop_mask_to_box(mask, _box(ann), FEEDBACK_MASK_SIZE)
    pasted = paste_box_mask(crop, _box(ann), image['height'], image['width']) >= 0.5
    ious.append(mask_iou(pasted, mask))
  assert len(ious) == 76 and min(ious) > 0.95


@pytest.mark.parametrize('backend', coco_eval.BACKENDS)
def test_ground_truth_box_relative_scores_one(gt, backend):
  evaluator = coco_eval.CocoEvaluator(str(VAL_JSON), seen_ids=VOC_IDS, backend=backend)
  detections = _ground_truth_detections(gt, FEEDBACK_MASK_SIZE)
  for batch in _batches(detections, sorted(gt.imgs), 4, FEEDBACK_MASK_SIZE):
    evaluator.add_predictions(**batch)
  results = evaluator.evaluate()
  _assert_perfect(results)
  assert results['num_images'] == 10 and results['num_detections'] == 76
  categories = {gt.cats[a['category_id']]['name'] for a in gt.dataset['annotations']}
  assert set(results['segm']['per_category']) == categories
  assert results['split_ids']['seen'] == [c for c in sorted(gt.cats) if c in VOC_IDS]
  assert results['split_ids']['unseen'] == [c for c in sorted(gt.cats) if c not in VOC_IDS]


def test_ground_truth_full_image_scores_one(gt):
  evaluator = coco_eval.CocoEvaluator(str(VAL_JSON), seen_ids=VOC_IDS)
  evaluator.add_coco_results(
      {'image_id': a['image_id'], 'category_id': a['category_id'], 'score': 1.0,
       'segmentation': a['segmentation'], 'bbox': a['bbox']}
      for a in gt.dataset['annotations'] if not a['iscrowd'])
  _assert_perfect(evaluator.evaluate())


@pytest.fixture(scope='module')
def perturbed(gt) -> dict[int, list[tuple]]:
  """Jittered GT boxes with cropped masks, random scores, drops, wrong classes and FPs."""
  rng = np.random.default_rng(0)
  cat_ids = sorted({a['category_id'] for a in gt.dataset['annotations']})
  detections = {image_id: [] for image_id in gt.imgs}
  for ann in gt.dataset['annotations']:
    if ann['iscrowd'] or rng.random() < 0.15:
      continue
    box = _box(ann)
    size = box[2:] - box[:2]
    box = (box + rng.normal(0, 0.08, 4) * np.tile(size, 2)).astype(np.float32)
    cls = int(rng.choice(cat_ids)) if rng.random() < 0.15 else ann['category_id']
    mask = crop_mask_to_box(gt.annToMask(ann), box, 28)
    detections[ann['image_id']].append((box, float(rng.random()), cls, mask))
  for image_id, image in gt.imgs.items():
    for _ in range(3):  # false positives, some crossing the image border
      y1, x1 = rng.uniform(-30, image['height']), rng.uniform(-30, image['width'])
      box = np.array([y1, x1, y1 + rng.uniform(4, 150), x1 + rng.uniform(4, 150)], np.float32)
      mask = rng.random((28, 28)).astype(np.float32)
      detections[image_id].append((box, float(rng.random()), int(rng.choice(cat_ids)), mask))
    order = rng.permutation(len(detections[image_id]))
    detections[image_id] = [detections[image_id][i] for i in order]
  return detections


def _reference_results(gt: COCO, detections: dict[int, list[tuple]]) -> dict[str, list[dict]]:
  """COCO result lists built independently: full-image paste, threshold 0.5, pycocotools RLE."""
  bbox, segm = [], []
  for image_id, dets in detections.items():
    image = gt.imgs[image_id]
    for box, score, cls, mask in dets:
      y1, x1, y2, x2 = (float(v) for v in box)
      full = paste_box_mask(mask, box, image['height'], image['width']) >= 0.5
      common = {'image_id': image_id, 'category_id': cls, 'score': score}
      bbox.append({**common, 'bbox': [x1, y1, x2 - x1, y2 - y1]})
      segm.append({**common, 'segmentation': mask_util.encode(
          np.asfortranarray(full.astype(np.uint8)))})
  return {'bbox': bbox, 'segm': segm}


def _reference_values(gt: COCO, detections, seen_ids) -> dict[str, float]:
  """The numbers of evaluate(), each from its own COCOeval run (splits: catIds by hand)."""
  results = _reference_results(gt, detections)
  all_ids = sorted(gt.cats)
  subsets = {'': None, 'seen/': [c for c in all_ids if c in seen_ids],
             'unseen/': [c for c in all_ids if c not in seen_ids]}
  with_gt = sorted({a['category_id'] for a in gt.dataset['annotations'] if not a['iscrowd']})
  out = {}
  for iou_type in coco_eval.IOU_TYPES:
    for prefix, cat_ids in subsets.items():
      stats = _coco_stats(gt, results[iou_type], iou_type, gt.imgs, cat_ids)
      out.update({f'{iou_type}/{prefix}{name}': v for name, v in zip(coco_eval.STAT_NAMES, stats)})
    for cat_id in with_gt:
      ap = _coco_stats(gt, results[iou_type], iou_type, gt.imgs, [cat_id])[0]
      out[f'{iou_type}/per_category/{gt.cats[cat_id]["name"]}'] = ap
  return out


@pytest.fixture(scope='module')
def perturbed_results(gt, perturbed) -> dict[str, dict]:
  out = {}
  for backend in coco_eval.BACKENDS:
    # _reference_values loads box-only and segmentation-only result lists: 'per_iou_type'.
    evaluator = coco_eval.CocoEvaluator(str(VAL_JSON), seen_ids=VOC_IDS, backend=backend,
                                        detection_area='per_iou_type')
    for batch in _batches(perturbed, sorted(gt.imgs), 3, 28):
      evaluator.add_predictions(**batch)
    out[backend] = evaluator.evaluate()
  return out


def test_perturbed_predictions_match_pycocotools(gt, perturbed, perturbed_results):
  expected = _reference_values(gt, perturbed, VOC_IDS)
  assert 0.2 < expected['segm/AP'] < 0.8 and 0.2 < expected['bbox/AP'] < 0.8
  _assert_close(_values(perturbed_results['pycocotools']), expected, 1e-12)


def test_backends_agree(perturbed_results):
  faster = _values(perturbed_results['faster_coco_eval'])
  _assert_close(faster, _values(perturbed_results['pycocotools']), 1e-6)


@pytest.fixture(scope='module')
def area_references(gt, perturbed) -> dict[str, dict[str, COCO]]:
  """{detection_area: {iou_type: detections}}, each loaded as the convention's own code does."""
  results = _reference_results(gt, perturbed)
  both = [{**b, 'segmentation': s['segmentation']}
          for b, s in zip(results['bbox'], results['segm'])]
  with_box_area = _quiet(gt.loadRes, copy.deepcopy(both))  # carries 'bbox': area = w * h
  # Model Garden's COCOWrapper.loadRes (eval_type 'mask', vision/evaluation/coco_utils.py) loads
  # the same list and then sets every detection's area to mask.area(segmentation).
  with_mask_area = _quiet(gt.loadRes, copy.deepcopy(both))
  for ann in with_mask_area.dataset['annotations']:
    ann['area'] = mask_util.area(ann['segmentation'])
  return {
      'mask': {'bbox': with_mask_area, 'segm': with_mask_area},
      'box': {'bbox': with_box_area, 'segm': with_box_area},
      'per_iou_type': {iou_type: _quiet(gt.loadRes, copy.deepcopy(results[iou_type]))
                       for iou_type in coco_eval.IOU_TYPES}}


def _area_reference_stats(gt, area_references, detection_area) -> dict[str, np.ndarray]:
  """{'bbox'|'segm'[/seen|/unseen]: the 12 COCOeval stats of the reference detections}."""
  all_ids = sorted(gt.cats)
  subsets = {'': None, '/seen': [c for c in all_ids if c in VOC_IDS],
             '/unseen': [c for c in all_ids if c not in VOC_IDS]}
  return {f'{iou_type}{suffix}': _cocoeval_stats(
      gt, area_references[detection_area][iou_type], iou_type, gt.imgs, cat_ids)
          for iou_type in coco_eval.IOU_TYPES for suffix, cat_ids in subsets.items()}


@pytest.mark.parametrize('backend', coco_eval.BACKENDS)
@pytest.mark.parametrize('detection_area', coco_eval.DETECTION_AREAS)
def test_detection_area_matches_pycocotools(gt, perturbed, area_references, detection_area,
                                            backend):
  evaluator = coco_eval.CocoEvaluator(str(VAL_JSON), seen_ids=VOC_IDS, backend=backend,
                                      detection_area=detection_area)
  for batch in _batches(perturbed, sorted(gt.imgs), 3, 28):
    evaluator.add_predictions(**batch)
  results = evaluator.evaluate()
  assert results['detection_area'] == detection_area
  expected = _area_reference_stats(gt, area_references, detection_area)
  tol = 1e-12 if backend == 'pycocotools' else 1e-6
  for iou_type in coco_eval.IOU_TYPES:
    # All 12 stats, from the COCOeval run that evaluate() summarises.
    run = evaluator._run_cocoeval(iou_type, evaluator.evaluated_image_ids)  # pylint: disable=protected-access
    stats = run.stats
    np.testing.assert_allclose(stats, expected[iou_type], rtol=0, atol=tol, err_msg=iou_type)
    # What evaluate() reports, overall and per split (-1 -> NaN).
    for key, summary in ((iou_type, results[iou_type]),
                         *((f'{iou_type}/{split}', results[iou_type][split])
                           for split in coco_eval.SPLITS)):
      reported = np.array([summary[name] for name in coco_eval.STAT_NAMES])
      np.testing.assert_allclose(reported, np.where(expected[key][:6] == -1, np.nan,
                                                    expected[key][:6]),
                                 rtol=0, atol=tol, err_msg=key)


def test_detection_areas_differ_only_in_size_ranges(gt, area_references):
  """The conventions differ on this data, so the test above tells them apart."""
  stats = {area: _area_reference_stats(gt, area_references, area)
           for area in coco_eval.DETECTION_AREAS}
  size_ap = [3, 4, 5]  # APs, APm, APl
  others = [i for i in range(12) if i not in size_ap]  # AP, AP50, AP75 and the 6 ARs
  for key in stats['mask']:
    for area in ('box', 'per_iou_type'):
      np.testing.assert_array_equal(stats[area][key][others], stats['mask'][key][others])
  for iou_type in coco_eval.IOU_TYPES:
    assert np.abs(stats['mask'][iou_type][size_ap] - stats['box'][iou_type][size_ap]).max() > 0.01
  # per_iou_type: box area for bbox, mask area for segm.
  np.testing.assert_array_equal(stats['per_iou_type']['bbox'], stats['box']['bbox'])
  np.testing.assert_array_equal(stats['per_iou_type']['segm'], stats['mask']['segm'])


def test_detection_area_config():
  from deepmarc_jax import config_lib  # pylint: disable=g-import-not-at-top
  assert config_lib.EVAL_DETECTION_AREAS == coco_eval.DETECTION_AREAS
  config = config_lib.base_config()
  assert config.eval.detection_area == 'mask' == coco_eval.DETECTION_AREAS[0]
  config_lib.validate(config)
  config.eval.detection_area = 'segm'
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.eval\.detection_area='segm' is not allowed; choose one of: "
                           r'mask, box, per_iou_type'):
    config_lib.validate(config)
  with pytest.raises(ValueError, match='detection_area'):
    coco_eval.CocoEvaluator(_toy_dataset(), detection_area='segm')


def test_detection_area_reaches_the_evaluator():
  import types  # pylint: disable=g-import-not-at-top
  from deepmarc_jax import config_lib  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.evaluation import loop  # pylint: disable=g-import-not-at-top
  config = config_lib.base_config()
  config.eval.detection_area = 'box'
  exp = types.SimpleNamespace(config=config, split_ids={'seen': [1], 'unseen': [2]})
  assert loop.new_coco_evaluator(exp, _toy_dataset()).detection_area == 'box'


def _toy_dataset() -> dict:
  """Three 100x100 images; category 1 'a' in images 1 and 2, category 2 'b' in image 3."""
  def rect(ann_id, image_id, cat_id, x, y, w, h):
    return {'id': ann_id, 'image_id': image_id, 'category_id': cat_id, 'iscrowd': 0,
            'bbox': [x, y, w, h], 'area': w * h,
            'segmentation': [[x, y, x + w, y, x + w, y + h, x, y + h]]}
  return {'images': [{'id': i, 'height': 100, 'width': 100} for i in (1, 2, 3)],
          'categories': [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}],
          'annotations': [rect(1, 1, 1, 10, 10, 40, 30), rect(2, 2, 1, 50, 50, 20, 20),
                          rect(3, 3, 2, 0, 0, 30, 30)]}


def test_padding_class_zero_and_images_without_detections():
  evaluator = coco_eval.CocoEvaluator(_toy_dataset())
  nan = float('nan')
  boxes = np.array([  # image 1: a hit, class 0, y2 < y1, x2 < x1, NaN, NaN score
      [[10, 10, 40, 50], [0, 0, 90, 90], [40, 10, 10, 50], [10, 50, 40, 10], [nan, 10, 40, 50],
       [10, 10, 40, 50]],
      [[50, 50, 70, 70]] * 6,  # image 2: class 0 only
      [[50, 50, 70, 70]] * 6])  # padding example
  classes = np.array([[1, 0, 1, 1, 1, 1], [0] * 6, [1] * 6])
  scores = np.array([[0.9, 0.99, 0.95, 0.96, 0.97, nan], [0.9] * 6, [1.0] * 6])
  evaluator.add_predictions(np.array([1, 2, 1]), boxes, scores, classes,
                            np.ones((3, 6, 8, 8), np.float32),
                            example_valid=np.array([True, True, False]))
  results = evaluator.evaluate()
  # Category 'a': 2 GT, one true positive at precision 1 -> recall 0.5: precision 1 at the
  # 51 recall thresholds 0, 0.01, ..., 0.5 and 0 at the other 50, at every IoU threshold.
  # Image 3 received no prediction batch, so category 'b' is not scored at all.
  for iou_type in coco_eval.IOU_TYPES:
    summary = results[iou_type]
    for name in ('AP', 'AP50', 'AP75'):
      assert summary[name] == pytest.approx(51 / 101), (iou_type, name)
    assert summary['APm'] == pytest.approx(1.0) and summary['APs'] == 0.0  # 1200 vs 400 px
    assert math.isnan(summary['APl'])
    assert summary['per_category'] == {'a': pytest.approx(51 / 101)}
  assert results['num_images'] == 2 and results['num_detections'] == 1


def _two_category_results(**splits) -> dict:
  dataset = _toy_dataset()
  dataset['annotations'][2]['image_id'] = 1  # image 1: 'a' at (10, 10, 40, 30), 'b' at origin
  evaluator = coco_eval.CocoEvaluator(dataset, **splits)
  boxes = np.array([[[10, 10, 40, 50], [60, 60, 90, 90]]], np.float32)  # 'b' far from its GT
  evaluator.add_predictions(np.array([1]), boxes, np.array([[0.9, 0.8]]), np.array([[1, 2]]),
                            np.ones((1, 2, 16, 16), np.float32))
  return evaluator.evaluate()


@pytest.mark.parametrize('splits', [{'seen_ids': [1]}, {'seen_ids': [1, 99], 'unseen_ids': [2]}])
def test_seen_unseen_split(splits):
  results = _two_category_results(**splits)
  assert results['split_ids'] == {'seen': [1], 'unseen': [2]}
  for iou_type in coco_eval.IOU_TYPES:
    summary = results[iou_type]
    assert summary['seen']['AP'] == pytest.approx(1.0)
    assert summary['unseen']['AP'] == 0.0
    assert summary['AP'] == pytest.approx(0.5)
    assert summary['per_category'] == {'a': pytest.approx(1.0), 'b': 0.0}


def test_default_split_all_seen():
  results = _two_category_results()
  assert results['split_ids'] == {'seen': [1, 2], 'unseen': []}
  assert results['segm']['seen']['AP'] == pytest.approx(0.5)
  assert math.isnan(results['segm']['unseen']['AP'])


def test_overlapping_splits_rejected():
  with pytest.raises(ValueError, match=r'\[1\]'):
    coco_eval.CocoEvaluator(_toy_dataset(), seen_ids=[1], unseen_ids=[1, 2])


def test_no_predictions_scores_zero():
  evaluator = coco_eval.CocoEvaluator(_toy_dataset())
  results = evaluator.evaluate()
  assert results['num_images'] == 3 and results['num_detections'] == 0
  for iou_type in coco_eval.IOU_TYPES:
    assert results[iou_type]['AP'] == 0.0 and results[iou_type]['seen']['AP'] == 0.0
  evaluator.add_predictions(np.array([2]), np.zeros((1, 1, 4)), np.zeros((1, 1)),
                            np.zeros((1, 1), np.int64), np.zeros((1, 1, 4, 4)))
  results = evaluator.evaluate()
  assert results['num_images'] == 1 and results['bbox']['AP'] == 0.0
  assert results['segm']['per_category'] == {'a': 0.0}


def _batch(image_ids=(1,), num_dets=2, mask_size=8) -> dict:
  batch_size = len(image_ids)
  return {'image_ids': np.array(image_ids),
          'boxes': np.tile([10.0, 10.0, 40.0, 50.0], (batch_size, num_dets, 1)),
          'scores': np.full((batch_size, num_dets), 0.5),
          'classes': np.ones((batch_size, num_dets), np.int64),
          'masks': np.ones((batch_size, num_dets, mask_size, mask_size), np.float32)}


@pytest.mark.parametrize('change, message', [
    ({'image_ids': np.array([12345])}, '12345'),
    ({'image_ids': np.array([1.0])}, 'image_ids must be integers'),
    ({'classes': np.full((1, 2), 7)}, r'category ids \[7\]'),
    ({'boxes': np.zeros((1, 2, 3))}, 'boxes must be'),
    ({'boxes': np.zeros((2, 4))}, 'boxes must be'),
    ({'scores': np.zeros((1, 3))}, 'scores must have shape'),
    ({'classes': np.zeros((2, 2), np.int64)}, 'classes must have shape'),
    ({'masks': np.zeros((1, 2, 8))}, 'masks must be'),
    ({'example_valid': np.ones(2, bool)}, 'example_valid must have shape'),
])
def test_bad_predictions_raise(change, message):
  evaluator = coco_eval.CocoEvaluator(_toy_dataset())
  with pytest.raises(ValueError, match=message):
    evaluator.add_predictions(**{**_batch(), **change})
  assert not evaluator.results and not evaluator.evaluated_image_ids


def test_repeated_image_raises():
  evaluator = coco_eval.CocoEvaluator(_toy_dataset())
  with pytest.raises(ValueError, match=r'\[1\]'):
    evaluator.add_predictions(**_batch(image_ids=(1, 1)))
  evaluator.add_predictions(**_batch(image_ids=(1,)))
  with pytest.raises(ValueError, match=r'\[1\]'):
    evaluator.add_predictions(**_batch(image_ids=(2, 1)))


def test_bad_coco_results_raise():
  evaluator = coco_eval.CocoEvaluator(_toy_dataset())
  result = {'image_id': 1, 'category_id': 1, 'score': 1.0, 'segmentation': [[0, 0, 5, 0, 5, 5]]}
  with pytest.raises(ValueError, match='777'):
    evaluator.add_coco_results([{**result, 'image_id': 777}])
  with pytest.raises(ValueError, match='777'):
    evaluator.add_coco_results([result], image_ids=[777])
  with pytest.raises(ValueError, match=r"\['score'\]"):
    evaluator.add_coco_results([{k: v for k, v in result.items() if k != 'score'}])
  rle = mask_util.encode(np.zeros((50, 100), np.uint8, order='F'))
  with pytest.raises(ValueError, match='RLE size'):
    evaluator.add_coco_results([{**result, 'segmentation': rle}])


def test_paste_to_rle_matches_full_image_paste():
  rng = np.random.default_rng(1)
  height, width = 37, 53
  for i in range(300):
    size = rng.integers(2, 30)
    y1, x1 = rng.uniform(-15, height), rng.uniform(-15, width)
    box = np.array([y1, x1, y1 + rng.uniform(0.3, 60), x1 + rng.uniform(0.3, 60)])
    if i % 2:
      box = box.astype(np.float32).astype(np.float64)
    mask = rng.random((size, size)) if i % 3 else np.ones((size, size))
    expected = paste_box_mask(mask, box, height, width) >= 0.5
    rle = coco_eval.paste_to_rle(mask, box, height, width, 0.5)
    assert rle == mask_util.encode(np.asfortranarray(expected.astype(np.uint8))), (i, box)


@pytest.mark.parametrize('window, top, left', [
    (np.ones((37, 20), bool), 0, 10),  # full height: runs join across columns
    (np.ones((37, 53), bool), 0, 0),  # whole image foreground
    (np.zeros((5, 5), bool), 3, 4),
    (np.zeros((0, 0), bool), 0, 0),
    (np.eye(5, dtype=bool), 32, 48),  # bottom-right corner
])
def test_window_rle_edge_cases(window, top, left):
  full = np.zeros((37, 53), np.uint8, order='F')
  full[top:top + window.shape[0], left:left + window.shape[1]] = window
  assert coco_eval.window_rle(window, top, left, 37, 53) == mask_util.encode(full)


def test_write_json_and_format_table(tmp_path):
  results = _two_category_results()
  path = tmp_path / 'eval' / 'results.json'
  coco_eval.write_json(results, path)
  loaded = json.loads(path.read_text())
  assert loaded['segm']['unseen']['AP'] is None
  assert loaded['segm']['seen']['AP'] == pytest.approx(0.5)
  assert loaded['split_ids'] == {'seen': [1, 2], 'unseen': []}
  lines = coco_eval.format_table(results).splitlines()
  assert [line.split()[0] for line in lines[1:]] == ['bbox', 'segm']
  assert lines[2].split()[1:] == ['50.00', '50.00', '50.00', '50.00', '-']
  # With masks from the GT boxes (eval_loop.evaluate_model, eval.gt_box_masks): one more row.
  results['segm_gt_boxes'] = dict(results['segm'], AP=0.25)
  lines = coco_eval.format_table(results).splitlines()
  assert [line.split()[0] for line in lines[1:4]] == ['bbox', 'segm', 'segm@GT']
  assert lines[3].split()[1:3] == ['25.00', '50.00']
  assert 'ground-truth boxes' in lines[4]
