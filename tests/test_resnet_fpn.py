"""models/resnet.py and models/fpn.py: official parameter counts, shapes, BN state, jit, dtypes.

The official counts come from Model Garden (tf-models-official 2.20.0) built in the oracle venv
from experiment deep_mask_head_rcnn_resnetfpn_coco (backbone/decoder factories, 1024x1024 input,
FPN levels 2-6 with 256 filters): Keras trainable_weights -> our `params`, non_trainable_weights
-> our `batch_stats`.
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepmarc_jax.models.fpn import FPN
from deepmarc_jax.models.layers import count_params
from deepmarc_jax.models.resnet import ResNet

OFFICIAL_COUNTS = {  # (trainable, non-trainable)
    'resnet50': (23_508_032, 53_120),
    'resnet101': (42_500_160, 105_344),
    'fpn_on_resnet50': (3_937_024, 2_560),
}
TINY = 0.125  # width_multiplier for the compute tests
SIZE = 128


def _abstract_init(module, *inputs):
  return jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), *inputs)


def _counts(variables):
  return count_params(variables['params']), count_params(variables['batch_stats'])


@pytest.mark.parametrize('depth', [50, 101])
def test_backbone_param_counts_match_official(depth):
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  assert _counts(_abstract_init(ResNet(depth), images)) == OFFICIAL_COUNTS[f'resnet{depth}']


def test_fpn_param_counts_match_official():
  backbone = ResNet(50)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = _abstract_init(backbone, images)
  endpoints = jax.eval_shape(functools.partial(backbone.apply, train=False), variables, images)
  fpn_variables = _abstract_init(FPN(min_level=2, max_level=6, num_filters=256), endpoints)
  assert _counts(fpn_variables) == OFFICIAL_COUNTS['fpn_on_resnet50']
  # Names a checkpoint converter maps onto Model Garden's layer names.
  assert sorted(fpn_variables['params']) == sorted(
      [f'lateral_{l}' for l in range(2, 6)] + [f'post_hoc_{l}' for l in range(2, 6)]
      + ['coarser_6'] + [f'norm_{l}' for l in range(2, 7)])


@pytest.fixture(scope='module')
def tiny():
  """Tiny ResNet-50 + FPN(2..6, 32 filters) initialised on a [2, 128, 128, 3] batch."""
  backbone, fpn = ResNet(50, width_multiplier=TINY), FPN(num_filters=32)
  images = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3))
  k1, k2 = jax.random.split(jax.random.key(0))
  endpoints, bb_vars = backbone.init_with_output(k1, images, train=False)
  fpn_vars = fpn.init(k2, endpoints, train=False)
  return types.SimpleNamespace(backbone=backbone, fpn=fpn, images=images, bb_vars=bb_vars,
                               fpn_vars=fpn_vars, endpoints=endpoints)


def test_output_strides_and_shapes(tiny):
  assert {l: e.shape for l, e in tiny.endpoints.items()} == {
      l: (2, SIZE // 2**l, SIZE // 2**l, int(256 * TINY) * 2**(l - 2)) for l in range(2, 6)}
  feats = tiny.fpn.apply(tiny.fpn_vars, tiny.endpoints, train=False)
  assert {l: f.shape for l, f in feats.items()} == {
      l: (2, SIZE // 2**l, SIZE // 2**l, 32) for l in range(2, 7)}
  assert all(bool(jnp.isfinite(f).all()) for f in feats.values())


def test_initialisation_follows_model_garden(tiny):
  # Keras VarianceScaling(): fan_in truncated normal with std sqrt(1 / fan_in); conv biases zero.
  post_hoc = tiny.fpn_vars['params']['post_hoc_2']
  np.testing.assert_allclose(np.std(post_hoc['kernel']), np.sqrt(1 / (9 * 32)), rtol=0.1)
  assert not post_hoc['bias'].any()
  # No zero-init of the residual branch's last BN gamma.
  assert (tiny.bb_vars['params']['block_group_l2_0']['conv3']['BatchNorm_0']['scale'] == 1).all()


def _train_forward(tiny, params, batch_stats, images):
  """Backbone + FPN in train mode -> (levels, new batch_stats {'backbone', 'fpn'})."""
  endpoints, bb_state = tiny.backbone.apply(
      {'params': params['backbone'], 'batch_stats': batch_stats['backbone']}, images,
      train=True, mutable=['batch_stats'])
  feats, fpn_state = tiny.fpn.apply(
      {'params': params['fpn'], 'batch_stats': batch_stats['fpn']}, endpoints, train=True,
      mutable=['batch_stats'])
  return feats, {'backbone': bb_state['batch_stats'], 'fpn': fpn_state['batch_stats']}


def _split(tiny):
  params = {'backbone': tiny.bb_vars['params'], 'fpn': tiny.fpn_vars['params']}
  batch_stats = {'backbone': tiny.bb_vars['batch_stats'], 'fpn': tiny.fpn_vars['batch_stats']}
  return params, batch_stats


def test_train_mode_updates_batch_stats(tiny):
  params, batch_stats = _split(tiny)
  _, new_stats = _train_forward(tiny, params, batch_stats, tiny.images)
  assert jax.tree_util.tree_structure(new_stats) == jax.tree_util.tree_structure(batch_stats)
  changed = jax.tree_util.tree_map(lambda a, b: bool((a != b).any()), batch_stats, new_stats)
  assert all(jax.tree_util.tree_leaves(changed))


def test_jit_forward_backward(tiny):
  def loss_fn(params, batch_stats, images):
    feats, new_stats = _train_forward(tiny, params, batch_stats, images)
    return sum(jnp.mean(f**2) for f in feats.values()), new_stats

  params, batch_stats = _split(tiny)
  step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, _), grads = step(params, batch_stats, tiny.images)
  assert np.isfinite(float(loss))
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
  assert float(jnp.abs(grads['backbone']['stem']['Conv_0']['kernel']).sum()) > 0


def test_bfloat16_compute_keeps_float32_params(tiny):
  backbone = ResNet(50, width_multiplier=TINY, dtype=jnp.bfloat16)
  fpn = FPN(num_filters=32, dtype=jnp.bfloat16)
  endpoints = jax.jit(functools.partial(backbone.apply, train=False))(tiny.bb_vars, tiny.images)
  feats = jax.jit(functools.partial(fpn.apply, train=False))(tiny.fpn_vars, endpoints)
  assert {x.dtype for x in [*endpoints.values(), *feats.values()]} == {jnp.dtype(jnp.bfloat16)}
  for module, inputs in ((backbone, tiny.images), (fpn, endpoints)):
    variables = _abstract_init(module, inputs)
    assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
