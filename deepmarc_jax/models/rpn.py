"""Region proposal network head (Model Garden's RPNHead).

One 3x3 conv (with bias) shared across levels, a separate BatchNorm per level, ReLU, then 1x1
convs to `num_anchors` objectness logits and `4 * num_anchors` box deltas, shared across levels.
Initialisers as the official head: N(0, 0.01) for the conv, N(0, 1e-5) for the outputs.
"""
from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepmarc_jax.models import layers


class RPNHead(nn.Module):
  """features {level: [B, H_l, W_l, C]} -> (scores {level: [B, H_l, W_l, A]},
  boxes {level: [B, H_l, W_l, 4A]}) with A = anchors per location."""
  num_anchors: int
  num_filters: int = 256
  num_convs: int = 1
  norm: layers.NormConfig = layers.NormConfig()
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Mapping[int, jax.Array], train: bool):
    convs = [layers.Conv(self.num_filters, (3, 3), padding='SAME', dtype=self.dtype,
                         kernel_init=nn.initializers.normal(0.01), name=f'conv_{i}')
             for i in range(self.num_convs)]
    classifier = layers.Conv(self.num_anchors, (1, 1), dtype=self.dtype,
                             kernel_init=nn.initializers.normal(1e-5), name='scores')
    regressor = layers.Conv(4 * self.num_anchors, (1, 1), dtype=self.dtype,
                            kernel_init=nn.initializers.normal(1e-5), name='boxes')
    scores, boxes = {}, {}
    for level in sorted(features):
      x = features[level]
      for i, conv in enumerate(convs):
        x = layers.batch_norm(conv(x), train, self.norm, self.dtype, name=f'norm_{level}_{i}')
        x = nn.relu(x)
      scores[level] = classifier(x)
      boxes[level] = regressor(x)
    return scores, boxes
