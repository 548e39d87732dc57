"""deepmarc_jax/tools/convert_tf_checkpoint.py against the official TF Model Garden Deep-MARC
(tf-models-official 2.20).

One oracle subprocess per module (oracle/deepmarc_parity.py in .venv-oracle, built by setup.sh;
the tests that need it are marked `oracle`) builds small official DeepMaskRCNNModels through the
deepmac_maskrcnn config + task factory, randomises every weight, calibrates and then perturbs
the BatchNorm moving statistics, writes `tf.train.Checkpoint(model=model)` and the official
evaluation-mode outputs on a fixed uint8 image (normalised as the Model Garden parser does):
  * 'spinenet': a narrow SpineNet-49 (identity decoder) + hourglass20 DeepMaskHead, 256 px,
    3 anchor scales, 6 classes; 'spinenet_default': the same trunk with the 'default' head;
  * 'resnetfpn': a narrow ResNet-50 + FPN (levels 2-6) + hourglass52 head (crop 32), 128 px;
    'resnetfpn_hourglass100': the same trunk with the 'hourglass100' head.
Official Keras layers are named per session, so the second model's backbone has shifted layer
numbers: the converter's offset handling is exercised too.
Each comparison prints max |ours - official| and that relative to max |official|, which must
be <= 1e-4 (float32). The same checkpoints, converted with configs that get one field (or many)
wrong, must be refused with the config fields and values that describe them; the CLI's refusal
is tested as a user meets it. One oracle run serves the module; with a dozen conversions it
takes minutes on a small CPU, so it is marked slow (CI runs it).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepmarc_jax import config_lib
from deepmarc_jax.tools import convert_tf_checkpoint as convert
from deepmarc_jax import experiment
from deepmarc_jax.models import catalogue
from deepmarc_jax.models import mask_rcnn
from deepmarc_jax.models import resnet as resnet_lib
from deepmarc_jax.models import spinenet as spinenet_lib
from deepmarc_jax.ops import boxes as box_ops
from deepmarc_jax.ops import nms as nms_ops
from tests.conftest import ORACLE_PYTHON
from tests.conftest import REPO

sys.path.insert(0, str(REPO / 'experiments'))
import deepmarc_spinenet  # noqa: E402  pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow

RTOL = 1e-4
WIDTH = 0.125       # backbone width_multiplier (SpineNet filter scale, ResNet depth multiplier)
NUM_CLASSES = 6     # few classes, so that random softmax scores pass the 0.05 threshold
MAX_DETECTIONS = 10
PRE_NMS_TOP_K, NUM_PROPOSALS = 500, 100  # RPN at inference (official test_* fields)
SPINE_SIZE, FPN_SIZE = 256, 128


def spinenet_config():
  """Our config of the official 'spinenet' model below: deepmarc_spinenet.py, narrowed."""
  config = deepmarc_spinenet.get_config()
  config.data.image_size = SPINE_SIZE
  model = config.model
  model.backbone.type, model.backbone.stochastic_depth = 'spinenet49', 0.0
  model.width_multiplier, model.num_classes = WIDTH, NUM_CLASSES
  model.rpn.update(test_pre_nms_top_k=PRE_NMS_TOP_K, test_num_proposals=NUM_PROPOSALS,
                   keep_degenerate=True)
  model.box_head.update(num_convs=2, num_filters=16, fc_dims=32)
  model.detection.max_detections = MAX_DETECTIONS
  model.mask_head.update(type='hourglass20', num_filters=16, crop_size=16)
  model.compute_dtype = 'float32'
  return config


def resnetfpn_config():
  """Our config of the official 'resnetfpn' model: the base (R50-FPN) config, narrowed."""
  config = config_lib.base_config()
  config.data.image_size = FPN_SIZE
  model = config.model
  model.width_multiplier, model.fpn_filters, model.num_classes = WIDTH, 32, NUM_CLASSES
  model.rpn.update(test_pre_nms_top_k=PRE_NMS_TOP_K, test_num_proposals=NUM_PROPOSALS,
                   keep_degenerate=True)
  model.box_head.update(num_convs=1, num_filters=16, fc_dims=32)
  model.detection.max_detections = MAX_DETECTIONS
  model.mask_head.update(type='hourglass52', num_filters=8, crop_size=32)
  return config


CONFIGS = {'spinenet': spinenet_config, 'resnetfpn': resnetfpn_config}


def official_spec() -> dict:
  """The official config overrides matching `CONFIGS` (and the SpineNet SCALING_MAP row)."""
  spine, fpn = spinenet_config().model, resnetfpn_config().model
  row = catalogue.SPINENETS[spine.backbone.type]
  common = {
      'num_classes': NUM_CLASSES, 'use_gt_boxes_for_masks': True,
      'roi_generator': {'test_pre_nms_top_k': PRE_NMS_TOP_K, 'test_num_proposals': NUM_PROPOSALS},
      'detection_generator': {'max_num_detections': MAX_DETECTIONS},
  }

  def heads(model):
    return {
        'rpn_head': {'num_filters': 32},
        'anchor': {'num_scales': model.anchor.num_scales,
                   'aspect_ratios': list(model.anchor.aspect_ratios),
                   'anchor_size': model.anchor.anchor_size},
        'detection_head': {'num_convs': model.box_head.num_convs,
                           'num_filters': model.box_head.num_filters,
                           'fc_dims': model.box_head.fc_dims},
        'mask_head': {'class_agnostic': True, 'num_filters': model.mask_head.num_filters,
                      'convnet_variant': model.mask_head.type},
        'mask_roi_aligner': {'crop_size': model.mask_head.crop_size},
    }

  return {
      'spinenet': {
          'scaling': {'endpoints_num_filters': int(row.endpoints_num_filters * WIDTH),
                      'filter_size_scale': row.filter_size_scale * WIDTH,
                      'resample_alpha': row.resample_alpha, 'block_repeats': row.block_repeats},
          'overrides': {**common, **heads(spine), 'input_size': [SPINE_SIZE, SPINE_SIZE, 3],
                        'backbone': {'spinenet': {'model_id': 'test'}}},
      },
      'resnetfpn': {
          'overrides': {**common, **heads(fpn), 'input_size': [FPN_SIZE, FPN_SIZE, 3],
                        'backbone': {'resnet': {'depth_multiplier': WIDTH}},
                        'decoder': {'fpn': {'num_filters': fpn.fpn_filters}}},
      },
  }


def _image(rng, n, size):
  """uint8 [n, size, size, 3]: smooth colour waves plus noise."""
  yy, xx = np.mgrid[:size, :size] / size
  base = 127 + 60 * np.sin(6 * yy[..., None] + 4 * xx[..., None] + np.arange(3))
  return np.clip(base[None] + rng.normal(0, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


def _boxes(rng, n, size, min_side=4.0):
  """[1, n, 4] boxes of log-uniform sides, some crossing the image border."""
  side = np.exp(rng.uniform(np.log(min_side), np.log(size * 1.2), (n, 2)))
  corner = rng.uniform(-0.1 * size, size * 0.9, (n, 2))
  return np.concatenate([corner, corner + side], -1).astype(np.float32)[None]


def make_inputs() -> dict:
  rng = np.random.default_rng(0)
  inputs = {'spec': json.dumps(official_spec())}
  for name, size in (('spinenet', SPINE_SIZE), ('resnetfpn', FPN_SIZE)):
    inputs[f'{name}_calibration_images'] = _image(rng, 2, size)
    inputs[f'{name}_image'] = _image(rng, 1, size)
    inputs[f'{name}_rois'] = _boxes(rng, 24, size)
    inputs[f'{name}_boxes'] = _boxes(rng, 4, size, 16.0)
  return inputs


@pytest.fixture(scope='module')
def official(tmp_path_factory) -> pathlib.Path:
  """Runs the oracle once: OUT/{name}/ckpt* and OUT/{name}.npz for every official model.

  Only tests marked `oracle` may use it (tests/conftest.py skips them where the venv is missing).
  """
  out = tmp_path_factory.mktemp('official')
  np.savez(out / 'inputs.npz', **make_inputs())
  start = time.time()
  result = subprocess.run(
      [str(ORACLE_PYTHON), str(REPO / 'oracle' / 'deepmarc_parity.py'), str(out),
       str(out / 'inputs.npz')],
      capture_output=True, text=True,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '2', 'CUDA_VISIBLE_DEVICES': ''})
  assert result.returncode == 0, f'oracle failed:\n{result.stderr[-6000:]}'
  print(f'oracle: {time.time() - start:.1f} s', file=sys.stderr)
  return out


def _convert(official, name, config):
  start = time.time()
  variables = convert.convert_checkpoint(str(official / name / 'ckpt'), config)
  print(f'converted {name} in {time.time() - start:.1f} s', file=sys.stderr)
  return variables


class Run:
  """Our model with the official model `name`'s converted variables, its official outputs and
  inputs, and our features of the image. `mask_head` overrides our config's mask head type."""

  def __init__(self, official, name, mask_head=None):
    prefix = name.split('_')[0]  # 'spinenet_default' shares the 'spinenet' trunk and inputs
    self.config = CONFIGS[prefix]()
    if mask_head:
      self.config.model.mask_head.type = mask_head
    self.model = mask_rcnn.MaskRCNN.from_config(self.config)
    self.variables = _convert(official, name, self.config)
    self.expected = np.load(official / f'{name}.npz')
    inputs = np.load(official / 'inputs.npz')
    self.image, self.rois, self.boxes = (jnp.asarray(inputs[f'{prefix}_{k}'])
                                         for k in ('image', 'rois', 'boxes'))
    self.features = self.apply(mask_rcnn.MaskRCNN.features, self.image, False)

  def apply(self, method, *args):
    return self.model.apply(self.variables, *args, method=method)


@pytest.fixture(scope='module')
def spine(official):
  return Run(official, 'spinenet')


@pytest.fixture(scope='module')
def fpn(official):
  return Run(official, 'resnetfpn')


def check(name, ours, official, rtol=RTOL):
  """Asserts max |ours - official| <= rtol * max |official| and prints both numbers."""
  ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
  assert ours.shape == official.shape, (name, ours.shape, official.shape)
  diff = float(np.abs(ours - official).max())
  rel = diff / max(float(np.abs(official).max()), 1e-30)
  print(f'{name}: max abs err {diff:.3g}, relative to max |official| {rel:.3g}', file=sys.stderr)
  assert rel <= rtol, f'{name}: relative error {rel:.3g} > {rtol}'


# ------------------------------------------------------------------------------------ parity


@pytest.mark.oracle
def test_spinenet_endpoints(spine):
  assert sorted(spine.features) == [3, 4, 5, 6, 7]
  for level, feature in spine.features.items():
    check(f'spinenet L{level}', feature, spine.expected[f'backbone_{level}'])


@pytest.mark.oracle
def test_resnet_endpoints_and_fpn_features(fpn):
  normalised = ((fpn.image.astype(jnp.float32) - jnp.array(mask_rcnn.MEAN_RGB))
                / jnp.array(mask_rcnn.STDDEV_RGB))
  endpoints = fpn.apply(lambda m, x: m.backbone(x, train=False), normalised)
  assert sorted(endpoints) == [2, 3, 4, 5]
  for level, feature in endpoints.items():
    check(f'resnet C{level}', feature, fpn.expected[f'backbone_{level}'])
  assert sorted(fpn.features) == [2, 3, 4, 5, 6]
  for level, feature in fpn.features.items():
    check(f'fpn P{level}', feature, fpn.expected[f'features_{level}'])


@pytest.mark.oracle
@pytest.mark.parametrize('which', ['spine', 'fpn'])
def test_rpn_outputs_and_anchors(which, request):
  run = request.getfixturevalue(which)
  scores, deltas = run.apply(lambda m, f: m.rpn_head(f, train=False), run.features)
  anchors = run.apply(lambda m: m.anchors())
  for level in sorted(scores):
    check(f'{which} rpn scores L{level}', scores[level], run.expected[f'rpn_scores_{level}'])
    check(f'{which} rpn boxes L{level}', deltas[level], run.expected[f'rpn_boxes_{level}'])
    # Official anchors are [H, W, A * 4], ours [H, W, A, 4]: same order (scale, then ratio).
    check(f'{which} anchors L{level}', anchors[level].reshape(anchors[level].shape[:2] + (-1,)),
          run.expected[f'anchors_{level}'], rtol=1e-6)


@pytest.mark.oracle
@pytest.mark.parametrize('which', ['spine', 'fpn'])
def test_proposals_on_official_rpn_outputs(which, request):
  """`select_proposals` (keep_degenerate, test-time sizes) on the official RPN outputs vs the
  official MultilevelROIGenerator: identical inputs, so score ties cannot reorder them."""
  run = request.getfixturevalue(which)
  s = run.model.settings
  assert s.rpn.keep_degenerate and s.rpn.test_pre_nms_top_k == PRE_NMS_TOP_K
  levels = range(s.min_level, s.max_level + 1)
  logits = {l: jnp.asarray(run.expected[f'rpn_scores_{l}'][0]) for l in levels}
  deltas = {l: jnp.asarray(run.expected[f'rpn_boxes_{l}'][0]) for l in levels}
  anchors = run.apply(lambda m: m.anchors())
  size = float(s.image_size)
  boxes, scores, valid = nms_ops.select_proposals(
      deltas, logits, anchors, size, size, pre_nms_top_k=s.rpn.test_pre_nms_top_k,
      iou_threshold=s.rpn.nms_threshold, num_proposals=s.rpn.test_num_proposals,
      keep_degenerate=True)
  expected = run.expected['proposals'][0]
  degenerate = box_ops.area(expected) == 0
  print(f'{which}: {int(degenerate.sum())} of {len(expected)} official proposals have zero area',
        file=sys.stderr)
  assert bool(valid.all()) and degenerate.any()
  check(f'{which} proposals', boxes, expected, rtol=1e-6)
  check(f'{which} proposal scores', scores, run.expected['proposal_scores'][0], rtol=1e-6)


@pytest.mark.oracle
@pytest.mark.parametrize('which', ['spine', 'fpn'])
def test_box_head_and_detections_on_fixed_rois(which, request):
  """Box head outputs on given ROIs; then our post-processing (MaskRCNN.detect's after the
  proposals) on the official head outputs vs the official DetectionGenerator (v2, class-aware
  NMS; identical inputs, so score ties cannot reorder them)."""
  run = request.getfixturevalue(which)
  np.testing.assert_array_equal(mask_rcnn.BOX_WEIGHTS, run.expected['box_weights'])
  logits, deltas = run.apply(lambda m, f, r: m.box_head(f, r, train=False), run.features,
                             run.rois)
  check(f'{which} class logits', logits, run.expected['class_outputs'])
  check(f'{which} box deltas', deltas.reshape(deltas.shape[:2] + (-1,)),
        run.expected['box_outputs'])
  s = run.model.settings
  size = float(s.image_size)
  official_logits = jnp.asarray(run.expected['class_outputs'][0])
  official_deltas = jnp.asarray(run.expected['box_outputs'][0]).reshape(deltas.shape[1:])
  boxes = box_ops.clip_boxes(
      box_ops.decode(official_deltas, run.rois[0, :, None, :], mask_rcnn.BOX_WEIGHTS),
      size, size)
  d = s.detection
  pre_nms, threshold, nms_threshold, max_dets = (d.pre_nms_top_k, d.score_threshold,
                                                 d.nms_threshold, d.max_detections)
  dets = nms_ops.class_aware_nms(
      boxes, jax.nn.softmax(official_logits, -1), jnp.ones(boxes.shape[0], bool),
      score_threshold=threshold, pre_nms_top_k=pre_nms, iou_threshold=nms_threshold,
      max_detections=max_dets)
  num = int(run.expected['num_detections'][0])
  assert num > 0 and int(dets['valid'].sum()) == num
  np.testing.assert_array_equal(dets['classes'][:num], run.expected['detection_classes'][0, :num])
  check(f'{which} detection scores', dets['scores'][:num],
        run.expected['detection_scores'][0, :num], rtol=1e-6)
  check(f'{which} detection boxes', dets['boxes'][:num],
        run.expected['detection_boxes'][0, :num], rtol=1e-6)


@pytest.mark.oracle
@pytest.mark.parametrize('name, mask_head', [
    ('spinenet', None), ('spinenet_default', 'default'), ('resnetfpn', None),
    ('resnetfpn_hourglass100', 'hourglass100')])
def test_segment_boxes_masks(official, spine, fpn, name, mask_head):
  """Mask logits and probabilities for user boxes: official `_features_to_mask_outputs` and
  `call_images_and_boxes` vs our `mask_logits` and `segment_boxes`."""
  run = {'spinenet': spine, 'resnetfpn': fpn}.get(name) or Run(official, name, mask_head=mask_head)
  classes = jnp.ones(run.boxes.shape[:2], jnp.int32)
  logits = run.apply(lambda m, f, b, c: m.mask_logits(f, b, c, train=False), run.features,
                     run.boxes, classes)
  probs = run.apply(mask_rcnn.MaskRCNN.segment_boxes, run.image, run.boxes)
  check(f'{name} mask logits', logits, run.expected['mask_logits'])
  check(f'{name} mask probabilities', probs, run.expected['mask_probs'])
  check(f'{name} call_images_and_boxes', probs, run.expected['mask_probs_call'])


# ------------------------------------------------------------------------------------ errors


@pytest.mark.oracle
def test_wrong_mask_head_names_both_sides(official):
  config = spinenet_config()
  config.model.mask_head.type = 'default'
  with pytest.raises(convert.ConversionError) as info:
    convert.convert_checkpoint(str(official / 'spinenet' / 'ckpt'), config)
  message = str(info.value)
  print(message[:3000], file=sys.stderr)
  # Both sides: the official hourglass variables, and our 'default' convs left unfilled.
  assert 'variables mapped to a leaf our model does not have:\n  TF model/mask_head/_hourglass/' \
      in message
  assert '-> ours params/mask_head/convnet/conv_input_conv_block/Conv_0/kernel' in message
  assert 'ours params/mask_head/convnet/conv_0/kernel [3, 3, 32, 16]' in message


@pytest.mark.oracle
def test_shape_mismatch_names_both_sides(official):
  config = spinenet_config()
  config.model.num_classes = NUM_CLASSES + 1
  with pytest.raises(convert.ConversionError, match=(
      r'shape mismatch: TF model/\S*detection_head/_classifier/kernel\S* '
      r'\(\S*detection-scores/kernel, shape \[32, 6\]\) vs ours '
      r'params/detection_head/scores/kernel \[32, 7\]')):
    convert.convert_checkpoint(str(official / 'spinenet' / 'ckpt'), config)


# ------------------------------------------------------------------------------------ wrong configs
# A config that describes another architecture than the checkpoint's must stop the conversion
# with the config fields (and values) that describe the checkpoint: each mistake below converts
# an official checkpoint with an otherwise right config, and must be reported alone.

MISTAKES = {  # id: (official checkpoint, config overrides, the one architecture line expected)
    'levels': (
        'spinenet', {'model.min_level': 2, 'model.max_level': 6},
        'pyramid levels: checkpoint has 3-7 (its RPN has BatchNorms for levels 3, 4, 5, 6, 7), '
        'config says 2-6: set --config.model.min_level=3 --config.model.max_level=7'),
    'levels_fpn': (
        'resnetfpn', {'model.min_level': 3, 'model.max_level': 7},
        'pyramid levels: checkpoint has 2-6 (its RPN has BatchNorms for levels 2, 3, 4, 5, 6), '
        'config says 3-7: set --config.model.min_level=2 --config.model.max_level=6'),
    'backbone_size': (
        'spinenet', {'model.backbone.type': 'spinenet96'},
        'backbone: checkpoint has spinenet49 at width_multiplier 0.125 (17 blocks = 1 per node, '
        'block filters [8, 16, 32], endpoint filters 32), config says spinenet96 at '
        'width_multiplier 0.125: set --config.model.backbone.type=spinenet49'),
    'backbone_kind': (
        'resnetfpn', {'model.backbone.type': 'spinenet49'},
        'backbone: checkpoint has resnet50 at width_multiplier 0.125 (16 bottleneck blocks, stem '
        'of 8 filters, block filters [8, 16, 32, 64]), config says spinenet49 at '
        'width_multiplier 0.125: set --config.model.backbone.type=resnet50'),
    'backbone_width': (
        'spinenet', {'model.width_multiplier': 0.25},
        'backbone: checkpoint has spinenet49 at width_multiplier 0.125 (17 blocks = 1 per node, '
        'block filters [8, 16, 32], endpoint filters 32), config says spinenet49 at '
        'width_multiplier 0.25: set --config.model.width_multiplier=0.125'),
    'mask_head_type': (
        'spinenet', {'model.mask_head.type': 'default'},
        'mask head: checkpoint has hourglass20, config says default: set '
        '--config.model.mask_head.type=hourglass20'),
    'mask_head_type_default': (
        'spinenet_default', {'model.mask_head.type': 'hourglass20'},
        'mask head: checkpoint has default, config says hourglass20: set '
        '--config.model.mask_head.type=default'),
    'mask_head_type_needs_crops': (  # hourglass100's 6 stages need 32 px crops
        'resnetfpn_hourglass100', {'model.mask_head.type': 'hourglass20',
                                   'model.mask_head.crop_size': 16},
        'mask head: checkpoint has hourglass100, config says hourglass20: set '
        '--config.model.mask_head.type=hourglass100 --config.model.mask_head.crop_size=32'),
    'num_classes': (
        'spinenet', {'model.num_classes': 91},
        'classes (background included): checkpoint has 6, config says 91: set '
        '--config.model.num_classes=6'),
    'mask_filters': (
        'spinenet', {'model.mask_head.num_filters': 64},
        'mask head filters: checkpoint has 16, config says 64: set '
        '--config.model.mask_head.num_filters=16'),
}


def _config_for(name, overrides):
  config = CONFIGS[name.split('_')[0]]()
  config.update_from_flattened_dict(overrides)
  return config


def _refusal(official, name, config) -> str:
  """The ConversionError message of converting official checkpoint `name` with `config`."""
  start = time.time()
  with pytest.raises(convert.ConversionError) as info:
    convert.convert_checkpoint(str(official / name / 'ckpt'), config)
  message = str(info.value)
  print(f'refused in {time.time() - start:.1f} s:\n{message[:2500]}', file=sys.stderr)
  return message


def _architecture_lines(message) -> list[str]:
  """The 'WHAT: checkpoint has X, config says Y: set ...' lines of a refusal."""
  lines = message.splitlines()
  assert 'nothing was converted' in lines[0], lines[0]
  end = next(i for i, line in enumerate(lines) if i and not line.startswith('  '))
  return [line.strip() for line in lines[1:end]]


@pytest.mark.oracle
@pytest.mark.parametrize('mistake', MISTAKES)
def test_a_config_of_another_architecture_is_refused_with_the_fields_to_set(official, mistake):
  name, overrides, expected = MISTAKES[mistake]
  message = _refusal(official, name, _config_for(name, overrides))
  assert _architecture_lines(message) == [expected]


def _apply_flags(config, flags: str):
  """Sets `--config.a.b=value ...` (as a shell would pass them) on `config`, typed as the field."""
  for flag in flags.split():
    field, value = flag[len('--config.'):].split('=', 1)
    *parents, leaf = field.split('.')
    parent = config
    for p in parents:
      parent = parent[p]
    old = parent[leaf]
    parent[leaf] = value == 'True' if isinstance(old, bool) else type(old)(value)


@pytest.mark.oracle
def test_every_difference_is_listed_and_its_flags_convert(official, spine):
  """Many mistakes at once: one error lists them all; the flags it gives, applied to the wrong
  config, convert the checkpoint to exactly the right config's variables."""
  config = _config_for('spinenet', {
      'model.backbone.type': 'spinenet96', 'model.width_multiplier': 0.25,
      'model.min_level': 2, 'model.max_level': 6, 'model.num_classes': 91,
      'model.anchor.num_scales': 1, 'model.box_head.fc_dims': 1024,
      'model.mask_head.type': 'hourglass52', 'model.mask_head.num_filters': 64})
  message = _refusal(official, 'spinenet', config)
  assert _architecture_lines(message) == [
      'backbone: checkpoint has spinenet49 at width_multiplier 0.125 (17 blocks = 1 per node, '
      'block filters [8, 16, 32], endpoint filters 32), config says spinenet96 at '
      'width_multiplier 0.25: set --config.model.backbone.type=spinenet49 '
      '--config.model.width_multiplier=0.125',
      'pyramid levels: checkpoint has 3-7 (its RPN has BatchNorms for levels 3, 4, 5, 6, 7), '
      'config says 2-6: set --config.model.min_level=3 --config.model.max_level=7',
      'anchors per location: checkpoint has 9 (RPN score channels), config says 3 '
      '(model.anchor.num_scales 1 x 3 model.anchor.aspect_ratios): set '
      '--config.model.anchor.num_scales=3',
      'box head fully connected width: checkpoint has 32, config says 1024: set '
      '--config.model.box_head.fc_dims=32',
      'classes (background included): checkpoint has 6, config says 91: set '
      '--config.model.num_classes=6',
      'mask head: checkpoint has hourglass20, config says hourglass52: set '
      '--config.model.mask_head.type=hourglass20',
      'mask head filters: checkpoint has 16, config says 64: set '
      '--config.model.mask_head.num_filters=16']
  flags = next(line for line in message.splitlines() if line.startswith('All together: '))
  _apply_flags(config, flags[len('All together: '):])
  variables = convert.convert_checkpoint(str(official / 'spinenet' / 'ckpt'), config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, variables, spine.variables)


def test_spinenet_and_resnet_sizes_are_told_from_keras_names():
  """backbone_from_keras_names on the Keras names and shapes of our own backbones (the
  mapping the parity tests check): SpineNet-96 at levels 2-6 (the level-2 output block built,
  two blocks per node) is not SpineNet-49, a narrow SpineNet-49S not a SpineNet-49, ResNet-101
  not ResNet-50; a config saying otherwise gets the fields to set."""
  image = jnp.zeros((1, 128, 128, 3))
  for name, width, levels in (('spinenet96', 0.125, (2, 6)), ('spinenet49s', 0.25, (3, 7)),
                              ('resnet101', 0.25, (2, 6))):
    if name.startswith('spinenet'):
      row = catalogue.SPINENETS[name]
      spec = dataclasses.replace(
          row, filter_size_scale=row.filter_size_scale * width,
          endpoints_num_filters=int(row.endpoints_num_filters * width))
      net = spinenet_lib.SpineNet(spec, min_level=levels[0], max_level=levels[1])
      layers = convert.spinenet_keras_names(spec, *levels)
    else:
      net = resnet_lib.ResNet(depth=101, width_multiplier=width)
      layers = convert.resnet_keras_names(101)
    shapes = flax.traverse_util.flatten_dict(
        jax.eval_shape(lambda net=net: net.init(jax.random.key(0), image, False)), sep='/')
    names = {}
    for path, (conv, norm) in layers.items():
      names[f'{conv}/kernel'] = shapes[f'params/{path}/Conv_0/kernel'].shape
      names[f'{norm}/gamma'] = shapes[f'params/{path}/BatchNorm_0/scale'].shape
    found = convert.backbone_from_keras_names(names, name.startswith('resnet'), levels)
    assert (found.name, found.width) == (name, width), found
    config = spinenet_config()
    config.model.backbone.type = 'resnet50' if name.startswith('resnet') else 'spinenet49'
    config.model.width_multiplier = 1.0
    # pylint: disable-next=protected-access
    [mismatch] = convert._backbone_mismatches(found, config.model)
    print(mismatch, file=sys.stderr)
    assert mismatch.fix == (('model.backbone.type', name), ('model.width_multiplier', width))


def test_block_variables_match_inside_their_block_scope_only():
  """A block variable the config's model lacks is unmatched, never taken for the top-level layer
  of the same local name (it once read as the stem 'filled twice'); an outer scope above the
  model is still tolerated."""
  variables = {
      'a': convert.Variable('stem', 'conv2d/kernel', (7, 7, 3, 64)),
      'b': convert.Variable('leftover', 'bottleneck_block_27/conv2d/kernel', (1, 1, 8, 8)),
      'c': convert.Variable('outer', 'outer_scope/conv2d_1/kernel', (1, 1, 8, 8)),
  }
  layers = {'conv2d': 'stem/Conv_0', 'conv2d_1': 'endpoint_3/Conv_0'}
  keys = {v.key: key for v, key in convert._functional_keys(  # pylint: disable=protected-access
      variables, layers, 'backbone')}
  assert keys == {'stem': 'params/backbone/stem/Conv_0/kernel', 'leftover': None,
                  'outer': 'params/backbone/endpoint_3/Conv_0/kernel'}


def test_rpn_norms_map_to_the_level_their_keras_name_records():
  name = 'deep_mask_rcnn_model/rpn_head/rpn-conv-norm_2_0/gamma'
  assert convert.rpn_head_key('_norms/0/0/gamma', 3, name) == 'params/rpn_head/norm_2_0/scale'
  assert convert.rpn_head_key('_norms/0/0/gamma', 3) == 'params/rpn_head/norm_3_0/scale'


def test_missing_backbone_is_reported(tmp_path):
  import tensorflow as tf
  tf.train.Checkpoint(model=tf.Module()).write(str(tmp_path / 'ckpt'))
  with pytest.raises(convert.ConversionError, match='no backbone'):
    convert.convert_checkpoint(str(tmp_path / 'ckpt'), spinenet_config())


# ------------------------------------------------------------------------------------ CLI


def _convert_cli(tf_checkpoint, out, **changes):
  """`python -m deepmarc_jax.tools.convert_tf_checkpoint` with the small SpineNet's config
  (`changes`: config fields to set otherwise)."""
  overrides = {
      'data.image_size': SPINE_SIZE, 'model.backbone.type': 'spinenet49',
      'model.width_multiplier': WIDTH, 'model.num_classes': NUM_CLASSES,
      'model.box_head.num_convs': 2, 'model.box_head.num_filters': 16,
      'model.box_head.fc_dims': 32, 'model.mask_head.type': 'hourglass20',
      'model.mask_head.num_filters': 16, 'model.mask_head.crop_size': 16, **changes,
  }
  return subprocess.run(
      [sys.executable, '-m', 'deepmarc_jax.tools.convert_tf_checkpoint',
       f'--config={REPO / "experiments" / "deepmarc_spinenet.py"}',
       *(f'--config.{k}={v}' for k, v in overrides.items()),
       f'--tf_checkpoint={tf_checkpoint}', f'--out={out}'],
      capture_output=True, text=True, cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.mark.oracle
def test_cli_writes_what_init_from_loads(official, spine, tmp_path):
  """`python -m deepmarc_jax.tools.convert_tf_checkpoint` -> orbax dir ->
  `experiment.load_init_from` of a TrainState."""
  out = tmp_path / 'converted'
  result = _convert_cli(official / 'spinenet', out)
  assert result.returncode == 0, result.stderr[-6000:]
  zeros = jax.tree_util.tree_map(jnp.zeros_like, spine.variables)
  state = experiment.TrainState(step=jnp.zeros([], jnp.int32), params=zeros['params'],
                                batch_stats=zeros['batch_stats'], opt_state=())
  state = experiment.load_init_from(state, str(out))
  jax.tree_util.tree_map(np.testing.assert_array_equal,
                         {'params': state.params, 'batch_stats': state.batch_stats},
                         spine.variables)


@pytest.mark.oracle
def test_cli_refuses_a_config_of_another_architecture(official, tmp_path):
  """The user's path: a SpineNet config of the wrong size, levels and mask head (whose stages
  the config's crops do not fit, so config validation fails too) exits with the flags that
  describe the checkpoint, writing nothing."""
  out = tmp_path / 'converted'
  result = _convert_cli(official / 'spinenet', out, **{
      'model.backbone.type': 'spinenet96', 'model.min_level': 2, 'model.max_level': 6,
      'model.mask_head.type': 'hourglass52'})
  print(result.stderr[-3000:], file=sys.stderr)
  assert result.returncode == 1 and not out.exists()
  assert 'Traceback' not in result.stderr
  assert ('All together: --config.model.backbone.type=spinenet49 --config.model.min_level=3 '
          '--config.model.max_level=7 --config.model.mask_head.type=hourglass20') in result.stderr
  assert 'config.model.mask_head.crop_size=16 must be a multiple of 32' in result.stderr
