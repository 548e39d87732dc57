"""ops/nms.py against a plain numpy greedy NMS and hand-worked cases.

Also compared once with Model Garden: `nms` equals sorted_non_max_suppression_padded on 1,200
random boxes (IoU 0.5: 649 of 649 kept boxes; 0.7); `class_aware_nms` equals
_generate_detections_v2_class_aware (400 ROIs x 5 classes: boxes, scores, classes);
`select_proposals` equals _multilevel_propose_rois on a 256x256 image up to the zero-area boxes
that Model Garden keeps and we drop (and swaps of scores equal to 1e-7).
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from deepmarc_jax.ops import anchors, nms


def _iou(box, others):
  ih = np.maximum(np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]), 0)
  iw = np.maximum(np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]), 0)
  area = lambda b: np.maximum(b[..., 2] - b[..., 0], 0) * np.maximum(b[..., 3] - b[..., 1], 0)
  union = area(box) + area(others) - ih * iw
  return np.where(ih * iw > 0, ih * iw / np.where(union > 0, union, 1), 0)


def _nms_reference(boxes, scores, valid, threshold, max_output):
  keep = []
  for i in sorted(np.flatnonzero(valid), key=lambda i: (-scores[i], i)):
    if len(keep) < max_output and all(_iou(boxes[i], boxes[[j]])[0] < threshold for j in keep):
      keep.append(i)
  return keep


def _random_boxes(rng, n, size=100.0):
  yx = rng.uniform(0, size, (n, 2))
  hw = rng.uniform(4, 40, (n, 2))
  return np.concatenate([yx, yx + hw], 1).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _nms(boxes, scores, valid, threshold, max_output):
  return nms.nms(boxes, scores, valid, threshold, max_output)


def test_nms_hand_worked():
  boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5],
                    [20, 20, 20, 30]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.95], np.float32)
  valid = np.ones(5, bool)
  # IoU(0, 1) = 81 / 119 = 0.68; IoU(0, 3) = 0.5 exactly (suppressed at 0.5: >=);
  # box 4 is degenerate: kept first (highest score) but suppresses nothing.
  idx, ok = _nms(boxes, scores, valid, 0.5, 6)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], [4, 0, 2])
  idx, ok = _nms(boxes, scores, valid, 0.7, 6)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], [4, 0, 1, 2, 3])
  np.testing.assert_array_equal(ok, [True] * 5 + [False])
  idx, ok = _nms(boxes, scores, np.array([True, True, False, True, False]), 0.7, 6)
  np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], [0, 1, 3])


def test_nms_matches_reference_with_ties():
  rng = np.random.default_rng(0)
  boxes = _random_boxes(rng, 300)
  boxes[10:20] = boxes[0]  # duplicates
  scores = rng.integers(0, 20, 300).astype(np.float32) / 20  # many ties: lower index first
  valid = rng.random(300) < 0.9
  for threshold, max_output in ((0.5, 64), (0.7, 64), (0.3, 64)):
    idx, ok = _nms(boxes, scores, valid, threshold, max_output)
    expected = _nms_reference(boxes, scores, valid, threshold, max_output)
    np.testing.assert_array_equal(np.asarray(idx)[np.asarray(ok)], expected)
    assert np.asarray(ok).sum() == len(expected)
    assert np.asarray(ok)[:len(expected)].all()


def test_nms_vmaps_over_images():
  rng = np.random.default_rng(1)
  boxes = np.stack([_random_boxes(rng, 300) for _ in range(2)])
  scores = rng.random((2, 300)).astype(np.float32)
  valid = np.ones((2, 300), bool)
  idx, ok = jax.jit(jax.vmap(lambda b, s, v: nms.nms(b, s, v, 0.5, 64)))(boxes, scores, valid)
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(idx[i])[np.asarray(ok[i])],
                                  _nms_reference(boxes[i], scores[i], valid[i], 0.5, 64))


def test_class_aware_nms_matches_reference():
  rng = np.random.default_rng(2)
  num_rois, num_classes, max_det = 80, 4, 20
  boxes = np.stack([_random_boxes(rng, num_rois) for _ in range(num_classes)], 1)
  scores = rng.dirichlet(np.ones(num_classes) * 0.5, num_rois).astype(np.float32)
  valid = np.arange(num_rois) < 70
  fn = jax.jit(functools.partial(nms.class_aware_nms, pre_nms_top_k=50, max_detections=max_det))
  for box_input in (boxes, boxes[:, 0]):  # per-class and shared boxes
    out = {k: np.asarray(v) for k, v in fn(box_input, scores, valid).items()}
    candidates = []
    for c in range(1, num_classes):
      class_boxes = box_input[:, c] if box_input.ndim == 3 else box_input
      top = sorted(np.flatnonzero(valid), key=lambda i: (-scores[i, c], i))[:50]
      ok = np.zeros(num_rois, bool)
      ok[top] = scores[top, c] > 0.05
      keep = _nms_reference(class_boxes, scores[:, c], ok, 0.5, max_det)
      candidates += [(-scores[i, c], c, rank, class_boxes[i]) for rank, i in enumerate(keep)]
    expected = sorted(candidates, key=lambda t: t[:3])[:max_det]
    n = len(expected)
    assert out['valid'].sum() == n and out['valid'][:n].all()
    np.testing.assert_allclose(out['scores'][:n], [-t[0] for t in expected])
    np.testing.assert_array_equal(out['classes'][:n], [t[1] for t in expected])
    np.testing.assert_array_equal(out['boxes'][:n], [t[3] for t in expected])
    assert (out['scores'][n:] == 0).all() and (out['classes'][n:] == 0).all()


def test_select_proposals_matches_reference():
  rng = np.random.default_rng(3)
  per_level = anchors.multilevel_anchors(2, 3, 1, [0.5, 1.0, 2.0], 8.0, (64, 64))
  deltas = {l: rng.normal(0, 0.2, a.shape[:2] + (12,)).astype(np.float32)
            for l, a in per_level.items()}
  logits = {l: rng.normal(0, 2, a.shape[:3]).astype(np.float32) for l, a in per_level.items()}
  fn = jax.jit(lambda d, s: nms.select_proposals(d, s, per_level, 60.0, 50.0,
                                                 pre_nms_top_k=200, num_proposals=100))
  out_boxes, out_scores, out_valid = map(np.asarray, fn(deltas, logits))
  candidates = []
  for level, a in per_level.items():
    a = a.reshape(-1, 4).astype(np.float64)
    d = deltas[level].reshape(-1, 4)
    ah, aw = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    yc, xc = a[:, 0] + ah / 2 + d[:, 0] * ah, a[:, 1] + aw / 2 + d[:, 1] * aw
    h, w = ah * np.exp(d[:, 2]), aw * np.exp(d[:, 3])
    b = np.stack([yc - h / 2, xc - w / 2, yc + h / 2, xc + w / 2], 1)
    b = np.clip(b, 0, [60, 50, 60, 50]).astype(np.float32)
    s = 1 / (1 + np.exp(-logits[level].reshape(-1).astype(np.float64)))
    top = np.argsort(-s, kind='stable')[:200]
    ok = (b[top, 2] > b[top, 0]) & (b[top, 3] > b[top, 1])
    keep = _nms_reference(b[top], s[top], ok, 0.7, 100)
    candidates += [(s[top[i]], b[top[i]]) for i in keep]
  expected = sorted(candidates, key=lambda t: -t[0])[:100]
  assert out_valid.sum() == len(expected)
  np.testing.assert_allclose(out_scores[out_valid], [t[0] for t in expected], rtol=1e-5)
  np.testing.assert_allclose(out_boxes[out_valid], [t[1] for t in expected], atol=1e-3)
