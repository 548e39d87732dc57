"""SpineNet backbones (49S/49/96/143/143L/190) as Model Garden builds them.

Source: official/vision/modeling/backbones/spinenet.py, layers/nn_blocks.py (BottleneckBlock,
ResidualBlock) and layers/nn_layers.py (get_stochastic_depth_rate, StochasticDepth). The
official parameter counts are asserted in tests/test_spinenet.py.

Input [B, H, W, 3] (NHWC, normalised), H and W multiples of 2^7 (the coarsest block level);
output {level: [B, H/2^level, W/2^level, endpoints_num_filters]} for min_level..max_level.

Architecture, all reproduced:
1. Stem: 7x7/2 conv (64 channels, not scaled) + BN + act + 3x3/2 max pool, then two level-2
   bottleneck groups of `block_repeats` blocks (filters int(64 * filter_size_scale)); both group
   outputs are nodes 0 and 1 of the network list.
2. Scale-permuted blocks i = 1..16 (`BLOCK_SPECS`): each resamples its two parent nodes to its
   level and width, sums them (plus, for an output block, every earlier node that nothing
   consumed yet and that has the same level and channel count), applies the activation, then a
   group of `block_repeats` blocks (the first with a projection shortcut when the channel count
   changes; all stride 1). Filters int(FILTER_SIZE_MAP[level] * filter_size_scale); a bottleneck
   outputs 4x filters, a residual block 1x.
3. Resampling of a parent with C channels (C/4 if it is a bottleneck): 1x1 conv to
   int(C * resample_alpha) + BN + act; going down, a 3x3/2 conv + BN + act and then 3x3/2 max
   pools ('SAME'); going up, nearest-neighbour repetition; finally a 1x1 conv to the target
   block's input width (4x filters for a bottleneck target) + BN, no activation.
4. Endpoints: for each level, the output block's features -> 1x1 conv to endpoints_num_filters +
   BN + act.
Every conv is bias-free with 'SAME' padding and Keras' VarianceScaling() kernel init; BN gamma 1,
beta 0. Blocks: BN after every conv, act after the residual add (and inside the branch), no SE.
Stochastic depth (scale-permuted blocks only, every block of a group with the same rate
init_rate * i / 16) drops the residual branch per example in training and scales kept ones by
1 / keep_prob. Only the nodes the endpoints reach are built, exactly like the functional Keras
model: with min_level 3 the last spec (a level-2 output, block 16) and its two resamplings have
no variables, as in the official counts.

The unused-node absorption compares static widths in Keras. With a fixed input size (Mask R-CNN
passes InputSpec [None, H, W, 3]) it happens as here; a Keras model built with unknown spatial
size would skip it (same variables, different sums). With the official specs this happens once,
for every scale: block 13 (level 5 bottleneck) also sums block 10 (level 5 bottleneck), which
nothing else consumes.

Variable names (every conv + BN pair is a `ConvBN`: `Conv_0/kernel`, `BatchNorm_0/{scale,bias}`,
batch_stats `BatchNorm_0/{mean,var}`):
  stem                          7x7 conv + BN
  stem_block_{g}_{r}            g = 1, 2; r = 0..block_repeats-1; children shortcut (r = 0 of
                                group 1, unless 4 * filters = 64), conv1, conv2, conv3
  resample_{i}_{k}              block i = 1..16, parent k = 0, 1 (input_offsets[k]); children
                                conv_in, downsample (only when going down), conv_out
  block_{i}_{r}                 bottleneck: conv1, conv2, conv3; residual: conv1, conv2 (never a
                                shortcut conv: the fused input already has the block's width)
  endpoint_{level}              1x1 conv + BN
The per-part parameter breakdown of the oracle (stem / blocks / resampling / endpoints) is the sum
over the prefixes `stem`, `block_`, `resample_`, `endpoint_`.

Mapping onto the official Keras names (`tools/convert_tf_checkpoint.spinenet_keras_names`
computes it). Keras numbers layers of one
class in creation order (in a fresh session), and SpineNet creates them in this order: stem conv +
BN, the stem groups' blocks, then for i = 1..16: resample(input0) convs+BNs, resample(input1)
convs+BNs, block group i's blocks; finally the endpoint convs+BNs for min..max level. Layers of
block 16 are created too (advancing the counters) although the model drops them. So, for
SpineNet-49: stem = conv2d / batch_normalization; stem_block_1_0 = bottleneck_block,
stem_block_2_0 = bottleneck_block_1; resample_1_0 = conv2d_1, conv2d_2 (+ the same-numbered
batch_normalization_n); resample_2_0 = conv2d_5..7; block_2_0 = residual_block; conv2d_77..80
belong to the dropped block 16; endpoint_3..7 = conv2d_81..85. Inside a block the sublayers
are numbered locally in build order: shortcut (if any), conv1, conv2, conv3 ->
`bottleneck_block_2/conv2d`, `.../conv2d_1`, ... with the matching `batch_normalization[_n]`.
Keras kernels are HWIO like flax's; gamma/beta/moving_mean/moving_variance map to
scale/bias/mean/var. (model.layers / checkpoint `layer_with_weights-N` order is topological, not
creation order: map by name, not by position.)

Parity: tests/test_convert.py converts a narrow, randomised official SpineNet
(oracle/deepmarc_parity.py) through that mapping (every official variable used once, all shapes
equal) and compares the evaluation-mode endpoints. Training mode is not compared: batch
statistics over a handful of values at the coarsest levels make a tiny random network so
ill-conditioned that a rounding-sized input change moves its outputs as much as the two
implementations differ.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepmarc_jax.models import catalogue
from deepmarc_jax.models.layers import (BottleneckBlock, ConvBN, Dtype, NormConfig,
                                         StochasticDepth, variance_scaling)

FILTER_SIZE_MAP = {1: 32, 2: 64, 3: 128, 4: 256, 5: 256, 6: 256, 7: 256}


class BlockSpec(NamedTuple):
  level: int
  block_fn: str  # 'bottleneck' or 'residual'
  input_offsets: tuple[int, int]  # indices into [stem node 0, stem node 1, block 1, ...]
  is_output: bool


# The NAS-found scale permutation (official SPINENET_BLOCK_SPECS); block i is entry i - 1.
BLOCK_SPECS = tuple(BlockSpec(*b) for b in (
    (2, 'bottleneck', (0, 1), False),
    (4, 'residual', (0, 1), False),
    (3, 'bottleneck', (2, 3), False),
    (4, 'bottleneck', (2, 4), False),
    (6, 'residual', (3, 5), False),
    (4, 'bottleneck', (3, 5), False),
    (5, 'residual', (6, 7), False),
    (7, 'residual', (6, 8), False),
    (5, 'bottleneck', (8, 9), False),
    (5, 'bottleneck', (8, 10), False),
    (4, 'bottleneck', (5, 10), True),
    (3, 'bottleneck', (4, 10), True),
    (5, 'bottleneck', (7, 12), True),
    (7, 'bottleneck', (5, 14), True),
    (6, 'bottleneck', (12, 14), True),
    (2, 'bottleneck', (2, 13), True),
))
NUM_INIT_BLOCKS = 2  # the stem's level-2 bottleneck groups (nodes 0 and 1)

_ACTIVATIONS = {'relu': nn.relu, 'swish': nn.swish}


def stochastic_depth_rates(init_rate: float, num_blocks: int = len(BLOCK_SPECS)
                           ) -> tuple[float, ...]:
  """Drop rate of scale-permuted blocks 1..num_blocks: init_rate * i / num_blocks.

  As nn_layers.get_stochastic_depth_rate with n = len(block specs) = 16, the unbuilt block 16
  included (so block 15 gets 15/16 of init_rate, never the full rate).
  """
  if not 0.0 <= init_rate <= 1.0:
    raise ValueError(f'stochastic depth rate must be within [0, 1], got {init_rate}')
  return tuple(init_rate * float(i) / num_blocks for i in range(1, num_blocks + 1))


@dataclasses.dataclass(frozen=True)
class Node:
  """One feature map of the network list: a stem group (index 0, 1) or block i (index i + 1)."""
  level: int
  block_fn: str
  filters: int
  parents: tuple[int, ...] = ()  # input_offsets, then absorbed unused nodes (output blocks)

  @property
  def channels(self) -> int:
    return 4 * self.filters if self.block_fn == 'bottleneck' else self.filters


def build_graph(filter_size_scale: float, block_specs=BLOCK_SPECS) -> tuple[Node, ...]:
  """The nodes [stem 0, stem 1, block 1..16] with their parents, as the official builder wires them.

  An output block also sums every earlier node with no outgoing connection yet whose width
  (i.e. level, for valid input sizes) and channel count equal the block's resampled inputs'.
  """
  stem_filters = int(FILTER_SIZE_MAP[2] * filter_size_scale)
  nodes = [Node(2, 'bottleneck', stem_filters)] * NUM_INIT_BLOCKS
  outgoing = [0] * len(nodes)
  for spec in block_specs:
    target = Node(spec.level, spec.block_fn, int(FILTER_SIZE_MAP[spec.level] * filter_size_scale))
    parents = list(spec.input_offsets)
    for j in spec.input_offsets:
      outgoing[j] += 1
    if spec.is_output:
      for j, node in enumerate(nodes):
        if outgoing[j] == 0 and node.level == target.level and node.channels == target.channels:
          parents.append(j)
          outgoing[j] += 1
    nodes.append(dataclasses.replace(target, parents=tuple(parents)))
    outgoing.append(0)
  return tuple(nodes)


def output_nodes(min_level: int, max_level: int, block_specs=BLOCK_SPECS) -> dict[int, int]:
  """{level: node index} of the output blocks feeding endpoints min_level..max_level."""
  outputs = {}
  for i, spec in enumerate(block_specs):
    if spec.is_output:
      if spec.level in outputs:
        raise ValueError(f'duplicate SpineNet output level {spec.level}')
      outputs[spec.level] = i + NUM_INIT_BLOCKS
  missing = [l for l in range(min_level, max_level + 1) if l not in outputs]
  if missing:
    raise ValueError(f'SpineNet has no output block for levels {missing}; output levels are '
                     f'{sorted(outputs)}')
  return {l: outputs[l] for l in range(min_level, max_level + 1)}


def built_nodes(nodes: tuple[Node, ...], outputs: dict[int, int]) -> frozenset[int]:
  """Indices of the nodes the endpoints depend on (the functional Keras model keeps only those)."""
  needed, stack = set(), list(outputs.values())
  while stack:
    j = stack.pop()
    if j not in needed:
      needed.add(j)
      stack.extend(nodes[j].parents)
  return frozenset(needed)


def _conv_bn(norm: NormConfig, dtype: Dtype):
  """ConvBN with SpineNet's settings (Keras VarianceScaling() kernels, bias-free, 'SAME')."""
  return functools.partial(ConvBN, norm=norm, kernel_init=variance_scaling, dtype=dtype)


class ResidualBlock(nn.Module):
  """nn_blocks.ResidualBlock as SpineNet uses it: 3x3 -> 3x3, stride 1.

  x: [B, H, W, C] -> [B, H, W, filters]. (Its bottleneck nodes use layers.BottleneckBlock.)
  """
  filters: int
  use_projection: bool
  stochastic_depth: float = 0.0
  activation: str = 'relu'
  norm: NormConfig = NormConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    act = _ACTIVATIONS[self.activation]
    conv = _conv_bn(self.norm, self.dtype)
    shortcut = x
    if self.use_projection:
      shortcut = conv(self.filters, 1, activation=None, name='shortcut')(x, train)
    x = conv(self.filters, 3, activation=act, name='conv1')(x, train)
    x = conv(self.filters, 3, activation=None, name='conv2')(x, train)
    x = StochasticDepth(self.stochastic_depth)(x, train)
    return act(x + shortcut)


class Resample(nn.Module):
  """_resample_with_alpha: [B, h_in, w_in, C] at `in_level` -> [B, h, w, out_channels]."""
  hidden: int  # int(C * alpha), C divided by 4 for a bottleneck parent
  out_channels: int
  in_level: int
  out_level: int
  activation: str = 'relu'
  norm: NormConfig = NormConfig()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    act = _ACTIVATIONS[self.activation]
    conv = _conv_bn(self.norm, self.dtype)
    x = conv(self.hidden, 1, activation=act, name='conv_in')(x, train)
    if self.out_level > self.in_level:
      x = conv(self.hidden, 3, 2, activation=act, name='downsample')(x, train)
      for _ in range(self.out_level - self.in_level - 1):
        x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
    elif self.out_level < self.in_level:
      # Nearest neighbour (spatial_transform_ops.nearest_upsampling): each pixel -> s x s.
      s = 2 ** (self.in_level - self.out_level)
      b, h, w, c = x.shape
      x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, s, w, s, c))
      x = x.reshape(b, h * s, w * s, c)
    return conv(self.out_channels, 1, activation=None, name='conv_out')(x, train)


class SpineNet(nn.Module):
  """`__call__(images [B,H,W,3], train)` -> {level: [B, H/2^l, W/2^l, endpoints_num_filters]}.

  `stochastic_depth` is the initial rate (block i gets rate * i / 16); with it > 0 and
  train=True, `apply` needs an rng stream 'dropout'.
  """
  spec: catalogue.SpineNetSpec
  min_level: int = 3
  max_level: int = 7
  norm: NormConfig = NormConfig()
  stochastic_depth: float = 0.0
  activation: str = 'relu'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool) -> dict[int, jax.Array]:
    if self.activation not in _ACTIVATIONS:
      raise ValueError(f'activation {self.activation!r} not implemented; '
                       f'choose from {sorted(_ACTIVATIONS)}')
    spec = self.spec
    nodes = build_graph(spec.filter_size_scale)
    outputs = output_nodes(self.min_level, self.max_level)
    built = built_nodes(nodes, outputs)
    if images.ndim != 4:
      raise ValueError(f'SpineNet expects images [B, H, W, C], got shape {images.shape}')
    coarsest = max(max(nodes[j].level for j in built), self.max_level)
    height, width = images.shape[1:3]
    if height % 2**coarsest or width % 2**coarsest:
      raise ValueError(f'SpineNet needs input height and width that are multiples of '
                       f'2^{coarsest} = {2**coarsest} (its coarsest level); got {height}x{width}')
    act = _ACTIVATIONS[self.activation]
    rates = stochastic_depth_rates(self.stochastic_depth)

    def group(x, node, rate, prefix):
      # _block_group: projection only where the channel count changes (strides are always 1).
      for r in range(spec.block_repeats):
        projection = r == 0 and x.shape[-1] != node.channels
        if node.block_fn == 'bottleneck':
          block = BottleneckBlock(node.filters, use_projection=projection, stochastic_depth=rate,
                                  activation=act, norm=self.norm, dtype=self.dtype,
                                  name=f'{prefix}_{r}')
        else:
          block = ResidualBlock(node.filters, projection, rate, self.activation, self.norm,
                                self.dtype, name=f'{prefix}_{r}')
        x = block(x, train)
      return x

    # Stem: 7x7/2 conv + BN + act + 3x3/2 max pool, then the two level-2 groups.
    x = ConvBN(64, 7, 2, activation=act, norm=self.norm, kernel_init=variance_scaling,
               dtype=self.dtype, name='stem')(images.astype(self.dtype), train)
    x = nn.max_pool(x, (3, 3), (2, 2), padding='SAME')
    feats = []
    for g in range(NUM_INIT_BLOCKS):
      x = group(x, nodes[g], 0.0, f'stem_block_{g + 1}')
      feats.append(x)

    for i in range(1, len(nodes) - NUM_INIT_BLOCKS + 1):
      j = i + NUM_INIT_BLOCKS - 1
      node = nodes[j]
      if j not in built:  # e.g. the level-2 output block 16 when min_level = 3
        feats.append(None)
        continue
      parents = []
      for k, p in enumerate(node.parents):
        parent = nodes[p]
        if k < 2:  # the two input_offsets are resampled; absorbed nodes enter as they are
          hidden = int(parent.channels / (4 if parent.block_fn == 'bottleneck' else 1)
                       * spec.resample_alpha)
          parents.append(Resample(hidden, node.channels, parent.level, node.level,
                                  self.activation, self.norm, self.dtype,
                                  name=f'resample_{i}_{k}')(feats[p], train))
        else:
          parents.append(feats[p])
      x = act(functools.reduce(jnp.add, parents))
      feats.append(group(x, node, rates[i - 1], f'block_{i}'))

    return {level: ConvBN(spec.endpoints_num_filters, 1, activation=act, norm=self.norm,
                          kernel_init=variance_scaling, dtype=self.dtype,
                          name=f'endpoint_{level}')(feats[j], train)
            for level, j in outputs.items()}


def spinenet_from_name(name: str, **kwargs) -> SpineNet:
  """SpineNet by catalogue name ('spinenet49s', 'spinenet49', ..., 'spinenet190')."""
  if name not in catalogue.SPINENETS:
    raise ValueError(f'unknown SpineNet {name!r}; choose from {sorted(catalogue.SPINENETS)}')
  return SpineNet(catalogue.SPINENETS[name], **kwargs)
