"""Mask R-CNN assembly: official parameter counts, training forward, padding invariance,
both crop modes and both inference paths, on a tiny model."""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepmarc_jax.models import layers
from deepmarc_jax.models import mask_rcnn
from tests.conftest import REPO
from tests.tiny import batch as _batch
from tests.tiny import config as _tiny_config

sys.path.insert(0, str(REPO / 'experiments'))
import deepmarc_spinenet  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope='module')
def tiny():
  config = _tiny_config()
  model = mask_rcnn.MaskRCNN.from_config(config)
  variables = jax.jit(lambda b: model.init({'params': jax.random.key(0),
                                            'sampling': jax.random.key(1)}, b, train=True))(
                                                _batch())
  return config, model, variables


def _loss_and_grads(model, config, variables, batch, key=2):
  def loss_fn(params):
    outputs, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, batch,
                             train=True, rngs={'sampling': jax.random.key(key)},
                             mutable=['batch_stats'])
    return mask_rcnn.loss(outputs, config.model)
  (loss, parts), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables['params'])
  return loss, parts, grads


def _part_counts(config) -> dict[str, tuple[int, int]]:
  """{top-level module: (params, batch_stats)} of the full-size model at 256 px (eval_shape)."""
  model = mask_rcnn.MaskRCNN.from_config(config)
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(size=256))
  batch['gt_masks'] = jnp.zeros((2, 8, 112, 112))
  shapes = jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'sampling': jax.random.key(1),
       'dropout': jax.random.key(2)}, batch, train=True))
  return {name: (layers.count_params(shapes['params'][name]),
                 layers.count_params(shapes['batch_stats'].get(name, {})))
          for name in shapes['params']}


def test_full_size_head_parameter_counts_match_the_official_model():
  """R50-FPN Mask R-CNN with the HG-52 head: counts of each part equal Model Garden's."""
  config = deepmarc_spinenet.get_config()
  config.model.backbone.type = 'resnet50'
  config.model.min_level, config.model.max_level = 2, 6
  config.model.anchor.update(num_scales=1, anchor_size=8.0)
  config.data.image_size = 256
  counts = _part_counts(config)
  assert counts['backbone'] == (23_508_032, 53_120)
  assert counts['decoder'] == (3_937_024, 2_560)
  assert counts['rpn_head'] == (596_495, 2_560)
  assert counts['detection_head'] == (15_676_871, 4_096)
  assert counts['mask_head'] == (23_606_145, 29_440)


def test_training_forward_gives_finite_losses_and_gradients(tiny):
  config, model, variables = tiny
  loss, parts, grads = _loss_and_grads(model, config, variables, _batch())
  assert np.isfinite(loss) and all(np.isfinite(v) for v in parts.values())
  assert parts['mask_loss'] > 0 and parts['rpn_score_loss'] > 0 and parts['class_loss'] > 0
  norms = {k: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree_util.tree_leaves(v))))
           for k, v in grads.items()}
  assert all(n > 0 for n in norms.values()), norms


def test_padding_mask_slots_changes_neither_loss_nor_gradients(tiny):
  """3 mask-allowed instances in 4 or in 8 mask-head slots: same loss, same gradients.

  (The official head runs on all padded GT slots and their padding enters BatchNorm.)
  """
  config, model, variables = tiny
  batch = _batch(num_instances=3)
  batch['gt_mask_allowed'][:] = batch['gt_valid']
  loss_a, parts_a, grads_a = _loss_and_grads(model, config, variables, batch)
  padded_model = mask_rcnn.MaskRCNN.from_config(_tiny_config(max_train_instances=8))
  loss_b, parts_b, grads_b = _loss_and_grads(padded_model, config, variables, batch)
  np.testing.assert_allclose(parts_a['mask_loss'], parts_b['mask_loss'], rtol=1e-5)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  # Equal up to float summation order (the slot count changes reduction shapes).
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-3, atol=max(1e-5 * float(np.abs(b).max()), 1e-7)), grads_a, grads_b)


def test_mask_loss_only_counts_mask_allowed_instances(tiny):
  config, model, variables = tiny
  batch = _batch()
  batch['gt_mask_allowed'][:] = False
  _, parts, grads = _loss_and_grads(model, config, variables, batch)
  assert parts['mask_loss'] == 0
  mask_grads = jax.tree_util.tree_leaves(grads['mask_head'])
  assert all(float(jnp.abs(g).max()) == 0 for g in mask_grads)


def test_proposal_crops_train_on_foreground_rois(tiny):
  _, _, variables = tiny
  config = _tiny_config(train_crops='proposals')
  model = mask_rcnn.MaskRCNN.from_config(config)
  loss, parts, _ = _loss_and_grads(model, config, variables, _batch())
  assert np.isfinite(loss) and parts['mask_loss'] > 0


def test_gt_box_jitter_moves_the_crops_and_their_targets_with_them(tiny):
  """gt_box_jitter: the same instances as without it, in jittered boxes inside the image, with
  targets resampled from each instance's mask into its jittered box."""
  from deepmarc_jax.ops import roi_align  # pylint: disable=g-import-not-at-top
  _, _, variables = tiny
  batch = jax.tree_util.tree_map(jnp.asarray, _batch(num_instances=6))
  gt_valid = batch['gt_valid'] & ~batch['gt_is_crowd']
  image_hw = jnp.array([[100.0, 128.0], [100.0, 128.0]])  # tiny batches' image_info
  key = jax.random.key(5)

  def inputs(jitter):
    model = mask_rcnn.MaskRCNN.from_config(_tiny_config(gt_box_jitter=jitter))
    return model.apply(variables, batch, None, gt_valid, key, image_hw,
                       method=mask_rcnn.MaskRCNN._mask_training_inputs)

  tight_boxes, tight, tight_weights = inputs(0.0)
  boxes, targets, weights = inputs(0.6)
  np.testing.assert_array_equal(targets['gt_index'], tight['gt_index'])  # same subset
  np.testing.assert_array_equal(weights, tight_weights)
  index = np.asarray(targets['gt_index'])
  gt_boxes = np.take_along_axis(np.asarray(batch['gt_boxes']), index[..., None], axis=1)
  np.testing.assert_allclose(tight_boxes, gt_boxes)
  boxes = np.asarray(boxes)
  size = np.concatenate([gt_boxes[..., 2:] - gt_boxes[..., :2]] * 2, -1)
  moved = np.abs(boxes - gt_boxes) / size
  real = np.asarray(weights) > 0
  assert moved[real].max() <= 0.3 + 1e-5 and np.median(moved[real]) > 0.02
  assert boxes.min() >= 0 and np.all(boxes[..., 2] <= 100) and np.all(boxes[..., 3] <= 128)
  gt_masks = np.take_along_axis(np.asarray(batch['gt_masks']), index[..., None, None], axis=1)
  expected = jax.vmap(roi_align.crop_mask_targets, in_axes=(0, 0, 0, None))(
      jnp.asarray(gt_masks, jnp.float32), jnp.asarray(gt_boxes), jnp.asarray(boxes),
      targets['masks'].shape[-1])
  np.testing.assert_allclose(targets['masks'], expected, atol=1e-6)
  assert not np.allclose(targets['masks'], tight['masks'])


def test_mask_head_bn_min_count_reaches_the_mask_head_only():
  """config.model.mask_head.bn_min_count sets the floor of every mask-head BatchNorm and of no
  other (traced, not run)."""
  config = _tiny_config()
  config.model.mask_head.bn_min_count = 64.0
  model = mask_rcnn.MaskRCNN.from_config(config)
  floors = {}

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, layers.BatchNorm) and context.method_name == '__call__':
      in_mask_head = context.module.path[0] == 'mask_head'
      floors.setdefault(in_mask_head, set()).add(context.module.min_count)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda b: model.init({'params': jax.random.key(0),
                                         'sampling': jax.random.key(1)}, b, train=True),
                   _batch())
  assert floors == {True: {64.0}, False: {0.0}}


def test_detect_and_segment_boxes_have_static_shapes(tiny):
  config, model, variables = tiny
  images = _batch()['image']
  dets = jax.jit(lambda v, x: model.apply(v, x, method=mask_rcnn.MaskRCNN.detect))(
      variables, images)
  assert dets['boxes'].shape == (2, 10, 4) and dets['masks'].shape == (2, 10, 16, 16)
  assert dets['classes'].dtype == jnp.int32
  assert float(dets['masks'].min()) >= 0 and float(dets['masks'].max()) <= 1
  boxes = jnp.array([[[10.0, 10.0, 50.0, 60.0], [0.0, 0.0, 128.0, 128.0]]] * 2)
  masks = jax.jit(lambda v, x, b: model.apply(v, x, b, method=mask_rcnn.MaskRCNN.segment_boxes))(
      variables, images, boxes)
  assert masks.shape == (2, 2, 16, 16)


def test_bfloat16_compute_keeps_float32_params_and_gives_nearly_the_float32_loss(tiny):
  """compute_dtype='bfloat16' (what accelerators run): same variables, f32 grads, loss parts
  within bf16 rounding of the f32 ones (same params, batch and sampling key)."""
  config, model, variables = tiny
  bf16_config = _tiny_config()
  bf16_config.model.compute_dtype = 'bfloat16'
  bf16_model = mask_rcnn.MaskRCNN.from_config(bf16_config)
  loss32, parts32, _ = _loss_and_grads(model, config, variables, _batch())
  loss16, parts16, grads16 = _loss_and_grads(bf16_model, bf16_config, variables, _batch())
  assert {g.dtype for g in jax.tree.leaves(grads16)} == {jnp.dtype(jnp.float32)}
  assert np.isfinite(float(loss16))
  for name in ('class_loss', 'mask_loss', 'rpn_score_loss', 'loss'):
    np.testing.assert_allclose(float(parts16[name]), float(parts32[name]), rtol=0.05,
                               err_msg=name)


def test_spinenet49_hourglass52_model_matches_the_official_parameter_counts():
  """The oracle's whole DeepMaskRCNNModel (SpineNet-49, identity decoder, 3 anchors per
  location, HG-52 head): every part and the total (61,835,799) equal Model Garden's."""
  config = deepmarc_spinenet.get_config()
  config.model.backbone.type = 'spinenet49'
  config.model.anchor.update(num_scales=1, anchor_size=3.0)
  config.data.image_size = 256
  counts = _part_counts(config)
  assert set(counts) == {'backbone', 'rpn_head', 'detection_head', 'mask_head'}  # no decoder
  assert counts['backbone'] == (21_831_488, 88_704)
  assert counts['rpn_head'] == (596_495, 2_560)
  assert counts['detection_head'] == (15_676_871, 4_096)
  assert counts['mask_head'] == (23_606_145, 29_440)
  assert sum(sum(c) for c in counts.values()) == 61_835_799


def test_narrow_spinenet_model_trains_and_detects():
  """A narrow SpineNet-49S Mask R-CNN with stochastic depth: finite losses and gradients for
  every part, a 'dropout'-dependent training forward, and static-shape detections."""
  config = _tiny_config()
  config.model.backbone.update(type='spinenet49s', stochastic_depth=0.2)
  config.model.width_multiplier = 0.25
  config.model.min_level, config.model.max_level = 3, 7
  model = mask_rcnn.MaskRCNN.from_config(config)
  batch = _batch()
  keys = {'params': jax.random.key(0), 'sampling': jax.random.key(1),
          'dropout': jax.random.key(2)}
  variables = jax.jit(lambda b: model.init(keys, b, train=True))(batch)
  assert variables['params']['backbone']['endpoint_3']['Conv_0']['kernel'].shape[-1] == 32

  @jax.jit
  def loss_and_grads(params, dropout_key):
    def loss_fn(p):
      outputs, _ = model.apply({'params': p, 'batch_stats': variables['batch_stats']}, batch,
                               train=True, mutable=['batch_stats'],
                               rngs={'sampling': jax.random.key(3), 'dropout': dropout_key})
      return mask_rcnn.loss(outputs, config.model)[0]
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = loss_and_grads(variables['params'], jax.random.key(4))
  other_loss, _ = loss_and_grads(variables['params'], jax.random.key(5))
  assert np.isfinite(loss) and loss != other_loss  # stochastic depth draws from 'dropout'
  for part, tree in grads.items():
    assert float(optax.global_norm(tree)) > 0, part
  dets = jax.jit(lambda v, x: model.apply(v, x, method=mask_rcnn.MaskRCNN.detect))(
      variables, batch['image'])
  assert dets['boxes'].shape == (2, 10, 4) and dets['masks'].shape == (2, 10, 16, 16)
