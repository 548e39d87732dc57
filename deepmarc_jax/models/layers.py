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
  (benchmarks/mask_head_gradients.py). Batches with count >= min_count are normalised exactly as
  with min_count 0, so a floor below every level's count changes nothing.
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
    xf = x.astype(jnp.float32)
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      if mask is None and self.min_count <= 0:
        mean, var, seen = *self._moments(xf, axes), None
      else:
        mean, var, seen = self._masked_moments(xf, axes, mask, ra_mean.value, ra_var.value)
      if not self.is_initializing():
        for average, batch in ((ra_mean, mean), (ra_var, var)):
          new = self.momentum * average.value + (1 - self.momentum) * batch
          average.value = new if seen is None else jnp.where(seen, new, average.value)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype or x.dtype)

  def _moments(self, xf: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Batch mean and biased variance per channel, over all replicas on axis_name.

    The unmasked, unfloored case (every backbone and FPN BatchNorm): the same statistics as
    `_masked_moments` with weights of one, without the weights and the stand-in arithmetic,
    whose forward and backward kernels XLA compiles in every BatchNorm of the train step.
    """
    count = float(math.prod(xf.shape[:-1]))
    total = jnp.sum(xf, axes)
    if self.axis_name is not None:
      count, total = jax.lax.psum((count, total), self.axis_name)
    mean = total / count
    total_sq = jnp.sum(jnp.square(xf - mean), axes)  # two-pass: see _masked_moments
    if self.axis_name is not None:
      total_sq = jax.lax.psum(total_sq, self.axis_name)
    return mean, total_sq / count

  def _masked_moments(self, xf: jax.Array, axes: tuple[int, ...], mask: jax.Array | None,
                      ra_mean: jax.Array, ra_var: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, var, seen) per channel over the masked-in entries, floored by min_count (see the
    class docstring); seen: whether the batch held any entry (else the running averages stay)."""
    if mask is None:
      weight = jnp.ones(xf.shape[:-1] + (1,), jnp.float32)
    else:  # mask covers leading axes ([N] for [N, H, W, C]); broadcast it over the rest
      weight = jnp.broadcast_to(
          mask.astype(jnp.float32).reshape(mask.shape + (1,) * (xf.ndim - mask.ndim)),
          xf.shape[:-1] + (1,))
    count, total = jnp.sum(weight, axes), jnp.sum(xf * weight, axes)
    if self.axis_name is not None:
      count, total = jax.lax.psum((count, total), self.axis_name)
    seen = count > 0
    # Values the running averages stand in for: the floor's shortfall, or (no example in the
    # batch) all of them, which normalises with the running statistics as in evaluation.
    stand_in = jnp.where(seen, jnp.maximum(self.min_count - count, 0.0),
                         jnp.maximum(self.min_count, 1.0))
    pooled = count + stand_in
    mean = (total + stand_in * ra_mean) / pooled
    # Two-pass variance: E[x^2] - E[x]^2 cancels catastrophically in float32 when a channel's
    # mean dwarfs its spread, which makes gradients depend on reduction order.
    total_sq = jnp.sum(jnp.square(xf - mean) * weight, axes)
    if self.axis_name is not None:
      total_sq = jax.lax.psum(total_sq, self.axis_name)
    var = (total_sq + stand_in * (ra_var + jnp.square(ra_mean - mean))) / pooled
    return mean, var, seen


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
