"""The meta-architectures by `config.model.meta_arch`: each module's model class and loss.

Both models have the same entry points (`__call__(batch, train)` for training, `detect`,
`segment_boxes`, and for the masks-from-boxes tool `encode` + `box_mask_logits`), and each
module a `loss(outputs, model_config) -> (total, parts)`, so the trainer, the evaluator and the
tools never branch on the meta-architecture.
"""
from __future__ import annotations

from types import ModuleType

import flax.linen as nn

from deepmarc_jax.models import centernet
from deepmarc_jax.models import mask_rcnn

META_ARCHS: dict[str, ModuleType] = {'mask_rcnn': mask_rcnn, 'deepmac': centernet}
_MODELS = {'mask_rcnn': mask_rcnn.MaskRCNN, 'deepmac': centernet.DeepMAC}


def _module(config) -> str:
  name = config.model.meta_arch
  if name not in META_ARCHS:
    raise ValueError(f'model.meta_arch={name!r}; allowed: {sorted(META_ARCHS)}')
  return name


def model_from_config(config) -> nn.Module:
  """The Flax model `config.model.meta_arch` names, built from the config."""
  return _MODELS[_module(config)].from_config(config)


def loss_fn(config):
  """(outputs, model_config) -> (total loss, {name: part}) of `config.model.meta_arch`."""
  return META_ARCHS[_module(config)].loss
