"""Hourglass networks: single hourglasses used as mask heads (catalogue.MASK_HEADS' `hourglass*`
entries) and CenterNet's stacked Hourglass backbone (`StackedHourglass`, Deep-MAC).

Mirrors Model Garden's `deepmac_maskrcnn/modeling/heads/hourglass_network.py` with
`initial_downsample=False` (the only mode a mask head uses):

  [R, S, S, C_in] -> conv_input_*: 3x3 conv nc + BN + ReLU, residual block to channel_dims[0]
    -> hourglass_network: EncoderDecoder, recursive, one level per stage
    -> output_conv: 3x3 conv channel_dims[0] + BN + ReLU -> [R, S, S, channel_dims[0]]

channel_dims = nc * spec.channel_multipliers (nc = num_channels, 64 in Deep-MARC). With stagewise
downsampling S must be a multiple of 2**stages (hourglass52/100: 32). Every conv is bias-free with
Keras' default glorot_uniform init and is followed by BatchNorm with eps 1e-5 and Keras momentum
0.1 (moving = 0.1 * moving + 0.9 * batch; the reference uses SyncBatchNormalization). Parameter
names follow the reference's attribute names to ease weight conversion.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepmarc_jax.models.catalogue import HourglassBackboneSpec, HourglassSpec
from deepmarc_jax.models.layers import ConvBN, Dtype, NormConfig

HOURGLASS_NORM = NormConfig(momentum=0.1, epsilon=1e-5)
# The reference's ZeroPadding2D(1) + 'valid' conv; differs from 'SAME' for stride 2 (SAME pads
# only the bottom/right there).
_PAD_1 = ((1, 1), (1, 1))

# One residual block: (output features, stride of its first conv, 1x1 conv + BN on the skip).
BlockPlan = tuple[int, int, bool]


def residual_stack_plan(out_features: int, num_blocks: int, initial_stride: int = 1,
                        residual_features: int | None = None,
                        initial_conv_skip: bool = False) -> tuple[BlockPlan, ...]:
  """The reference's `_make_repeated_residual_blocks` rule, block by block.

  All blocks but the last output `residual_features` (default `out_features`); only the first
  block strides. A single block honours the stride but ignores `initial_conv_skip`, exactly as
  the reference does.
  """
  residual_features = residual_features or out_features
  plan = []
  for i in range(num_blocks - 1):
    stride = initial_stride if i == 0 else 1
    plan.append((residual_features, stride, stride > 1 or (i == 0 and initial_conv_skip)))
  if num_blocks == 1:
    plan.append((out_features, initial_stride, initial_stride > 1))
  else:
    plan.append((out_features, 1, residual_features != out_features))
  return tuple(plan)


class ResidualBlock(nn.Module):
  """3x3 conv-BN-ReLU (strided), 3x3 conv-BN, + skip (identity or 1x1 conv-BN), ReLU.

  [R, H, W, C] -> [R, ceil(H / strides), ceil(W / strides), features].
  """
  features: int
  strides: int = 1
  conv_skip: bool = False
  norm: NormConfig = HOURGLASS_NORM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    y = ConvBN(self.features, 3, self.strides, padding=_PAD_1, norm=self.norm, dtype=self.dtype,
               name='conv_block')(x, train, mask)
    y = ConvBN(self.features, 3, activation=None, padding=_PAD_1, norm=self.norm,
               dtype=self.dtype, name='conv')(y, train, mask)
    if self.conv_skip:
      x = ConvBN(self.features, 1, self.strides, activation=None, padding='VALID',
                 norm=self.norm, dtype=self.dtype, name='skip')(x, train, mask)
    return nn.relu(y + x)


class ResidualStack(nn.Module):
  """Residual blocks applied in sequence, one per `plan` entry (see residual_stack_plan)."""
  plan: tuple[BlockPlan, ...]
  norm: NormConfig = HOURGLASS_NORM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    for i, (features, strides, conv_skip) in enumerate(self.plan):
      x = ResidualBlock(features, strides, conv_skip, self.norm, self.dtype,
                        name=f'block_{i}')(x, train, mask)
    return x


def upsample_nearest(x: jax.Array, factor: int) -> jax.Array:
  """[R, H, W, C] -> [R, H * factor, W * factor, C], nearest neighbour (Keras UpSampling2D)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


class EncoderDecoder(nn.Module):
  """One hourglass level; recurses on channel_dims[1:] until one stage is left.

  encoder_block1 (full-res skip, channel_dims[0]) + upsample(decoder(inner(encoder_block2(x)))),
  where encoder_block2 strides by 2 (if `downsample`) to channel_dims[1] and the decoder returns
  to channel_dims[0]. [R, H, W, C] -> [R, H, W, channel_dims[0]].
  """
  channel_dims: tuple[int, ...]
  blocks_per_stage: tuple[int, ...]
  downsample: bool = True
  encoder_shortcut: bool = True
  norm: NormConfig = HOURGLASS_NORM
  dtype: Dtype = jnp.float32

  def _stack(self, plan: tuple[BlockPlan, ...], name: str) -> ResidualStack:
    return ResidualStack(plan, self.norm, self.dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    features, inner_features = self.channel_dims[:2]
    num_blocks = self.blocks_per_stage[0]
    stride = 2 if self.downsample else 1

    skip = None
    if self.encoder_shortcut:
      skip = self._stack(residual_stack_plan(features, num_blocks), 'encoder_block1')(
          x, train, mask)
    y = self._stack(residual_stack_plan(inner_features, num_blocks, stride,
                                        initial_conv_skip=features != inner_features),
                    'encoder_block2')(x, train, mask)
    if len(self.channel_dims) > 2:
      y = EncoderDecoder(self.channel_dims[1:], self.blocks_per_stage[1:], self.downsample,
                         self.encoder_shortcut, self.norm, self.dtype,
                         name='inner_block')(y, train, mask)
    else:
      y = self._stack(residual_stack_plan(inner_features, self.blocks_per_stage[1]),
                      'inner_block')(y, train, mask)
    y = self._stack(residual_stack_plan(features, num_blocks, residual_features=inner_features),
                    'decoder_block')(y, train, mask)
    y = upsample_nearest(y, stride)
    return y if skip is None else skip + y


class Hourglass(nn.Module):
  """A single hourglass without input downsampling: [R, S, S, C_in] -> [R, S, S, 2nc..4nc].

  The output has channel_dims[0] = nc * spec.channel_multipliers[0] channels (128 for nc 64).
  """
  spec: HourglassSpec
  num_channels: int = 64
  norm: NormConfig = HOURGLASS_NORM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    channel_dims = tuple(m * self.num_channels for m in self.spec.channel_multipliers)
    conv_bn = dict(padding=_PAD_1, norm=self.norm, dtype=self.dtype)
    x = ConvBN(self.num_channels, 3, name='conv_input_conv_block', **conv_bn)(x, train, mask)
    x = ResidualBlock(channel_dims[0], conv_skip=True, norm=self.norm, dtype=self.dtype,
                      name='conv_input_residual_block')(x, train, mask)
    x = EncoderDecoder(channel_dims, self.spec.blocks_per_stage, self.spec.downsample,
                       self.spec.encoder_shortcut, self.norm, self.dtype,
                       name='hourglass_network')(x, train, mask)
    return ConvBN(channel_dims[0], 3, name='output_conv', **conv_bn)(x, train, mask)


class StackedHourglass(nn.Module):
  """CenterNet's Hourglass backbone (the TF OD API's `HourglassNetwork` with
  `initial_downsample=True`; Hourglass-104 is catalogue.HOURGLASS_BACKBONES['hourglass104']).

  x [B, S, S, 3] (normalized) -> one [B, S/4, S/4, channel_dims[0]] output per stack:
    downsample_input: 7x7/2 conv (stem_channels) + BN + ReLU, residual block /2 (1x1 conv skip)
    per stack i: hourglass_network_i (an EncoderDecoder) -> output_conv_i (3x3 conv-BN-ReLU)
      = output i; between stacks: ReLU(intermediate_conv1_i(input) + intermediate_conv2_i(
      output)) (each a 1x1 conv-BN) -> intermediate_residual_i -> the next stack's input.
  """
  spec: HourglassBackboneSpec
  norm: NormConfig = HOURGLASS_NORM
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list[jax.Array]:
    spec = self.spec
    features = spec.channel_dims[0]
    conv_bn = dict(norm=self.norm, dtype=self.dtype)
    x = ConvBN(spec.stem_channels, 7, 2, padding=((3, 3), (3, 3)),
               name='downsample_input_conv_block', **conv_bn)(x, train)
    x = ResidualBlock(features, 2, conv_skip=True, name='downsample_input_residual_block',
                      **conv_bn)(x, train)
    outputs = []
    for i in range(spec.num_stacks):
      y = EncoderDecoder(spec.channel_dims, spec.blocks_per_stage, name=f'hourglass_network_{i}',
                         **conv_bn)(x, train)
      y = ConvBN(features, 3, padding=_PAD_1, name=f'output_conv_{i}', **conv_bn)(y, train)
      outputs.append(y)
      if i < spec.num_stacks - 1:
        merged = (ConvBN(features, 1, activation=None, name=f'intermediate_conv1_{i}',
                         **conv_bn)(x, train)
                  + ConvBN(features, 1, activation=None, name=f'intermediate_conv2_{i}',
                           **conv_bn)(y, train))
        x = ResidualBlock(features, name=f'intermediate_residual_{i}', **conv_bn)(
            nn.relu(merged), train)
    return outputs
