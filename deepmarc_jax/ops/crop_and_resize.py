"""Bilinear crop-and-resize with endpoint-aligned samples: Deep-MAC's crop of the pixel embedding.

The semantics of the TF Object Detection API's `spatial_transform_ops.matmul_crop_and_resize`
(`multilevel_roi_align` with one level, one sample per cell and `align_corners=True`), which
Deep-MAC uses both to crop its pixel embedding and to resample the ground-truth masks:

* boxes are normalized [y1, x1, y2, x2]; normalized y maps to pixel row y * (H - 1), so [0, 1]
  spans the first to the last pixel centre (pixels are points);
* the `size` samples along an axis are linspace(y1, y2, size) in those pixel coordinates (the
  box's centre when size is 1);
* each sample is the bilinear mix of its four neighbouring pixels, where a neighbour outside
  the feature map counts as 0 (so samples partly outside fade to 0; the whole-sample
  `extrapolation_value` of `tf.image.crop_and_resize` is not what this op does).

Written as two interpolation matrices per box ([size, H] and [size, W], at most two non-zeros
per row) and two contractions, which is how the matmul variant runs on TPUs too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _axis_weights(start: jax.Array, end: jax.Array, extent: int, size: int) -> jax.Array:
  """[N] normalized starts/ends -> [N, size, extent] bilinear weights along one axis."""
  scale = extent - 1
  if size > 1:
    steps = jnp.linspace(0.0, 1.0, size)
    points = (start * scale)[:, None] + steps[None, :] * ((end - start) * scale)[:, None]
  else:
    points = (0.5 * (start + end) * scale)[:, None]
  low = jnp.floor(points)
  frac = points - low
  pixels = jnp.arange(extent, dtype=points.dtype)
  # A neighbour outside [0, extent) matches no pixel and so drops out (counts as 0).
  return ((pixels == low[..., None]) * (1.0 - frac)[..., None]
          + (pixels == (low + 1.0)[..., None]) * frac[..., None])


def crop_and_resize(features: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """One image's features [H, W, C], boxes [N, 4] normalized y1, x1, y2, x2 -> [N, size, size, C].

  Output sample (i, j) of box n is at pixel (y1 + i (y2 - y1) / (size - 1)) * (H - 1), likewise
  for x; float32 boxes, features in any float dtype (the result has the features' dtype).
  """
  height, width = features.shape[:2]
  boxes = boxes.astype(jnp.float32)
  wy = _axis_weights(boxes[:, 0], boxes[:, 2], height, size).astype(features.dtype)
  wx = _axis_weights(boxes[:, 1], boxes[:, 3], width, size).astype(features.dtype)
  rows = jnp.einsum('nih,hwc->niwc', wy, features)
  return jnp.einsum('njw,niwc->nijc', wx, rows)
