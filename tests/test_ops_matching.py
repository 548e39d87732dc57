"""ops/matching.py: hand-worked matching tables, a loop reference, sampling statistics.

`match` was also compared once with Model Garden's BoxMatcher on a 5,100-anchor x 7-GT IoU
matrix, for the RPN (0.3/0.7, force match) and ROI-sampler (0.5) thresholds: identical labels
and matched GT on positives.
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from deepmarc_jax.ops import boxes, matching

IOU = np.array([[0.8, 0.1, 0.95],    # best valid GT 0 (GT 2 is invalid) -> positive
                [0.5, 0.6, 0.0],     # 0.6: between the thresholds -> ignored
                [0.2, 0.25, 0.0],    # 0.25 < 0.3 -> negative
                [0.1, 0.65, 0.9],    # ignored, but GT 1's best row -> forced positive (low quality)
                [0.0, 0.0, 0.0]], np.float32)
GT_VALID = np.array([True, True, False])


def test_match_hand_worked_rpn_table():
  matched, labels = matching.match(IOU, GT_VALID, 0.7, 0.3)
  np.testing.assert_array_equal(labels, [1, -1, 0, -1, 0])
  assert matched[0] == 0
  matched, labels = matching.match(IOU, GT_VALID, 0.7, 0.3, allow_low_quality=True)
  np.testing.assert_array_equal(labels, [1, -1, 0, 1, 0])
  assert matched[0] == 0 and matched[3] == 1


def test_match_thresholds_are_inclusive_positive_exclusive_negative():
  iou = np.array([[0.5], [0.4999], [0.3]], np.float32)
  _, labels = matching.match(iou, np.array([True]), 0.5, 0.5)
  np.testing.assert_array_equal(labels, [1, 0, 0])
  _, labels = matching.match(iou, np.array([True]), 0.7, 0.3)
  np.testing.assert_array_equal(labels, [-1, -1, -1])


def test_low_quality_ties_and_empty_gt():
  # Both GT choose row 0 -> it matches the lower GT index (Model Garden); GT 2 overlaps nothing.
  iou = np.array([[0.4, 0.4, 0.0], [0.1, 0.2, 0.0]], np.float32)
  matched, labels = matching.match(iou, np.ones(3, bool), 0.7, 0.3, allow_low_quality=True)
  np.testing.assert_array_equal(labels, [1, 0])
  assert matched[0] == 0
  # No valid GT: every row negative, even with low-quality matching.
  _, labels = matching.match(IOU, np.zeros(3, bool), 0.7, 0.3, allow_low_quality=True)
  np.testing.assert_array_equal(labels, np.zeros(5))


def _match_reference(iou, gt_valid, pos, neg, low_quality):
  num_rows, num_gt = iou.shape
  matched, labels = np.zeros(num_rows, int), np.zeros(num_rows, int)
  for i in range(num_rows):
    best, best_iou = 0, 0.0
    for j in range(num_gt):
      if gt_valid[j] and iou[i, j] > best_iou:
        best, best_iou = j, iou[i, j]
    matched[i] = best
    labels[i] = 1 if best_iou >= pos else (0 if best_iou < neg else -1)
  if low_quality:
    for j in reversed(range(num_gt)):  # lower GT index wins a shared row
      if gt_valid[j] and iou[:, j].max() > 0:
        row = int(np.argmax(iou[:, j]))
        matched[row], labels[row] = j, 1
  return matched, labels


def test_match_matches_loop_reference_on_random_iou():
  rng = np.random.default_rng(0)
  iou = rng.random((200, 9)).astype(np.float32) ** 3
  gt_valid = rng.random(9) < 0.7
  for pos, neg, low_quality in ((0.7, 0.3, True), (0.5, 0.5, False)):
    matched, labels = matching.match(iou, gt_valid, pos, neg, low_quality)
    ref_matched, ref_labels = _match_reference(iou, gt_valid, pos, neg, low_quality)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_array_equal(np.asarray(matched)[labels == 1], ref_matched[ref_labels == 1])
    assert gt_valid[np.asarray(matched)[labels == 1]].all()


@functools.partial(jax.jit, static_argnums=(2, 3))
def _sample_many(labels, keys, num_samples, fraction):
  return jax.vmap(lambda k: matching.sample_balanced(labels, k, num_samples, fraction))(keys)


def _labels(num_pos, num_neg, size=500, seed=0):
  labels = np.array([1] * num_pos + [0] * num_neg + [-1] * (size - num_pos - num_neg), np.int32)
  return np.random.default_rng(seed).permutation(labels)


def test_sample_balanced_counts_and_padding():
  keys = jax.random.split(jax.random.key(0), 50)
  for num_pos, num_neg, expect_pos, expect_valid in ((10, 400, 10, 64), (100, 300, 16, 64),
                                                     (5, 20, 5, 25), (0, 400, 0, 64)):
    labels = _labels(num_pos, num_neg)
    idx, sampled, valid = map(np.asarray, _sample_many(labels, keys, 64, 0.25))
    for i in range(len(keys)):
      assert valid[i].sum() == expect_valid and (sampled[i] == 1).sum() == expect_pos
      real = idx[i][valid[i]]
      assert len(set(real.tolist())) == len(real)                 # no repeats
      np.testing.assert_array_equal(sampled[i][valid[i]], labels[real])
      assert (labels[real] >= 0).all() and (sampled[i][~valid[i]] == -1).all()
      assert valid[i][:expect_valid].all()                        # padding last


def test_sample_balanced_is_uniform_and_deterministic_per_key():
  labels = _labels(100, 300)
  keys = jax.random.split(jax.random.key(1), 400)
  idx, sampled, _ = map(np.asarray, _sample_many(labels, keys, 64, 0.25))
  counts = np.bincount(idx[sampled == 1].ravel(), minlength=len(labels))[labels == 1]
  # Each of the 100 positives is drawn with probability 16/100: 64 of 400 keys on average.
  assert counts.min() > 30 and counts.max() < 100
  again = np.asarray(_sample_many(labels, keys[:2], 64, 0.25)[0])
  np.testing.assert_array_equal(again, idx[:2])
  assert not np.array_equal(idx[0], idx[1])


def _toy_image(rng):
  gt_boxes = np.array([[10, 10, 50, 60], [60, 20, 90, 90], [5, 5, 95, 95], [0, 0, 30, 30]],
                      np.float32)
  gt_classes = np.array([3, 7, 9, 11], np.int32)
  gt_valid = np.array([True, True, True, False])   # GT 3 is padding
  gt_is_crowd = np.array([False, False, True, False])  # GT 2 is a crowd region
  # Two jittered copies of each GT box, then small random boxes (background).
  jitter = rng.normal(0, 2, (8, 4)).astype(np.float32)
  proposals = np.concatenate([gt_boxes[np.arange(8) % 4] + jitter,
                              np.tile(rng.uniform(0, 100, (92, 2)), 2).astype(np.float32)
                              + np.array([0, 0, 8, 8], np.float32)])
  proposal_valid = np.arange(100) < 90
  return proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_is_crowd


@functools.partial(jax.jit, static_argnames=('num_samples',))
def _sample_rois(keys, proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_is_crowd,
                 num_samples):
  fn = functools.partial(matching.sample_rois, num_samples=num_samples)
  return jax.vmap(fn)(proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, keys,
                      gt_is_crowd)


def test_sample_rois_targets():
  rng = np.random.default_rng(0)
  image = _toy_image(rng)
  no_gt = list(image)
  no_gt[4] = np.zeros(4, bool)
  batch = [np.stack(x) for x in zip(image, no_gt)]  # a batch of two images, vmapped
  out = {k: np.asarray(v) for k, v in
         _sample_rois(jax.random.split(jax.random.key(0), 2), *batch, num_samples=64).items()}
  proposals, proposal_valid, gt_boxes, gt_classes, gt_valid, gt_is_crowd = image
  usable = gt_valid & ~gt_is_crowd
  candidates = np.concatenate([proposals, gt_boxes])
  candidate_valid = np.concatenate([proposal_valid, usable])
  valid, is_fg, rois = out['valid'][0], out['is_fg'][0], out['rois'][0]
  assert valid.all() and 0 < is_fg.sum() <= 16
  # Every sampled ROI is a valid candidate (never an invalid proposal, padding or crowd GT).
  hits = (rois[:, None, :] == candidates[None]).all(-1) & candidate_valid[None]
  assert hits.any(1).all()
  overlaps = np.asarray(boxes.iou(rois, gt_boxes))
  matched = out['matched_gt'][0]
  assert usable[matched[is_fg]].all()
  np.testing.assert_array_equal(out['classes'][0], np.where(is_fg, gt_classes[matched], 0))
  assert (overlaps[is_fg, matched[is_fg]] >= 0.5).all()
  assert (overlaps[~is_fg][:, usable] < 0.5).all()
  # The appended GT boxes are foreground candidates: there are fewer than 16 fg candidates, so
  # all are taken and both usable GT boxes appear among the ROIs.
  for j in np.flatnonzero(usable):
    assert (rois == gt_boxes[j]).all(-1).any()
  # Image without valid GT: background only, still a full sample.
  assert out['valid'][1].all() and not out['is_fg'][1].any() and (out['classes'][1] == 0).all()
