r"""Deep-MAC: CenterNet Hourglass-104 + Hourglass-100 mask network at 1024x1024, VOC -> nonVOC.

The paper recipe (the TF Object Detection API's
configs/tf2/center_net_deepmac_1024x1024_voc_only_tpu-128.config): masks of the 20 VOC classes
only, boxes of all 80; the mask branch is trained on ground-truth boxes only; 35.5 mask AP on
the 60 non-VOC classes.

  python run.py --config=experiments/deepmac_centernet.py --workdir=WORKDIR \
      --config.data.manual_dir=/path/to/coco2017

Variants (comma-separated after ':'):
  nonvoc  the reverse split (center_net_deepmac_1024x1024_non_voc_only): masks of the 60
          non-VOC classes, AP on VOC (paper: 39.1).
  512     the 512x512 config: Hourglass-52 mask network, mask loss on the last stack only
          (paper: 32.5 on non-VOC).
  demo    a narrow one-stage Hourglass on the synthetic seen/unseen shapes at 128 px, sized for
          a 2-core CPU.
  tiny    (with demo) the official oracle's small Hourglass (two stacks, two stages, narrow)
          at seconds per step: what the tests run.

Mask-network sweeps: --config.model.mask_head.type=hourglass52 (all names:
catalogue.MASK_HEADS).
"""
from deepmarc_jax import config_lib

VARIANTS = ('nonvoc', '512', 'demo', 'tiny')


def get_config(arg: str | None = None):
  variants = config_lib.parse_variants(arg, VARIANTS, 'deepmac_centernet.py')

  config = config_lib.base_config()
  config.experiment = 'deepmac_hourglass104_hg100_voc'

  data = config.data
  data.tfds_name = 'coco_instances/coco2017'
  data.image_size = 1024
  data.max_instances = 100          # max_number_of_boxes
  # random_square_crop_by_scale [0.6, 1.3] is approximated by the pipeline's scale jitter and
  # random crop (docs/design.md, "Deep-MAC").
  data.scale_jitter = (0.6, 1.3)
  data.hflip = True
  data.color_jitter = True          # random_adjust_hue/contrast/saturation/brightness
  data.mask_classes = 'voc'

  model = config.model
  model.meta_arch = 'deepmac'
  model.num_classes = 91            # 90 heatmap channels: COCO ids 1..90
  model.backbone.type = 'hourglass104'
  # hourglass_network.py's BatchNorm (Keras momentum 0.1, eps 1e-5) everywhere.
  model.backbone.bn_momentum, model.backbone.bn_epsilon = 0.1, 1e-5
  model.mask_head.type = 'hourglass100'
  model.mask_head.num_filters = 64  # num_init_channels
  model.mask_head.train_crops = 'gt'
  model.mask_head.max_train_instances = 100  # every GT box of an image
  model.detection.max_detections = 100  # max_box_predictions
  model.compute_dtype = 'bfloat16'
  # The OD API's input pipeline keeps crowd boxes: its CenterNet learns them as objects.
  model.deepmac.crowd_boxes_as_objects = True
  # The OD API evaluates boxes and masks with separate COCO evaluators: box areas for bbox,
  # mask areas for segm in the size ranges (evaluation/coco.py).
  config.eval.detection_area = 'per_iou_type'

  train = config.train
  train.batch_size = 128
  train.total_steps = 50_000
  opt = train.optimizer
  # Adam (no weight decay in the official config), cosine from 1e-3 with a linear warmup of
  # 5,000 steps from 2.5e-4.
  opt.name, opt.schedule = 'adamw', 'cosine'
  opt.learning_rate, opt.weight_decay = 1e-3, 0.0
  opt.warmup_steps, opt.warmup_init_lr = 5000, 2.5e-4

  if 'nonvoc' in variants:
    config.experiment = 'deepmac_hourglass104_hg100_nonvoc'
    data.mask_classes = 'nonvoc'
  if '512' in variants:
    config.experiment = config.experiment.replace('hg100', 'hg52') + '_512'
    data.image_size = 512
    model.mask_head.type = 'hourglass52'
    model.deepmac.use_only_last_stage = True

  if 'demo' in variants:
    config.experiment = 'deepmac_hourglass_hg20_demo'
    data.tfds_name = 'coco_instances/shapes'
    data.image_size = 128
    data.max_instances = 3
    data.mask_size = 32
    data.scale_jitter = (0.8, 1.25)
    data.shuffle_buffer = 256
    model.num_classes = 15          # the shapes' category ids are 1..14
    model.backbone.type = 'hourglass104_tiny'
    model.deepmac.head_filters = 64
    model.mask_head.update(type='hourglass20', num_filters=16, max_train_instances=3)
    model.detection.max_detections = 20
    model.compute_dtype = 'float32'
    train.batch_size = 8
    train.total_steps = 1200
    train.log_every_steps = 50
    train.checkpoint_every_steps = 600
    opt.learning_rate, opt.weight_decay = 3e-3, 1e-4
    opt.flatten = True
    opt.warmup_steps, opt.warmup_init_lr = 100, 1e-4
    config.eval.batch_size = 8
    config.eval.every_steps = 1200
    config.eval.gt_box_masks = True
    config.eval.overlay_score_threshold = 0.2
  if 'tiny' in variants:
    data.max_instances = 8
    model.deepmac.head_filters = 32
    model.mask_head.update(type='hourglass10', num_filters=8, max_train_instances=4)
    model.detection.max_detections = 10
    train.batch_size = 2
    train.total_steps = 6
    train.log_every_steps = 1
    train.checkpoint_every_steps = 2
    config.eval.batch_size = 2
    config.eval.max_batches = 1
  return config
