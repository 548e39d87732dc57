"""Official Deep-MAC (CenterNet) targets and losses on given GT and head outputs.

The oracle side of tests/test_centernet_losses.py. Runs under the Deep-MAC oracle venv (the TF
Object Detection API, built by shared/oracle/setup_deepmac_venv.sh), not .venv:

  .venv-oracle-deepmac/bin/python oracle/centernet_targets_parity.py INPUTS_NPZ OUT_NPZ

Path taken: the official model itself. The official voc_only pipeline config (model block;
num_classes, the allow-list and the resizer size taken from the inputs) is built by the OD API's
`model_builder` into a DeepMACMetaArch, with a tiny hourglass registered as the feature
extractor (as shared/oracle/official_deepmac_facts.py does; its weights are never built: no
predict() runs). For each case the GT goes in through `provide_groundtruth` and the given head
outputs through an injected prediction dict into the model's own `loss()`, which runs
CenterNetMetaArch.loss (centre, box scale and offset) and DeepMACMetaArch._compute_masks_loss
unchanged. The targets are read from the same model's target assigners and helpers
(`_target_assigner_dict`, `_get_groundtruth_mask_output`, `filter_masked_classes`,
`get_valid_anchor_weights_in_flattened_image`, `target_assigner._compute_std_dev_from_box_size`).
Keras learning phase 0 (no ROI jitter branch; max_roi_jitter_ratio is 0 in the config anyway).

INPUTS_NPZ: `spec` (JSON: input_size, num_classes, allowed_ids, cases) and per case k:
  k/boxes [B, N, 4] f32 normalised to the padded input, k/classes [B, N] int (COCO ids, 0 pad),
  k/weights [B, N] f32, k/true_image_shapes [B, 3] int32, k/masks [B, N, Hm, Wm] f32 full-image
  masks, k/center/s [B, h, w, C], k/box_scale/s, k/box_offset/s [B, h, w, 2] for each stack s,
  k/mask_logits/s [B, N, 32, 32] for each mask stack s (their count may be 1 or 2).
OUT_NPZ per case k: k/heatmap [B, h, w, C], k/indices [B*N, 3], k/box_hw [B*N, 2],
  k/offsets [B*N, 2], k/box_weights [B*N], k/pixel_weights [B, h*w], k/sigma [B, N],
  k/mask_targets [B, N, 32, 32], k/mask_weights [B, N], k/loss/<official loss name>.
"""
import json
import sys
import time

import deepmac_official  # noqa: F401  (first: sets up TensorFlow, registers the tiny backbone)
import numpy as np
import tensorflow as tf
from deepmac_official import log
from object_detection.core import target_assigner as od_target_assigner
from object_detection.meta_architectures import center_net_meta_arch as cn_arch
from object_detection.meta_architectures import deepmac_meta_arch


def build(spec):
  return deepmac_official.build(num_classes=spec['num_classes'], input_size=spec['input_size'],
                                allowed_ids=spec['allowed_ids'])


def run_case(model, spec, inputs, k):
  num_classes = spec['num_classes']
  size = spec['input_size']
  boxes = inputs[f'{k}/boxes'].astype(np.float32)
  classes = inputs[f'{k}/classes'].astype(np.int64)
  weights = inputs[f'{k}/weights'].astype(np.float32)
  masks = inputs[f'{k}/masks'].astype(np.float32)
  true_shapes = tf.constant(inputs[f'{k}/true_image_shapes'].astype(np.int32))
  batch, num = classes.shape
  onehot = np.zeros((batch, num, num_classes), np.float32)
  for b in range(batch):
    for i in range(num):
      if 1 <= classes[b, i] <= num_classes:
        onehot[b, i, classes[b, i] - 1] = 1.0
  model.provide_groundtruth(
      groundtruth_boxes_list=[tf.constant(x) for x in boxes],
      groundtruth_classes_list=[tf.constant(x) for x in onehot],
      groundtruth_masks_list=[tf.constant(x) for x in masks],
      groundtruth_weights_list=[tf.constant(x) for x in weights])

  def stacks(name):
    out, s = [], 0
    while f'{k}/{name}/{s}' in inputs:
      out.append(tf.constant(inputs[f'{k}/{name}/{s}'].astype(np.float32)))
      s += 1
    return out

  prediction = {
      cn_arch.OBJECT_CENTER: stacks('center'),
      cn_arch.BOX_SCALE: stacks('box_scale'),
      cn_arch.BOX_OFFSET: stacks('box_offset'),
      deepmac_meta_arch.MASK_LOGITS_GT_BOXES: stacks('mask_logits'),
      # Only its shape (input H, W) and a LAB image for the weight-0 colour loss are used.
      'preprocessed_inputs': tf.zeros((batch, size, size, 3), tf.float32),
  }
  out = {}
  losses = model.loss(prediction, true_shapes)
  for name, value in losses.items():
    out[f'{k}/loss/{name}'] = np.float32(value)

  # The targets, from the same model's assigners (the calls its loss functions make).
  gt_boxes_list = model.groundtruth_lists('boxes')
  gt_weights_list = model.groundtruth_lists('weights')
  gt_classes_list = model.groundtruth_lists('classes')
  heatmap = model._target_assigner_dict[cn_arch.OBJECT_CENTER].assign_center_targets_from_boxes(
      height=size, width=size, gt_boxes_list=gt_boxes_list, gt_classes_list=gt_classes_list,
      gt_weights_list=gt_weights_list)
  indices, box_hw, offsets, box_weights = (
      model._target_assigner_dict[cn_arch.DETECTION_TASK].assign_size_and_offset_targets(
          height=size, width=size, gt_boxes_list=gt_boxes_list,
          gt_weights_list=gt_weights_list))
  out_size = max(size // model._stride, 1)
  out_true = tf.math.ceil(tf.cast(true_shapes, tf.float32) / model._stride)
  pixel_weights = cn_arch.get_valid_anchor_weights_in_flattened_image(
      out_true, out_size, out_size)
  sigma = []
  for b in range(batch):
    abs_boxes = boxes[b] * np.float32(out_size)
    sigma.append(od_target_assigner._compute_std_dev_from_box_size(
        tf.constant(abs_boxes[:, 2] - abs_boxes[:, 0]),
        tf.constant(abs_boxes[:, 3] - abs_boxes[:, 1]), 0.7).numpy())
  _, mask_weights, masks_filtered = deepmac_meta_arch.filter_masked_classes(
      spec['allowed_ids'], tf.constant(onehot), tf.constant(weights), tf.constant(masks))
  mask_targets = model._get_groundtruth_mask_output(tf.constant(boxes), masks_filtered)
  out.update({f'{k}/heatmap': heatmap.numpy(), f'{k}/indices': indices.numpy(),
              f'{k}/box_hw': box_hw.numpy(), f'{k}/offsets': offsets.numpy(),
              f'{k}/box_weights': box_weights.numpy(), f'{k}/pixel_weights': pixel_weights.numpy(),
              f'{k}/sigma': np.stack(sigma), f'{k}/mask_targets': mask_targets.numpy(),
              f'{k}/mask_weights': mask_weights.numpy()})
  return out


def main():
  inputs_path, out_path = sys.argv[1], sys.argv[2]
  inputs = dict(np.load(inputs_path))
  spec = json.loads(str(inputs['spec']))
  start = time.time()
  tf.keras.backend.set_learning_phase(0)
  model = build(spec)
  log(f'built {type(model).__name__} in {time.time() - start:.1f} s')
  out = {}
  for k in spec['cases']:
    out.update(run_case(model, spec, inputs, k))
  np.savez(out_path, **out)
  log(f'{len(spec["cases"])} cases in {time.time() - start:.1f} s')


if __name__ == '__main__':
  main()
