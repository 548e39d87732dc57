"""Anchor/proposal-to-GT matching and balanced sampling (one image, jnp, static shapes).

Semantics follow Model Garden (`official/vision/ops/box_matcher.py`, `anchor.py`
RpnAnchorLabeler, `modeling/layers/roi_sampler.py`, `ops/sampling_ops.py`):

* `match`: each row (anchor/proposal) takes its highest-IoU valid GT (first on ties); positive
  if that IoU >= pos_threshold, negative if < neg_threshold, ignored in between. With
  `allow_low_quality` (the RPN's force_match_for_each_col) each valid GT's single best row
  (first on ties) becomes positive, matched to that GT (to the lowest such GT index when
  several GT choose the same row). Invalid GT never match; with no valid GT all rows are
  negative. Deviation: a GT whose best IoU is 0 forces nothing (Model Garden forces row 0).
* `sample_balanced`: at most int(num_samples * positive_fraction) positives, uniformly at random
  among positives, the rest from negatives. Model Garden fills a shortfall with non-candidates
  labelled negative; here the shortfall is padding with `sample_valid` False.
* `sample_rois`: Model Garden's ROISampler: GT boxes appended to the proposals, IoU matching,
  foreground IoU >= fg_iou, background IoU in [bg_iou_lo, bg_iou_hi), balanced sampling.
  Crowd GT are treated as invalid (Model Garden drops them in the training parser,
  skip_crowd_during_training); invalid GT and invalid proposals are never sampled. An image
  without valid GT gives background-only samples (Model Garden marks every candidate invalid
  and fills the sample with the first candidates as background).

Label convention: 1 positive, 0 negative, -1 ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from deepmarc_jax.ops import boxes as box_ops


def _best_gt(iou: jnp.ndarray, gt_valid: jnp.ndarray):
  """Per row: index of the best valid GT (first on ties) and its IoU (0 without valid GT)."""
  masked = jnp.where(gt_valid[None, :], iou, -1.0)
  return (jnp.argmax(masked, axis=1).astype(jnp.int32),
          jnp.maximum(jnp.max(masked, axis=1), 0.0))


def match(iou: jnp.ndarray, gt_valid: jnp.ndarray, pos_threshold: float,
          neg_threshold: float, allow_low_quality: bool = False):
  """Matches rows to GT columns.

  Args:
    iou: [A, G] IoU of each anchor/proposal with each GT box.
    gt_valid: [G] bool, real (non-padding) GT.
    pos_threshold: IoU >= this is positive.
    neg_threshold: IoU < this is negative (between the two: ignored).
    allow_low_quality: each valid GT's best row is forced positive (RPN).
  Returns:
    matched_gt: [A] int32 GT index, meaningful where labels == 1.
    labels: [A] int32 in {1, 0, -1}.
  """
  num_rows = iou.shape[0]
  matched_gt, max_iou = _best_gt(iou, gt_valid)
  labels = jnp.where(max_iou >= pos_threshold, 1,
                     jnp.where(max_iou < neg_threshold, 0, -1)).astype(jnp.int32)
  if allow_low_quality:
    best_row = jnp.argmax(iou, axis=0)  # [G]
    forces = gt_valid & (jnp.max(iou, axis=0) > 0)
    # Lowest forcing GT index per row; G (out of range) where no GT forces the row.
    gt_ids = jnp.where(forces, jnp.arange(iou.shape[1]), iou.shape[1])
    forced_gt = jnp.full((num_rows,), iou.shape[1], jnp.int32).at[best_row].min(gt_ids)
    forced = forced_gt < iou.shape[1]
    matched_gt = jnp.where(forced, forced_gt, matched_gt)
    labels = jnp.where(forced, 1, labels)
  return matched_gt, labels


def sample_balanced(labels: jnp.ndarray, key: jax.Array, num_samples: int,
                    positive_fraction: float):
  """Samples a fixed-size, positive-capped subset of labelled rows.

  Args:
    labels: [A] int32 in {1, 0, -1}; -1 rows are never sampled.
    key: PRNG key.
    num_samples: output size S.
    positive_fraction: at most int(S * positive_fraction) positives are taken.
  Returns:
    indices: [S] int32 rows; positives first, then negatives, then padding.
    sampled_labels: [S] int32 labels[indices], -1 for padding.
    sample_valid: [S] bool, False for padding (not enough candidates).
    Padding indices repeat arbitrary rows: scatter with them only where sample_valid.
  """
  num_rows = labels.shape[0]
  max_pos = int(num_samples * positive_fraction)
  noise = jax.random.uniform(key, (num_rows,))
  is_pos, is_neg = labels == 1, labels == 0
  _, pos_idx = jax.lax.top_k(jnp.where(is_pos, noise, -1.0), max(min(max_pos, num_rows), 1))
  _, neg_idx = jax.lax.top_k(jnp.where(is_neg, noise, -1.0), min(num_samples, num_rows))
  num_pos = jnp.minimum(jnp.sum(is_pos), max_pos)
  num_neg = jnp.minimum(jnp.sum(is_neg), neg_idx.shape[0])
  slot = jnp.arange(num_samples)
  take_pos = slot < num_pos
  neg_slot = slot - num_pos
  indices = jnp.where(take_pos, pos_idx[jnp.minimum(slot, pos_idx.shape[0] - 1)],
                      neg_idx[jnp.clip(neg_slot, 0, neg_idx.shape[0] - 1)]).astype(jnp.int32)
  sample_valid = take_pos | (neg_slot < num_neg)
  return indices, jnp.where(sample_valid, labels[indices], -1), sample_valid


def sample_rois(proposals: jnp.ndarray, proposal_valid: jnp.ndarray, gt_boxes: jnp.ndarray,
                gt_classes: jnp.ndarray, gt_valid: jnp.ndarray, key: jax.Array,
                gt_is_crowd: jnp.ndarray | None = None, num_samples: int = 512,
                fg_fraction: float = 0.25, fg_iou: float = 0.5, bg_iou_hi: float = 0.5,
                bg_iou_lo: float = 0.0, mix_gt_boxes: bool = True) -> dict[str, jnp.ndarray]:
  """Samples training ROIs for the second stage and assigns their targets.

  Args:
    proposals: [P, 4] RPN proposals.
    proposal_valid: [P] bool.
    gt_boxes: [G, 4]; gt_classes: [G] int32 (1..); gt_valid: [G] bool.
    key: PRNG key.
    gt_is_crowd: optional [G] bool; crowd GT are treated as invalid.
    num_samples: S, ROIs per image.
    fg_fraction: at most int(S * fg_fraction) foreground ROIs.
    fg_iou, bg_iou_hi, bg_iou_lo: foreground IoU >= fg_iou, background in [bg_iou_lo, bg_iou_hi).
    mix_gt_boxes: append the (valid, non-crowd) GT boxes to the candidates.
  Returns:
    dict of rois [S, 4]; classes [S] int32 (0 for background and padding); matched_gt [S]
    int32 GT index (meaningful where is_fg); valid [S] bool; is_fg [S] bool.
  """
  gt_valid = jnp.asarray(gt_valid, bool)
  if gt_is_crowd is not None:
    gt_valid = gt_valid & ~jnp.asarray(gt_is_crowd, bool)
  candidates, candidate_valid = proposals, jnp.asarray(proposal_valid, bool)
  if mix_gt_boxes:
    candidates = jnp.concatenate([candidates, gt_boxes.astype(candidates.dtype)])
    candidate_valid = jnp.concatenate([candidate_valid, gt_valid])
  matched_gt, max_iou = _best_gt(box_ops.iou(candidates, gt_boxes), gt_valid)
  labels = jnp.where(max_iou >= fg_iou, 1,
                     jnp.where((max_iou >= bg_iou_lo) & (max_iou < bg_iou_hi), 0, -1))
  labels = jnp.where(candidate_valid, labels, -1).astype(jnp.int32)
  indices, sampled_labels, valid = sample_balanced(labels, key, num_samples, fg_fraction)
  is_fg = sampled_labels == 1
  matched_gt = matched_gt[indices]
  return {
      'rois': candidates[indices],
      'classes': jnp.where(is_fg, gt_classes[matched_gt], 0).astype(jnp.int32),
      'matched_gt': matched_gt,
      'valid': valid,
      'is_fg': is_fg,
  }
