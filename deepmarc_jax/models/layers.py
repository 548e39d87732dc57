"""Building blocks shared by backbones and heads (flax.linen).

BatchNorm momentum follows Keras/Flax semantics (`moving = momentum * moving + (1 - momentum) *
batch`), so the official configs' numbers carry over unchanged: Model Garden's norm_activation
uses 0.99 / 1e-3, the hourglass networks 0.1 / 1e-5.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Keras' default for convs without an explicit initializer (e.g. hourglass_network.py).
glorot_uniform = nn.initializers.glorot_uniform()
# Model Garden heads: VarianceScaling(scale=2, mode='fan_out', distribution='untruncated_normal').
he_normal_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Keras' VarianceScaling() defaults (scale 1, fan_in, truncated normal): the string
# 'VarianceScaling' Model Garden passes to its ResNet, SpineNet and FPN convs.
variance_scaling = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal')


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """BatchNorm settings; `axis_name` set for cross-replica (sync) BN under shard_map/pmap."""
  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: str | None = None


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
    x = nn.Conv(self.features, (self.kernel_size, self.kernel_size), (self.strides,) * 2,
                padding=self.padding, use_bias=False, kernel_init=self.kernel_init,
                dtype=self.dtype)(x)
    x = batch_norm(x, train, self.norm, self.dtype, mask)
    return self.activation(x) if self.activation is not None else x


def batch_norm(x: jax.Array, train: bool, norm: NormConfig, dtype: Dtype,
               mask: jax.Array | None = None, name: str | None = None) -> jax.Array:
  """BatchNorm over all but the last axis; `mask` [N] limits the statistics to real examples.

  Padded examples (e.g. empty mask-head slots) then change neither the normalisation of the
  real ones nor the running statistics. Must be called inside a compact module.
  """
  if mask is not None:
    mask = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim)), x.shape)
  return nn.BatchNorm(use_running_average=not train, momentum=norm.momentum,
                      epsilon=norm.epsilon, axis_name=norm.axis_name, dtype=dtype,
                      name=name)(x, mask=mask)


def count_params(tree) -> int:
  """Number of scalars in a pytree of arrays (params or batch_stats)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
