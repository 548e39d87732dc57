"""Deep-MAC parity with the official TF Object Detection API, through a converted checkpoint.

oracle/deepmac_parity.py builds the official DeepMACMetaArch (the voc_only config with the small
Hourglass-104-layout backbone, 128 px, hourglass100 mask network of nc 8), randomises and
calibrates it, saves `tf.train.Checkpoint(model=model)` and its outputs on one batch. Here the
checkpoint goes through our converter (`convert_tf_checkpoint`, meta_arch 'deepmac') into our
`centernet.DeepMAC`, which must reproduce, to 1e-4 of each tensor's scale: the backbone's output
and every head per stack, the mask logits of the GT boxes, the four weighted losses with
BatchNorm in inference and in training mode, the top-k detections with their masks, and the
Colab's masks for given boxes. Also: the full-size model's parameter counts per component
(Hourglass-104, hourglass100) equal the official ones, with no oracle run.

Deliberate difference, measured here: our mask targets come from the batch's box-cropped masks,
the official's from full-image masks (docs/design.md); the loss comparison feeds both the
official targets, and ours are checked to be close to them.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepmarc_jax.ops import masks as mask_ops
from tests.conftest import DEEPMAC_ORACLE_PYTHON, REPO

sys.path.insert(0, str(REPO / 'experiments'))
import deepmac_centernet  # noqa: E402  pylint: disable=g-import-not-at-top

SIZE, NUM_CLASSES, ALLOWED = 128, 20, (1, 2, 3, 5, 7, 9)
BATCH_BOXES = np.array([  # normalised y1, x1, y2, x2; every instance's class is allowed
    [[0.10, 0.15, 0.55, 0.60], [0.40, 0.30, 0.95, 0.85], [0.05, 0.62, 0.35, 0.97]],
    [[0.20, 0.05, 0.80, 0.45], [0.12, 0.50, 0.47, 0.93], [0.55, 0.40, 0.90, 0.75]],
], np.float32)
BATCH_CLASSES = np.array([[1, 3, 7], [2, 9, 3]], np.int32)
PROMPT_BOXES = np.array([[[0.1, 0.1, 0.6, 0.5], [0.3, 0.45, 0.9, 0.95], [0.0, 0.0, 1.0, 1.0],
                          [0.52, 0.12, 0.61, 0.33]]], np.float32)


def _ellipse(box, size):
  y1, x1, y2, x2 = box * size
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  inside = (((yy - (y1 + y2) / 2) / ((y2 - y1) / 2)) ** 2
            + ((xx - (x1 + x2) / 2) / ((x2 - x1) / 2)) ** 2) <= 1.0
  return inside.astype(np.float32)


@pytest.fixture(scope='module')
def official(tmp_path_factory):
  """(inputs, the official outputs, the checkpoint prefix)."""
  out = tmp_path_factory.mktemp('deepmac_oracle')
  rng = np.random.default_rng(0)
  inputs = {
      'spec': json.dumps({'input_size': SIZE, 'num_classes': NUM_CLASSES,
                          'allowed_ids': list(ALLOWED), 'network_type': 'hourglass100',
                          'num_init_channels': 8, 'use_only_last_stage': False,
                          'max_detections': 20}),
      'calibration_images': rng.integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8),
      'images': rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8),
      'boxes': BATCH_BOXES, 'classes': BATCH_CLASSES,
      'masks': np.stack([[_ellipse(b, SIZE) for b in image] for image in BATCH_BOXES]),
      'prompt_boxes': PROMPT_BOXES,
  }
  np.savez(out / 'inputs.npz', **inputs)
  result = subprocess.run(
      [str(DEEPMAC_ORACLE_PYTHON), str(REPO / 'oracle' / 'deepmac_parity.py'),
       str(out / 'inputs.npz'), str(out)],
      capture_output=True, text=True, check=False,
      env=dict(os.environ, CUDA_VISIBLE_DEVICES=''))
  assert result.returncode == 0, result.stderr[-5000:]
  return inputs, dict(np.load(out / 'outputs.npz')), str(out / 'ckpt')


def _config():
  config = deepmac_centernet.get_config('')
  config.data.image_size = SIZE
  config.data.max_instances = 3
  config.data.mask_classes = ','.join(str(i) for i in ALLOWED)
  config.model.num_classes = NUM_CLASSES + 1
  config.model.backbone.type = 'hourglass104_tiny'
  config.model.mask_head.update(type='hourglass100', num_filters=8, max_train_instances=3)
  config.model.detection.max_detections = 20
  config.model.compute_dtype = 'float32'
  return config


@pytest.fixture(scope='module')
def ours(official):
  """(model, converted variables, our batch) for the official checkpoint."""
  from deepmarc_jax.models import meta_archs  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.tools import convert_tf_checkpoint  # pylint: disable=g-import-not-at-top
  inputs, _, ckpt = official
  config = _config()
  variables = convert_tf_checkpoint.convert_checkpoint(ckpt, config)
  batch = {
      'image': inputs['images'],
      'image_info': np.tile([[SIZE, SIZE, 1.0, 1.0]], (2, 1)).astype(np.float32),
      'gt_boxes': inputs['boxes'] * SIZE,
      'gt_classes': inputs['classes'],
      'gt_valid': np.ones((2, 3), bool), 'gt_is_crowd': np.zeros((2, 3), bool),
      'gt_mask_allowed': np.ones((2, 3), bool),
      # Box-cropped masks, as the pipeline writes them (ops/masks.py convention), at the
      # recipe's data.mask_size.
      'gt_masks': np.stack([[mask_ops.crop_mask_to_box(m, b * SIZE, 112)
                             for m, b in zip(ms, bs)]
                            for ms, bs in zip(inputs['masks'], inputs['boxes'])]),
  }
  return meta_archs.model_from_config(config), variables, batch


def _close(ours, theirs, what, rtol=1e-4):
  """Equal to rtol of the official tensor's scale (max |value|), elementwise."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (what, ours.shape, theirs.shape)
  scale = max(float(np.abs(theirs).max()), 1e-6)
  error = float(np.abs(ours - theirs).max()) / scale
  assert error <= rtol, f'{what}: max error {error:.2e} of scale {scale:.3g}'


OFFICIAL_HEADS = {'object_center': 'center', 'box/scale': 'box_scale',
                  'box/offset': 'box_offset', 'INSTANCE_EMBEDDING': 'instance_embedding',
                  'PIXEL_EMBEDDING': 'pixel_embedding'}


@pytest.mark.oracle
def test_backbone_heads_and_gt_box_masks_match_per_stack(official, ours):
  _, theirs, _ = official
  model, variables, batch = ours
  features = model.apply(variables, batch['image'], False, method='features')
  predictions = model.apply(variables, batch['image'], False, method='predict')
  for stack in range(2):
    _close(features[stack], theirs[f'pred/extracted_features/{stack}'], f'features {stack}')
    for name, key in OFFICIAL_HEADS.items():
      _close(predictions[stack][key], theirs[f'pred/{name}/{stack}'], f'{name} {stack}')
    logits = model.apply(variables, predictions[stack], batch['gt_boxes'], False,
                         method='mask_logits')
    _close(logits, theirs[f'pred/MASK_LOGITS_GT_BOXES/{stack}'], f'GT-box masks {stack}')


def _losses(model, variables, batch, mask_targets, train):
  from deepmarc_jax.models import centernet  # pylint: disable=g-import-not-at-top
  outputs, _ = model.apply(variables, batch, train=train, mutable=['batch_stats'],
                           rngs={'sampling': jax.random.key(0)})
  ours_targets = outputs['mask_targets']
  outputs = dict(outputs, mask_targets=jnp.asarray(mask_targets))
  _, parts = centernet.loss(outputs, _config().model)
  return parts, outputs, ours_targets


@pytest.mark.oracle
@pytest.mark.parametrize('mode', ['inference', 'training'])
def test_losses_match_in_both_batchnorm_modes(official, ours, mode):
  _, theirs, _ = official
  model, variables, batch = ours
  parts, outputs, ours_targets = _losses(model, variables, batch, theirs['mask_targets'],
                                         train=mode == 'training')
  prefix = 'loss' if mode == 'inference' else 'train/loss'
  names = {'center_loss': 'Loss/object_center', 'box_scale_loss': 'Loss/box/scale',
           'box_offset_loss': 'Loss/box/offset', 'mask_loss': 'Loss/deep_mask_estimation'}
  for ours_name, official_name in names.items():
    _close(parts[ours_name], theirs[f'{prefix}/{official_name}'], f'{mode} {ours_name}')
  if mode == 'training':
    for stack in range(2):
      _close(outputs['stacks'][stack]['mask_logits'],
             theirs[f'train/MASK_LOGITS_GT_BOXES/{stack}'], f'training GT-box masks {stack}')
  # Our targets (read from 112 x 112 box-cropped masks) against the official (sampled from the
  # full-image masks): they differ only where the binary ellipses' edges are resampled twice.
  difference = np.abs(np.asarray(ours_targets) - theirs['mask_targets'])
  assert difference.mean() < 0.01, difference.mean()


@pytest.mark.oracle
def test_detections_and_masks_for_given_boxes_match(official, ours):
  _, theirs, _ = official
  model, variables, batch = ours
  dets = model.apply(variables, batch['image'], batch['image_info'], method='detect')
  _close(dets['scores'], theirs['det/scores'], 'detection scores')
  np.testing.assert_array_equal(np.asarray(dets['classes']), theirs['det/classes'] + 1)
  _close(dets['boxes'], theirs['det/boxes'] * SIZE, 'detection boxes')
  _close(dets['masks'], theirs['det/masks'], 'detection masks')
  masks = model.apply(variables, batch['image'][:1], PROMPT_BOXES * SIZE,
                      method='segment_boxes')
  _close(masks, theirs['prompt/masks'], 'masks for given boxes')


def test_full_size_parameter_counts_equal_the_official():
  """Hourglass-104 + hourglass100 at the recipe's widths, per component
  (shared/reference/official-deepmac-oracle.md section 4.1), from shapes only."""
  from deepmarc_jax.tools import convert_tf_checkpoint  # pylint: disable=g-import-not-at-top
  config = deepmac_centernet.get_config('')
  config.data.image_size = 128  # parameter shapes do not depend on it
  variables = convert_tf_checkpoint.abstract_variables(config)
  counts = {}
  for key, leaf in variables.items():
    part = key.split('/')[1]
    part = part[:-2] if part.startswith('heads_') else part  # both stacks together
    counts[part] = counts.get(part, 0) + int(np.prod(leaf.shape))
  assert counts == {'backbone': 187_817_856, 'heads_center': 2 * 613_210,
                    'heads_box_scale': 2 * 590_594, 'heads_box_offset': 2 * 590_594,
                    'heads_instance_embedding': 2 * 205_088,
                    'heads_pixel_embedding': 2 * 200_976, 'mask_net': 47_276_545}
  assert sum(counts.values()) == 239_495_325


@pytest.mark.oracle
def test_converter_names_what_does_not_match(official):
  """A config whose model differs from the checkpoint's stops the conversion, naming both sides;
  a Deep-MARC config on a Deep-MAC checkpoint says what it expected."""
  from deepmarc_jax.tools import convert_tf_checkpoint  # pylint: disable=g-import-not-at-top
  _, _, ckpt = official
  config = _config()
  config.model.mask_head.type = 'hourglass52'
  with pytest.raises(convert_tf_checkpoint.ConversionError) as error:
    convert_tf_checkpoint.convert_checkpoint(ckpt, config)
  message = str(error.value)
  assert 'mask head hourglass52' in message and '_mask_net/_net/' in message
  assert 'our leaves no TF variable fills' in message and 'params/mask_net/convnet/' in message
  config = _config()
  config.model.deepmac.head_filters = 128
  with pytest.raises(convert_tf_checkpoint.ConversionError, match='shape mismatch'):
    convert_tf_checkpoint.convert_checkpoint(ckpt, config)
  deepmarc = deepmac_centernet.config_lib.base_config()
  with pytest.raises(convert_tf_checkpoint.ConversionError, match='no backbone'):
    convert_tf_checkpoint.convert_checkpoint(ckpt, deepmarc)


@pytest.mark.oracle
@pytest.mark.parametrize('field, value, line', [
    ('model.backbone.type', 'hourglass104',
     'backbone: checkpoint has hourglass104_tiny, config says hourglass104: '
     'set --config.model.backbone.type=hourglass104_tiny'),
    ('model.mask_head.type', 'hourglass52',
     'mask network: checkpoint has hourglass100, config says hourglass52: '
     'set --config.model.mask_head.type=hourglass100'),
    ('model.mask_head.num_filters', 32,
     'mask network filters (nc): checkpoint has 8, config says 32: '
     'set --config.model.mask_head.num_filters=8'),
    ('model.num_classes', NUM_CLASSES + 3, 'set --config.model.num_classes=' + str(NUM_CLASSES + 1)),
    ('model.deepmac.use_xy', False, 'set --config.model.deepmac.use_xy=True'),
])
def test_a_config_of_another_deepmac_is_refused_with_the_field_to_set(official, field, value,
                                                                      line):
  """Each common mistake stops the conversion with the field and the value to set."""
  from deepmarc_jax.tools import convert_tf_checkpoint  # pylint: disable=g-import-not-at-top
  _, _, ckpt = official
  config = _config()
  parent, name = field.rsplit('.', 1)
  node = config
  for part in parent.split('.'):
    node = node[part]
  node[name] = value
  with pytest.raises(convert_tf_checkpoint.ConversionError) as error:
    convert_tf_checkpoint.convert_checkpoint(ckpt, config)
  assert 'nothing was converted' in str(error.value)
  assert line in str(error.value), str(error.value)[:3000]
