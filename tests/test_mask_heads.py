"""Mask heads: parameter counts against the official code, shapes, class gather, BN modes, grads.

Counts use C_in = 256 and nc = num_filters = 64, as in official-oracle.md 2b/2c; the big heads are
only traced (jax.eval_shape), real forward/backward passes use small heads on small inputs.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepmarc_jax.models.catalogue import MASK_HEADS
from deepmarc_jax.models.hourglass import Hourglass
from deepmarc_jax.models.layers import BatchNorm, NormConfig, count_params
from deepmarc_jax.models.mask_heads import MaskHead

C_IN, NC = 256, 64
KEY = jax.random.key(0)


# (trainable params, batch_stats) of building blocks.
def _sum(*counts):
  return tuple(map(sum, zip(*counts)))


def _times(k, counts):
  return tuple(k * n for n in counts)


def _bn(c):
  return (2 * c, 2 * c)


def _conv_bn(c_in, c_out, k):
  return _sum((k * k * c_in * c_out, 0), _bn(c_out))


def _identity_residual_block(c):
  """hourglass_network.ResidualBlock without a skip conv: 2 x conv3x3-BN."""
  return _times(2, _conv_bn(c, c, 3))


def _preact_block(c_in, c_out, conv_shortcut):
  """resnet_v1.block_basic: preact BN, optional 1x1 conv shortcut with bias, 2 x conv3x3-BN."""
  shortcut = (c_in * c_out + c_out, 0) if conv_shortcut else (0, 0)
  return _sum(_bn(c_in), shortcut, _conv_bn(c_in, c_out, 3), _conv_bn(c_out, c_out, 3))


def _resnet_net(stages):
  counts, c_in = [(C_IN * NC + NC, 0)], NC  # input_layer: 1x1 conv with bias
  for num_blocks, multiplier in stages:
    c_out = NC * multiplier
    counts += [_preact_block(c_in, c_out, True)]
    counts += [_times(num_blocks - 1, _preact_block(c_out, c_out, False))]
    c_in = c_out
  return _sum(*counts), c_in


def _head_tail(c_convnet):
  """Deconv 2x2 (bias) + BN + 1x1 logits conv (bias) of a class-agnostic DeepMaskHead."""
  return _sum((4 * c_convnet * NC + NC, 0), _bn(NC), (NC + 1, 0))


# official-oracle.md 2c: hourglass_N(64, initial_downsample=False) at C_in 256.
_HG20 = (5_649_152, 8_960)
HOURGLASS_NETS = {
    'hourglass10': (1_723_776, 3_456),
    'hourglass20': _HG20,
    'hourglass32': (10_558_592, 15_488),
    'hourglass52': (23_573_120, 29_312),
    'hourglass100': (47_339_648, 55_424),
    # No stride 2, so stage 0's single-block encoder_block2 loses its 1x1 conv skip (stage 1's
    # first block keeps it: 128 -> 192 channels).
    'hourglass20_uniform_size': _sum(_HG20, _times(-1, _conv_bn(2 * NC, 2 * NC, 1))),
    # No encoder_block1: stage 0 has 1 block, stage 1 has 2, all 128 -> 128 with identity skips.
    'hourglass20_no_shortcut': _sum(_HG20, _times(-3, _identity_residual_block(2 * NC))),
}
# official-oracle.md 2b: DeepMaskHead(num_filters=64, class_agnostic=True), C_in 256, crop 32.
OFFICIAL_HEADS = {
    'default': (275_457, 640),
    'hourglass20': (5_682_177, 9_088),
    'hourglass52': (23_606_145, 29_440),
    'hourglass100': (47_372_673, 55_552),
}


def _expected_head_counts(name):
  if name in OFFICIAL_HEADS:
    return OFFICIAL_HEADS[name]
  if name in HOURGLASS_NETS:
    return _sum(HOURGLASS_NETS[name], _head_tail(2 * NC))
  net, c_out = _resnet_net(MASK_HEADS[name].stages)
  return _sum(net, _head_tail(c_out))


def _abstract_variables(module, *inputs):
  return jax.eval_shape(functools.partial(module.init, train=False), KEY, *inputs)


def _init(module, *inputs):
  return jax.jit(functools.partial(module.init, train=False))(KEY, *inputs)


def _counts(variables):
  return count_params(variables['params']), count_params(variables['batch_stats'])


def test_oracle_numbers_are_consistent():
  """The 2c hourglass counts plus the head tail give the 2b head counts; 2c totals hold."""
  for name in ('hourglass20', 'hourglass52', 'hourglass100'):
    assert _sum(HOURGLASS_NETS[name], _head_tail(2 * NC)) == OFFICIAL_HEADS[name]
  assert sum(HOURGLASS_NETS['hourglass52']) == 23_602_432
  # Built once with the oracle venv's hourglass_network.py (C_in 256).
  assert sum(HOURGLASS_NETS['hourglass20_uniform_size']) == 5_641_216
  assert sum(HOURGLASS_NETS['hourglass20_no_shortcut']) == 4_770_304
  conv_stack = _sum(_conv_bn(C_IN, NC, 3), _times(3, _conv_bn(NC, NC, 3)), (4 * NC, 0))  # + biases
  assert _sum(conv_stack, _head_tail(NC)) == OFFICIAL_HEADS['default']


@pytest.mark.parametrize('name', sorted(HOURGLASS_NETS))
def test_hourglass_network_param_counts(name):
  variables = _abstract_variables(Hourglass(MASK_HEADS[name], NC), jnp.zeros((1, 32, 32, C_IN)))
  assert _counts(variables) == HOURGLASS_NETS[name]


@pytest.mark.parametrize('name', sorted(MASK_HEADS))
def test_mask_head_param_counts_and_output_shape(name):
  init = functools.partial(MaskHead(name).init_with_output, train=False)
  logits, variables = jax.eval_shape(init, KEY, jnp.zeros((3, 32, 32, C_IN)), None)
  assert _counts(variables) == _expected_head_counts(name)
  assert (logits.shape, logits.dtype) == ((3, 64, 64), jnp.float32)


@pytest.mark.parametrize('name', ['default', 'resnet8', 'hourglass20'])
def test_class_specific_bfloat16_head_returns_float32_logits(name):
  head = MaskHead(name, class_agnostic=False, num_classes=5, dtype=jnp.bfloat16)
  init = functools.partial(head.init_with_output, train=False)
  logits, variables = jax.eval_shape(init, KEY, jnp.zeros((3, 16, 16, C_IN), jnp.bfloat16),
                                     jnp.zeros((3,), jnp.int32))
  assert (logits.shape, logits.dtype) == ((3, 32, 32), jnp.float32)
  assert variables['params']['logits']['kernel'].shape[-1] == 5
  assert {x.dtype for x in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_class_specific_head_gathers_the_roi_class_channel():
  head = MaskHead('default', num_filters=8, class_agnostic=False, num_classes=7)
  features = jax.random.normal(KEY, (3, 8, 8, 4))
  classes = jnp.array([6, 0, 3])
  apply = jax.jit(functools.partial(
      head.apply, train=False, capture_intermediates=lambda module, _: module.name == 'logits'))
  logits, state = apply(_init(head, features, classes), features, classes)
  all_logits = state['intermediates']['logits']['__call__'][0]
  assert all_logits.shape == (3, 16, 16, 7)
  np.testing.assert_array_equal(logits, all_logits[np.arange(3), :, :, classes])


def test_class_specific_head_needs_classes_and_names_are_checked():
  features = jnp.zeros((1, 8, 8, 4))
  with pytest.raises(ValueError, match='roi_classes'):
    _abstract_variables(MaskHead('default', class_agnostic=False), features, None)
  with pytest.raises(ValueError, match='unknown mask head'):
    _abstract_variables(MaskHead('hourglass53'), features, None)


def test_train_step_updates_batch_stats_with_keras_momentum_and_reaches_the_input():
  head = MaskHead('hourglass10', num_filters=8)
  features = jax.random.normal(KEY, (2, 8, 8, 4)) + 1.0
  variables = _init(head, features, None)

  def loss(params, x):
    logits, state = head.apply(
        {**variables, 'params': params}, x, None, train=True, mutable=['batch_stats'],
        capture_intermediates=lambda module, _: module.name == 'deconv')
    return jnp.mean(jax.nn.sigmoid(logits) * jnp.arange(16.0)), (logits, state)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (param_grads, input_grads), (logits, state) = grad(variables['params'], features)
  assert logits.shape == (2, 16, 16)
  assert np.all(np.isfinite(input_grads)) and np.abs(input_grads).max() > 0
  for path, g in jax.tree_util.tree_leaves_with_path(param_grads):
    if path[-1].key == 'kernel':  # biases/betas under a BN can have exactly zero gradients
      assert np.abs(g).max() > 0, jax.tree_util.keystr(path)

  old, new = variables['batch_stats'], state['batch_stats']
  for before, after in zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)):
    assert not np.allclose(before, after)
  # Head BN: Model Garden norm_activation momentum 0.99, so 1% of the batch mean from zero.
  deconv_out = state['intermediates']['deconv']['__call__'][0]
  np.testing.assert_allclose(new['deconv_bn']['mean'], 0.01 * deconv_out.mean((0, 1, 2)),
                             rtol=1e-5, atol=1e-7)
  # Hourglass BN: Keras momentum 0.1, so 90% of the batch mean.
  conv = variables['params']['convnet']['conv_input_conv_block']['Conv_0']['kernel']
  batch_mean = jax.lax.conv_general_dilated(
      features, conv, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')).mean((0, 1, 2))
  np.testing.assert_allclose(
      new['convnet']['conv_input_conv_block']['BatchNorm_0']['mean'], 0.9 * batch_mean,
      rtol=1e-4, atol=1e-6)


def _batchnorm_settings(head):
  """(min_count, momentum, epsilon) of each BatchNorm the head calls, in call order (traced)."""
  settings = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, BatchNorm) and context.method_name == '__call__':
      module = context.module
      settings.append((module.min_count, module.momentum, module.epsilon))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(head.init, train=True), KEY, jnp.zeros((2, 8, 8, 4)), None)
  return settings


@pytest.mark.parametrize('name', ['default', 'resnet4', 'hourglass10'])
def test_bn_min_count_reaches_every_batchnorm_of_the_head(name):
  """The head's floor (layers.BatchNorm min_count) also sets the convnet's BatchNorms, which keep
  their reference momentum and epsilon. (The floor's numbers: tests/test_layers.py.)"""
  floored = _batchnorm_settings(MaskHead(name, num_filters=8, norm=NormConfig(min_count=64.0)))
  plain = _batchnorm_settings(MaskHead(name, num_filters=8))
  assert len(floored) == len(plain) > 1
  assert {count for count, _, _ in floored} == {64.0}
  assert [rest for _, *rest in floored] == [rest for _, *rest in plain]


@pytest.mark.parametrize('name', ['default', 'resnet4', 'hourglass10'])
def test_hourglass_bn_momentum_sets_the_hourglass_batchnorms_only(name):
  """It replaces the reference's 0.1 in every BatchNorm of an hourglass convnet; the head's own
  deconv BatchNorm and the other heads keep their momentum."""
  changed = _batchnorm_settings(MaskHead(name, num_filters=8, hourglass_bn_momentum=0.9))
  plain = _batchnorm_settings(MaskHead(name, num_filters=8))
  assert len(changed) == len(plain) > 1
  if name != 'hourglass10':
    assert changed == plain
    return
  # Every convnet BatchNorm, then the deconv's (the head's norm, momentum 0.99).
  assert [m for _, m, _ in plain] == [0.1] * (len(plain) - 1) + [0.99]
  assert [m for _, m, _ in changed] == [0.9] * (len(plain) - 1) + [0.99]
  assert [(c, e) for c, _, e in changed] == [(c, e) for c, _, e in plain]


def test_hourglass_bn_momentum_weights_the_moving_average():
  """Keras semantics, worked by hand: one step from a zero mean leaves (1 - momentum) of the
  batch mean."""
  features = jax.random.normal(KEY, (2, 8, 8, 4)) + 1.0
  head = MaskHead('hourglass10', num_filters=8, hourglass_bn_momentum=0.9)
  variables = _init(head, features, None)
  _, state = head.apply(variables, features, None, train=True, mutable=['batch_stats'])
  conv = variables['params']['convnet']['conv_input_conv_block']['Conv_0']['kernel']
  batch_mean = jax.lax.conv_general_dilated(
      features, conv, (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC')).mean((0, 1, 2))
  np.testing.assert_allclose(
      state['batch_stats']['convnet']['conv_input_conv_block']['BatchNorm_0']['mean'],
      0.1 * batch_mean, rtol=1e-4, atol=1e-6)


def test_eval_mode_leaves_batch_stats_alone():
  head = MaskHead('resnet4', num_filters=8)
  features = jax.random.normal(KEY, (2, 8, 8, 4))
  variables = _init(head, features, None)
  apply = jax.jit(functools.partial(head.apply, train=False, mutable=['batch_stats']))
  logits, state = apply(variables, features, None)
  assert logits.shape == (2, 16, 16) and np.all(np.isfinite(logits))
  jax.tree_util.tree_map(np.testing.assert_array_equal, state['batch_stats'],
                         variables['batch_stats'])


def test_hourglass_needs_crop_divisible_by_its_downsampling():
  head = MaskHead('hourglass20', num_filters=8)  # two stride-2 stages: multiples of 4
  with pytest.raises(TypeError, match='incompatible shapes'):
    _abstract_variables(head, jnp.zeros((1, 14, 14, 4)), None)
  variables = _abstract_variables(MaskHead('hourglass20_uniform_size', num_filters=8),
                                  jnp.zeros((1, 14, 14, 4)), None)
  assert variables['params']
