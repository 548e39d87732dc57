"""A tiny Mask R-CNN config and random batches for fast model and trainer tests."""
import sys

import numpy as np

from tests.conftest import REPO

sys.path.insert(0, str(REPO / 'experiments'))
import deepmarc_spinenet  # noqa: E402  pylint: disable=g-import-not-at-top


def config(**mask_head):
  """The `demo,tiny` experiment, with mask-head overrides."""
  config = deepmarc_spinenet.get_config('demo,tiny')
  config.model.mask_head.update(mask_head)
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
