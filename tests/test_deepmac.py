"""Deep-MAC's pieces against independent references (TF's crop_and_resize, numpy), its config
validation and its colour augmentation; and (slow) run.py training and evaluating it.

Parity of the whole model with the official code: tests/test_deepmac_parity.py.
"""
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from deepmarc_jax import config_lib
from deepmarc_jax.models import centernet
from deepmarc_jax.ops import crop_and_resize as crop_ops
from deepmarc_jax.ops import masks as mask_ops
from deepmarc_jax.ops import peaks
from tests.conftest import REPO

sys.path.insert(0, str(REPO / 'experiments'))
import deepmac_centernet  # noqa: E402  pylint: disable=g-import-not-at-top


def _reference_crop(features, box, size):
  """numpy: endpoint-aligned bilinear samples, each neighbour outside the map counting 0."""
  height, width, _ = features.shape
  ys = np.linspace(box[0], box[2], size) * (height - 1)
  xs = np.linspace(box[1], box[3], size) * (width - 1)
  out = np.zeros((size, size, features.shape[2]))
  for i, y in enumerate(ys):
    for j, x in enumerate(xs):
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
          if 0 <= yy < height and 0 <= xx < width:
            out[i, j] += wy * wx * features[yy, xx]
  return out


def test_crop_and_resize_equals_tf_inside_and_fades_outside():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(9, 13, 3)).astype(np.float32)
  inside = np.array([[0.1, 0.2, 0.8, 0.9], [0.0, 0.0, 1.0, 1.0], [0.5, 0.3, 0.55, 0.35],
                     [0.7, 0.6, 0.2, 0.1]], np.float32)  # the last one flipped
  ours = np.asarray(crop_ops.crop_and_resize(jnp.asarray(features), jnp.asarray(inside), 7))
  theirs = tf.image.crop_and_resize(features[None], inside, tf.zeros(4, tf.int32), [7, 7])
  np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5)
  outside = np.array([[-0.2, -0.1, 0.5, 0.6], [0.6, 0.7, 1.3, 1.2]], np.float32)
  ours = np.asarray(crop_ops.crop_and_resize(jnp.asarray(features), jnp.asarray(outside), 6))
  for k, box in enumerate(outside):
    np.testing.assert_allclose(ours[k], _reference_crop(features, box, 6), atol=1e-5)


def _reference_decode(logits, scale, offset, k, stride, valid_hw):
  probs = 1 / (1 + np.exp(-logits.astype(np.float64)))
  height, width, classes = probs.shape
  probs *= ((np.arange(height) * stride < valid_hw[0])[:, None]
            & (np.arange(width) * stride < valid_hw[1])[None])[..., None]
  padded = np.pad(probs, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  pooled = np.max([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)],
                  axis=0)
  peak = np.where(np.abs(probs - pooled) < 1e-6, probs, 0.0)
  order = np.argsort(-peak.reshape(-1), kind='stable')[:k]
  y, x, c = np.unravel_index(order, peak.shape)
  size = np.maximum(scale[y, x], 0)
  cy, cx = y + offset[y, x, 0], x + offset[y, x, 1]
  boxes = np.stack([cy - size[:, 0] / 2, cx - size[:, 1] / 2, cy + size[:, 0] / 2,
                    cx + size[:, 1] / 2], -1) * stride
  boxes = np.clip(boxes, 0, np.tile(valid_hw, 2))
  return boxes, peak.reshape(-1)[order], c + 1


def test_peak_decoding_equals_a_numpy_reference():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (12, 10, 4)).astype(np.float32)
  scale = rng.normal(3, 2, (12, 10, 2)).astype(np.float32)  # some negative: size 0
  offset = rng.uniform(0, 1, (12, 10, 2)).astype(np.float32)
  valid = np.array([40.0, 32.0], np.float32)  # the last 2 columns are padding
  dets = peaks.decode(jnp.asarray(logits), jnp.asarray(scale), jnp.asarray(offset),
                      jnp.asarray(valid), stride=4, k=15)
  boxes, scores, classes = _reference_decode(logits, scale, offset, 15, 4, valid)
  np.testing.assert_allclose(np.asarray(dets['scores']), scores, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(dets['classes']), classes)
  np.testing.assert_allclose(np.asarray(dets['boxes']), boxes, atol=1e-4)
  assert np.asarray(dets['valid']).all() and (np.asarray(dets['boxes'])[:, 3] <= 32).all()
  few = peaks.decode(jnp.asarray(logits[:2, :2, :1]), jnp.asarray(scale[:2, :2]),
                     jnp.asarray(offset[:2, :2]), jnp.asarray(valid), stride=4, k=6)
  assert few['boxes'].shape == (6, 4) and not np.asarray(few['valid'])[4:].any()


def test_mask_targets_from_box_crops_approach_the_official_full_image_crop():
  """endpoint_mask_targets reads the official's sample positions from our box-cropped masks:
  as the crops get finer, the targets converge to crop_and_resize of the full-image mask."""
  size = 128
  yy, xx = np.mgrid[0:size, 0:size] + 0.5
  full = (((yy - 60) / 35) ** 2 + ((xx - 50) / 22) ** 2 <= 1).astype(np.float32)
  box = np.array([25.0, 28.0, 95.0, 72.0], np.float32)
  official = np.asarray(crop_ops.crop_and_resize(
      jnp.asarray(full)[..., None], jnp.asarray(box / size)[None], 32))[0, ..., 0]
  errors = []
  for cells in (32, 112, 448):
    crop = mask_ops.crop_mask_to_box(full, box, cells)
    ours = np.asarray(centernet.endpoint_mask_targets(
        jnp.asarray(crop)[None, None], jnp.asarray(box)[None, None], 32, size))[0, 0]
    errors.append(np.abs(ours - official).mean())
  assert errors[0] > errors[1] > errors[2] and errors[2] < 0.004, errors


@pytest.mark.parametrize('override, message', [
    (dict(backbone='resnet50'), "model.backbone.type='resnet50'"),
    (dict(image_size=120), 'multiple of 16 for hourglass104_tiny'),
    (dict(train_crops='proposals'), 'ground-truth boxes only'),
    (dict(mask_size=18), 'deepmac.mask_size=18 must be a multiple of 4'),
])
def test_deepmac_config_errors_name_the_field(override, message):
  config = deepmac_centernet.get_config('demo')
  config.model.backbone.type = override.get('backbone', config.model.backbone.type)
  config.data.image_size = override.get('image_size', config.data.image_size)
  config.model.mask_head.train_crops = override.get('train_crops', 'gt')
  config.model.deepmac.mask_size = override.get('mask_size', 32)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(config)
  config_lib.validate(deepmac_centernet.get_config(''))
  config_lib.validate(deepmac_centernet.get_config('nonvoc,512'))


def test_color_jitter_is_seeded_bounded_and_changes_colour():
  from deepmarc_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  image = tf.constant(np.random.default_rng(0).integers(30, 220, (16, 20, 3), dtype=np.uint8))
  outs = [pipeline.color_jitter(image, tf.constant([s, 0], tf.int64)).numpy()
          for s in (1, 1, 2)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert outs[0].dtype == np.uint8 and outs[0].shape == (16, 20, 3)
  assert not np.array_equal(outs[0], outs[2]) and not np.array_equal(outs[0], image.numpy())
  # Brightness moves the mean by at most 0.2 of the range; contrast and saturation keep it
  # within their factors: the mean stays in a band around the original's.
  assert abs(outs[0].mean() - image.numpy().mean()) < 0.2 * 255 + 10


@pytest.mark.slow
def test_run_py_trains_and_evaluates_deepmac(tmp_path):
  """run.py end to end on the synthetic shapes: Deep-MAC's :demo,tiny trains, checkpoints and
  evaluates with masks from GT boxes, through the same trainer and evaluator as Deep-MARC."""
  result = subprocess.run(
      [sys.executable, 'run.py', '--config=experiments/deepmac_centernet.py:demo,tiny',
       f'--workdir={tmp_path}'], cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-5000:]
  assert (tmp_path / 'eval_6.json').exists() and (tmp_path / 'predictions.png').exists()
  assert 'segm@GT' in result.stdout and 'center_loss' in result.stderr


@pytest.mark.parametrize('name, official', [
    ('hourglass10', 401_376), ('hourglass20', 3_110_160), ('hourglass32', 5_877_840),
    ('hourglass52', 23_464_384)])
def test_one_stack_backbones_have_the_official_parameter_counts(name, official):
  """The OD API's one-stack CenterNet Hourglass backbones (parameters + BatchNorm statistics,
  counted from its `center_net_hourglass_feature_extractor.hourglass_*()`)."""
  import jax  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.models import catalogue  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.models import hourglass  # pylint: disable=g-import-not-at-top
  backbone = hourglass.StackedHourglass(catalogue.HOURGLASS_BACKBONES[name])
  shapes = jax.eval_shape(lambda: backbone.init(jax.random.key(0), jnp.zeros((1, 128, 128, 3)),
                                                train=False))
  assert sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes)) == official


@pytest.mark.parametrize('as_objects', [True, False])
def test_crowd_boxes_are_objects_only_when_the_flag_says_so(as_objects):
  """The OD API's input keeps crowd boxes, so its CenterNet's centre, size and offset targets
  include them (the recipes' value); with the flag off they are left out as Mask R-CNN does.
  The mask loss never sees them either way."""
  import jax  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.ops import heatmaps  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = deepmac_centernet.get_config('demo,tiny')
  assert config.model.deepmac.crowd_boxes_as_objects  # the official value, in the recipe
  config.model.deepmac.crowd_boxes_as_objects = as_objects
  config.data.image_size = 64
  model = centernet.DeepMAC.from_config(config)
  batch = tiny.batch(num_instances=3, max_instances=4, batch_size=1, size=64)
  batch['gt_boxes'] = batch['gt_boxes'] * 0.5  # inside 64 px
  batch['image_info'][:] = [64.0, 64.0, 1.0, 1.0]
  batch['gt_is_crowd'][0, 1] = True
  rngs = {'params': jax.random.PRNGKey(0), 'sampling': jax.random.PRNGKey(1)}
  variables = model.init(rngs, batch, train=False)
  out = model.apply(variables, batch, train=False, rngs={'sampling': jax.random.PRNGKey(1)})
  size = config.data.image_size
  expected_valid = batch['gt_valid'] & (as_objects | ~batch['gt_is_crowd'])
  expected = heatmaps.batch_targets(
      batch['gt_boxes'], batch['gt_classes'], expected_valid, batch['image_info'],
      input_hw=(size, size), num_classes=config.model.num_classes - 1,
      stride=centernet.OUTPUT_STRIDE, min_overlap=config.model.deepmac.min_box_overlap_iou)
  without_crowd = heatmaps.batch_targets(
      batch['gt_boxes'], batch['gt_classes'], batch['gt_valid'] & ~batch['gt_is_crowd'],
      batch['image_info'], input_hw=(size, size), num_classes=config.model.num_classes - 1,
      stride=centernet.OUTPUT_STRIDE, min_overlap=config.model.deepmac.min_box_overlap_iou)
  for key in expected._fields:
    np.testing.assert_array_equal(np.asarray(getattr(out['targets'], key)),
                                  np.asarray(getattr(expected, key)), key)
  # The crowd box's Gaussian is in the heatmap target exactly when it counts as an object, so
  # the comparison above tells the two settings apart.
  differs = not np.array_equal(np.asarray(expected.heatmap), np.asarray(without_crowd.heatmap))
  assert differs == as_objects
  # Mask slots: the crowd box's weight is 0 whatever the flag.
  weights = np.asarray(out['mask_weights'])
  slots = np.asarray(batch['gt_valid'] & batch['gt_mask_allowed'] & ~batch['gt_is_crowd'])
  assert weights.sum() == slots.sum()
