"""Fast R-CNN detection head (Model Garden's DetectionHead as configured for Mask R-CNN).

ROI features [R, 7, 7, C] -> `num_convs` 3x3 convs (bias + BN + ReLU) -> flatten -> `num_fcs`
FC layers (bias + BN + ReLU) -> class logits [R, K] and class-specific box deltas [R, K, 4].
Model Garden's Mask R-CNN uses 4 convs of 256 and 1 FC of 1024 (15,676,871 trainable params
with 91 classes). `mask` [R] limits BatchNorm statistics to real ROIs.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepmarc_jax.models import layers


class DetectionHead(nn.Module):
  num_classes: int
  num_convs: int = 4
  num_filters: int = 256
  num_fcs: int = 1
  fc_dims: int = 1024
  class_agnostic_boxes: bool = False
  norm: layers.NormConfig = layers.NormConfig()
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, roi_features: jax.Array, train: bool, mask: jax.Array | None = None):
    """roi_features: [R, h, w, C] -> (logits [R, K] f32, box deltas [R, K or 1, 4] f32)."""
    x = roi_features
    for i in range(self.num_convs):
      x = layers.Conv(self.num_filters, (3, 3), padding='SAME', dtype=self.dtype,
                      kernel_init=layers.he_normal_fan_out, name=f'conv_{i}')(x)
      x = nn.relu(layers.batch_norm(x, train, self.norm, self.dtype, mask, name=f'conv_bn_{i}'))
    x = x.reshape(x.shape[0], -1)
    for i in range(self.num_fcs):
      x = nn.Dense(self.fc_dims, dtype=self.dtype, name=f'fc_{i}',
                   kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_out', 'uniform'))(x)
      x = nn.relu(layers.batch_norm(x, train, self.norm, self.dtype, mask, name=f'fc_bn_{i}'))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name='scores',
                      kernel_init=nn.initializers.normal(0.01))(x)
    num_box_classes = 1 if self.class_agnostic_boxes else self.num_classes
    deltas = nn.Dense(4 * num_box_classes, dtype=self.dtype, name='boxes',
                      kernel_init=nn.initializers.normal(0.001))(x)
    return (logits.astype(jnp.float32),
            deltas.astype(jnp.float32).reshape(-1, num_box_classes, 4))
