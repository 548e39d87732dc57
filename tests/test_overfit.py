"""The whole chain learns: overfitting 4 real COCO images reaches mask AP >= 0.5 on them.

Pipeline (coco_mini_seg through TFDS, no augmentation) -> MaskRCNN (narrow R50-FPN,
hourglass20 head on GT crops, masks of all classes) -> the trainer -> `detect` -> the COCO
evaluator (itself tested against pycocotools). A broken link anywhere (box coding, ROIAlign
alignment, mask targets, paste-back, evaluation) keeps AP far below the bar.
"""
import json
import pathlib

import pytest

from tests import tiny

# coco_mini_seg train images 13-16 (ids 623, 529, 25, 387): 12 instances of 9 classes, areas
# from 3% to 88% of the image.
IMAGES = 'train[13:17]'


@pytest.mark.slow
def test_overfitting_four_coco_images_reaches_mask_ap_one_half(coco_mini_seg_builder, tmp_path):
  from deepmarc_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny.config(crop_size=16)  # 32x32 mask logits
  data = config.data
  data.tfds_name = 'coco_instances/coco_mini_seg'
  data.data_dir = str(pathlib.Path(coco_mini_seg_builder.data_dir).parents[2])
  data.train_split = data.eval_split = IMAGES
  data.mask_classes = 'all'
  data.hflip, data.scale_jitter = False, (1.0, 1.0)
  config.model.width_multiplier = 0.25
  config.train.update(batch_size=4, total_steps=350, log_every_steps=25,
                      checkpoint_every_steps=1000)
  config.train.optimizer.update(name='adamw', schedule='cosine', learning_rate=1e-3,
                                warmup_steps=20, warmup_init_lr=1e-4, weight_decay=0.0)
  config.eval.update(batch_size=4, every_steps=1000, max_batches=None)

  results = train.train_and_evaluate(config, str(tmp_path))

  assert results['segm']['AP'] >= 0.5, results['segm']
  assert results['bbox']['AP'] >= 0.5, results['bbox']
  logged = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert logged[-1]['step'] == 350
  assert logged[-1]['mask_loss'] < 0.25 * logged[0]['mask_loss'], logged
  assert (tmp_path / 'predictions.png').exists()
