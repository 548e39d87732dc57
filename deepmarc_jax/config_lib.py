"""Shared experiment defaults and config validation (the one place both live).

Experiment files (`experiments/*.py`) start from `base_config()` and change what their recipe
says. `validate(config)` runs before anything reads data: every bad value is reported with its
full field name and the allowed values, all at once.
"""
from __future__ import annotations

from collections.abc import Sequence
import json

import ml_collections
from ml_collections import config_dict

from deepmarc_jax.data import class_splits
from deepmarc_jax.data import coco_format
from deepmarc_jax.data import coco_instances
from deepmarc_jax.models import catalogue

META_ARCHS = ('mask_rcnn', 'deepmac')
TRAIN_CROPS = ('gt', 'proposals')
OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('step', 'cosine')
DTYPES = ('float32', 'bfloat16')
EVAL_BACKENDS = ('pycocotools', 'faster_coco_eval')
# The area a detection has in COCO's small/medium/large ranges (evaluation/coco.py).
EVAL_DETECTION_AREAS = ('mask', 'box', 'per_iou_type')
DATASETS = tuple(f'coco_instances/{c.name}' for c in coco_instances.CocoInstances.BUILDER_CONFIGS)


class ConfigError(ValueError):
  """A config value is not allowed; the message names each field and its allowed values."""


def parse_variants(arg: str | None, allowed: Sequence[str], config_file: str) -> list[str]:
  """The comma-separated variants after ':' in `--config=FILE:a,b`; ValueError on unknown ones."""
  variants = [v for v in (arg or '').split(',') if v]
  unknown = [v for v in variants if v not in allowed]
  if unknown:
    raise ValueError(f'unknown variant(s) {unknown} of {config_file}; allowed: {tuple(allowed)}')
  return variants


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments: Mask R-CNN, R50-FPN levels 2-6, HG-52 head, COCO."""
  config = ml_collections.ConfigDict()
  config.experiment = 'deepmarc'
  config.seed = 0

  config.data = dict(
      tfds_name='coco_instances/coco2017',
      data_dir=config_dict.placeholder(str),    # TFDS data dir (default ~/tensorflow_datasets)
      manual_dir=config_dict.placeholder(str),  # where COCO JSON + images (or zips) are
      train_split='train',
      eval_split='validation',
      image_size=1024,
      max_instances=100,
      mask_size=112,                # GT mask crop size in the batch (Model Garden: 112)
      hflip=True,
      scale_jitter=(0.8, 1.25),     # (min, max) of the random output-size factor
      # Random hue, contrast, saturation and brightness (the TF OD API's ranges; pipeline.py).
      color_jitter=False,
      mask_classes='voc',           # 'voc' | 'nonvoc' | 'all' | comma-separated ids
      shuffle_buffer=1000,
      on_bad_input='skip',          # 'skip' (drop and count) | 'error'
      max_json_mb=coco_format.DEFAULT_MAX_JSON_MB,  # larger COCO JSONs are refused, not read
  )

  config.model = dict(
      meta_arch='mask_rcnn',
      num_classes=91,               # COCO ids 1..90 + background 0
      min_level=2,
      max_level=6,
      # Model Garden's ResNet-FPN Mask R-CNN: BN momentum 0.997, eps 1e-4 (SpineNet: 0.99, 1e-3).
      backbone=dict(type='resnet50', stochastic_depth=0.0, bn_momentum=0.997, bn_epsilon=1e-4),
      anchor=dict(num_scales=1, aspect_ratios=(0.5, 1.0, 2.0), anchor_size=8.0),
      fpn_filters=256,              # FPN decoder width (ResNet backbones)
      width_multiplier=1.0,         # backbone channel scale (narrow models for tests/demo)
      # keep_degenerate: keep proposals clipped to zero height/width, as Model Garden does
      # (False: drop every zero-area proposal). test_pre_nms_top_k: pre-NMS top-k per level
      # at inference (Model Garden: 1000); unset, pre_nms_top_k serves both.
      rpn=dict(samples_per_image=256, positive_fraction=0.5, pre_nms_top_k=2000,
               nms_threshold=0.7, num_proposals=1000, test_num_proposals=1000,
               keep_degenerate=True,
               test_pre_nms_top_k=config_dict.FieldReference(1000, field_type=int)),
      roi_sampler=dict(samples_per_image=512, foreground_fraction=0.25, foreground_iou=0.5),
      detection=dict(pre_nms_top_k=5000, score_threshold=0.05, nms_threshold=0.5,
                     max_detections=100),
      box_head=dict(num_convs=4, num_filters=256, num_fcs=1, fc_dims=1024, crop_size=7),
      mask_head=dict(
          type='hourglass52',
          num_filters=64,
          train_crops='gt',         # Deep-MARC's use_gt_boxes_for_masks: 'gt' | 'proposals'
          crop_size=32,             # mask ROIAlign output; the head upsamples x2 -> 64
          max_train_instances=16,   # mask-head crops per image in training (sampled if more)
          # 'gt' crops only: move each GT box side by up to this ratio / 2 of the box's size
          # (Deep-MAC's max_roi_jitter_ratio, 'default' mode; 0 = tight GT boxes, as released).
          gt_box_jitter=0.0,
          # Floor on the values per channel the mask head's BatchNorm statistics rest on; the
          # running averages make up a shortfall (layers.BatchNorm). 0 = plain BatchNorm. For
          # CPU-size batches whose few instances reach 1x1 inside a deep hourglass.
          bn_min_count=0.0,
          # Moving-average momentum of the hourglass heads' BatchNorms (Keras: moving =
          # m * moving + (1 - m) * batch). 0.1 is the reference's value, most likely PyTorch's
          # default carried over (CornerNet's hourglass is a PyTorch model); in Keras it makes the
          # moving averages almost exactly the last batch's statistics. Harmless at TPU batch
          # sizes; with a few instances per CPU batch, evaluation then swings with the last
          # training batch (docs/findings.md). 0.9 is what PyTorch's 0.1 means.
          hourglass_bn_momentum=0.1,
      ),
      compute_dtype='float32',      # 'bfloat16' on accelerators; params stay float32
      # meta_arch 'deepmac' (CenterNet, models/centernet.py): the official voc_only config's
      # values. model.backbone.type is then a catalogue.HOURGLASS_BACKBONES name; the mask
      # convnet is model.mask_head.type with nc = model.mask_head.num_filters, trained on up to
      # model.mask_head.max_train_instances GT boxes per image; model.detection.max_detections
      # peaks are decoded. The Mask R-CNN fields (levels, anchors, rpn, roi_sampler, box_head)
      # are unused.
      deepmac=dict(
          head_filters=256,             # every prediction head's first conv
          center_bias_init=-2.19,       # the centre heatmap logits' initial bias
          instance_embedding_dim=32,
          pixel_embedding_dim=16,
          mask_size=32,                 # crop side and mask-logit side (box-relative)
          use_xy=True,                  # y/x coordinate channels in front of the crop
          use_instance_embedding=True,  # the centre's instance embedding tiled over the crop
          use_only_last_stage=False,    # mask loss on the last stack only (the 512 recipe)
          peak_pool_size=3,             # detection: a peak is its 3x3 neighbourhood's max
          min_box_overlap_iou=0.7,      # centre Gaussians' radius (CenterNet's formula)
          center_loss_weight=1.0,
          box_scale_loss_weight=0.1,
          box_offset_loss_weight=1.0,
          mask_loss_weight=5.0,
          # Crowd boxes in the centre, size and offset targets, as the OD API's input pipeline
          # keeps them; False leaves them out as Mask R-CNN does. Never in the mask loss.
          crowd_boxes_as_objects=True,
      ),
  )

  config.train = dict(
      total_steps=70_000,
      batch_size=64,                # global
      log_every_steps=100,
      checkpoint_every_steps=1000,
      optimizer=dict(
          name='sgd', momentum=0.9, learning_rate=0.12, schedule='step',
          warmup_steps=500, warmup_init_lr=0.0067,
          decay_boundaries=(50_000, 65_000), decay_rate=0.1,
          weight_decay=4e-5,
          # Moments as one vector over all parameters: fewer kernels for XLA:CPU to compile
          # (optimizers.py); same updates.
          flatten=False),
  )

  config.eval = dict(
      batch_size=8,
      every_steps=10_000,
      max_batches=config_dict.placeholder(int),  # evaluate only the first N batches
      mask_threshold=0.5,
      overlay_score_threshold=0.5,  # detections drawn in the workdir's predictions.png
      # Also score masks predicted from the ground-truth boxes ('segm_gt_boxes'): no detector,
      # so it measures the mask head alone (the paper's view of mask-head generalisation).
      gt_box_masks=False,
      backend='faster_coco_eval',
      # The area a detection has in APs/APm/APl (GT always uses its annotation's 'area'):
      # 'mask' its mask's pixel count, for bbox and segm alike, as the official Deep-MARC
      # evaluator (Model Garden's COCOEvaluator) does | 'box' its box's area, for both, as
      # COCO.loadRes does with results carrying 'bbox' | 'per_iou_type' box for bbox, mask for
      # segm (Detectron2, mmdetection, the TF OD API that evaluated Deep-MAC). AP, AP50, AP75
      # and the seen/unseen AP are the same in all three (evaluation/coco.py).
      detection_area='mask',
  )

  config.mesh = [('data', -1)]
  # {'params', 'batch_stats'} to start training from when the workdir has no checkpoint yet,
  # e.g. an official checkpoint converted by `python -m deepmarc_jax.tools.convert_tf_checkpoint`.
  config.init_from = config_dict.placeholder(str)
  return config


def _allowed(errors: list[str], field: str, value, allowed: Sequence) -> None:
  if value not in allowed:
    errors.append(f'config.{field}={value!r} is not allowed; choose one of: '
                  + ', '.join(map(str, allowed)))


def _validate_mask_rcnn(errors: list[str], config: ml_collections.ConfigDict) -> None:
  data, model = config.data, config.model
  stride = 2 ** model.max_level
  if data.image_size <= 0 or data.image_size % stride:
    errors.append(f'config.data.image_size={data.image_size} must be a positive multiple of '
                  f'{stride} (2**model.max_level)')
  _allowed(errors, 'model.backbone.type', model.backbone.type, catalogue.BACKBONES)
  if model.backbone.type in catalogue.SPINENETS and data.image_size % 128:
    errors.append(f'config.data.image_size={data.image_size} must be a multiple of 128 for '
                  f'{model.backbone.type} (its coarsest blocks are at level 7)')
  _allowed(errors, 'model.mask_head.train_crops', model.mask_head.train_crops, TRAIN_CROPS)
  jitter = model.mask_head.gt_box_jitter
  if not 0 <= jitter < 1:
    errors.append(f'config.model.mask_head.gt_box_jitter={jitter} must be in [0, 1) (each box '
                  'side moves by up to jitter / 2 of the box\'s size)')
  elif jitter and model.mask_head.train_crops != 'gt':
    errors.append(f'config.model.mask_head.gt_box_jitter={jitter} applies to GT crops only; '
                  f'train_crops is {model.mask_head.train_crops!r}')
  if not 2 <= model.min_level <= model.max_level <= 7:
    errors.append(f'config.model.min_level/max_level={model.min_level}/{model.max_level} must '
                  'satisfy 2 <= min_level <= max_level <= 7')


def _validate_deepmac(errors: list[str], config: ml_collections.ConfigDict) -> None:
  data, model, deepmac = config.data, config.model, config.model.deepmac
  _allowed(errors, 'model.backbone.type', model.backbone.type,
           tuple(catalogue.HOURGLASS_BACKBONES))
  spec = catalogue.HOURGLASS_BACKBONES.get(model.backbone.type)
  if spec is not None:
    # The stem's stride 4, then one stride-2 encoder per stage.
    multiple = 4 * 2 ** (len(spec.channel_dims) - 1)
    if data.image_size <= 0 or data.image_size % multiple:
      errors.append(f'config.data.image_size={data.image_size} must be a positive multiple of '
                    f'{multiple} for {model.backbone.type}')
  if model.mask_head.train_crops != 'gt':
    errors.append(f'config.model.mask_head.train_crops={model.mask_head.train_crops!r}: '
                  "Deep-MAC trains its mask branch on ground-truth boxes only ('gt')")
  if model.mask_head.gt_box_jitter:
    errors.append(f'config.model.mask_head.gt_box_jitter={model.mask_head.gt_box_jitter}: not '
                  'implemented for Deep-MAC (the released recipes do not jitter)')
  for field in ('head_filters', 'instance_embedding_dim', 'pixel_embedding_dim', 'mask_size',
                'peak_pool_size'):
    if deepmac[field] <= 0:
      errors.append(f'config.model.deepmac.{field}={deepmac[field]} must be positive')
  if not 0 < deepmac.min_box_overlap_iou < 1:
    errors.append(f'config.model.deepmac.min_box_overlap_iou={deepmac.min_box_overlap_iou} '
                  'must be in (0, 1)')
  if model.num_classes < 2:
    errors.append(f'config.model.num_classes={model.num_classes} must be >= 2 (background + '
                  'one heatmap channel per category id 1..num_classes - 1)')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError listing every invalid field (name, value and what is allowed)."""
  errors: list[str] = []
  data, model, train = config.data, config.model, config.train
  _allowed(errors, 'data.tfds_name', data.tfds_name, DATASETS)
  _allowed(errors, 'data.on_bad_input', data.on_bad_input, coco_format.ON_BAD_INPUT)
  if not data.max_json_mb > 0:
    errors.append(f'config.data.max_json_mb={data.max_json_mb} must be positive (MiB)')
  mask_classes = data.mask_classes
  if isinstance(mask_classes, str) and mask_classes not in class_splits.NAMED_SPLITS:
    try:
      class_splits.resolve_mask_classes(mask_classes)
    except ValueError as e:
      errors.append(str(e).replace('data.mask_classes', 'config.data.mask_classes'))
  lo, hi = data.scale_jitter
  if not 0 < lo <= hi:
    errors.append(f'config.data.scale_jitter={tuple(data.scale_jitter)} must be (min, max) with '
                  '0 < min <= max')
  for field in ('max_instances', 'mask_size'):
    if data[field] <= 0:
      errors.append(f'config.data.{field}={data[field]} must be positive')
  _allowed(errors, 'model.meta_arch', model.meta_arch, META_ARCHS)
  if model.meta_arch == 'deepmac':
    _validate_deepmac(errors, config)
  else:
    _validate_mask_rcnn(errors, config)
  _allowed(errors, 'model.mask_head.type', model.mask_head.type, tuple(catalogue.MASK_HEADS))
  if model.mask_head.bn_min_count < 0:
    errors.append(f'config.model.mask_head.bn_min_count={model.mask_head.bn_min_count} must be '
                  '>= 0 (values per channel; 0 = plain BatchNorm)')
  if not 0 <= model.mask_head.hourglass_bn_momentum < 1:
    errors.append(f'config.model.mask_head.hourglass_bn_momentum='
                  f'{model.mask_head.hourglass_bn_momentum} must be in [0, 1) (Keras semantics: '
                  'the weight of the moving average)')
  head = catalogue.MASK_HEADS.get(model.mask_head.type)
  crop_field = 'deepmac.mask_size' if model.meta_arch == 'deepmac' else 'mask_head.crop_size'
  crop_size = model.deepmac.mask_size if model.meta_arch == 'deepmac' else model.mask_head.crop_size
  if isinstance(head, catalogue.HourglassSpec) and head.downsample:
    multiple = 2 ** (len(head.blocks_per_stage) - 1)
    if crop_size % multiple:
      errors.append(f'config.model.{crop_field}={crop_size} must be a multiple of {multiple} '
                    f'for {model.mask_head.type} (its stride-2 stages)')
  _allowed(errors, 'model.compute_dtype', model.compute_dtype, DTYPES)

  _allowed(errors, 'train.optimizer.name', train.optimizer.name, OPTIMIZERS)
  _allowed(errors, 'train.optimizer.schedule', train.optimizer.schedule, SCHEDULES)
  for field in ('total_steps', 'batch_size'):
    if train[field] <= 0:
      errors.append(f'config.train.{field}={train[field]} must be positive')
  _allowed(errors, 'eval.backend', config.eval.backend, EVAL_BACKENDS)
  _allowed(errors, 'eval.detection_area', config.eval.detection_area, EVAL_DETECTION_AREAS)

  mesh = config.mesh
  names = [axis[0] for axis in mesh] if all(len(a) == 2 for a in mesh) else []
  if 'data' not in names or sum(1 for _, n in mesh if n == -1) > 1:
    errors.append(f'config.mesh={mesh!r} must be [(name, size), ...] with a "data" axis and at '
                  'most one size -1')
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))


def changed_fields(previous_json: str | None, config: ml_collections.ConfigDict) -> list[str]:
  """'field: old -> new' for each leaf of `config` that differs from a config.json's text (as
  run.py writes it), fields added or removed included; [] where there is no earlier config."""
  if previous_json is None:
    return []
  try:
    old = _flatten(json.loads(previous_json))
  except ValueError:
    return ['config.json: unreadable']
  new = _flatten(json.loads(config.to_json_best_effort()))
  missing = object()
  return [f'{k}: {old.get(k, "(absent)")!r} -> {new.get(k, "(absent)")!r}'
          for k in sorted(set(old) | set(new)) if old.get(k, missing) != new.get(k, missing)]


def _flatten(tree, prefix: str = '') -> dict:
  if isinstance(tree, dict):
    return {k: v for key, value in tree.items()
            for k, v in _flatten(value, f'{prefix}{key}.').items()}
  return {prefix.rstrip('.'): tree}
