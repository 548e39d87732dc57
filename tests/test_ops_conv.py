"""ops/conv.py: the im2col-gradient convolution equals lax.conv_general_dilated and its autodiff."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deepmarc_jax.ops import conv

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _numpy_conv(x, w, pads):
  """Direct sum over kernel taps (stride 1), the independent reference for the forward."""
  (top, bottom), (left, right) = pads
  xp = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  kh, kw = w.shape[:2]
  out_h, out_w = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  out = np.zeros((x.shape[0], out_h, out_w, w.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum('nhwc,co->nhwo', xp[:, i:i + out_h, j:j + out_w], w[i, j])
  return out


@pytest.mark.parametrize('kernel,padding', [
    ((3, 3), 'SAME'), ((1, 1), 'SAME'), ((3, 3), 'VALID'), ((2, 2), 'SAME'),
    ((3, 3), ((2, 0), (1, 3))), ((5, 3), ((2, 2), (1, 1)))])
def test_forward_and_gradients_match_lax(kernel, padding):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 7, 6, 5))
  w = rng.standard_normal(kernel + (5, 4))
  pads = conv._explicit_padding(padding, x.shape[1:3], kernel)  # pylint: disable=protected-access
  ours = conv.im2col_grad_conv(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), pads)
  np.testing.assert_allclose(np.asarray(ours), _numpy_conv(x, w, pads), rtol=1e-4, atol=1e-4)

  cot = jnp.asarray(rng.standard_normal(ours.shape), jnp.float32)

  def grads(fn):
    return jax.grad(lambda a, b: jnp.sum(fn(a, b) * cot), argnums=(0, 1))(
        jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  def ref(a, b):
    return lax.conv_general_dilated(a, b, (1, 1), padding, dimension_numbers=NHWC)
  for ours_g, ref_g in zip(grads(lambda a, b: conv.im2col_grad_conv(a, b, pads)), grads(ref)):
    np.testing.assert_allclose(np.asarray(ours_g), np.asarray(ref_g), rtol=1e-4, atol=1e-4)


def test_unsupported_cases_fall_through_to_lax():
  x = jnp.ones((1, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 2))
  for kwargs in (dict(window_strides=(2, 2)), dict(window_strides=(1, 1), rhs_dilation=(2, 2))):
    ours = conv.conv_general_dilated(x, w, padding='SAME', dimension_numbers=NHWC, **kwargs)
    ref = lax.conv_general_dilated(x, w, padding='SAME', dimension_numbers=NHWC, **kwargs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_flax_conv_with_it_has_the_same_params_and_gradients():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 6, 6, 4)), jnp.float32)
  plain = nn.Conv(8, (3, 3), padding='SAME')
  fast = nn.Conv(8, (3, 3), padding='SAME', conv_general_dilated=conv.conv_general_dilated)
  params = plain.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, fast.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape,
                                                                                   params)
  loss = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2))(params)  # noqa: E731
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               loss(fast), loss(plain))


def test_policy_routes_1x1_kernels_on_cpu_only(monkeypatch):
  assert conv.uses_im2col_grad((1, 1)) and not conv.uses_im2col_grad((3, 3))
  x, w = jnp.ones((1, 4, 4, 3)), jnp.ones((1, 1, 3, 2))
  jaxpr = str(jax.make_jaxpr(lambda a, b: conv.conv_general_dilated(
      a, b, (1, 1), 'SAME', dimension_numbers=NHWC))(x, w))
  assert 'custom_vjp' in jaxpr
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert not conv.uses_im2col_grad((1, 1))
