"""The masked BatchNorm against numpy and against flax.linen.BatchNorm."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepmarc_jax.models import layers

X = np.random.default_rng(0).normal(size=(6, 3, 3, 4)).astype(np.float32) * 3 + 1


def _apply(module, x, mask=None, variables=None):
  variables = variables or module.init(jax.random.key(0), x, mask)
  return module.apply(variables, x, mask, mutable=['batch_stats']), variables


def test_equals_flax_batchnorm_without_mask():
  ours, _ = _apply(layers.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3), X)
  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  v = flax_bn.init(jax.random.key(0), X)
  theirs = flax_bn.apply(v, X, mutable=['batch_stats'])
  np.testing.assert_allclose(ours[0], theirs[0], atol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         ours[1], theirs[1])


def test_mask_limits_statistics_to_masked_in_examples():
  mask = np.array([True, True, False, True, False, False])
  (y, stats), _ = _apply(layers.BatchNorm(use_running_average=False, momentum=0.9,
                                          epsilon=1e-3), X, jnp.asarray(mask))
  sub = X[mask].reshape(-1, 4)
  expected = (X - sub.mean(0)) / np.sqrt(sub.var(0) + 1e-3)
  np.testing.assert_allclose(y[mask], expected[mask], atol=1e-4)
  np.testing.assert_allclose(stats['batch_stats']['mean'], 0.1 * sub.mean(0), atol=1e-5)
  np.testing.assert_allclose(stats['batch_stats']['var'], 0.9 + 0.1 * sub.var(0), atol=1e-5)


def test_all_masked_out_keeps_running_stats_and_stays_finite():
  module = layers.BatchNorm(use_running_average=False, momentum=0.9)
  mask = jnp.zeros([6], bool)
  (y, stats), v = _apply(module, X, mask)
  assert np.isfinite(np.asarray(y)).all()
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats['batch_stats'], v['batch_stats'])
