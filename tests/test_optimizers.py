import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from deepmarc_jax import optimizers


def _opt(**kw):
  base = dict(name='sgd', momentum=0.9, learning_rate=0.32, schedule='step', warmup_steps=2000,
              warmup_init_lr=0.0067, decay_boundaries=(219_450, 226_380), decay_rate=0.1,
              weight_decay=4e-5)
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
