import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from deepmarc_jax import optimizers


def _opt(**kw):
  base = dict(name='sgd', momentum=0.9, learning_rate=0.32, schedule='step', warmup_steps=2000,
              warmup_init_lr=0.0067, decay_boundaries=(219_450, 226_380), decay_rate=0.1,
              weight_decay=4e-5, flatten=False)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_step_schedule_matches_the_official_recipe():
  lr = optimizers.learning_rate_schedule(_opt(), 231_000)
  np.testing.assert_allclose(lr(0), 0.0067, rtol=1e-5)
  np.testing.assert_allclose(lr(1000), 0.0067 + (0.32 - 0.0067) / 2, rtol=1e-5)
  np.testing.assert_allclose(lr(2000), 0.32, rtol=1e-5)
  np.testing.assert_allclose(lr(219_449), 0.32, rtol=1e-5)
  np.testing.assert_allclose(lr(219_450), 0.032, rtol=1e-5)
  np.testing.assert_allclose(lr(226_380), 0.0032, rtol=1e-5)


def test_cosine_schedule_warms_up_then_decays_to_zero():
  lr = optimizers.learning_rate_schedule(_opt(schedule='cosine', warmup_steps=10,
                                              warmup_init_lr=0.0), 110)
  assert lr(0) == 0 and np.isclose(lr(10), 0.32) and np.isclose(lr(60), 0.16, rtol=1e-3)
  assert lr(110) < 1e-6


def test_sgd_weight_decay_is_l2_on_kernels_only():
  params = {'conv': {'kernel': jnp.ones((2,)), 'bias': jnp.ones((2,))},
            'bn': {'scale': jnp.ones((2,))}}
  zero_grads = {'conv': {'kernel': jnp.zeros(2), 'bias': jnp.zeros(2)},
                'bn': {'scale': jnp.zeros(2)}}
  tx = optimizers.make_optimizer(_opt(warmup_steps=0, weight_decay=0.5, momentum=0.0), 10)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(new['conv']['kernel'], 1 - 0.32 * 0.5)  # lr * wd * w
  np.testing.assert_allclose(new['conv']['bias'], 1.0)
  np.testing.assert_allclose(new['bn']['scale'], 1.0)


def _tree(seed):
  """Conv, dense and BatchNorm leaves of several shapes (weight decay applies to the kernels)."""
  rng = np.random.default_rng(seed)
  shapes = {'conv': {'kernel': (3, 3, 2, 4), 'bias': (4,)}, 'bn': {'scale': (4,), 'bias': (4,)},
            'dense': {'kernel': (5, 3)}}
  return {m: {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in leaves.items()}
          for m, leaves in shapes.items()}


@pytest.mark.parametrize('name', ['sgd', 'adamw'])
def test_flat_moments_update_like_per_leaf_ones(name):
  """`flatten` changes the moments' layout, not the arithmetic: five steps from the same
  parameters and gradients give the same parameters as optax's own sgd / adamw."""
  settings = dict(name=name, warmup_steps=2, weight_decay=0.1, learning_rate=0.1)
  opt = _opt(**settings)
  schedule = optimizers.learning_rate_schedule(opt, 10)
  reference = (optax.chain(optax.add_decayed_weights(0.1, mask=optimizers.kernel_mask),
                           optax.sgd(schedule, momentum=0.9)) if name == 'sgd' else
               optax.adamw(schedule, weight_decay=0.1, mask=optimizers.kernel_mask))
  results = []
  for tx in (reference, optimizers.make_optimizer(opt, 10),
             optimizers.make_optimizer(_opt(**settings, flatten=True), 10)):
    params = _tree(0)
    state = tx.init(params)
    for step in range(5):
      updates, state = tx.update(_tree(step + 1), state, params)
      params = optax.apply_updates(params, updates)
    results.append((params, state))
  (reference_params, reference_state), (per_leaf_params, per_leaf_state), (flat_params,
                                                                            flat_state) = results
  # Per-leaf is optax's own optimizer, state structure included (checkpoints carry over).
  assert jax.tree.structure(per_leaf_state) == jax.tree.structure(reference_state)
  jax.tree.map(np.testing.assert_array_equal, per_leaf_params, reference_params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               flat_params, reference_params)
  # Flat: each moment is one vector over all 99 parameters.
  moments = [x for x in jax.tree.leaves(flat_state) if x.ndim]
  assert [x.shape for x in moments] == [(99,)] * (1 if name == 'sgd' else 2)


def test_gradient_norm_over_the_flat_vector_equals_numpy():
  grads = _tree(3)
  expected = np.sqrt(sum(np.sum(np.square(np.asarray(g, np.float64)))
                         for g in jax.tree.leaves(grads)))
  for flatten in (False, True):
    norm = optimizers.gradient_norm(grads, _opt(flatten=flatten))
    np.testing.assert_allclose(norm, expected, rtol=1e-6)
  assert optimizers.flat_vector(grads).shape == (99,)
