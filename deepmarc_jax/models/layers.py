"""Building blocks shared by backbones and heads (flax.linen).

BatchNorm momentum follows Keras/Flax semantics (`moving = momentum * moving + (1 - momentum) *
batch`), so the official configs' numbers carry over unchanged: Model Garden's norm_activation
uses 0.99 / 1e-3, the hourglass networks 0.1 / 1e-5.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepmarc_jax.ops import conv as conv_ops

Dtype = Any

# Every conv of the models: flax's nn.Conv (same variables and names) with ops/conv.py's
# convolution, whose kernel gradient is an im2col matmul where that is faster on CPU.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_ops.conv_general_dilated)

# Keras' default for convs without an explicit initializer (e.g. hourglass_network.py).
glorot_uniform = nn.initializers.glorot_uniform()
# Model Garden heads: VarianceScaling(scale=2, mode='fan_out', distribution='untruncated_normal').
he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Keras' VarianceScaling() defaults (scale 1, fan_in, truncated normal): the string
# 'VarianceScaling' Model Garden passes to its ResNet, SpineNet and FPN convs.
variance_scaling = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """BatchNorm settings; `axis_name` set for cross-replica (sync) BN under shard_map/pmap.

  min_count: the fewest values per channel BatchNorm statistics may rest on; see `BatchNorm`.
  """
  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: str | None = None
  min_count: float = 0.0


class ConvBN(nn.Module):
  """Conv (no bias) -> BatchNorm -> optional activation, NHWC.

  'SAME' padding for odd kernels equals Keras' ZeroPadding + 'valid' for stride 1 and Model
  Garden's fixed padding is used where a backbone needs it (its own module handles that).
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  activation: Callable[[jax.Array], jax.Array] | None = nn.relu
  norm: NormConfig = NormConfig()
  kernel_init: Callable = glorot_uniform
  padding: Any = 'SAME'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    """x: [N, H, W, C]; mask: optional [N] bool, the examples BatchNorm statistics use."""
    x = Conv(self.features, (self.kernel_size, self.kernel_size), (self.strides,) * 2,
             padding=self.padding, use_bias=False, kernel_init=self.kernel_init,
             dtype=self.dtype)(x)
    x = batch_norm(x, train, self.norm, self.dtype, mask)
    return self.activation(x) if self.activation is not None else x


class StochasticDepth(nn.Module):
  """Per-example drop of a residual branch [B, ...] with `rate`, kept ones scaled by 1/keep.

  Model Garden's nn_layers.StochasticDepth; train=True with a nonzero rate needs the 'dropout'
  rng stream.
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if not train or not self.rate:
      return x
    keep_prob = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng('dropout'), keep_prob,
                                (x.shape[0],) + (1,) * (x.ndim - 1))
    return x / jnp.asarray(keep_prob, x.dtype) * keep.astype(x.dtype)


class BottleneckBlock(nn.Module):
  """Model Garden's nn_blocks.BottleneckBlock, as ResNet and SpineNet use it.

  1x1 -> 3x3 (carries the stride) -> 1x1 (4 * filters), each a bias-free ConvBN with Keras
  VarianceScaling() kernels; `activation` after the first two and after the residual add;
  optional projection shortcut (strided 1x1 ConvBN) and stochastic depth on the branch.
  x: [B, H, W, C] -> [B, H / strides, W / strides, 4 * filters]. Sub-modules `shortcut`, `conv1`,
  `conv2`, `conv3`: the checkpoint converter maps these names.
  """
  filters: int
  strides: int = 1
  use_projection: bool = False
  stochastic_depth: float = 0.0
  activation: Callable[[jax.Array], jax.Array] = nn.relu
  norm: NormConfig = NormConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = functools.partial(ConvBN, norm=self.norm, kernel_init=variance_scaling,
                             dtype=self.dtype)
    out_filters = 4 * self.filters
    shortcut = x
    if self.use_projection:
      shortcut = conv(out_filters, 1, self.strides, activation=None, name='shortcut')(x, train)
    x = conv(self.filters, 1, activation=self.activation, name='conv1')(x, train)
    x = conv(self.filters, 3, self.strides, activation=self.activation, name='conv2')(x, train)
    x = conv(out_filters, 1, activation=None, name='conv3')(x, train)
    x = StochasticDepth(self.stochastic_depth)(x, train)
    return self.activation(x + shortcut)


class BatchNorm(nn.Module):
  """BatchNorm over all axes but the last, with an optional example mask.

  Same variables as `flax.linen.BatchNorm` (params scale/bias, batch_stats mean/var; the class
  name keeps its auto-names 'BatchNorm_<i>'), Keras momentum semantics, biased batch variance.
  With `mask`, statistics use only the masked-in entries; when nothing is masked in (e.g. no
  mask-allowed instance in the whole batch) it normalises with the running averages and leaves
  them unchanged, so the (unused) outputs stay finite; flax's masked BatchNorm divides by zero.

  `min_count` > 0 is a floor on the values per channel the training statistics rest on: when the
  (masked, all-replica) batch holds count < min_count of them, the running averages stand in for
  the missing min_count - count values (pooled mean and variance of the two). Why: a mask head
  trained on a few real instances per batch normalises only that many values per channel where
  its hourglass reaches 1x1; their variance is then tiny and noisy and the gradients explode
  (`python -m deepmarc_jax.tools.mask_head_gradients`; docs/findings.md). Batches with
  count >= min_count are normalised exactly as with min_count 0, so a floor below every level's
  count changes nothing.
  """
  use_running_average: bool
  momentum: float = 0.99
  epsilon: float = 1e-5
  axis_name: str | None = None
  dtype: Dtype | None = None
  min_count: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x: [N, ..., C]; mask: optional bool over leading axes of x (e.g. [N])."""
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)
    if self.use_running_average:
      y = ((x.astype(jnp.float32) - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
           * scale + bias)
      return y.astype(self.dtype or x.dtype)
    weight = None
    if mask is not None:  # mask covers leading axes ([N] for [N, H, W, C]); broadcasts on
      weight = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
    elif self.min_count > 0:
      weight = jnp.ones((1,) * x.ndim, jnp.float32)
    running = jax.lax.stop_gradient((ra_mean.value, ra_var.value))
    y, mean, var = batch_norm_train(x, scale, bias, weight, running, self.epsilon,
                                    self.min_count, self.axis_name)
    if not self.is_initializing():
      # Nothing masked in: the running averages stay (the outputs used them, see above).
      seen = None if weight is None else _count(x, weight, self.axis_name) > 0
      for average, batch in ((ra_mean, mean), (ra_var, var)):
        new = self.momentum * average.value + (1 - self.momentum) * batch
        average.value = new if seen is None else jnp.where(seen, new, average.value)
    return y.astype(self.dtype or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, weight: jax.Array | None,
                     running: tuple[jax.Array, jax.Array], epsilon: float, min_count: float,
                     axis_name: str | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over all axes but the last, with a hand-written backward.

  x: [N, ..., C], any float dtype (statistics in float32); scale, bias: [C]; weight: None (every
  entry counts) or 0/1 float32 broadcastable to x.shape[:-1] + (1,), the entries the statistics
  use; running: the running (mean, var) [C], which stand in for missing entries below
  `min_count` (see `BatchNorm`) and get no gradient; axis_name: replicas whose entries the
  statistics pool. Returns (y [..., C] float32, mean [C], var [C]), var biased.

  Why not autodiff: differentiated, the two-pass statistics leave XLA more kernels to compile
  per BatchNorm than the closed form below, which also reads x fewer times; with a BatchNorm
  after nearly every conv, that shortens the train step's compile and lowers its memory peak
  (docs/benchmarks.md, "What limits speed"). Equal to autodiff within float tolerance
  (tests/test_layers.py).
  """
  (y, mean, var), _ = _batch_norm_train_fwd(x, scale, bias, weight, running, epsilon, min_count,
                                            axis_name)
  return y, mean, var


def _count(x: jax.Array, weight: jax.Array | None, axis_name: str | None):
  """Entries per channel the statistics rest on (a Python float without weights or replicas)."""
  per_weight = math.prod(x.shape[:-1]) / (1 if weight is None else math.prod(weight.shape))
  count = per_weight * (1.0 if weight is None else jnp.sum(weight))
  return count if axis_name is None else jax.lax.psum(count, axis_name)


def _sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  """Per-channel sum of [..., C] over all replicas on axis_name."""
  total = jnp.sum(x, tuple(range(x.ndim - 1)))
  return total if axis_name is None else jax.lax.psum(total, axis_name)


def _batch_norm_train_fwd(x, scale, bias, weight, running, epsilon, min_count, axis_name):
  xf = x.astype(jnp.float32)
  count = _count(x, weight, axis_name)
  if weight is None:  # every backbone and FPN BatchNorm: no stand-ins
    mean = _sum(xf, axis_name) / count
    # Two-pass variance: E[x^2] - E[x]^2 cancels catastrophically in float32 when a channel's
    # mean dwarfs its spread, which makes gradients depend on reduction order.
    var = _sum(jnp.square(xf - mean), axis_name) / count
    pooled = count
  else:
    ra_mean, ra_var = running
    # Values the running averages stand in for: the floor's shortfall, or (no entry in the
    # batch) all of them, which normalises with the running statistics as in evaluation.
    stand_in = jnp.where(count > 0, jnp.maximum(min_count - count, 0.0), max(min_count, 1.0))
    pooled = count + stand_in
    mean = (_sum(xf * weight, axis_name) + stand_in * ra_mean) / pooled
    var = (_sum(jnp.square(xf - mean) * weight, axis_name)
           + stand_in * (ra_var + jnp.square(ra_mean - mean))) / pooled
  rstd = jax.lax.rsqrt(var + epsilon)
  y = (xf - mean) * rstd * scale + bias
  # x in its own dtype: a bfloat16 activation is not kept twice.
  return (y, mean, var), (x, weight, mean, rstd, scale, pooled)


def _batch_norm_train_bwd(epsilon, min_count, axis_name, residuals, cotangents):
  """With g = dy * scale and xhat = (x - mean) * rstd: y's gradient reaches x directly
  (g * rstd) and through mean and var, which move with x by weight / pooled and
  2 * weight * (x - mean) / pooled (the running averages' stand-ins are constants, and var
  does not move with mean: d var / d mean = -2 (sum w (x - mean) + stand_in (ra_mean - mean))
  / pooled = 0 by mean's definition)."""
  del epsilon, min_count
  x, weight, mean, rstd, scale, pooled = residuals
  dy, dmean, dvar = cotangents  # mean's and var's: zero where only the running averages use them
  xc = x.astype(jnp.float32) - mean
  dbias, dscale = _sum(dy, None), _sum(dy * xc, None) * rstd  # no broadcast rstd in memory
  # Scale and bias get this replica's share (as autodiff gives them); x's gradient needs the
  # sums over every replica's entries, as its statistics did.
  sum_dy, sum_dy_xhat = (dbias, dscale) if axis_name is None else jax.lax.psum(
      (dbias, dscale), axis_name)
  d_mean = dmean - scale * rstd * sum_dy  # the loss's gradient w.r.t. mean, then var
  d_var = dvar - 0.5 * scale * jnp.square(rstd) * sum_dy_xhat
  moved = 1.0 / pooled if weight is None else weight / pooled
  dx = scale * rstd * dy + moved * (d_mean + 2.0 * d_var * xc)
  return dx.astype(x.dtype), dscale, dbias, None, None


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm(x: jax.Array, train: bool, norm: NormConfig, dtype: Dtype,
               mask: jax.Array | None = None, name: str | None = None) -> jax.Array:
  """`BatchNorm` with `norm`'s settings; `mask` [N] (leading axis) limits the statistics.

  Padded examples (e.g. empty mask-head slots) then change neither the normalisation of the
  real ones nor the running statistics. Must be called inside a compact module.
  """
  return BatchNorm(use_running_average=not train, momentum=norm.momentum,
                   epsilon=norm.epsilon, axis_name=norm.axis_name, dtype=dtype,
                   min_count=norm.min_count, name=name)(x, mask)


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays (params or batch_stats)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
