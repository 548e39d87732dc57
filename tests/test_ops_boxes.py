"""ops/boxes.py against hand-worked values and a per-pair numpy reference."""
from __future__ import annotations

import math

import jax
import numpy as np

from deepmarc_jax.ops import boxes


def _random_boxes(rng, n, size=100.0):
  yx = rng.uniform(0, size, (n, 2))
  hw = rng.uniform(1, size / 2, (n, 2))
  return np.concatenate([yx, yx + hw], 1).astype(np.float32)


def _iou_reference(a, b):
  out = np.zeros((len(a), len(b)))
  for i, (ay1, ax1, ay2, ax2) in enumerate(a.astype(np.float64)):
    for j, (by1, bx1, by2, bx2) in enumerate(b.astype(np.float64)):
      area_a, area_b = (ay2 - ay1) * (ax2 - ax1), (by2 - by1) * (bx2 - bx1)
      if area_a <= 0 or area_b <= 0:
        continue
      ih = max(0.0, min(ay2, by2) - max(ay1, by1))
      iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
      out[i, j] = ih * iw / (area_a + area_b - ih * iw)
  return out


def test_iou_and_area_hand_worked():
  a = np.array([[0, 0, 2, 2], [0, 0, 4, 4], [5, 5, 5, 9]], np.float32)
  b = np.array([[1, 1, 3, 3], [1, 1, 3, 3], [2, 0, 4, 2], [5, 5, 5, 9]], np.float32)
  expected = [[1 / 7, 1 / 7, 0, 0],     # overlap 1 of union 7; touching edge -> 0
              [4 / 16, 4 / 16, 4 / 16, 0],  # containment: 4 / 16
              [0, 0, 0, 0]]             # degenerate box (zero height) -> 0, even with itself
  np.testing.assert_allclose(boxes.iou(a, b), expected, rtol=1e-6)
  np.testing.assert_allclose(boxes.area(a), [4, 16, 0])
  np.testing.assert_allclose(boxes.area(np.array([[3, 3, 1, 5]])), [0])  # inverted: 0


def test_iou_matches_reference_on_random_boxes():
  rng = np.random.default_rng(0)
  a, b = _random_boxes(rng, 20), _random_boxes(rng, 30)
  b[3, 2] = b[3, 0]  # a degenerate box
  np.testing.assert_allclose(boxes.iou(a, b), _iou_reference(a, b), atol=1e-6)


def test_encode_hand_worked_and_weights():
  anchor = np.array([0, 0, 10, 10], np.float32)   # centre (5, 5), size 10 x 10
  box = np.array([5, 5, 15, 25], np.float32)      # centre (10, 15), size 10 x 20
  np.testing.assert_allclose(boxes.encode(box, anchor), [0.5, 1.0, 0.0, math.log(2)], atol=1e-6)
  np.testing.assert_allclose(boxes.encode(box, anchor, (10, 10, 5, 5)),
                             [5.0, 10.0, 0.0, 5 * math.log(2)], atol=1e-5)


def test_encode_matches_numpy_and_round_trips():
  rng = np.random.default_rng(1)
  b, a = _random_boxes(rng, 200), _random_boxes(rng, 200)
  bh, bw, ah, aw = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1], a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
  reference = np.stack([(b[:, 0] + bh / 2 - a[:, 0] - ah / 2) / ah,
                        (b[:, 1] + bw / 2 - a[:, 1] - aw / 2) / aw,
                        np.log(bh / ah), np.log(bw / aw)], 1)
  for weights in ((1, 1, 1, 1), (10, 10, 5, 5)):
    deltas = boxes.encode(b, a, weights)
    np.testing.assert_allclose(deltas, reference * np.array(weights), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(boxes.decode(deltas, a, weights), b, atol=1e-3)


def test_decode_clips_log_scale_and_broadcasts():
  anchors = np.array([[0, 0, 16, 32]], np.float32)
  deltas = np.array([[0, 0, 20.0, -1.0], [0, 0, 0, 0]], np.float32)
  out = np.asarray(boxes.decode(deltas, anchors))
  np.testing.assert_allclose(out[0, 2] - out[0, 0], 1000.0, rtol=1e-5)  # 16 * 1000 / 16
  np.testing.assert_allclose(out[0, 3] - out[0, 1], 32 * math.exp(-1), rtol=1e-5)
  np.testing.assert_allclose(out[1], anchors[0])
  # [N, C, 4] deltas against [N, 1, 4] anchors (per-class box regression).
  per_class = np.zeros((1, 3, 4), np.float32)
  assert boxes.decode(per_class, anchors[:, None], (10, 10, 5, 5)).shape == (1, 3, 4)


def test_clip_boxes_with_traced_size():
  b = np.array([[-5, 3, 40, 70], [10, -1, 12, 5]], np.float32)
  out = jax.jit(boxes.clip_boxes)(b, np.float32(30), np.float32(50))
  np.testing.assert_allclose(out, [[0, 3, 30, 50], [10, 0, 12, 5]])


def test_jitter_is_the_object_detection_api_formula():
  """Each side at (1 + u) / 2 of the size from the centre, u ~ U(-ratio, ratio) per side."""
  rng = np.random.default_rng(3)
  b = _random_boxes(rng, 2000).reshape(40, 50, 4)
  key, ratio = jax.random.key(7), 0.4
  out = np.asarray(boxes.jitter(key, b, ratio), np.float64)
  u = np.asarray(jax.random.uniform(key, b.shape, np.float32, -ratio, ratio), np.float64)
  b = b.astype(np.float64)
  yc, xc = (b[..., 0] + b[..., 2]) / 2, (b[..., 1] + b[..., 3]) / 2
  h, w = b[..., 2] - b[..., 0], b[..., 3] - b[..., 1]
  expected = np.stack([yc - h * (1 + u[..., 0]) / 2, xc - w * (1 + u[..., 1]) / 2,
                       yc + h * (1 + u[..., 2]) / 2, xc + w * (1 + u[..., 3]) / 2], -1)
  np.testing.assert_allclose(out, expected, atol=1e-3)
  # Each side moves by at most ratio / 2 of the box's size, and the draws fill that range.
  size = np.stack([h, w, h, w], -1)
  moved = np.abs(out - b) / size
  assert moved.max() <= ratio / 2 + 1e-5 and moved.max() > 0.95 * ratio / 2
  assert np.all(out[..., 2] > out[..., 0]) and np.all(out[..., 3] > out[..., 1])
  np.testing.assert_allclose(np.asarray(boxes.jitter(key, b.astype(np.float32), 0.0)), b,
                             atol=1e-4)
