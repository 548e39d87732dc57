"""Masks for user boxes from any of our checkpoints: the image is encoded once, each box costs
only the mask head.

A `Segmenter` holds a model and its variables, from a run's workdir (`from_workdir`: its
config.json and a kept checkpoint) or from converted variables with the config that describes
them (`from_variables`, e.g. an official Deep-MARC checkpoint converted by
tools/convert_tf_checkpoint.py). `encode` preprocesses an image exactly as the eval pipeline
does (data/pipeline.preprocess_image) and runs the backbone; `box_masks` runs ROIAlign and the
mask head on any number of boxes. Box counts are padded to powers of two (at least 8), so a
session compiles a handful of shapes. The two steps together compute `MaskRCNN.segment_boxes`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from deepmarc_jax import checkpoint
from deepmarc_jax import experiment as experiment_lib
from deepmarc_jax.data import pipeline
from deepmarc_jax.masks_from_boxes import boxes as boxes_lib
from deepmarc_jax.masks_from_boxes import outputs
from deepmarc_jax.models import meta_archs

# Box sets are padded to a power of two (at least this), so the mask head compiles once per
# bucket, not per count; small buckets keep one box from paying for many.
MIN_BOX_BUCKET = 1


class CheckpointMismatchError(ValueError):
  """Variables that do not fit the model the config describes."""


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One encoded image: features {level: [1, h_l, w_l, C]}, its input-pixel scale (input px
  per original px) and original height and width."""
  features: Any
  scale: float
  height: int
  width: int


@dataclasses.dataclass(frozen=True)
class ImageMasks:
  """The masks of one image's usable boxes, K of them.

  numbers: [K] each box's 1-based position among the boxes given (skipped ones keep theirs);
  boxes: [K, 4] y1, x1, y2, x2 original-image pixels; classes: [K] int32; box_masks: [K, m, m]
  box-relative probabilities; probabilities: [K, H, W] pasted at the original resolution.
  """
  numbers: list[int]
  boxes: np.ndarray
  classes: np.ndarray
  box_masks: np.ndarray
  probabilities: np.ndarray

  def labels(self, threshold: float) -> np.ndarray:
    return outputs.label_image(self.probabilities, self.numbers, threshold)

  def coco_results(self, image_id: int, threshold: float) -> list[dict]:
    return outputs.coco_results(image_id, self.probabilities, self.boxes, self.classes,
                                threshold)


class Segmenter:
  """Box-relative mask probabilities for boxes on images, from one model's variables."""

  def __init__(self, config, variables: dict[str, Any]):
    self.config = config
    self.model = meta_archs.model_from_config(config)
    self.variables = variables
    self.image_size = int(config.data.image_size)
    self.mask_threshold = float(config.eval.mask_threshold)
    model = self.model
    self._features = jax.jit(lambda v, images: model.apply(v, images, method='encode'))
    # The eval pipeline's own resize and pad, traced once for any image size (eager TF would
    # spend longer dispatching its ops than a small model spends encoding).
    self._preprocess = tf.function(
        lambda image: pipeline.preprocess_image(image, self.image_size),
        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    self._box_masks = jax.jit(lambda v, features, boxes, classes: jax.nn.sigmoid(
        model.apply(v, features, boxes, classes, method='box_mask_logits')))

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> Segmenter:
    """The model of a run.py workdir at its checkpoint of `step` (default the latest kept).

    FileNotFoundError names what is missing; CheckpointMismatchError says when the checkpoint
    does not fit the workdir's config.json.
    """
    config = checkpoint.read_run_config(workdir)
    exp = experiment_lib.for_inference(config)
    try:
      state = experiment_lib.restore_checkpoint(exp, workdir, step)
    except (ValueError, TypeError, KeyError) as e:
      raise CheckpointMismatchError(
          f'the checkpoint in {workdir}/checkpoints does not fit its config.json '
          f'({config.model.backbone.type}, mask head {config.model.mask_head.type}): {e}') from e
    return cls(config, {'params': state.params, 'batch_stats': state.batch_stats})

  @classmethod
  def from_variables(cls, config, directory: str) -> Segmenter:
    """Converted variables ({'params', 'batch_stats'}, checkpoint.save_variables) of the model
    that `config` describes."""
    abstract = experiment_lib.abstract_state(experiment_lib.for_inference(config))
    target = {'params': abstract.params, 'batch_stats': abstract.batch_stats}
    try:
      variables = checkpoint.load_variables(directory, target)
    except (ValueError, TypeError, KeyError) as e:
      raise CheckpointMismatchError(
          f'{directory} does not fit the config\'s model ({config.model.backbone.type}, mask '
          f'head {config.model.mask_head.type}, image size {config.data.image_size}): {e}') from e
    return cls(config, flax.core.unfreeze(variables))

  def encode(self, image: np.ndarray) -> Encoded:
    """image: [H, W, 3] uint8 RGB, any size -> its features (the backbone runs once)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
      raise ValueError(f'expected an [H, W, 3] uint8 image, got {image.shape} {image.dtype}')
    inputs, scale = self._preprocess(tf.constant(image))
    features = self._features(self.variables, jnp.asarray(inputs.numpy()[None]))
    return Encoded(features, float(scale.numpy()), image.shape[0], image.shape[1])

  def box_masks(self, encoded: Encoded, boxes: np.ndarray,
                classes: np.ndarray | None = None) -> np.ndarray:
    """boxes [N, 4] (y1, x1, y2, x2) original-image pixels -> [N, m, m] float32 mask
    probabilities relative to each box (ops/masks.py convention). classes [N] (default 1)
    matter only to class-specific mask heads."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    num = len(boxes)
    if classes is None:
      classes = np.ones([num], np.int32)
    bucket = max(MIN_BOX_BUCKET, 1 << max(num - 1, 0).bit_length())
    padded = np.zeros([1, bucket, 4], np.float32)
    padded[0, :, 2:] = 1.0  # padding slots hold a valid 1-pixel box; their masks are dropped
    padded[0, :num] = boxes * encoded.scale
    padded_classes = np.ones([1, bucket], np.int32)
    padded_classes[0, :num] = classes
    probs = self._box_masks(self.variables, encoded.features, jnp.asarray(padded),
                            jnp.asarray(padded_classes))
    return np.asarray(probs[0, :num])

  def masks(self, encoded: Encoded, boxes: Sequence[boxes_lib.Box]) -> ImageMasks:
    """The masks of the usable ones of an image's interpreted boxes (boxes_lib.interpret)."""
    used = [(k, b) for k, b in enumerate(boxes, 1) if b.usable]
    yxyx = np.asarray([b.yxyx for _, b in used], np.float64).reshape(-1, 4)
    classes = np.asarray([b.category_id for _, b in used], np.int32)
    box_masks = (self.box_masks(encoded, yxyx, classes) if used
                 else np.zeros((0, 1, 1), np.float32))
    return ImageMasks([k for k, _ in used], yxyx, classes, box_masks,
                      outputs.paste(box_masks, yxyx, encoded.height, encoded.width))
