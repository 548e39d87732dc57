"""ResNet v1 backbone as Model Garden's Mask R-CNN builds it.

Source: official/vision/modeling/backbones/resnet.py and layers/nn_blocks.py (BottleneckBlock).

Input [B, H, W, 3] (NHWC, already normalised); output endpoints {level: C_level} for levels 2..5,
[B, H/2^level, W/2^level, 256 * 2^(level-2) * width_multiplier] (H, W multiples of 32 keep the
FPN's x2 upsampling exact).

Model Garden defaults of the deep_mask_head_rcnn_resnetfpn_coco experiment, all reproduced:
stem 'v0' = 7x7/2 conv + BN + ReLU + 3x3/2 max pool; bottleneck blocks 1x1 -> 3x3 (carries the
stride) -> 1x1 (x4 filters), BN after every conv, ReLU after the residual add; projection shortcut
(strided 1x1 conv + BN, no ResNet-D pooling) on the first block of each stage; no SE, no
stochastic depth, no zero-init of the last BN's gamma. Every conv and the max pool use 'SAME'
padding (not fixed padding) and are bias-free, kernels init'd with Keras' VarianceScaling()
(fan_in, truncated normal). `width_multiplier` is MG's `depth_multiplier` (scale_stem=True: the
stem is scaled too), channels truncated with int(). The Mask R-CNN config's BN is
NormConfig(momentum=0.997, epsilon=1e-4), sync.

Parameter names: `stem`, `block_group_l{level}_{i}/{shortcut,conv1,conv2,conv3}`, each a ConvBN
(`Conv_0/kernel`, `BatchNorm_0/{scale,bias}` + batch_stats `{mean,var}`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepmarc_jax.models import catalogue
from deepmarc_jax.models.layers import BottleneckBlock, ConvBN, Dtype, NormConfig, variance_scaling


class ResNet(nn.Module):
  """ResNet-50/101 v1; `__call__(images [B,H,W,3], train)` -> {2: C2, 3: C3, 4: C4, 5: C5}."""
  depth: int = 50
  width_multiplier: float = 1.0
  norm: NormConfig = NormConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> dict[int, jax.Array]:
    x = ConvBN(int(64 * self.width_multiplier), 7, 2, norm=self.norm,
               kernel_init=variance_scaling, dtype=self.dtype, name='stem')(x, train)
    x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
    endpoints = {}
    for i, repeats in enumerate(catalogue.RESNETS[f'resnet{self.depth}']):
      level = i + 2
      for j in range(repeats):
        x = BottleneckBlock(int(64 * 2**i * self.width_multiplier),
                            strides=2 if i > 0 and j == 0 else 1, use_projection=j == 0,
                            norm=self.norm, dtype=self.dtype,
                            name=f'block_group_l{level}_{j}')(x, train)
      endpoints[level] = x
    return endpoints
