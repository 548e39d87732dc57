"""FPN decoder as Model Garden's Mask R-CNN builds it (official/vision/modeling/decoders/fpn.py).

Input: backbone endpoints {level: [B, H/2^level, W/2^level, C_level]} covering min_level..L with
L = min(max backbone level, max_level); output {level: [B, H/2^level, W/2^level, num_filters]}
for min_level..max_level.

Model Garden's default (fusion 'sum', plain convs, no keras-layer variants), reproduced:
1. lateral_l: 1x1 conv (with bias) of C_l;
2. top-down: P_l = lateral_l + nearest_x2(P_{l+1});
3. post_hoc_l: 3x3 conv (with bias) of each P_l;
4. coarser_l for l > L: 3x3 stride-2 conv (with bias) of the previous level's post_hoc output, with
   a ReLU before it only from L + 2 on (level 6 on ResNet sees no ReLU);
5. norm_l: a BatchNorm on every output level (applied last, so coarser levels read pre-BN maps),
   no activation after it.
Kernels init'd with Keras' VarianceScaling() (fan_in, truncated normal), biases zero.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepmarc_jax.models.layers import Conv, Dtype, NormConfig, batch_norm, variance_scaling


def nearest_upsample_x2(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], each pixel repeated 2x2."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nn.Module):
  """`__call__(endpoints {level: [B,h,w,C]}, train)` -> {level: [B,h,w,num_filters]}."""
  min_level: int = 2
  max_level: int = 6
  num_filters: int = 256
  norm: NormConfig = NormConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, endpoints: dict[int, jax.Array], train: bool) -> dict[int, jax.Array]:
    if min(endpoints) > self.min_level:
      raise ValueError(f'backbone levels {sorted(endpoints)} start above min_level '
                       f'{self.min_level}')
    conv = functools.partial(Conv, self.num_filters, kernel_init=variance_scaling,
                             dtype=self.dtype)
    top = min(max(endpoints), self.max_level)
    feats = {top: conv((1, 1), name=f'lateral_{top}')(endpoints[top])}
    for level in range(top - 1, self.min_level - 1, -1):
      lateral = conv((1, 1), name=f'lateral_{level}')(endpoints[level])
      feats[level] = lateral + nearest_upsample_x2(feats[level + 1])
    for level in range(self.min_level, top + 1):
      feats[level] = conv((3, 3), name=f'post_hoc_{level}')(feats[level])
    for level in range(top + 1, self.max_level + 1):
      x = feats[level - 1]
      if level > top + 1:
        x = nn.relu(x)
      feats[level] = conv((3, 3), (2, 2), name=f'coarser_{level}')(x)
    return {
        level: batch_norm(feats[level], train, self.norm, self.dtype, name=f'norm_{level}')
        for level in range(self.min_level, self.max_level + 1)
    }
