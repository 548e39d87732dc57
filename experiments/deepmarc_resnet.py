r"""Deep-MARC: Mask R-CNN + ResNet-FPN + Hourglass-52 mask head at 1024x1024, VOC -> nonVOC.

The official deep_mask_head_rcnn_voc_r50_hg52.yaml / _r101_hg52.yaml recipe (base experiment
deep_mask_head_rcnn_resnetfpn_coco): masks of the 20 VOC classes only, boxes of all 80; mask
head on ground-truth-box crops (crop 32 -> 64x64 logits); FPN levels 2-6; batch 64, 70,000
steps, SGD 0.12 (x0.1 at 50k and 65k, warmup 500 from 0.0067), L2 4e-5, jitter 0.8-1.25,
ImageNet-pretrained backbone in the paper (load one with --config.init_from).

  python run.py --config=experiments/deepmarc_resnet.py --workdir=WORKDIR \
      --config.data.manual_dir=/path/to/coco2017

Variants (comma-separated after ':'):
  r101    ResNet-101 instead of ResNet-50.
  nonvoc  the reverse split: masks of the 60 non-VOC classes, AP on VOC.
"""
from deepmarc_jax import config_lib

VARIANTS = ('r101', 'nonvoc')


def get_config(arg: str | None = None):
  variants = config_lib.parse_variants(arg, VARIANTS, 'deepmarc_resnet.py')
  # base_config is this recipe's Model Garden setting; only the names below are spelled out.
  config = config_lib.base_config()
  config.data.tfds_name = 'coco_instances/coco2017'
  config.data.image_size = 1024
  config.model.backbone.type = 'resnet101' if 'r101' in variants else 'resnet50'
  config.model.min_level, config.model.max_level = 2, 6
  config.model.mask_head.update(type='hourglass52', num_filters=64, train_crops='gt',
                                crop_size=32)
  config.model.compute_dtype = 'bfloat16'
  config.train.batch_size = 64
  config.train.total_steps = 70_000
  split = 'nonvoc' if 'nonvoc' in variants else 'voc'
  config.data.mask_classes = split
  config.experiment = f"deepmarc_{config.model.backbone.type.replace('resnet', 'r')}_hg52_{split}"
  return config
