"""Padded greedy non-maximum suppression and the two Mask R-CNN uses of it (one image, jnp).

Semantics follow Model Garden (`official/vision/ops/nms.py` sorted_non_max_suppression_padded,
`modeling/layers/roi_generator.py`, `modeling/layers/detection_generator.py` v2 class-aware):

* `nms`: visit boxes by decreasing score (ties: lower index first); keep a box unless a kept
  box overlaps it with IoU >= iou_threshold. Degenerate boxes never suppress anything.
* `select_proposals` (RPN): per level, sigmoid scores, decode (weights 1) and clip to the image,
  pre-NMS top-k, NMS, at most num_proposals kept per level; then the overall top num_proposals.
  Boxes clipped to zero area are dropped (Model Garden drops only those clipped to (0, 0, 0, 0);
  `keep_degenerate=True` does the same).
  Model Garden defaults: train top-k 2000 / test 1000, NMS 0.7, 1000 proposals.
* `class_aware_nms` (detections): per foreground class, pre-NMS top-k of that class's scores,
  scores > score_threshold, NMS, at most max_detections per class; then the overall top
  max_detections. Model Garden defaults: top-k 5000, threshold 0.05, NMS 0.5, 100 detections.

Outputs have fixed sizes; `valid` flags mark real entries, which come first (sorted by score).
Padding indices/boxes repeat arbitrary entries.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from deepmarc_jax.ops import boxes as box_ops


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, valid: jnp.ndarray, iou_threshold: float,
        max_output: int):
  """Greedy NMS.

  Args:
    boxes: [N, 4]; scores: [N]; valid: [N] bool, only valid boxes are considered.
    iou_threshold: a kept box suppresses the boxes overlapping it with IoU >= this.
    max_output: K, the most boxes kept.
  Returns:
    indices: [K] int32 into boxes, kept boxes by decreasing score, then padding.
    out_valid: [K] bool.
  """
  order = jnp.argsort(-jnp.asarray(scores), stable=True)
  boxes = jnp.asarray(boxes)[order]

  def cond(state):
    count, alive, _ = state
    return (count < max_output) & jnp.any(alive)

  def body(state):
    count, alive, kept = state
    best = jnp.argmax(alive)  # the highest-scoring box still alive
    alive = alive & (box_ops.iou(boxes[best][None], boxes)[0] < iou_threshold)
    return count + 1, alive.at[best].set(False), kept.at[count].set(best)

  count, _, kept = jax.lax.while_loop(
      cond, body, (jnp.int32(0), jnp.asarray(valid)[order], jnp.zeros((max_output,), jnp.int32)))
  return order[kept].astype(jnp.int32), jnp.arange(max_output) < count


def _top_k(scores, valid, k):
  """Top-k of the valid scores: (scores, indices, valid) of size k (ties: lower index first)."""
  top, idx = jax.lax.top_k(jnp.where(valid, scores, -jnp.inf), k)
  return top, idx, valid[idx]


def select_proposals(deltas: Mapping[int, jnp.ndarray], logits: Mapping[int, jnp.ndarray],
                     anchors: Mapping[int, jnp.ndarray], image_height, image_width,
                     pre_nms_top_k: int = 2000, iou_threshold: float = 0.7,
                     num_proposals: int = 1000, keep_degenerate: bool = False):
  """RPN outputs -> proposals, Model Garden's multilevel ROI generator.

  Args:
    deltas: {level: [H_l, W_l, A * 4] or [..., 4]} RPN box deltas (weights 1, 1, 1, 1).
    logits: {level: [H_l, W_l, A] or [...]} RPN objectness logits.
    anchors: {level: [H_l, W_l, A, 4]} (`anchors.multilevel_anchors`).
    image_height, image_width: the real (unpadded) image size the boxes are clipped to.
    pre_nms_top_k: highest-scoring boxes per level considered by NMS.
    iou_threshold: NMS IoU threshold.
    num_proposals: P, output size.
    keep_degenerate: keep boxes clipped to zero height or width (they suppress nothing), as
      Model Garden does; only boxes clipped to (0, 0, 0, 0) are dropped then. Default: drop
      every zero-area box.
  Returns:
    boxes [P, 4], scores [P] (sigmoid), valid [P] bool.
  """
  all_boxes, all_scores, all_valid = [], [], []
  for level in sorted(logits):
    level_scores = jax.nn.sigmoid(jnp.reshape(logits[level], (-1,)))
    level_boxes = box_ops.decode(jnp.reshape(deltas[level], (-1, 4)),
                                 jnp.reshape(anchors[level], (-1, 4)))
    level_boxes = box_ops.clip_boxes(level_boxes, image_height, image_width)
    num_boxes = level_scores.shape[0]
    level_scores, idx = jax.lax.top_k(level_scores, min(num_boxes, pre_nms_top_k))
    level_boxes = level_boxes[idx]
    # Model Garden's padded NMS keeps a selected box if any coordinate is > 0.
    candidates = (jnp.any(level_boxes > 0, -1) if keep_degenerate
                  else box_ops.area(level_boxes) > 0)
    keep, keep_valid = nms(level_boxes, level_scores, candidates, iou_threshold,
                           min(num_boxes, num_proposals))
    all_boxes.append(level_boxes[keep])
    all_scores.append(level_scores[keep])
    all_valid.append(keep_valid)
  all_boxes, all_scores, all_valid = (jnp.concatenate(x)
                                      for x in (all_boxes, all_scores, all_valid))
  scores, idx, valid = _top_k(all_scores, all_valid, min(all_scores.shape[0], num_proposals))
  pad = num_proposals - idx.shape[0]
  return (jnp.pad(all_boxes[idx], ((0, pad), (0, 0))),
          jnp.pad(jnp.where(valid, scores, 0.0), (0, pad)),
          jnp.pad(valid, (0, pad)))


def class_aware_nms(boxes: jnp.ndarray, scores: jnp.ndarray, valid: jnp.ndarray,
                    score_threshold: float = 0.05, pre_nms_top_k: int = 5000,
                    iou_threshold: float = 0.5, max_detections: int = 100):
  """Per-class NMS and the overall top detections (Model Garden's v2 class-aware generator).

  Args:
    boxes: [N, C, 4] per-class boxes or [N, 4] shared boxes (decoded, clipped).
    scores: [N, C] class probabilities; column 0 is background and ignored.
    valid: [N] bool, real ROIs.
    score_threshold: a class's boxes need score > this.
    pre_nms_top_k: highest-scoring boxes per class considered by NMS.
    iou_threshold: NMS IoU threshold.
    max_detections: D, output size (and the most detections kept per class).
  Returns:
    dict of boxes [D, 4], scores [D] (0 for padding), classes [D] int32 (column index,
    1..C-1), valid [D] bool.
  """
  boxes, scores, valid = jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid)
  num_rois, num_classes = scores.shape
  if boxes.ndim == 2:
    boxes = jnp.broadcast_to(boxes[:, None], (num_rois, num_classes, 4))
  k = min(num_rois, pre_nms_top_k)

  def per_class(class_boxes, class_scores):
    top, idx, top_valid = _top_k(class_scores, valid, k)
    top_valid = top_valid & (top > score_threshold)
    keep, keep_valid = nms(class_boxes[idx], top, top_valid, iou_threshold, max_detections)
    return class_boxes[idx[keep]], top[keep], keep_valid

  class_boxes, class_scores, class_valid = jax.vmap(per_class, in_axes=(1, 1))(
      boxes[:, 1:], scores[:, 1:])
  classes = jnp.broadcast_to(jnp.arange(1, num_classes, dtype=jnp.int32)[:, None],
                             class_valid.shape)
  top, idx, top_valid = _top_k(class_scores.reshape(-1), class_valid.reshape(-1),
                               min(max_detections, class_valid.size))
  pad = max_detections - idx.shape[0]
  return {
      'boxes': jnp.pad(class_boxes.reshape(-1, 4)[idx], ((0, pad), (0, 0))),
      'scores': jnp.pad(jnp.where(top_valid, top, 0.0), (0, pad)),
      'classes': jnp.pad(jnp.where(top_valid, classes.reshape(-1)[idx], 0), (0, pad)),
      'valid': jnp.pad(top_valid, (0, pad)),
  }
