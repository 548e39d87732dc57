"""CenterNet's box decoding: the top-k peaks of the class-centre heatmap (one image).

The TF Object Detection API's `CenterNetMetaArch.postprocess` with `top_k_feature_map_locations
(per_channel=False)`, `prediction_tensors_to_boxes` and
`convert_strided_predictions_to_normalized_boxes`, returning input-image pixels:

* a cell is a peak where its probability equals the max over its `pool_size` x `pool_size`
  neighbourhood (within 1e-6, the official PEAK_EPSILON); other cells score 0;
* the k best (cell, class) pairs over the whole map, best first;
* box = centre (row + offset_y, col + offset_x) -/+ half the predicted (height, width), both
  in output-stride cells (negative sizes count as 0), times the stride, clipped to the valid
  image region.

One deliberate difference: cells outside the valid (unpadded) image region score 0. The
official `mask_from_true_image_shape` compares output-stride rows with input-pixel sizes, so it
masks nothing in practice; peaks in the zero padding are never objects.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

PEAK_EPSILON = 1e-6


def decode(center_logits: jax.Array, box_scale: jax.Array, box_offset: jax.Array,
           valid_hw: jax.Array, stride: int, k: int, pool_size: int = 3) -> dict[str, jax.Array]:
  """Top-k detections of one image.

  Args:
    center_logits: [h, w, C] class-centre logits (channel c is category id c + 1).
    box_scale: [h, w, 2] box (height, width) in output-stride cells.
    box_offset: [h, w, 2] (y, x) offset of the centre from the cell's corner, in cells.
    valid_hw: [2] height and width of the real image region, input pixels.
    stride: input pixels per output cell.
    k: detections to return (fewer cells x classes than k: the rest score 0).
    pool_size: side of the peak neighbourhood (1: every cell is a peak).

  Returns:
    boxes [k, 4] y1, x1, y2, x2 input pixels; scores [k] sigmoid probabilities; classes [k]
    int32 category ids; valid [k] bool (score > 0).
  """
  height, width, num_classes = center_logits.shape
  probs = jax.nn.sigmoid(center_logits.astype(jnp.float32))
  rows = jnp.arange(height) * stride < valid_hw[0]
  cols = jnp.arange(width) * stride < valid_hw[1]
  probs = probs * (rows[:, None] & cols[None, :])[..., None]
  if pool_size > 1:
    pooled = jax.lax.reduce_window(probs, -jnp.inf, jax.lax.max, (pool_size, pool_size, 1),
                                   (1, 1, 1), 'SAME')
    probs = jnp.where(jnp.abs(probs - pooled) < PEAK_EPSILON, probs, 0.0)
  flat = probs.reshape(-1)
  k_safe = min(k, flat.shape[0])
  scores, index = jax.lax.top_k(flat, k_safe)
  y = index // (width * num_classes)
  x = (index // num_classes) % width
  channel = index % num_classes
  size = jnp.maximum(box_scale[y, x].astype(jnp.float32), 0.0)
  offset = box_offset[y, x].astype(jnp.float32)
  cy = y.astype(jnp.float32) + offset[:, 0]
  cx = x.astype(jnp.float32) + offset[:, 1]
  boxes = jnp.stack([cy - size[:, 0] / 2, cx - size[:, 1] / 2,
                     cy + size[:, 0] / 2, cx + size[:, 1] / 2], axis=-1) * stride
  limit = jnp.concatenate([valid_hw, valid_hw]).astype(jnp.float32)
  boxes = jnp.clip(boxes, 0.0, limit)
  pad = k - k_safe
  if pad:
    boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
    scores = jnp.pad(scores, (0, pad))
    channel = jnp.pad(channel, (0, pad), constant_values=-1)
  return {'boxes': boxes, 'scores': scores, 'classes': (channel + 1).astype(jnp.int32),
          'valid': scores > 0}
