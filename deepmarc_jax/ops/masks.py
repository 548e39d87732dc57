"""Box-relative instance masks: the one convention, plus numpy crop and paste.

Convention (used by the tf.data pipeline, the models and the evaluator alike):
  * Pixel (r, c) of an image covers the continuous square [r, r+1) x [c, c+1); its centre is
    (r + 0.5, c + 0.5). Boxes are (y1, x1, y2, x2) in these continuous pixel coordinates.
  * An m x m box-relative mask splits its box into m x m equal cells; cell (i, j) holds the
    value at the cell centre (y1 + (i + 0.5) h / m, x1 + (j + 0.5) w / m), h = y2 - y1.
  * Cropping samples the image mask bilinearly at the cell centres, with the sample positions
    clamped to the image (so boxes touching the border see the border pixels, not zeros).
  * Pasting is the inverse: each image pixel whose centre lies inside the box [y1, y2) x [x1, x2)
    samples the m x m mask bilinearly at its centre, clamped to the mask; other pixels are 0.

Both directions are separable bilinear resamplings: interpolate rows, then columns, with two
gathers each. (Plain numpy indexing, no BLAS: matrix products of these sizes wake BLAS threads
that cost more than the work.)
"""
from __future__ import annotations

import numpy as np


def _interp_indices(positions: np.ndarray, size: int):
  """Neighbour indices (lo, hi) and weight of hi for linear interpolation at `positions`.

  Positions are index-space coordinates clamped to [0, size - 1] (border replication).
  """
  pos = np.clip(np.asarray(positions, np.float64), 0.0, size - 1)
  lo = np.floor(pos).astype(np.int64)
  return lo, np.minimum(lo + 1, size - 1), pos - lo


def _resample(array: np.ndarray, rows, cols) -> np.ndarray:
  """Separable bilinear resampling of a 2-D array at (rows x cols) `_interp_indices`."""
  (r0, r1, fr), (c0, c1, fc) = rows, cols
  array = np.asarray(array, np.float64)
  tmp = array[r0] * (1.0 - fr)[:, None] + array[r1] * fr[:, None]
  return tmp[:, c0] * (1.0 - fc) + tmp[:, c1] * fc


def crop_mask_to_box(mask: np.ndarray, box, size: int) -> np.ndarray:
  """Crops an image mask to a box and resizes it to `size` x `size` (bilinear, soft values).

  Args:
    mask: [H, W] image mask (any real dtype; binary masks give soft values at edges).
    box: (y1, x1, y2, x2) in pixel coordinates of `mask`.
    size: output side m.
  Returns:
    [m, m] float32 box-relative mask.
  """
  height, width = mask.shape
  y1, x1, y2, x2 = (float(v) for v in box)
  centres = (np.arange(size) + 0.5) / size
  ys = y1 + centres * (y2 - y1) - 0.5  # index space: pixel r has its centre at r
  xs = x1 + centres * (x2 - x1) - 0.5
  return _resample(mask, _interp_indices(ys, height),
                   _interp_indices(xs, width)).astype(np.float32)


def paste_box_mask(box_mask: np.ndarray, box, height: int, width: int) -> np.ndarray:
  """Pastes an m x m box-relative mask into an image of `height` x `width`.

  Args:
    box_mask: [m, m] values (probabilities or logits; resampling is linear).
    box: (y1, x1, y2, x2) in pixel coordinates of the target image.
  Returns:
    [height, width] float32; zero outside the box.
  """
  out = np.zeros((height, width), np.float32)
  y1, x1, y2, x2 = (float(v) for v in box)
  if not (y2 > y1 and x2 > x1):
    return out
  m_h, m_w = box_mask.shape
  r0, r1 = max(int(np.ceil(y1 - 0.5)), 0), min(int(np.ceil(y2 - 0.5)), height)  # centre in [y1, y2)
  c0, c1 = max(int(np.ceil(x1 - 0.5)), 0), min(int(np.ceil(x2 - 0.5)), width)
  if r1 <= r0 or c1 <= c0:
    return out
  us = (np.arange(r0, r1) + 0.5 - y1) * m_h / (y2 - y1) - 0.5
  vs = (np.arange(c0, c1) + 0.5 - x1) * m_w / (x2 - x1) - 0.5
  out[r0:r1, c0:c1] = _resample(box_mask, _interp_indices(us, m_h), _interp_indices(vs, m_w))
  return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
  """IoU of two boolean masks of the same shape (1.0 when both are empty)."""
  a, b = np.asarray(a, bool), np.asarray(b, bool)
  union = np.logical_or(a, b).sum()
  return float(np.logical_and(a, b).sum() / union) if union else 1.0
