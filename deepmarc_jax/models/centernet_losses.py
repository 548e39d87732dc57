"""Deep-MAC (CenterNet) training losses, as the official TF Object Detection API computes them.

Official code: `meta_architectures/center_net_meta_arch.py` (CenterNetMetaArch.loss,
_compute_object_center_loss, _compute_box_scale_and_offset_loss,
get_num_instances_from_weights), `core/losses.py` (PenaltyReducedLogisticFocalLoss,
L1LocalizationLoss, WeightedSigmoidClassificationLoss), `core/target_assigner.py`
(get_batch_predictions_from_indices) and `meta_architectures/deepmac_meta_arch.py`
(DeepMACMetaArch.loss, _compute_masks_loss, _compute_mask_prediction_loss,
filter_masked_classes). Checked against the official model's own `loss()` by
tests/test_centernet_losses.py through oracle/centernet_targets_parity.py.

Interface (what the model provides):
  outputs: a list with one dict per hourglass stack (2 for Hourglass-104), in stack order:
    'center':      [B, h, w, num_classes] logits (channel = COCO id - 1).
    'box_scale':   [B, h, w, 2] predicted (height, width) of the box centred at each pixel, in
                   output pixels (raw regression, no activation, as the official head).
    'box_offset':  [B, h, w, 2] predicted (dy, dx) sub-pixel centre offset, output pixels.
    'mask_logits': [B, N, m, m] Deep-MAC mask logits for the N GT boxes (the same N slots as
                   the targets, padding included), box-relative, m = mask_size (32). Optional
                   per stack: the mask loss averages over the stacks that carry it, so with
                   `use_only_last_stage` only the last dict has it (the official predicts mask
                   logits for the last stack only and averages over that list of one).
  targets: `deepmarc_jax.ops.heatmaps.CenterNetTargets` with a batch axis (`batch_targets`), on
    the same (h, w) grid as the heads.
  mask_targets: [B, N, m, m] f32 soft GT masks in each GT box (values in [0, 1]); the official
    crops each full-image mask with its GT box to m x m (bilinear, crop_and_resize endpoint
    sampling, not re-binarised). Padding rows may hold anything finite (weight 0).
  mask_weights: [B, N] f32: box weight x (class in allowed_masked_classes_ids), i.e.
    gt_weights * gt_mask_allowed. The official gates by class only (its weights already zero
    padding); our gt_mask_allowed also excludes crowd boxes.

Returned losses (scalars, already weighted exactly as the official `loss()` returns them):
  center_loss       'Loss/object_center': sum over stacks of the penalty-reduced focal loss
                    summed over valid pixels and classes, / (num_stacks * num_boxes), x 1.0.
  box_scale_loss    'Loss/box/scale': sum over stacks of |pred - target| * weight summed over
                    boxes and (h, w), / (num_stacks * num_boxes), x 0.1 (x task weight 1.0).
  box_offset_loss   'Loss/box/offset': the same for the offsets, x 1.0 (x task weight 1.0).
  mask_loss         'Loss/deep_mask_estimation': mean over mask stacks of
                    sum_i(mean_pixels(sigmoid CE_i) * mask_weight_i) / max(sum(mask_weight), 1),
                    x 5.0.
num_boxes = max(count_nonzero(targets.weights) over the whole batch, 1): padding rows (weight 0)
add nothing to any loss nor to any normaliser. The mask normaliser is a *sum* of weights, not a
count (as the official). All normalisers are over the batch given: the official normalises per
replica and averages over replicas, which equals a global normalisation only when every replica
holds the same number of boxes (vmap this over replica-sized groups to reproduce it exactly).

One deliberate difference: size/offset predictions are gathered at indices clipped into the
grid. A box whose floored centre lies outside the grid (possible only for centres on or beyond
the input's far border) would make the official `tf.gather` fail on CPU (or read 0 on GPU/TPU);
here it reads the border pixel.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from deepmarc_jax.ops.heatmaps import CenterNetTargets


@dataclasses.dataclass(frozen=True)
class CenterNetLossConfig:
  """Loss weights and focal-loss parameters of the Deep-MAC voc_only/non_voc_only configs."""
  center_weight: float = 1.0  # object_center_params.object_center_loss_weight
  focal_alpha: float = 2.0  # penalty_reduced_logistic_focal_loss
  focal_beta: float = 4.0
  focal_sigmoid_clip: float = 1e-4  # PenaltyReducedLogisticFocalLoss default
  detection_task_weight: float = 1.0  # object_detection_task.task_loss_weight
  scale_weight: float = 0.1  # object_detection_task.scale_loss_weight
  offset_weight: float = 1.0  # object_detection_task.offset_loss_weight
  mask_weight: float = 5.0  # deepmac_mask_estimation.task_loss_weight


def penalty_reduced_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 2.0,
                               beta: float = 4.0, sigmoid_clip: float = 1e-4) -> jax.Array:
  """Elementwise CenterNet focal loss (official PenaltyReducedLogisticFocalLoss, unweighted).

  p = clip(sigmoid(logits), clip, 1 - clip); where target == 1 exactly:
  -(1 - p)^alpha log p, elsewhere -(1 - target)^beta p^alpha log(1 - p).

  Args:
    logits, targets: [...] (same shape); targets in [0, 1].

  Returns:
    [...] f32 loss per element.
  """
  logits = logits.astype(jnp.float32)
  p = jnp.clip(jax.nn.sigmoid(logits), sigmoid_clip, 1 - sigmoid_clip)
  positive = (1 - p) ** alpha * jnp.log(p)
  negative = (1 - targets) ** beta * p ** alpha * jnp.log(1 - p)
  return -jnp.where(targets == 1.0, positive, negative)


def gather_at_indices(predictions: jax.Array, indices: jax.Array) -> jax.Array:
  """[B, h, w, K] predictions at [B, N, 2] (row, col) indices -> [B, N, K].

  Indices are clipped into the grid (see the module docstring).
  """
  _, h, w, k = predictions.shape
  rows = jnp.clip(indices[..., 0], 0, h - 1)
  cols = jnp.clip(indices[..., 1], 0, w - 1)
  flat = predictions.reshape(predictions.shape[0], h * w, k)
  return jnp.take_along_axis(flat, (rows * w + cols)[..., None], axis=1)


def num_boxes(weights: jax.Array) -> jax.Array:
  """Official get_num_instances_from_weights: max(count_nonzero(weights), 1) as f32."""
  return jnp.maximum(jnp.count_nonzero(weights), 1).astype(jnp.float32)


def center_loss_sum(logits: jax.Array, targets: CenterNetTargets,
                    config: CenterNetLossConfig = CenterNetLossConfig()) -> jax.Array:
  """One stack's focal loss summed over valid pixels and classes (not normalised).

  Args:
    logits: [B, h, w, C]; targets: batched, heatmap [B, h, w, C], pixel_weights [B, h, w].
  """
  loss = penalty_reduced_focal_loss(logits, targets.heatmap, config.focal_alpha,
                                    config.focal_beta, config.focal_sigmoid_clip)
  return jnp.sum(loss * targets.pixel_weights[..., None])


def l1_loss_sum(predictions: jax.Array, target_values: jax.Array, indices: jax.Array,
                weights: jax.Array) -> jax.Array:
  """One stack's weighted L1 at the box centres, summed (official L1LocalizationLoss).

  Args:
    predictions: [B, h, w, 2]; target_values: [B, N, 2]; indices: [B, N, 2]; weights: [B, N].
  """
  gathered = gather_at_indices(predictions.astype(jnp.float32), indices)
  return jnp.sum(jnp.abs(target_values - gathered) * weights[..., None])


def deepmac_mask_loss(mask_logits: jax.Array, mask_targets: jax.Array,
                      mask_weights: jax.Array) -> jax.Array:
  """One stack's Deep-MAC mask loss (official _compute_masks_loss, DEEP_MASK_ESTIMATION term).

  Per-pixel sigmoid cross-entropy against the soft targets, averaged over the m x m pixels of
  each instance ('normalize_auto'), weighted, summed and divided by max(sum(weights), 1).

  Args:
    mask_logits, mask_targets: [B, N, m, m]; mask_weights: [B, N] f32.

  Returns:
    scalar, before the task weight 5.0.
  """
  if mask_logits.shape != mask_targets.shape:
    # The official resizes the logits to the GT size; both are mask_size in every config.
    raise ValueError(f'mask logits {mask_logits.shape} vs targets {mask_targets.shape}')
  ce = optax.sigmoid_binary_cross_entropy(mask_logits.astype(jnp.float32),
                                          mask_targets.astype(jnp.float32))
  per_instance = jnp.mean(ce, axis=(-2, -1))
  mask_weights = mask_weights.astype(jnp.float32)
  return jnp.sum(per_instance * mask_weights) / jnp.maximum(jnp.sum(mask_weights), 1.0)


def centernet_losses(outputs: Sequence[Mapping[str, jax.Array]], targets: CenterNetTargets,
                     mask_targets: jax.Array | None = None, mask_weights: jax.Array | None = None,
                     config: CenterNetLossConfig = CenterNetLossConfig()) -> dict[str, jax.Array]:
  """The four official Deep-MAC losses, weighted (see the module docstring for the interface).

  Returns:
    {'center_loss', 'box_scale_loss', 'box_offset_loss', 'mask_loss'}: f32 scalars ('mask_loss'
    only when some stack carries 'mask_logits' and mask_targets / mask_weights are given).
  """
  num_stacks = float(len(outputs))
  boxes = num_boxes(targets.weights)
  center = sum(center_loss_sum(o['center'], targets, config) for o in outputs)
  scale = sum(l1_loss_sum(o['box_scale'], targets.box_hw, targets.indices, targets.weights)
              for o in outputs)
  offset = sum(l1_loss_sum(o['box_offset'], targets.offsets, targets.indices, targets.weights)
               for o in outputs)
  losses = {
      'center_loss': config.center_weight * center / (num_stacks * boxes),
      'box_scale_loss': (config.detection_task_weight * config.scale_weight
                         * scale / (num_stacks * boxes)),
      'box_offset_loss': (config.detection_task_weight * config.offset_weight
                          * offset / (num_stacks * boxes)),
  }
  mask_stacks = [o['mask_logits'] for o in outputs if 'mask_logits' in o]
  if mask_stacks and mask_targets is not None and mask_weights is not None:
    mask = sum(deepmac_mask_loss(m, mask_targets, mask_weights) for m in mask_stacks)
    losses['mask_loss'] = config.mask_weight * mask / float(len(mask_stacks))
  return losses
