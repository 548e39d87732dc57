"""A drop-in `lax.conv_general_dilated` whose kernel gradient is one im2col matmul.

XLA's CPU backend runs a convolution's forward pass well but its kernel-gradient convolution
poorly. Here the forward and the input gradient stay XLA convolutions (the input gradient is a
forward convolution of the output gradient with the flipped kernel) and the kernel gradient
becomes

    dW[kh, kw, c, o] = sum_{n, y, x} patches(x)[n, y, x, kh, kw, c] * dy[n, y, x, o]

a single matmul over the (N*H*W) rows of the im2col patches, which runs near the machine's
matmul speed. The policy (`uses_im2col_grad`) is: CPU backend, 1x1 kernels only, whose patches
are the input itself (no extra memory). 3x3 kernels stay with XLA: on large maps the matmul
loses even in isolation, and on the ROI heads' small maps their patches (9x the input) made the
whole train step slower and larger (benchmarks/conv_grad_speed.py, train_step_speed.py;
docs/benchmarks.md). Accelerators always get XLA's own gradient. Values and gradients equal
lax's to float rounding (tests/test_ops_conv.py), so this is an implementation choice, not a
setting.

Handled: 2-D NHWC x HWIO, stride 1, no dilation, one feature group, any explicit or 'SAME' /
'VALID' padding. Anything else falls through to `lax.conv_general_dilated` unchanged.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _is_nhwc(dimension_numbers, lhs_ndim: int) -> bool:
  if dimension_numbers is None or lhs_ndim != 4:
    return False
  if isinstance(dimension_numbers, tuple) and dimension_numbers == _NHWC:
    return True
  return lax.conv_dimension_numbers((1,) * 4, (1,) * 4, _NHWC) == dimension_numbers


def _explicit_padding(padding, in_hw, kernel_hw):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_hw, kernel_hw, (1, 1), padding))
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def uses_im2col_grad(kernel_hw) -> bool:
  """The dispatch policy (module docstring): 1x1 kernels on the CPU backend."""
  return jax.default_backend() == 'cpu' and tuple(kernel_hw) == (1, 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with an im2col kernel gradient where it applies (see module)."""
  unit = lambda d: d is None or all(v == 1 for v in d)  # noqa: E731
  if (_is_nhwc(dimension_numbers, lhs.ndim) and uses_im2col_grad(rhs.shape[:2])
      and all(s == 1 for s in window_strides)
      and unit(lhs_dilation) and unit(rhs_dilation) and feature_group_count == 1
      and batch_group_count == 1 and preferred_element_type is None):
    pads = _explicit_padding(padding, lhs.shape[1:3], rhs.shape[:2])
    return im2col_grad_conv(lhs, rhs, pads, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def im2col_grad_conv(x, w, pads, precision=None):
  """Stride-1 NHWC x HWIO conv with explicit `pads` ((top, bottom), (left, right)) whose
  kernel gradient is an im2col matmul (always, whatever the backend)."""
  return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC,
                                  precision=precision)


def _conv_fwd(x, w, pads, precision):
  return im2col_grad_conv(x, w, pads, precision), (x, w)


def _conv_bwd(pads, precision, residuals, dy):
  x, w = residuals
  kh, kw, cin, cout = w.shape
  (top, bottom), (left, right) = pads
  # Input gradient: correlate dy with the spatially flipped, in/out-swapped kernel.
  w_t = jnp.flip(w, (0, 1)).swapaxes(2, 3)
  dx = lax.conv_general_dilated(
      dy, w_t, (1, 1), ((kh - 1 - top, kh - 1 - bottom), (kw - 1 - left, kw - 1 - right)),
      dimension_numbers=_NHWC, precision=precision)
  # Output positions beyond the input (negative padding) contribute nothing.
  dx = dx[:, :x.shape[1], :x.shape[2]]
  # Kernel gradient: im2col patches of the padded input times dy, one matmul.
  out_h, out_w = dy.shape[1:3]
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               ((0, 0, 0), (top, bottom, 0), (left, right, 0), (0, 0, 0)))
  patches = jnp.stack([xp[:, i:i + out_h, j:j + out_w] for i in range(kh) for j in range(kw)],
                      axis=3)  # [N, H', W', kh*kw, Cin]
  dw = jnp.einsum('nhwkc,nhwo->kco', patches, dy, precision=precision)
  return dx.astype(x.dtype), dw.reshape(kh, kw, cin, cout).astype(w.dtype)


im2col_grad_conv.defvjp(_conv_fwd, _conv_bwd)
