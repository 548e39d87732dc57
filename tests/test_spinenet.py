"""models/spinenet.py: official parameter counts, graph, endpoint shapes, stochastic depth, names.

The official numbers come from Model Garden (tf-models-official 2.20) SpineNet built in the oracle
venv with SCALING_MAP[id], min_level 3, max_level 7 (shared/reference/official-oracle.md 2a):
Keras trainable_weights -> our `params`, non_trainable_weights (BN moving mean/var) -> our
`batch_stats`. Counts use `jax.eval_shape` of `init`, so no full-size array is allocated.
"""
from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepmarc_jax.models import catalogue
from deepmarc_jax.models import layers
from deepmarc_jax.models import spinenet
from deepmarc_jax.models.layers import count_params
from deepmarc_jax.tools import convert_tf_checkpoint

OFFICIAL_COUNTS = {  # (trainable, non-trainable)
    'spinenet49s': (9_089_215, 57_136),
    'spinenet49': (21_831_488, 88_704),
    'spinenet96': (36_262_976, 122_752),
    'spinenet143': (60_247_616, 166_272),
    'spinenet143l': (100_796_257, 214_836),
    'spinenet190': (126_587_664, 261_552),
}
# Totals (BN stats included) of stem / scale-permuted blocks / resampling / endpoints.
OFFICIAL_PARTS = {
    'spinenet49s': (75_838, 6_036_603, 2_648_886, 385_024),
    'spinenet49': (157_120, 14_323_200, 6_255_104, 1_184_768),
    'spinenet96': (299_456, 28_646_400, 6_255_104, 1_184_768),
    'spinenet143': (441_792, 42_969_600, 15_817_728, 1_184_768),
    'spinenet143l': (724_626, 72_194_811, 26_556_680, 1_534_976),
    'spinenet190': (962_836, 96_259_748, 26_556_680, 3_069_952),
}
PART_PREFIXES = ('stem', 'block_', 'resample_', 'endpoint_')
TINY = catalogue.SpineNetSpec(endpoints_num_filters=16, filter_size_scale=0.125,
                              resample_alpha=0.5, block_repeats=1)
SIZE = 128  # the smallest valid input: level 7 is 1x1
ABSTRACT_IMAGES = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)


def _abstract_init(module, images=ABSTRACT_IMAGES):
  return jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), images)


@pytest.mark.parametrize('name', sorted(OFFICIAL_COUNTS))
def test_param_counts_match_official(name):
  variables = _abstract_init(spinenet.spinenet_from_name(name))
  assert (count_params(variables['params']),
          count_params(variables['batch_stats'])) == OFFICIAL_COUNTS[name]
  parts = tuple(
      sum(count_params(variables[c][k]) for c in ('params', 'batch_stats')
          for k in variables[c] if k.startswith(prefix))
      for prefix in PART_PREFIXES)
  assert parts == OFFICIAL_PARTS[name]


def test_graph_absorbs_the_unused_block_and_drops_block_16():
  nodes = spinenet.build_graph(1.0)
  # Node j = block j - 1. Block 13 (level 5 output) also sums block 10, which nothing consumes.
  assert [(j, n.parents) for j, n in enumerate(nodes) if len(n.parents) > 2] == [(14, (7, 12, 11))]
  outputs = spinenet.output_nodes(3, 7)
  assert outputs == {3: 13, 4: 12, 5: 14, 6: 16, 7: 15}
  assert spinenet.built_nodes(nodes, outputs) == frozenset(range(17))  # node 17 = block 16
  names = set(_abstract_init(spinenet.spinenet_from_name('spinenet49'))['params'])
  assert names == ({'stem', 'stem_block_1_0', 'stem_block_2_0'}
                   | {f'block_{i}_0' for i in range(1, 16)}
                   | {f'resample_{i}_{k}' for i in range(1, 16) for k in (0, 1)}
                   | {f'endpoint_{l}' for l in range(3, 8)})
  # With a level-2 endpoint the last block is built, as in Keras.
  variables = _abstract_init(spinenet.SpineNet(TINY, min_level=2))
  assert {'block_16_0', 'resample_16_0', 'resample_16_1', 'endpoint_2'} <= set(
      variables['params'])


def test_keras_names_cover_every_conv_bn():
  spec = catalogue.SPINENETS['spinenet49']
  mapping = convert_tf_checkpoint.spinenet_keras_names(spec)
  params = _abstract_init(spinenet.SpineNet(spec))['params']
  paths = set()

  def walk(tree, prefix):
    if 'Conv_0' in tree:
      paths.add(prefix)
    for k, v in tree.items():
      if k not in ('Conv_0', 'BatchNorm_0'):
        walk(v, f'{prefix}/{k}' if prefix else k)

  walk(params, '')
  assert set(mapping) == paths
  assert len(set(mapping.values())) == len(mapping)
  # Spot checks against the oracle's SpineNet-49 variable names (fresh Keras session).
  assert mapping['stem'] == ('conv2d', 'batch_normalization')
  assert mapping['stem_block_1_0/shortcut'] == ('bottleneck_block/conv2d',
                                                'bottleneck_block/batch_normalization')
  assert mapping['stem_block_2_0/conv1'] == ('bottleneck_block_1/conv2d',
                                             'bottleneck_block_1/batch_normalization')
  assert mapping['resample_1_0/conv_in'][0] == 'conv2d_1'
  assert mapping['resample_1_1/conv_out'][0] == 'conv2d_4'
  assert mapping['resample_2_0/downsample'][0] == 'conv2d_6'
  assert mapping['resample_2_1/conv_out'] == ('conv2d_10', 'batch_normalization_10')
  assert mapping['block_2_0/conv2'][0] == 'residual_block/conv2d_1'
  assert mapping['block_3_0/conv3'][0] == 'bottleneck_block_3/conv2d_2'
  assert [mapping[f'endpoint_{l}'][0] for l in range(3, 8)] == [
      f'conv2d_{n}' for n in range(81, 86)]  # conv2d_77..80: block 16's dropped resamplings


def _fill(path, leaf, rng):
  """Keras-like values for one variable: kernels ~ N(0, 1/fan_in), BN gamma/var 1, beta/mean 0."""
  name = path[-1].key
  if name == 'kernel':
    return jnp.asarray(rng.normal(0, np.sqrt(1 / np.prod(leaf.shape[:-1])), leaf.shape),
                       leaf.dtype)
  return (jnp.ones if name in ('scale', 'var') else jnp.zeros)(leaf.shape, leaf.dtype)


@pytest.fixture(scope='module')
def tiny():
  """Narrow SpineNet with variables for a [2, 128, 128, 3] batch (batch 2: per-example drops).

  The variables are drawn with numpy on `init`'s abstract shapes: a real `init` spends ~30 s on
  this CPU compiling one truncated-normal sampler per kernel shape (its initialisers are checked
  on a single block below).
  """
  model = spinenet.SpineNet(TINY, stochastic_depth=0.5)
  images = jax.random.normal(jax.random.key(1), (2, SIZE, SIZE, 3))
  rng = np.random.default_rng(0)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _fill(path, leaf, rng),
      _abstract_init(model, jax.ShapeDtypeStruct(images.shape, images.dtype)))
  # One compiled program per mode (eager dispatch would compile every op shape separately).
  evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
  train = jax.jit(lambda v, x, key: model.apply(v, x, train=True, mutable=['batch_stats'],
                                                rngs={'dropout': key}))
  return types.SimpleNamespace(model=model, images=images, variables=variables,
                               evaluate=evaluate, train=train)


def test_endpoint_shapes_and_bn_paths(tiny):
  outputs = tiny.evaluate(tiny.variables, tiny.images)  # no 'dropout' rng in evaluation
  assert {l: o.shape for l, o in outputs.items()} == {
      l: (2, SIZE // 2**l, SIZE // 2**l, 16) for l in range(3, 8)}
  assert all(bool(jnp.isfinite(o).all()) for o in outputs.values())
  train_out, updates = tiny.train(tiny.variables, tiny.images, jax.random.key(2))
  assert {l: o.shape for l, o in train_out.items()} == {l: o.shape for l, o in outputs.items()}
  assert all(bool(jnp.isfinite(o).all()) for o in train_out.values())
  # Training moves the running statistics (momentum 0.99 towards the batch's).
  old = tiny.variables['batch_stats']['endpoint_3']['BatchNorm_0']['mean']
  new = updates['batch_stats']['endpoint_3']['BatchNorm_0']['mean']
  assert not np.allclose(old, new)


def test_initialisation_follows_model_garden():
  # Keras VarianceScaling(): fan_in truncated normal (std sqrt(1 / fan_in), cut at 2 sigma of the
  # underlying normal); BN gamma 1, beta 0, moving mean 0, var 1.
  block = spinenet.ResidualBlock(32, use_projection=True)
  variables = block.init(jax.random.key(0), jnp.zeros((1, 8, 8, 16)), train=False)
  kernel = variables['params']['conv2']['Conv_0']['kernel']  # 3x3, 32 -> 32
  fan_in = 3 * 3 * kernel.shape[2]
  assert float(jnp.std(kernel)) == pytest.approx(np.sqrt(1 / fan_in), rel=0.1)
  assert float(jnp.abs(kernel).max()) <= 2 * np.sqrt(1 / fan_in) / 0.87962566 + 1e-6
  assert set(variables['params']) == {'shortcut', 'conv1', 'conv2'}
  bn, stats = variables['params']['shortcut']['BatchNorm_0'], variables['batch_stats']['conv1']
  assert bool((bn['scale'] == 1).all()) and bool((bn['bias'] == 0).all())
  assert bool((stats['BatchNorm_0']['mean'] == 0).all())
  assert bool((stats['BatchNorm_0']['var'] == 1).all())


def test_stochastic_depth_rates():
  assert spinenet.stochastic_depth_rates(0.2) == pytest.approx(
      [0.0125, 0.025, 0.0375, 0.05, 0.0625, 0.075, 0.0875, 0.1,
       0.1125, 0.125, 0.1375, 0.15, 0.1625, 0.175, 0.1875, 0.2])
  assert spinenet.stochastic_depth_rates(0.0) == (0.0,) * 16
  with pytest.raises(ValueError, match='within'):
    spinenet.stochastic_depth_rates(1.5)


def test_stochastic_depth_layer_drops_whole_examples():
  x = jnp.ones((4000, 2, 2, 3))
  y = layers.StochasticDepth(0.25).apply({}, x, train=True,
                                           rngs={'dropout': jax.random.key(0)})
  per_example = np.asarray(y).reshape(4000, -1)
  assert (per_example == per_example[:, :1]).all()  # one decision per example
  np.testing.assert_allclose(np.unique(per_example), [0.0, 1 / 0.75], rtol=1e-6)
  assert per_example[:, 0].mean() == pytest.approx(1.0, abs=0.05)
  assert (layers.StochasticDepth(0.25).apply({}, x, train=False) == x).all()


def test_stochastic_depth_depends_on_the_dropout_rng_in_training(tiny):
  run = lambda key: tiny.train(tiny.variables, tiny.images, jax.random.key(key))[0][3]  # noqa: E731
  a, b, a2 = run(3), run(4), run(3)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, a2)
  # Evaluation runs without a 'dropout' rng (test_endpoint_shapes_and_bn_paths), so it cannot
  # depend on one; rate 0 in training needs none either (checked on one block, cheaply).
  block = layers.BottleneckBlock(4, use_projection=False, stochastic_depth=0.0)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  rng = np.random.default_rng(1)
  variables = jax.tree_util.tree_map_with_path(
      lambda path, leaf: _fill(path, leaf, rng),
      jax.eval_shape(functools.partial(block.init, train=False), jax.random.key(1), x))
  y, _ = block.apply(variables, x, train=True, mutable=['batch_stats'])
  y2, _ = block.apply(variables, x, train=True, mutable=['batch_stats'],
                      rngs={'dropout': jax.random.key(7)})
  np.testing.assert_array_equal(y, y2)
  with pytest.raises(Exception, match='dropout'):  # a positive rate does need the stream
    block.clone(stochastic_depth=0.5).apply(variables, x, train=True, mutable=['batch_stats'])


@pytest.mark.parametrize('shape', [(1, 100, 128, 3), (1, 64, 64, 3), (1, 256, 192, 3)])
def test_bad_input_size_raises(shape):
  with pytest.raises(ValueError, match='multiples of 2\\^7 = 128'):
    _abstract_init(spinenet.SpineNet(TINY), jax.ShapeDtypeStruct(shape, jnp.float32))


def test_bad_names_and_levels_raise():
  with pytest.raises(ValueError, match='unknown SpineNet'):
    spinenet.spinenet_from_name('spinenet50')
  with pytest.raises(ValueError, match='not implemented'):
    _abstract_init(spinenet.SpineNet(TINY, activation='gelu'))
  with pytest.raises(ValueError, match='no output block for levels \\[8\\]'):
    _abstract_init(spinenet.SpineNet(TINY, max_level=8),
                   jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32))
