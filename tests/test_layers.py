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


def test_unmasked_statistics_equal_the_masked_path_with_every_example_in():
  """No mask and no floor take a shorter path (fewer kernels to compile); with every example
  masked in, the masked path must give the same outputs, statistics and gradients."""
  module = layers.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3)
  x = jnp.asarray(X)
  variables = module.init(jax.random.key(0), x)
  variables = {**variables, 'params': {'scale': jnp.arange(1.0, 5.0), 'bias': jnp.ones(4)}}

  def run(mask):
    def f(params, x):
      y, stats = module.apply({**variables, 'params': params}, x, mask,
                              mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y)), (y, stats)
    return jax.grad(f, argnums=(0, 1), has_aux=True)(variables['params'], x)

  (grads, (y, stats)), (grads_m, (y_m, stats_m)) = run(None), run(jnp.ones([6], bool))
  np.testing.assert_allclose(y, y_m, rtol=1e-6, atol=1e-6)
  for ours, masked in ((stats, stats_m), (grads, grads_m)):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           ours, masked)


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


def _stand_in_values(mean, var, n, rng):
  """n values per channel [n, C] whose mean and (biased) variance are exactly mean and var."""
  z = rng.normal(size=(n, mean.shape[0]))
  z = (z - z.mean(0)) / z.std(0)
  return mean + np.sqrt(var) * z


def test_min_count_pools_running_averages_for_the_shortfall():
  """Statistics on 27 values per channel with a floor of 40: as if 13 more values, with the
  running mean and variance, had joined the batch (reference: numpy on that pooled sample)."""
  rng = np.random.default_rng(1)
  mask = np.array([True, False, True, False, True, False])  # 3 examples x 3x3 = 27 values
  module = layers.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3,
                            min_count=40)
  variables = module.init(jax.random.key(0), X, jnp.asarray(mask))
  ra_mean, ra_var = np.array([0.5, -2.0, 4.0, 1.0]), np.array([2.0, 0.5, 9.0, 1.0])
  variables = {**variables, 'batch_stats': {'mean': jnp.asarray(ra_mean, jnp.float32),
                                            'var': jnp.asarray(ra_var, jnp.float32)}}
  (y, stats), _ = _apply(module, X, jnp.asarray(mask), variables)
  pooled = np.concatenate([X[mask].reshape(-1, 4), _stand_in_values(ra_mean, ra_var, 13, rng)])
  mean, var = pooled.mean(0), pooled.var(0)
  np.testing.assert_allclose(y[mask], ((X - mean) / np.sqrt(var + 1e-3))[mask], atol=1e-4)
  np.testing.assert_allclose(stats['batch_stats']['mean'], 0.9 * ra_mean + 0.1 * mean,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stats['batch_stats']['var'], 0.9 * ra_var + 0.1 * var, rtol=1e-5)
  # Masked-out examples (padding) still change nothing.
  padded = np.where(mask[:, None, None, None], X, 100.0 * rng.normal(size=X.shape))
  (y_padded, stats_padded), _ = _apply(module, padded.astype(np.float32), jnp.asarray(mask),
                                       variables)
  np.testing.assert_allclose(y_padded[mask], y[mask], rtol=1e-6, atol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                         stats_padded, stats)


def test_min_count_at_or_below_the_count_changes_nothing():
  """27 values per channel: floors 0 and 27 give bit-identical outputs, statistics and input
  gradients; 28 does not."""
  mask = jnp.asarray([True, False, True, False, True, False])

  def run(min_count):
    module = layers.BatchNorm(use_running_average=False, momentum=0.9, min_count=min_count)
    variables = module.init(jax.random.key(0), X, mask)

    def loss(x):
      y, stats = module.apply(variables, x, mask, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y) * mask[:, None, None, None]), (y, stats)

    return jax.grad(loss, has_aux=True)(jnp.asarray(X))

  grads0, (y0, stats0) = run(0.0)
  grads27, (y27, stats27) = run(27.0)
  np.testing.assert_array_equal(y0, y27)
  np.testing.assert_array_equal(grads0, grads27)
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats0, stats27)
  _, (y28, _) = run(28.0)
  assert not np.allclose(np.asarray(y0)[np.asarray(mask)], np.asarray(y28)[np.asarray(mask)])


def test_min_count_tames_the_gradient_of_two_examples_at_1x1():
  """Two values per channel (two instances at a 1x1 level): plain BatchNorm divides by their
  half-distance, so the input gradient grows as they approach; the floor bounds it."""
  x = jnp.asarray([[1.0], [1.0001]]).reshape(2, 1, 1, 1)

  def input_grad_norm(min_count):
    module = layers.BatchNorm(use_running_average=False, min_count=min_count)
    variables = module.init(jax.random.key(0), x)
    loss = lambda x: module.apply(variables, x, mutable=['batch_stats'])[0][0, 0, 0, 0]
    return float(jnp.linalg.norm(jax.grad(loss)(x)))

  # Hand-worked: var = (5e-5)^2 << eps = 1e-5, so plain BN is (x - mean) / sqrt(eps) and
  # d y_0 / d x = (1 - 1/2, -1/2) / sqrt(eps): norm 0.707 * 316 = 224. With 62 stand-in values
  # (mean 0, variance 1) the pooled variance is ~1 and y_0 ~ x_0 - mean: gradient ~(1 - 1/64).
  np.testing.assert_allclose(input_grad_norm(0.0), 0.5 ** 0.5 / 1e-5 ** 0.5, rtol=1e-3)
  np.testing.assert_allclose(input_grad_norm(64.0), 1.0, atol=0.05)


def _reference_batch_norm(x, scale, bias, mask, ra_mean, ra_var, min_count, epsilon):
  """The statistics of `BatchNorm`'s docstring in plain jnp, for autodiff to differentiate:
  masked-in entries, pooled with min_count - count stand-ins from the running averages."""
  w = jnp.ones(x.shape[:1]) if mask is None else mask.astype(jnp.float32)
  w = jnp.broadcast_to(w[:, None, None, None], x.shape[:-1] + (1,))
  count = jnp.sum(w)
  stand_in = jnp.where(count > 0, jnp.maximum(min_count - count, 0.0), max(min_count, 1.0))
  pooled = count + stand_in
  mean = (jnp.sum(x * w, (0, 1, 2)) + stand_in * ra_mean) / pooled
  var = (jnp.sum((x - mean) ** 2 * w, (0, 1, 2))
         + stand_in * (ra_var + (ra_mean - mean) ** 2)) / pooled
  return (x - mean) / jnp.sqrt(var + epsilon) * scale + bias, mean, var


def test_backward_equals_autodiff_of_the_statistics():
  """The hand-written backward against autodiff of `_reference_batch_norm`, for the gradients
  of x, scale and bias, through the output and through the new running averages, unmasked,
  masked, with the floor active and with nothing masked in."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(X)
  scale, bias = jnp.asarray(rng.normal(1, 0.3, 4)), jnp.asarray(rng.normal(0, 0.3, 4))
  ra_mean, ra_var = jnp.asarray(rng.normal(0, 1, 4)), jnp.asarray(rng.uniform(0.5, 2, 4))
  weights = [jnp.asarray(rng.normal(size=X.shape)), jnp.asarray(rng.normal(size=4)),
             jnp.asarray(rng.normal(size=4))]
  cases = {'unmasked': (None, 0.0), 'masked': (np.array([1, 0, 1, 1, 0, 1], bool), 0.0),
           'floored': (np.array([1, 0, 1, 0, 0, 0], bool), 40.0),
           'floor, no mask': (None, 100.0), 'none in': (np.zeros(6, bool), 0.0)}
  for name, (mask, min_count) in cases.items():
    module = layers.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-3,
                              min_count=min_count)
    variables = {'params': {'scale': scale, 'bias': bias},
                 'batch_stats': {'mean': ra_mean, 'var': ra_var}}
    mask_arg = None if mask is None else jnp.asarray(mask)
    seen = mask is None or mask.any()

    def ours(x, scale, bias, mask_arg=mask_arg, module=module):
      y, new = module.apply({'params': {'scale': scale, 'bias': bias},
                             'batch_stats': variables['batch_stats']}, x, mask_arg,
                            mutable=['batch_stats'])
      stats = new['batch_stats']
      return (jnp.sum(jnp.sin(y) * weights[0]) + jnp.sum(stats['mean'] * weights[1])
              + jnp.sum(stats['var'] * weights[2]))

    def reference(x, scale, bias, mask=mask, min_count=min_count, seen=seen):
      y, mean, var = _reference_batch_norm(x, scale, bias, None if mask is None else
                                           jnp.asarray(mask), ra_mean, ra_var, min_count, 1e-3)
      new_mean = 0.9 * ra_mean + 0.1 * mean if seen else ra_mean
      new_var = 0.9 * ra_var + 0.1 * var if seen else ra_var
      return (jnp.sum(jnp.sin(y) * weights[0]) + jnp.sum(new_mean * weights[1])
              + jnp.sum(new_var * weights[2]))

    got = jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias)
    want = jax.grad(reference, argnums=(0, 1, 2))(x, scale, bias)
    np.testing.assert_allclose(ours(x, scale, bias), reference(x, scale, bias), rtol=1e-5)
    for g, w, what in zip(got, want, ('x', 'scale', 'bias')):
      np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5, err_msg=f'{name}: d/d{what}')


def test_statistics_and_gradients_pool_over_replicas_on_axis_name():
  """axis_name: BatchNorm on 3 replicas of 2 examples (vmap with a named axis) gives the
  outputs and gradients of BatchNorm on all 6 examples at once."""
  def run(module, x):
    variables = module.init(jax.random.key(0), x)
    params = {'scale': jnp.arange(1.0, 5.0), 'bias': jnp.ones(4)}

    def loss(params, x):
      y = module.apply({**variables, 'params': params}, x, mutable=['batch_stats'])[0]
      return jnp.sum(jnp.sin(y) * jnp.cos(x))
    return jax.grad(loss, argnums=(0, 1))(params, x)

  whole = layers.BatchNorm(use_running_average=False, epsilon=1e-3)
  dparams, dx = run(whole, jnp.asarray(X))
  replica = layers.BatchNorm(use_running_average=False, epsilon=1e-3, axis_name='replicas')
  parts = jnp.asarray(X).reshape(3, 2, *X.shape[1:])
  dparams_r, dx_r = jax.vmap(lambda x: run(replica, x), axis_name='replicas')(parts)
  np.testing.assert_allclose(dx_r.reshape(X.shape), dx, rtol=1e-5, atol=1e-6)
  # Each replica's share of the parameter gradients; the trainer sums them over replicas.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a.sum(0), b, rtol=1e-5),
                         dparams_r, dparams)


def test_bfloat16_activations_keep_their_dtype_and_float32_statistics():
  module = layers.BatchNorm(use_running_average=False, epsilon=1e-3)
  x = jnp.asarray(X, jnp.bfloat16)
  variables = module.init(jax.random.key(0), x)
  dx = jax.grad(lambda x: jnp.sum(module.apply(variables, x, mutable=['batch_stats'])[0]
                                  .astype(jnp.float32) ** 2))(x)
  dx32 = jax.grad(lambda x: jnp.sum(module.apply(variables, x, mutable=['batch_stats'])[0]
                                    ** 2))(x.astype(jnp.float32))
  assert dx.dtype == jnp.bfloat16
  np.testing.assert_allclose(dx.astype(jnp.float32), dx32, rtol=0.05, atol=0.05)
