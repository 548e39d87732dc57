"""Architectures by name: the specs the configs choose from.

Sources: the mask heads of the TF Object Detection API's deepmac_meta_arch.py (`network_type`)
and of Model Garden's `official/projects/deepmac_maskrcnn/modeling/heads/hourglass_network.py`
(`hourglass_10` .. `hourglass_100`, `hourglass_20_uniform_size`, `hourglass_20_no_shortcut`);
CenterNet's stacked Hourglass backbones (`hourglass_104`); the SpineNets of
`official/vision/modeling/backbones/spinenet.py` (`SCALING_MAP`).

These tables are the single source of allowed names for config validation and of the numbers
the Flax modules are built from.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class HourglassSpec:
  """A single hourglass used as a mask head (hourglass_network.py); channels are multiples of nc."""
  blocks_per_stage: tuple[int, ...]
  channel_multipliers: tuple[int, ...]
  downsample: bool = True       # stride-2 first block of each encoder stage
  encoder_shortcut: bool = True  # the skip branch merged after upsampling


@dataclasses.dataclass(frozen=True)
class ResNetHeadSpec:
  """`resnetN` mask head: 1x1 conv to nc, then basic blocks (count, channel multiplier)."""
  stages: tuple[tuple[int, int], ...]


@dataclasses.dataclass(frozen=True)
class ConvHeadSpec:
  """The standard Mask R-CNN head: `num_convs` 3x3 convs of `num_filters`."""
  num_convs: int = 4


_HG52 = ((2, 2, 2, 2, 2, 4), (2, 2, 3, 3, 3, 4))
MASK_HEADS: dict[str, HourglassSpec | ResNetHeadSpec | ConvHeadSpec] = {
    'default': ConvHeadSpec(4),
    'resnet4': ResNetHeadSpec(((2, 2),)),
    'resnet8': ResNetHeadSpec(((4, 2),)),
    'resnet12': ResNetHeadSpec(((6, 2),)),
    'resnet16': ResNetHeadSpec(((8, 2),)),
    'resnet20': ResNetHeadSpec(((8, 2), (2, 3))),
    'hourglass10': HourglassSpec((1, 1), (2, 2)),
    'hourglass20': HourglassSpec((1, 2, 2), (2, 2, 3)),
    'hourglass32': HourglassSpec((2, 2, 2, 2), (2, 2, 3, 3)),
    'hourglass52': HourglassSpec(*_HG52),
    'hourglass100': HourglassSpec((4, 4, 4, 4, 4, 8), _HG52[1]),
    'hourglass20_uniform_size': HourglassSpec((1, 2, 2), (2, 2, 3), downsample=False),
    'hourglass20_no_shortcut': HourglassSpec((1, 2, 2), (2, 2, 3), encoder_shortcut=False),
}


@dataclasses.dataclass(frozen=True)
class HourglassBackboneSpec:
  """CenterNet's stacked Hourglass backbone (hourglass_network.py `HourglassNetwork` with
  `initial_downsample=True`): stem width, per-stage channels and blocks, number of stacks."""
  stem_channels: int
  channel_dims: tuple[int, ...]
  blocks_per_stage: tuple[int, ...]
  num_stacks: int


HOURGLASS_BACKBONES = {
    # hourglass_network.hourglass_104(): CenterNet's and Deep-MAC's backbone.
    'hourglass104': HourglassBackboneSpec(128, (256, 256, 384, 384, 384, 512),
                                          (2, 2, 2, 2, 2, 4), 2),
    # The official_deepmac_facts.py oracle's small variant: Hourglass-104's layout (two stacks,
    # stem, inter-stack merges) with two stages and narrow channels, for parity tests.
    'hourglass104_tiny': HourglassBackboneSpec(16, (32, 32, 48), (2, 2, 4), 2),
    # One-stack CenterNet backbones (center_net_hourglass_feature_extractor.hourglass_10/20/32/
    # 52: single_stage_hourglass with the input downsampling, nc 32/48/48/64).
    'hourglass10': HourglassBackboneSpec(32, (64, 64), (1, 1), 1),
    'hourglass20': HourglassBackboneSpec(48, (96, 96, 144), (1, 2, 2), 1),
    'hourglass32': HourglassBackboneSpec(48, (96, 96, 144, 144), (2, 2, 2, 2), 1),
    'hourglass52': HourglassBackboneSpec(64, (128, 128, 192, 192, 192, 256), (2, 2, 2, 2, 2, 4),
                                         1),
}


@dataclasses.dataclass(frozen=True)
class SpineNetSpec:
  """A row of spinenet.py's SCALING_MAP."""
  endpoints_num_filters: int
  filter_size_scale: float
  resample_alpha: float
  block_repeats: int


SPINENETS = {
    'spinenet49s': SpineNetSpec(128, 0.65, 0.5, 1),
    'spinenet49': SpineNetSpec(256, 1.0, 0.5, 1),
    'spinenet96': SpineNetSpec(256, 1.0, 0.5, 2),
    'spinenet143': SpineNetSpec(256, 1.0, 1.0, 3),
    'spinenet143l': SpineNetSpec(256, 1.3, 1.0, 3),  # the official SCALING_MAP's '143L'
    'spinenet190': SpineNetSpec(512, 1.3, 1.0, 4),
}

RESNETS = {'resnet50': (3, 4, 6, 3), 'resnet101': (3, 4, 23, 3)}

BACKBONES = tuple(SPINENETS) + tuple(RESNETS)
