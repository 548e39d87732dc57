r"""Deep-MARC: Mask R-CNN + SpineNet-143 + Hourglass-52 mask head at 1280x1280, VOC -> nonVOC.

The paper recipe (official deep_mask_head_rcnn_voc_spinenet143_hg52.yaml): masks of the 20 VOC
classes only, boxes of all 80; mask head trained on ground-truth-box crops; 38.7 mask AP on the
60 non-VOC classes.

  python run.py --config=experiments/deepmarc_spinenet.py --workdir=WORKDIR \
      --config.data.manual_dir=/path/to/coco2017

Variants (comma-separated after ':'):
  nonvoc  the reverse split: masks of the 60 non-VOC classes, AP on VOC (paper: 41.0).
  demo    a quarter-width SpineNet-49 on the synthetic seen/unseen shapes dataset at 128 px,
          sized for a 2-core CPU (its wall time: docs/benchmarks.md).
  tiny    (with demo) a seconds-per-step smoke size: what the trainer tests run.

Mask-head sweeps: --config.model.mask_head.type=hourglass100 (all names: catalogue.MASK_HEADS).
"""
from deepmarc_jax import config_lib

VARIANTS = ('nonvoc', 'demo', 'tiny')


def get_config(arg: str | None = None):
  variants = config_lib.parse_variants(arg, VARIANTS, 'deepmarc_spinenet.py')

  config = config_lib.base_config()
  config.experiment = 'deepmarc_spinenet143_hg52_voc'

  data = config.data
  data.tfds_name = 'coco_instances/coco2017'
  data.image_size = 1280
  data.scale_jitter = (0.1, 2.0)
  data.hflip = True
  data.mask_classes = 'voc'

  model = config.model
  model.min_level, model.max_level = 3, 7           # identity decoder: no FPN
  model.backbone.type = 'spinenet143'
  model.backbone.stochastic_depth = 0.2
  model.backbone.bn_momentum, model.backbone.bn_epsilon = 0.99, 1e-3  # sync BN
  model.anchor.num_scales = 3
  model.anchor.aspect_ratios = (0.5, 1.0, 2.0)
  model.anchor.anchor_size = 4.0
  model.mask_head.type = 'hourglass52'
  model.mask_head.num_filters = 64
  model.mask_head.train_crops = 'gt'
  model.mask_head.crop_size = 32
  model.compute_dtype = 'bfloat16'

  train = config.train
  train.batch_size = 256
  train.total_steps = 231_000
  opt = train.optimizer
  opt.name, opt.schedule, opt.momentum = 'sgd', 'step', 0.9
  opt.learning_rate = 0.32
  opt.warmup_steps, opt.warmup_init_lr = 2000, 0.0067
  opt.decay_boundaries, opt.decay_rate = (219_450, 226_380), 0.1
  opt.weight_decay = 4e-5

  if 'nonvoc' in variants:
    config.experiment = 'deepmarc_spinenet143_hg52_nonvoc'
    data.mask_classes = 'nonvoc'

  if 'demo' in variants:
    # Seen classes are the shapes with VOC ids, unseen those with non-VOC ids (data/shapes.py),
    # so 'voc'/'nonvoc' keep their meaning. A quarter-width SpineNet-49 with every count scaled
    # for a 2-core CPU. Trained from scratch, so AdamW (much faster to start than the paper's
    # SGD) with a cosine decay.
    config.experiment = 'deepmarc_spinenet49_hg20_demo'
    data.tfds_name = 'coco_instances/shapes'  # the 'upright' style: <= 3 objects per image
    data.image_size = 128
    data.max_instances = 3
    data.mask_size = 32
    data.scale_jitter = (0.8, 1.25)
    data.shuffle_buffer = 256
    model.backbone.type = 'spinenet49'
    model.backbone.stochastic_depth = 0.0
    # Short training from scratch: running BN statistics must catch up within a few hundred
    # steps, or evaluation (which uses them) sees features unlike training's.
    model.backbone.bn_momentum, model.backbone.bn_epsilon = 0.9, 1e-3
    model.width_multiplier = 0.25
    # Levels 2-6, not the recipe's 3-7: the objects here are 26-77 px, 10x smaller than COCO's
    # at 1280, and all go to ROIAlign's finest level. At stride 8 (level 3) the losses stay
    # flat for the length of a demo run; SpineNet's level-2 output block (stride 4) learns as
    # fast as a ResNet-FPN does (docs/design.md, "How the demo got here").
    model.min_level, model.max_level = 2, 6
    model.anchor.num_scales, model.anchor.anchor_size = 1, 4.0
    model.rpn.update(samples_per_image=128, pre_nms_top_k=500, num_proposals=200,
                     test_num_proposals=100, test_pre_nms_top_k=None, keep_degenerate=False)
    model.roi_sampler.samples_per_image = 32
    model.box_head.update(num_convs=1, num_filters=64, fc_dims=256)
    model.detection.update(pre_nms_top_k=500, max_detections=20)
    model.mask_head.update(type='hourglass20', num_filters=16, crop_size=16,
                           max_train_instances=3)
    model.compute_dtype = 'float32'
    train.batch_size = 8
    train.total_steps = 1200
    train.log_every_steps = 50
    train.checkpoint_every_steps = 600
    opt.name, opt.schedule = 'adamw', 'cosine'
    # 3e-3: at 1e-3 the detector is still weak when the cosine ends (box AP ~5 after 1,000
    # steps); 3e-3 learns the shapes within the demo's minutes (docs/findings.md, "The demo").
    opt.learning_rate, opt.weight_decay = 3e-3, 1e-4
    opt.flatten = True  # fewer kernels for XLA:CPU to compile (optimizers.py)
    opt.warmup_steps, opt.warmup_init_lr = 100, 1e-4
    config.eval.batch_size = 8
    config.eval.every_steps = 1200
    # Also score masks from the ground-truth boxes: the mask head alone, as in the paper's Colab.
    config.eval.gt_box_masks = True
    # A from-scratch detector after minutes spreads its confidence over similar shapes.
    config.eval.overlay_score_threshold = 0.2
  if 'tiny' in variants:
    data.max_instances = 8  # the trainer tests' batches
    # A ResNet-FPN compiles faster than SpineNet; the trainer tests compile many steps.
    # SpineNet itself is tested in tests/test_spinenet.py and tests/test_mask_rcnn.py.
    model.backbone.type = 'resnet50'
    model.width_multiplier = 0.125
    model.fpn_filters = 32
    model.rpn.update(samples_per_image=64, pre_nms_top_k=100, num_proposals=50,
                     test_num_proposals=50)
    model.roi_sampler.samples_per_image = 32
    model.box_head.update(num_convs=1, num_filters=32, fc_dims=64)
    model.detection.update(pre_nms_top_k=100, max_detections=10)
    model.mask_head.update(type='hourglass10', num_filters=16, crop_size=8,
                           max_train_instances=4)
    train.batch_size = 2
    train.total_steps = 6
    train.log_every_steps = 1
    train.checkpoint_every_steps = 2
    config.eval.batch_size = 2
    config.eval.max_batches = 1
  return config
