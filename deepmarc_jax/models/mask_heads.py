"""Deep-MARC mask head (Model Garden DeepMaskHead) with every convnet in catalogue.MASK_HEADS.

  roi_features [R, S, S, C_in] -> convnet -> [R, S, S, C]
    -> deconv: ConvTranspose k = stride = u (num_filters, bias) + BN + ReLU -> [R, uS, uS, nf]
    -> logits: 1x1 conv (bias) to 1 channel, or num_classes then the ROI class's channel
    -> [R, uS, uS] float32 logits (sigmoid is applied by the caller).

Convnets (Model Garden's `official/projects/deepmac_maskrcnn/modeling/heads/instance_heads.py`
DeepMaskHead and the TF OD API's deepmac_meta_arch.py):
- `default`: num_convs x [3x3 conv num_filters (with bias) + BN + ReLU] (instance_heads.py).
- `hourglassN...`: hourglass.Hourglass(num_channels=num_filters); C = 2 * num_filters.
- `resnetN`: the TF OD API's ResNetMaskNetwork (deepmac_meta_arch.py): 1x1 conv to nc (bias),
  then per stage resnet_v1.stack_basic(stride1=1) pre-activation basic blocks; C = last stage's
  channels. Its BatchNorms keep Keras' defaults (momentum 0.99, eps 1.001e-5).

Initialisers follow the code each part comes from: the head's own convs and deconv use
VarianceScaling(2, fan_out, untruncated normal) with zero bias; the hourglass and ResNet convnets
use Keras' default glorot_uniform (zero bias where a conv has one). The head's BatchNorms are
Model Garden's norm_activation (momentum 0.99, eps 1e-3). In the reference, weight decay reaches
only the deconv and the logits of an hourglass head (hourglass_network.py takes no regulariser).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepmarc_jax.models.catalogue import (MASK_HEADS, ConvHeadSpec, HourglassSpec,
                                           ResNetHeadSpec)
from deepmarc_jax.models.hourglass import HOURGLASS_NORM, Hourglass
from deepmarc_jax.models.layers import (Conv, ConvBN, Dtype, NormConfig, batch_norm,
                                        glorot_uniform, he_normal_fan_out)

# tf.keras.layers.BatchNormalization defaults with resnet_v1.block_basic's epsilon.
RESNET_NORM = NormConfig(momentum=0.99, epsilon=1.001e-5)
_PAD_1 = ((1, 1), (1, 1))


class ConvStack(nn.Module):
  """`default` convnet: num_convs x [3x3 conv (bias) + BN + ReLU]. [R,H,W,C] -> [R,H,W,features]."""
  num_convs: int
  features: int
  norm: NormConfig = NormConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    for i in range(self.num_convs):
      x = Conv(self.features, (3, 3), padding='SAME', kernel_init=he_normal_fan_out,
               dtype=self.dtype, name=f'conv_{i}')(x)
      x = nn.relu(batch_norm(x, train, self.norm, self.dtype, mask, name=f'conv_bn_{i}'))
    return x


class PreActBasicBlock(nn.Module):
  """resnet_v1.block_basic at stride 1: [R,H,W,C] -> [R,H,W,features].

  p = ReLU(BN(x)); out = shortcut + ReLU(BN(conv3x3(ReLU(BN(conv3x3(p)))))), where shortcut is a
  1x1 conv with bias on p (first block of a stack) or x itself. No activation after the add.
  """
  features: int
  conv_shortcut: bool = False
  norm: NormConfig = RESNET_NORM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    preact = nn.relu(batch_norm(x, train, self.norm, self.dtype, mask, name='preact_bn'))
    if self.conv_shortcut:
      x = Conv(self.features, (1, 1), kernel_init=glorot_uniform, dtype=self.dtype,
               name='shortcut_conv')(preact)
    y = preact
    for name in ('conv_1', 'conv_2'):
      y = ConvBN(self.features, 3, padding=_PAD_1, norm=self.norm, dtype=self.dtype,
                 name=name)(y, train, mask)
    return x + y


class ResNetMaskNet(nn.Module):
  """`resnetN` convnet: 1x1 conv (bias) to nc, then pre-activation basic-block stacks.

  [R, H, W, C_in] -> [R, H, W, nc * spec.stages[-1][1]].
  """
  spec: ResNetHeadSpec
  num_channels: int = 64
  norm: NormConfig = RESNET_NORM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    x = Conv(self.num_channels, (1, 1), kernel_init=glorot_uniform, dtype=self.dtype,
             name='input_layer')(x)
    for stage, (num_blocks, multiplier) in enumerate(self.spec.stages):
      # stack_basic builds a conv-shortcut block, blocks - 2 plain ones and a final one (stride1).
      for i in range(max(num_blocks, 2)):
        x = PreActBasicBlock(self.num_channels * multiplier, conv_shortcut=i == 0,
                             norm=self.norm, dtype=self.dtype,
                             name=f'stack_{stage}_block_{i}')(x, train, mask)
    return x


def convnet(type: str, num_filters: int, norm: NormConfig, hourglass_bn_momentum: float,
            dtype: Dtype) -> nn.Module:
  """The catalogue.MASK_HEADS convnet `type`, named 'convnet': [R, S, S, C_in] -> [R, S, S, C].

  `default` uses `norm` as it is; the ResNet and hourglass convnets keep their reference
  momentum/epsilon (the hourglass's momentum is `hourglass_bn_momentum`) and take `norm`'s
  axis_name and min_count.
  """
  if type not in MASK_HEADS:
    raise ValueError(f'unknown mask head {type!r}; allowed: {sorted(MASK_HEADS)}')
  spec = MASK_HEADS[type]
  if isinstance(spec, ConvHeadSpec):
    return ConvStack(spec.num_convs, num_filters, norm, dtype, name='convnet')
  if isinstance(spec, ResNetHeadSpec):
    resnet_norm = dataclasses.replace(RESNET_NORM, axis_name=norm.axis_name,
                                      min_count=norm.min_count)
    return ResNetMaskNet(spec, num_filters, resnet_norm, dtype, name='convnet')
  assert isinstance(spec, HourglassSpec), spec
  hourglass_norm = dataclasses.replace(HOURGLASS_NORM, momentum=hourglass_bn_momentum,
                                       axis_name=norm.axis_name, min_count=norm.min_count)
  return Hourglass(spec, num_filters, hourglass_norm, dtype, name='convnet')


class MaskHead(nn.Module):
  """Deep-MARC mask head: [R, S, S, C_in] ROI features -> [R, S*u, S*u] float32 mask logits.

  Attributes:
    type: a catalogue.MASK_HEADS name ('default', 'resnet4', ..., 'hourglass52', ...).
    num_filters: deconv channels; also `default`'s conv width and the hourglass/ResNet nc.
    upsample_factor: u, kernel size and stride of the deconv.
    class_agnostic: one logit channel; otherwise num_classes channels gathered by ROI class.
    num_classes: logit channels when class-specific (ROI classes index them directly).
    norm: the head's own BatchNorms; its axis_name and min_count (a floor on the values per
      channel the statistics rest on, layers.BatchNorm) also apply to the convnet's BatchNorms,
      which keep their reference momentum/epsilon (except as below).
    hourglass_bn_momentum: the hourglass convnet's BatchNorm momentum (the reference's 0.1
      unless changed; config_lib explains why a small-batch run changes it).
    dtype: computation dtype (params stay float32; logits are returned as float32).
  """
  type: str
  num_filters: int = 64
  upsample_factor: int = 2
  class_agnostic: bool = True
  num_classes: int = 91
  norm: NormConfig = NormConfig()
  hourglass_bn_momentum: float = HOURGLASS_NORM.momentum
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, roi_features: jax.Array, roi_classes: jax.Array | None,
               train: bool, mask: jax.Array | None = None) -> jax.Array:
    """roi_features [R, S, S, C_in]; roi_classes [R] int (class-specific only) -> [R, uS, uS].

    mask: optional [R] bool, the ROIs whose features enter BatchNorm statistics (padding slots
    then change nothing for the real ones).
    """
    x = convnet(self.type, self.num_filters, self.norm, self.hourglass_bn_momentum,
                self.dtype)(roi_features, train, mask)
    u = self.upsample_factor
    # transpose_kernel: Keras' Conv2DTranspose semantics and kernel layout [u, u, out, in], so
    # fan_out (u*u*in) is the one Keras computes for this initializer.
    x = nn.ConvTranspose(self.num_filters, (u, u), (u, u), padding='VALID', transpose_kernel=True,
                         kernel_init=he_normal_fan_out, dtype=self.dtype, name='deconv')(x)
    x = nn.relu(batch_norm(x, train, self.norm, self.dtype, mask, name='deconv_bn'))
    num_logits = 1 if self.class_agnostic else self.num_classes
    logits = Conv(num_logits, (1, 1), kernel_init=he_normal_fan_out, dtype=self.dtype,
                  name='logits')(x).astype(jnp.float32)
    if self.class_agnostic:
      return logits[..., 0]
    if roi_classes is None:
      raise ValueError('a class-specific mask head needs roi_classes')
    index = roi_classes.astype(jnp.int32)[:, None, None, None]
    return jnp.take_along_axis(logits, index, axis=-1)[..., 0]
