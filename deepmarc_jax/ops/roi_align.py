"""Multilevel ROIAlign with the official Model Garden semantics, and proposal mask targets.

Feature side (`multilevel_roi_align`), the semantics of Model Garden's
`official/vision/ops/spatial_transform_ops.py` `multilevel_crop_and_resize` (checked against it
by tests/test_ops_roi_align.py through oracle/roi_align_parity.py):
  * `features` is {level: [B, H_l, W_l, C]} for consecutive levels; level l has stride 2^l.
    `boxes` is [B, N, 4] (y1, x1, y2, x2) in input-image pixels.
  * Each box goes to one level (`assign_levels`) and is divided by 2^level: no half-pixel
    shift, no minimum size.
  * One bilinear sample per output bin, at `y1/2^l + (i + sample_offset) * (h/2^l) / S` (the
    same for x), in the level's index space (row r has its value at r).
  * Neighbours: `y0 = min(max(floor(y), 0), bound)`, `y1 = min(y0 + 1, bound)`, weight of y1
    is `y - y0`, with `bound = H_min / 2^(l - min_level) - 1` (from the min level's size, as the
    official code does). Below 0 the value is linearly extrapolated from rows 0 and 1; beyond
    `bound` it is the border value.
  * Gradients reach the features only (the boxes are under `stop_gradient`).

Implementation: each image's levels are flattened into one [sum(H_l W_l), C] table and each
output sample gathers its 4 neighbour rows (channels contiguous), vmapped over the batch so that
a batch-sharded jit keeps every gather on its own shard. Shapes are static: one compile per
input shape.

Mask side (`crop_mask_targets`) uses the box-relative convention of `deepmarc_jax.ops.masks`
(pixel r covers [r, r+1), cell centres, bilinear, zero outside the box).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

CANONICAL_SIZE = 224
CANONICAL_LEVEL = 4


def assign_levels(boxes: jax.Array, min_level: int, max_level: int,
                  canonical_size: float = CANONICAL_SIZE,
                  canonical_level: int = CANONICAL_LEVEL) -> jax.Array:
  """FPN level per box: clip(floor(log2(sqrt(h*w) / canonical_size)) + canonical_level).

  Evaluated as comparisons of sqrt(h*w) with canonical_size * 2^k (exact at the level edges;
  no log rounding). Zero-area (and inverted, NaN-area) boxes get `min_level`.

  Args:
    boxes: [..., 4] (y1, x1, y2, x2).
  Returns:
    int32 [...] levels in [min_level, max_level].
  """
  boxes = jnp.asarray(boxes)
  sqrt_area = jnp.sqrt((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))
  level = jnp.full(sqrt_area.shape, min_level, jnp.int32)
  for k in range(min_level + 1, max_level + 1):
    level += (sqrt_area >= canonical_size * 2.0 ** (k - canonical_level)).astype(jnp.int32)
  return level


def _axis_neighbours(start: jax.Array, extent: jax.Array, bound: jax.Array, size: int,
                     sample_offset: float):
  """Clipped neighbour indices and bilinear weights of `size` samples along one axis.

  Args:
    start, extent, bound: [...] box start, box extent and last valid index (level units).
  Returns:
    (lo, hi) int32 [..., size] indices and (w_lo, w_hi) float [..., size] weights.
  """
  steps = jnp.arange(size, dtype=start.dtype) + sample_offset
  grid = start[..., None] + steps * extent[..., None] / size  # official order of operations
  lo = jnp.minimum(jnp.maximum(jnp.floor(grid), 0.0), bound[..., None])
  hi = jnp.minimum(lo + 1.0, bound[..., None])
  w_hi = grid - lo
  return (lo.astype(jnp.int32), hi.astype(jnp.int32)), (1.0 - w_hi, w_hi)


def _gather_bilinear(table: jax.Array, base: jax.Array, row_stride: jax.Array, ys, xs,
                     ) -> jax.Array:
  """Sum over the 4 neighbours of weight * table row, per batch element.

  Args:
    table: [B, R, C] feature rows of each batch element.
    base, row_stride: int32 [B, ...] row of each box's (0, 0) feature and its row stride.
    ys, xs: ((lo, hi), (w_lo, w_hi)) neighbour indices and weights, [B, ..., S] each.
  Returns:
    [B, ..., S, S, C] float32.
  """
  gather = jax.vmap(lambda rows, index: rows.at[index].get(mode='clip'))
  (y_idx, y_w), (x_idx, x_w) = ys, xs
  out = 0.0
  for y, wy in zip(y_idx, y_w):
    rows = base[..., None] + y * row_stride[..., None]
    for x, wx in zip(x_idx, x_w):
      index = rows[..., :, None] + x[..., None, :]
      weight = wy[..., :, None] * wx[..., None, :]
      out = out + weight[..., None] * gather(table, index).astype(jnp.float32)
  return out


def multilevel_roi_align(features: Mapping[int, jax.Array], boxes: jax.Array,
                         output_size: int, sample_offset: float = 0.5) -> jax.Array:
  """ROIAlign on a feature pyramid with Model Garden's semantics (module docstring).

  Args:
    features: {level: [B, H_l, W_l, C]} for consecutive levels; H_l should be
      H_min / 2^(l - min_level) (the official code derives the border from it).
    boxes: [B, N, 4] (y1, x1, y2, x2) in input-image pixels.
    output_size: S.
    sample_offset: sample position inside each bin (0.5: bin centres).
  Returns:
    [B, N, S, S, C] in the features' dtype.
  """
  levels = sorted(features)
  min_level, max_level = levels[0], levels[-1]
  if levels != list(range(min_level, max_level + 1)):
    raise ValueError(f'levels must be consecutive, got {levels}')
  batch, height, width, channels = features[min_level].shape
  dtype = features[min_level].dtype
  for k, l in enumerate(levels):
    if features[l].shape[1] < height // 2**k or features[l].shape[2] < width // 2**k:
      raise ValueError(f'level {l} is {features[l].shape[1:3]}, smaller than the level '
                       f'{min_level} size {(height, width)} / 2^{k}')
  sizes = [features[l].shape[1] * features[l].shape[2] for l in levels]
  table = jnp.concatenate([features[l].reshape(batch, -1, channels) for l in levels], axis=1)

  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  level = assign_levels(boxes, min_level, max_level)
  scale = 2.0 ** level.astype(jnp.float32)
  k = level - min_level
  strides = 2.0 ** np.arange(len(levels))
  bound_y = jnp.asarray(height / strides - 1.0, jnp.float32)[k]
  bound_x = jnp.asarray(width / strides - 1.0, jnp.float32)[k]
  ys = _axis_neighbours(boxes[..., 0] / scale, (boxes[..., 2] - boxes[..., 0]) / scale,
                        bound_y, output_size, sample_offset)
  xs = _axis_neighbours(boxes[..., 1] / scale, (boxes[..., 3] - boxes[..., 1]) / scale,
                        bound_x, output_size, sample_offset)

  level_offsets = jnp.asarray(np.cumsum([0] + sizes[:-1]), jnp.int32)
  base = level_offsets[k]
  row_stride = jnp.asarray([features[l].shape[2] for l in levels], jnp.int32)[k]
  return _gather_bilinear(table, base, row_stride, ys, xs).astype(dtype)


def roi_align(features: jax.Array, boxes: jax.Array, output_size: int,
              sample_offset: float = 0.5) -> jax.Array:
  """Single-level ROIAlign: `multilevel_roi_align` with one level of stride 1.

  Args:
    features: [B, H, W, C].
    boxes: [B, N, 4] (y1, x1, y2, x2) in units of the feature grid (row r has its value at r).
  Returns:
    [B, N, S, S, C].
  """
  return multilevel_roi_align({0: features}, boxes, output_size, sample_offset)


def _mask_axis(gt_start: jax.Array, gt_end: jax.Array, roi_start: jax.Array,
               roi_end: jax.Array, mask_size: int, output_size: int):
  """ROI cell centres along one axis, expressed as bilinear taps into a box-relative mask.

  Args:
    gt_start, gt_end, roi_start, roi_end: [K] box edges in image pixels.
  Returns:
    (lo, hi) int32 [K, S] mask indices, (w_lo, w_hi) [K, S] weights, and `inside` [K, S]
    (the cell centre lies in [gt_start, gt_end)).
  """
  centres = roi_start[:, None] + (jnp.arange(output_size) + 0.5) * (
      roi_end - roi_start)[:, None] / output_size
  extent = gt_end - gt_start
  extent = jnp.where(extent > 0, extent, 1.0)[:, None]
  pos = jnp.clip((centres - gt_start[:, None]) * mask_size / extent - 0.5, 0.0, mask_size - 1)
  lo = jnp.floor(pos)
  hi = jnp.minimum(lo + 1.0, mask_size - 1)
  inside = (centres >= gt_start[:, None]) & (centres < gt_end[:, None])
  return (lo.astype(jnp.int32), hi.astype(jnp.int32)), (1.0 - (pos - lo), pos - lo), inside


def crop_mask_targets(gt_masks: jax.Array, gt_boxes: jax.Array, rois: jax.Array,
                      output_size: int) -> jax.Array:
  """Mask targets of ROIs from the box-relative masks of their matched GT boxes.

  Samples each GT-box mask at the ROI's S x S cell centres expressed in GT-box coordinates
  (bilinear, clamped to the mask), and 0 where a centre lies outside the GT box. This equals
  cropping the ROI (`masks.crop_mask_to_box`) from the GT mask pasted into the image
  (`masks.paste_box_mask`), without the intermediate image-resolution resampling.

  Args:
    gt_masks: [..., M_h, M_w] box-relative masks (any real dtype).
    gt_boxes: [..., 4] (y1, x1, y2, x2) image pixels; degenerate boxes give all-zero targets.
    rois: [..., 4] (y1, x1, y2, x2) image pixels, same leading shape.
    output_size: S.
  Returns:
    [..., S, S] float32.
  """
  lead, (m_h, m_w) = gt_masks.shape[:-2], gt_masks.shape[-2:]
  table = jnp.asarray(gt_masks, jnp.float32).reshape(-1, m_h * m_w, 1)
  gt_boxes = jnp.asarray(gt_boxes, jnp.float32).reshape(-1, 4)
  rois = jnp.asarray(rois, jnp.float32).reshape(-1, 4)
  *ys, y_in = _mask_axis(gt_boxes[:, 0], gt_boxes[:, 2], rois[:, 0], rois[:, 2], m_h,
                         output_size)
  *xs, x_in = _mask_axis(gt_boxes[:, 1], gt_boxes[:, 3], rois[:, 1], rois[:, 3], m_w,
                         output_size)
  zeros = jnp.zeros(gt_boxes.shape[:1], jnp.int32)
  out = _gather_bilinear(table, zeros, zeros + m_w, ys, xs)[..., 0]
  out = jnp.where(y_in[:, :, None] & x_in[:, None, :], out, 0.0)
  return out.reshape(*lead, output_size, output_size)
