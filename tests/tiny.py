"""A tiny Mask R-CNN config and random batches for fast model and trainer tests."""
import sys

import numpy as np

from tests.conftest import REPO

sys.path.insert(0, str(REPO / 'experiments'))
import deepmarc_spinenet  # noqa: E402  pylint: disable=g-import-not-at-top


def config(**mask_head):
  config = deepmarc_spinenet.get_config('demo')
  config.model.backbone.type = 'resnet50'
  config.model.min_level, config.model.max_level = 2, 6
  config.model.width_multiplier = 0.125
  config.model.fpn_filters = 32
  config.model.rpn.update(pre_nms_top_k=100, num_proposals=50, test_num_proposals=50,
                          samples_per_image=64)
  config.model.roi_sampler.samples_per_image = 32
  config.model.box_head.update(num_convs=1, num_filters=32, fc_dims=64)
  config.model.detection.update(pre_nms_top_k=100, max_detections=10)
  config.model.mask_head.update(type='hourglass10', num_filters=16, crop_size=8,
                                max_train_instances=4)
  config.model.mask_head.update(mask_head)
  config.data.image_size = 128
  return config


def batch(num_instances=8, max_instances=8, seed=0, batch_size=2, size=128):
  rng = np.random.default_rng(seed)
  batch = {
      'image': rng.integers(0, 255, (batch_size, size, size, 3), dtype=np.uint8),
      'image_info': np.tile([[100.0, 128.0, 1.0, 1.0]], (batch_size, 1)).astype(np.float32),
      'gt_boxes': np.zeros((batch_size, max_instances, 4), np.float32),
      'gt_classes': np.zeros((batch_size, max_instances), np.int32),
      'gt_valid': np.zeros((batch_size, max_instances), bool),
      'gt_is_crowd': np.zeros((batch_size, max_instances), bool),
      'gt_mask_allowed': np.zeros((batch_size, max_instances), bool),
      'gt_masks': np.zeros((batch_size, max_instances, 16, 16), np.float32),
  }
  for b in range(batch_size):
    for k in range(num_instances):
      y, x = rng.uniform(0, 60, 2)
      h, w = rng.uniform(10, 40, 2)
      batch['gt_boxes'][b, k] = [y, x, y + h, x + w]
      batch['gt_classes'][b, k] = rng.choice([1, 2, 8, 10])
      batch['gt_valid'][b, k] = True
      batch['gt_mask_allowed'][b, k] = batch['gt_classes'][b, k] < 8
      batch['gt_masks'][b, k] = rng.random((16, 16)) > 0.5
  return batch
