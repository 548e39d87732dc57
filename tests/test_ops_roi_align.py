"""ops/roi_align.py against an explicit-loop numpy reference, the oracle's measured tables,
the official TF implementation (oracle/roi_align_parity.py, marked `oracle`: skipped where
.venv-oracle is missing) and ops/masks.py's paste and crop."""
from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepmarc_jax.ops import masks
from deepmarc_jax.ops import roi_align as ra
from tests.conftest import ORACLE_PYTHON
from tests.conftest import REPO


# ------------------------------------------------------------------ explicit-loop reference
def reference_taps(shapes, boxes, output_size, sample_offset=0.5):
  """Official ROIAlign as loops: {(b, n, i, j): [(level, y, x, weight)] * 4}.

  shapes: {level: (H_l, W_l)}; boxes: [B, N, 4] input pixels.
  """
  levels = sorted(shapes)
  min_level, max_level = levels[0], levels[-1]
  height, width = shapes[min_level]
  taps = {}
  for b, n in np.ndindex(boxes.shape[:2]):
    y1, x1, y2, x2 = (float(v) for v in boxes[b, n])
    area = (y2 - y1) * (x2 - x1)
    level = min_level
    if area > 0:
      level = min(max(math.floor(math.log2(math.sqrt(area) / 224)) + 4, min_level), max_level)
    stride, k = 2.0 ** level, 2 ** (level - min_level)

    def neighbours(start, end, bound, i):
      pos = start / stride + (i + sample_offset) * (end - start) / stride / output_size
      lo = min(max(math.floor(pos), 0), bound)
      hi = min(lo + 1, bound)
      return ((int(lo), 1.0 - (pos - lo)), (int(hi), pos - lo))

    for i, j in np.ndindex(output_size, output_size):
      taps[b, n, i, j] = [(level, y, x, wy * wx)
                          for y, wy in neighbours(y1, y2, height / k - 1, i)
                          for x, wx in neighbours(x1, x2, width / k - 1, j)]
  return taps


def reference_align(features, taps, shape):
  out = np.zeros(shape)
  for (b, n, i, j), tap in taps.items():
    out[b, n, i, j] = sum(w * features[l][b, y, x] for l, y, x, w in tap)
  return out


def reference_feature_grad(features, taps, cotangent):
  """d sum(out * cotangent) / d features: the transpose of the taps."""
  grads = {l: np.zeros(f.shape) for l, f in features.items()}
  for (b, n, i, j), tap in taps.items():
    for l, y, x, w in tap:
      grads[l][b, y, x] += w * cotangent[b, n, i, j]
  return grads


def random_case(seed=0, batch=2, image=256, levels=range(2, 7), channels=3, num_random=14):
  """Pyramid of H_l = image / 2^l, boxes of every level, partly outside, zero-area."""
  rng = np.random.default_rng(seed)
  features = {l: rng.standard_normal((batch, image >> l, image >> l, channels)).astype(np.float32)
              for l in levels}
  side = np.exp(rng.uniform(0, np.log(1200), (batch, num_random, 2)))
  corner = rng.uniform(-80, image, (batch, num_random, 2))
  boxes = np.concatenate([corner, corner + side], -1)
  special = np.array([[10, 20, 10, 60],     # zero height
                      [30, 30, 30, 30],     # a point
                      [-50, -40, -8, -4],   # entirely above-left of the image
                      [200, 190, 400, 500],  # beyond bottom-right
                      [0, 0, 56, 56], [0, 0, 112, 112], [-40, -40, 184, 184],
                      [0, 0, 448, 448], [-100, 0, 800, 900]], np.float64)
  boxes = np.concatenate([boxes, np.broadcast_to(special, (batch, *special.shape))], 1)
  return features, boxes.astype(np.float32)


# ------------------------------------------------------------------ level assignment
SIDES = [0.0, 1.0, 16.0, 32.0, 55.9, 56.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 895.9, 896.0]
LEVELS_2_6 = [2, 2, 2, 2, 2, 2, 2, 3, 3, 4, 4, 5, 5, 6]  # official-oracle.md section 3
LEVELS_3_7 = [3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 5, 5, 6]


def test_assign_levels_reproduces_the_measured_table():
  boxes = jnp.asarray([[0, 0, s, s] for s in SIDES], jnp.float32)
  np.testing.assert_array_equal(ra.assign_levels(boxes, 2, 6), LEVELS_2_6)
  np.testing.assert_array_equal(ra.assign_levels(boxes, 3, 7), LEVELS_3_7)
  # Only the area counts; inverted boxes (NaN sqrt) go to min_level like zero-area ones.
  other = jnp.asarray([[0, 0, 112, 448], [0, 0, 111.9, 448], [10, 10, 0, 30]], jnp.float32)
  np.testing.assert_array_equal(ra.assign_levels(other, 2, 6), [4, 3, 2])
  assert ra.assign_levels(boxes, 2, 6).dtype == jnp.int32


def test_multilevel_roi_align_uses_the_assigned_level():
  features = {l: jnp.full((1, 1024 >> l, 1024 >> l, 1), float(l)) for l in range(2, 7)}
  boxes = jnp.asarray([[[0, 0, s, s] for s in SIDES]], jnp.float32)
  out = ra.multilevel_roi_align(features, boxes, 2)
  np.testing.assert_array_equal(out[0, :, 0, 0, 0], LEVELS_2_6)


# ------------------------------------------------------------------ sampling semantics
@pytest.mark.parametrize('box, size, expected', [
    ((16, 16, 80, 80), 4, [3, 5, 7, 9]),
    ((16, 16, 80, 80), 8, np.arange(2.5, 10, 1.0)),
    ((0, 0, 8, 8), 2, [0.25, 0.75]),
    ((-16, -16, 16, 16), 2, [-1.0, 1.0]),          # extrapolated from rows 0 and 1
    ((200, 200, 300, 300), 2, [28.125, 31.0]),     # 34.375 is clipped to the border (31)
])
def test_measured_sample_positions(box, size, expected):
  # official-oracle.md section 3: a 256 image, levels 3-7, channel 0 = x index, 1 = y index.
  features = {}
  for l in range(3, 8):
    yy, xx = np.meshgrid(np.arange(256 >> l), np.arange(256 >> l), indexing='ij')
    features[l] = jnp.asarray(np.stack([xx, yy], -1)[None], jnp.float32)
  out = ra.multilevel_roi_align(features, jnp.asarray([[box]], jnp.float32), size)
  np.testing.assert_allclose(out[0, 0, 0, :, 0], expected, atol=1e-6)  # x along a row
  np.testing.assert_allclose(out[0, 0, :, 0, 1], expected, atol=1e-6)  # y along a column


# Float32 rounding, relative to the magnitude: boxes far outside the map get large weights
# (extrapolation below 0 up to ~20; past the border y0 = y1 = bound with weights 1 - (y - bound)
# and y - bound, up to ~200, that cancel), so outputs reach ~250 and float32 errors ~1e-3
# (measured against the official code: <= 7e-5 * (1 + |value|)). A wrong tap errs by O(1).
TOL = dict(rtol=1e-4, atol=1e-4)


def test_matches_explicit_loop_reference_under_jit():
  features, boxes = random_case()
  align = jax.jit(ra.multilevel_roi_align, static_argnums=(2,))
  out = align({l: jnp.asarray(f) for l, f in features.items()}, jnp.asarray(boxes), 5)
  assert out.shape == (2, boxes.shape[1], 5, 5, 3) and out.dtype == jnp.float32
  taps = reference_taps({l: f.shape[1:3] for l, f in features.items()}, boxes, 5)
  assert {tap[0][0] for tap in taps.values()} == set(range(2, 7))  # every level exercised
  np.testing.assert_allclose(out, reference_align(features, taps, out.shape), **TOL)


def test_sample_offset_and_single_level_variant():
  rng = np.random.default_rng(1)
  features = rng.standard_normal((2, 9, 13, 4)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(-3, 10, (2, 6, 2)), rng.uniform(-3, 16, (2, 6, 2))], -1)
  boxes = np.concatenate([boxes[..., :2], boxes[..., :2] + np.abs(boxes[..., 2:])], -1)
  for offset in (0.5, 0.0):
    out = ra.roi_align(jnp.asarray(features), jnp.asarray(boxes, jnp.float32), 3, offset)
    taps = reference_taps({0: (9, 13)}, boxes.astype(np.float32), 3, offset)
    np.testing.assert_allclose(out, reference_align({0: features}, taps, out.shape), **TOL)


def test_gradient_is_the_transposed_taps_and_boxes_get_none():
  features, boxes = random_case(seed=2, num_random=6)
  cotangent = np.random.default_rng(3).standard_normal((2, boxes.shape[1], 4, 4, 3))

  def loss(feats, bxs):
    return jnp.sum(ra.multilevel_roi_align(feats, bxs, 4) * cotangent)

  grad_features, grad_boxes = jax.grad(loss, argnums=(0, 1))(
      {l: jnp.asarray(f) for l, f in features.items()}, jnp.asarray(boxes))
  taps = reference_taps({l: f.shape[1:3] for l, f in features.items()}, boxes, 4)
  expected = reference_feature_grad(features, taps, cotangent)
  for l in features:
    np.testing.assert_allclose(grad_features[l], expected[l], **TOL)
  np.testing.assert_array_equal(grad_boxes, 0.0)


def test_rejects_bad_pyramids():
  f = jnp.zeros((1, 16, 16, 1))
  with pytest.raises(ValueError, match='consecutive'):
    ra.multilevel_roi_align({2: f, 4: f[:, :4, :4]}, jnp.zeros((1, 1, 4)), 2)
  with pytest.raises(ValueError, match='smaller'):
    ra.multilevel_roi_align({2: f, 3: f[:, :7, :7]}, jnp.zeros((1, 1, 4)), 2)


# ------------------------------------------------------------------ official TF oracle
@pytest.mark.oracle
def test_parity_with_official_multilevel_crop_and_resize(tmp_path):
  features, boxes = random_case(seed=4, channels=4, num_random=40)
  sizes = (7, 14)
  np.savez(tmp_path / 'in.npz', boxes=boxes, sizes=np.array(sizes),
           **{f'level_{l}': f for l, f in features.items()})
  subprocess.run([str(ORACLE_PYTHON), str(REPO / 'oracle' / 'roi_align_parity.py'),
                  tmp_path / 'in.npz', tmp_path / 'out.npz'], check=True,
                 env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'CUDA_VISIBLE_DEVICES': ''})
  official = np.load(tmp_path / 'out.npz')
  for size in sizes:
    ours = ra.multilevel_roi_align({l: jnp.asarray(f) for l, f in features.items()},
                                   jnp.asarray(boxes), size)
    diff = np.abs(np.asarray(ours) - official[f'out_{size}'])
    print(f'oracle parity S={size}: max |ours - official| = {diff.max():.3g}, relative to '
          f'1 + |official|: {(diff / (1 + np.abs(official[f"out_{size}"]))).max():.3g}',
          file=sys.stderr)
    np.testing.assert_allclose(ours, official[f'out_{size}'], **TOL)


# ------------------------------------------------------------------ mask targets
def test_crop_mask_targets_hand_worked():
  mask = jnp.asarray([[[0.0, 1.0], [2.0, 3.0]]])  # value 2 * row + col
  gt = jnp.asarray([[10.0, 10.0, 14.0, 14.0]])
  # roi == gt box, S == M: the cell centres coincide, the mask comes back.
  np.testing.assert_allclose(ra.crop_mask_targets(mask, gt, gt, 2), mask)
  # S = 4: centres at mask positions -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
  a = np.array([0.0, 0.25, 0.75, 1.0])
  np.testing.assert_allclose(ra.crop_mask_targets(mask, gt, gt, 4)[0],
                             2 * a[:, None] + a[None, :], atol=1e-6)
  # An roi twice the gt box: centres 9, 11, 13, 15 -> outside, cell 0, cell 1, outside.
  out = ra.crop_mask_targets(mask, gt, jnp.asarray([[8.0, 8.0, 16.0, 16.0]]), 4)[0]
  np.testing.assert_allclose(out, np.pad(np.asarray(mask[0]), 1), atol=1e-6)


def _paste_and_crop(gt_masks, gt_boxes, rois, size, canvas=256):
  return np.stack([masks.crop_mask_to_box(masks.paste_box_mask(m, g, canvas, canvas), r, size)
                   for m, g, r in zip(gt_masks, gt_boxes, rois)])


def _mask_case(rng, num, cell_sizes):
  gt_masks = rng.random((num, 16, 12)).astype(np.float32)
  gt_corner = rng.uniform(40, 90, (num, 2))
  gt_boxes = np.concatenate([gt_corner, gt_corner + rng.uniform(80, 120, (num, 2))], -1)
  roi_side = 8 * rng.choice(cell_sizes, (num, 2))
  roi_corner = np.floor(gt_corner + rng.uniform(-30, 60, (num, 2)))
  rois = np.concatenate([roi_corner, roi_corner + roi_side], -1)
  return gt_masks, gt_boxes.astype(np.float32), rois.astype(np.float32)


def test_crop_mask_targets_equals_paste_then_crop_on_pixel_centres():
  # Integer roi corners and odd cell sizes put every roi cell centre on a pixel centre, where
  # crop_mask_to_box reads the pasted canvas exactly: only float32 rounding differs.
  gt_masks, gt_boxes, rois = _mask_case(np.random.default_rng(5), 24, [1, 3, 5, 7])
  gt_boxes[-1] = [50, 50, 50, 90]  # degenerate gt box: all zeros
  ours = ra.crop_mask_targets(gt_masks.reshape(2, 12, 16, 12), gt_boxes.reshape(2, 12, 4),
                              rois.reshape(2, 12, 4), 8)
  assert ours.shape == (2, 12, 8, 8)
  expected = _paste_and_crop(gt_masks, gt_boxes, rois, 8)
  assert expected.sum() > 100 and np.all(expected[-1] == 0)
  np.testing.assert_allclose(ours.reshape(24, 8, 8), expected, atol=1e-5)


def test_crop_mask_targets_close_to_paste_then_crop_anywhere():
  # With continuous rois, the canvas path re-interpolates the mask's piecewise-bilinear
  # interpolant on the pixel grid. Along one axis that errs by at most (slope change)/4 per
  # kink, and a kink of a [0, 1]-valued mask with cells of c pixels changes the slope by <= 2/c;
  # the two axes add: |error| <= 1/(2 c_y) + 1/(2 c_x). Samples within 1 px of a gt edge are
  # left out (there the canvas smears the step to zero over a pixel).
  rng = np.random.default_rng(6)
  gt_masks, gt_boxes, rois = _mask_case(rng, 24, [1, 3, 5, 7])
  rois = (rois + rng.uniform(-0.5, 0.5, rois.shape)).astype(np.float32)
  ours = np.asarray(ra.crop_mask_targets(gt_masks, gt_boxes, rois, 8))
  expected = _paste_and_crop(gt_masks, gt_boxes, rois, 8)
  centres = (np.arange(8) + 0.5) / 8
  keep = np.ones(ours.shape, bool)
  for axis, (lo, hi) in enumerate([(0, 2), (1, 3)]):
    c = rois[:, lo, None] + centres * (rois[:, hi] - rois[:, lo])[:, None]
    far = (np.abs(c - gt_boxes[:, lo, None]) > 1) & (np.abs(c - gt_boxes[:, hi, None]) > 1)
    keep &= far[:, :, None] if axis == 0 else far[:, None, :]
  cell_y = (gt_boxes[:, 2] - gt_boxes[:, 0]) / 16
  cell_x = (gt_boxes[:, 3] - gt_boxes[:, 1]) / 12
  bound = (0.5 / cell_y + 0.5 / cell_x)[:, None, None] + 1e-5
  assert keep.mean() > 0.7
  assert np.all(np.abs(ours - expected)[keep] <= np.broadcast_to(bound, ours.shape)[keep])
