"""Box geometry and Model Garden's box coder (jnp, jit-able, broadcast over leading axes).

Boxes are (y1, x1, y2, x2) in continuous input-image pixel coordinates (see `masks.py`): a box's
height is y2 - y1, with no +1 (TF2 Model Garden's convention). Deltas are (dy, dx, dh, dw):
centre offsets in units of the anchor's size and log size ratios, each multiplied by its weight
(RPN: (1, 1, 1, 1); the Fast R-CNN box head: (10, 10, 5, 5)), exactly as
`official/vision/ops/box_ops.py` encode_boxes / decode_boxes.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

# Added to sizes before the logs of `encode` (Model Garden's EPSILON).
EPSILON = 1e-8
# Upper bound on the unweighted dh, dw in `decode`: boxes grow at most 1000/16 times their anchor.
BBOX_XFORM_CLIP = math.log(1000.0 / 16.0)


def area(boxes: jnp.ndarray) -> jnp.ndarray:
  """[..., 4] -> [...]: box areas; 0 for degenerate boxes (y2 <= y1 or x2 <= x1)."""
  boxes = jnp.asarray(boxes)
  height = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
  width = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
  return height * width


def iou(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
  """Pairwise intersection over union: a [N, 4], b [M, 4] -> [N, M].

  0 for any pair involving a degenerate (zero-area) box.
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  top = jnp.maximum(a[:, None, 0], b[None, :, 0])
  left = jnp.maximum(a[:, None, 1], b[None, :, 1])
  bottom = jnp.minimum(a[:, None, 2], b[None, :, 2])
  right = jnp.minimum(a[:, None, 3], b[None, :, 3])
  inter = jnp.maximum(bottom - top, 0.0) * jnp.maximum(right - left, 0.0)
  area_a, area_b = area(a)[:, None], area(b)[None, :]
  union = area_a + area_b - inter
  nonempty = (area_a > 0) & (area_b > 0)
  return jnp.where(nonempty, inter / jnp.where(nonempty, union, 1.0), 0.0)


def _centres_and_sizes(boxes):
  height = boxes[..., 2] - boxes[..., 0]
  width = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * height, boxes[..., 1] + 0.5 * width, height, width


def encode(boxes: jnp.ndarray, anchors: jnp.ndarray,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
  """Regression targets of `boxes` [..., 4] w.r.t. `anchors` (broadcastable) -> [..., 4] deltas."""
  boxes, anchors = jnp.asarray(boxes, jnp.float32), jnp.asarray(anchors, jnp.float32)
  yc, xc, h, w = _centres_and_sizes(boxes)
  ayc, axc, ah, aw = _centres_and_sizes(anchors)
  ah, aw, h, w = ah + EPSILON, aw + EPSILON, h + EPSILON, w + EPSILON
  deltas = jnp.stack([(yc - ayc) / ah, (xc - axc) / aw, jnp.log(h / ah), jnp.log(w / aw)], -1)
  return deltas * jnp.asarray(weights, jnp.float32)


def decode(deltas: jnp.ndarray, anchors: jnp.ndarray,
           weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
           clip: float = BBOX_XFORM_CLIP) -> jnp.ndarray:
  """Inverse of `encode`: deltas [..., 4] applied to `anchors` (broadcastable) -> boxes [..., 4].

  `clip` bounds the unweighted dh, dw from above before exponentiation.
  """
  deltas = jnp.asarray(deltas, jnp.float32) / jnp.asarray(weights, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  dy, dx = deltas[..., 0], deltas[..., 1]
  dh, dw = jnp.minimum(deltas[..., 2], clip), jnp.minimum(deltas[..., 3], clip)
  ayc, axc, ah, aw = _centres_and_sizes(anchors)
  yc, xc = dy * ah + ayc, dx * aw + axc
  h, w = jnp.exp(dh) * ah, jnp.exp(dw) * aw
  y1, x1 = yc - 0.5 * h, xc - 0.5 * w
  return jnp.stack([y1, x1, y1 + h, x1 + w], -1)


def clip_boxes(boxes: jnp.ndarray, height, width) -> jnp.ndarray:
  """Clips [..., 4] boxes to [0, height] x [0, width] (scalars, possibly traced)."""
  boxes = jnp.asarray(boxes)
  limits = jnp.stack([height, width, height, width]).astype(boxes.dtype)
  return jnp.clip(boxes, 0.0, limits)


def jitter(key: jax.Array, boxes: jnp.ndarray, ratio: float) -> jnp.ndarray:
  """Moves each side of [..., 4] boxes at random, as Object Detection API random_jitter_boxes.

  Its 'default' mode (Deep-MAC's `max_roi_jitter_ratio`): about the unchanged centre, each side
  sits at (1 + u) / 2 of the box's height (y sides) or width (x sides) from the centre, with an
  independent u ~ U(-ratio, ratio) per side; so a side moves by at most ratio / 2 of the box's
  size. The caller clips to the image (the official op clips to its normalised [0, 1]).
  """
  yc, xc, h, w = _centres_and_sizes(boxes)
  u = jax.random.uniform(key, boxes.shape, boxes.dtype, -ratio, ratio)
  return jnp.stack([yc - 0.5 * h * (1 + u[..., 0]), xc - 0.5 * w * (1 + u[..., 1]),
                    yc + 0.5 * h * (1 + u[..., 2]), xc + 0.5 * w * (1 + u[..., 3])], -1)
