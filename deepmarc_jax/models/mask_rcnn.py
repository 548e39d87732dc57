"""Deep-MARC: Mask R-CNN whose mask head trains on ground-truth-box crops, with deep mask heads.

`MaskRCNN` (flax.linen) has three entry points:
  * `__call__(batch, train=True)`: the training forward. It samples its own targets (RPN
    anchors, second-stage ROIs, mask-head instances) with the 'sampling' rng and returns
    everything `loss()` needs.
  * `detect(images)`: boxes, scores, classes and box-relative mask probabilities of the top
    detections (class-aware NMS), in input-image pixels.
  * `segment_boxes(images, boxes)`: mask probabilities for boxes a user gives (no detector),
    the Deep-MAC colab / Model Garden `call_images_and_boxes` path.

Mask-head training crops (`model.mask_head.train_crops`):
  * 'gt' (Deep-MARC's use_gt_boxes_for_masks): up to `max_train_instances` real, mask-allowed
    GT instances per image (a random subset when there are more); ROIAlign on their GT boxes,
    each side moved at random by up to `gt_box_jitter` / 2 of the box's size (Deep-MAC's ROI
    jitter; 0 by default); targets are their GT masks resampled into those boxes.
  * 'proposals' (Mask R-CNN's default): up to `max_train_instances` foreground sampled ROIs per
    image whose matched GT is mask-allowed; targets are the matched GT masks resampled into the
    ROI (`roi_align.crop_mask_targets`).
Empty slots get weight 0 and are excluded from the mask head's BatchNorm statistics (masked
BN), so padding changes neither the loss nor the gradients.

Images are uint8 and normalised here with Model Garden's ImageNet mean/std (RGB, 0-255).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from deepmarc_jax import losses
from deepmarc_jax.models import catalogue
from deepmarc_jax.models import fpn as fpn_lib
from deepmarc_jax.models import layers
from deepmarc_jax.models import mask_heads
from deepmarc_jax.models import resnet as resnet_lib
from deepmarc_jax.models import roi_heads
from deepmarc_jax.models import rpn as rpn_lib
from deepmarc_jax.models import spinenet as spinenet_lib
from deepmarc_jax.ops import anchors as anchor_ops
from deepmarc_jax.ops import boxes as box_ops
from deepmarc_jax.ops import matching
from deepmarc_jax.ops import nms as nms_ops
from deepmarc_jax.ops import roi_align

MEAN_RGB = (123.675, 116.28, 103.53)
STDDEV_RGB = (58.395, 57.12, 57.375)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class AnchorSettings:
  num_scales: int
  aspect_ratios: tuple[float, ...]
  anchor_size: float  # anchor side at each level, in multiples of the level's stride


@dataclasses.dataclass(frozen=True)
class RPNSettings:
  samples_per_image: int  # anchors sampled for the RPN loss
  positive_fraction: float
  pre_nms_top_k: int  # per level, before NMS (training; and inference unless test_ set)
  nms_threshold: float
  num_proposals: int  # kept after NMS, training
  test_num_proposals: int  # kept after NMS, inference
  test_pre_nms_top_k: int | None = None  # None: pre_nms_top_k
  keep_degenerate: bool = False  # keep zero-area proposals (Model Garden's ROI generator does)


@dataclasses.dataclass(frozen=True)
class ROISamplerSettings:
  samples_per_image: int
  foreground_fraction: float
  foreground_iou: float  # also the upper IoU bound of background ROIs


@dataclasses.dataclass(frozen=True)
class BoxHeadSettings:
  num_convs: int
  num_filters: int
  num_fcs: int
  fc_dims: int
  crop_size: int  # ROIAlign output side


@dataclasses.dataclass(frozen=True)
class DetectionSettings:
  pre_nms_top_k: int
  score_threshold: float
  nms_threshold: float
  max_detections: int


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static numbers of a Mask R-CNN, resolved from `config.model` and `config.data` by
  `MaskRCNN.from_config` (config_lib holds every default)."""
  image_size: int
  num_classes: int
  min_level: int
  max_level: int
  backbone: str
  stochastic_depth: float
  width_multiplier: float
  fpn_filters: int
  anchor: AnchorSettings
  rpn: RPNSettings
  roi_sampler: ROISamplerSettings
  detection: DetectionSettings
  box_head: BoxHeadSettings
  mask_head_type: str
  mask_filters: int
  mask_crop_size: int
  train_crops: str
  max_train_instances: int
  norm: layers.NormConfig
  dtype: Any
  gt_box_jitter: float = 0.0  # 'gt' crops: random side moves, as a ratio of the box's size
  mask_bn_min_count: float = 0.0  # mask-head BatchNorm: fewest values per channel (layers.py)
  hourglass_bn_momentum: float = 0.1  # the reference's (config_lib: why a CPU run changes it)


class MaskRCNN(nn.Module):
  settings: Settings

  @classmethod
  def from_config(cls, config) -> MaskRCNN:
    m = config.model
    return cls(Settings(
        image_size=config.data.image_size, num_classes=m.num_classes,
        min_level=m.min_level, max_level=m.max_level, backbone=m.backbone.type,
        stochastic_depth=m.backbone.stochastic_depth, width_multiplier=m.width_multiplier,
        fpn_filters=m.fpn_filters,
        anchor=AnchorSettings(m.anchor.num_scales, tuple(m.anchor.aspect_ratios),
                              m.anchor.anchor_size),
        rpn=RPNSettings(
            samples_per_image=m.rpn.samples_per_image, positive_fraction=m.rpn.positive_fraction,
            pre_nms_top_k=m.rpn.pre_nms_top_k, nms_threshold=m.rpn.nms_threshold,
            num_proposals=m.rpn.num_proposals, test_num_proposals=m.rpn.test_num_proposals,
            test_pre_nms_top_k=m.rpn.get('test_pre_nms_top_k'),
            keep_degenerate=m.rpn.get('keep_degenerate', False)),
        roi_sampler=ROISamplerSettings(m.roi_sampler.samples_per_image,
                                       m.roi_sampler.foreground_fraction,
                                       m.roi_sampler.foreground_iou),
        detection=DetectionSettings(m.detection.pre_nms_top_k, m.detection.score_threshold,
                                    m.detection.nms_threshold, m.detection.max_detections),
        box_head=BoxHeadSettings(m.box_head.num_convs, m.box_head.num_filters,
                                 m.box_head.num_fcs, m.box_head.fc_dims, m.box_head.crop_size),
        mask_head_type=m.mask_head.type, mask_filters=m.mask_head.num_filters,
        mask_crop_size=m.mask_head.crop_size, train_crops=m.mask_head.train_crops,
        max_train_instances=m.mask_head.max_train_instances,
        gt_box_jitter=m.mask_head.get('gt_box_jitter', 0.0),
        mask_bn_min_count=m.mask_head.get('bn_min_count', 0.0),
        hourglass_bn_momentum=m.mask_head.get('hourglass_bn_momentum', 0.1),
        norm=layers.NormConfig(m.backbone.bn_momentum, m.backbone.bn_epsilon),
        dtype=_DTYPES[m.compute_dtype]))

  def setup(self):
    s = self.settings
    if s.backbone in catalogue.SPINENETS:
      # Model Garden's SpineNet Mask R-CNN: endpoints min..max level feed the heads directly
      # (decoder 'identity'). width_multiplier scales the block filters and the endpoint width.
      spec = catalogue.SPINENETS[s.backbone]
      spec = dataclasses.replace(
          spec, filter_size_scale=spec.filter_size_scale * s.width_multiplier,
          endpoints_num_filters=int(spec.endpoints_num_filters * s.width_multiplier))
      self.backbone = spinenet_lib.SpineNet(
          spec, min_level=s.min_level, max_level=s.max_level, norm=s.norm,
          stochastic_depth=s.stochastic_depth, dtype=s.dtype)
      self.decoder = None
      feature_width = spec.endpoints_num_filters
    else:
      self.backbone = resnet_lib.ResNet(depth=int(s.backbone[len('resnet'):]),
                                        width_multiplier=s.width_multiplier, norm=s.norm,
                                        dtype=s.dtype)
      self.decoder = fpn_lib.FPN(min_level=s.min_level, max_level=s.max_level,
                                 num_filters=s.fpn_filters, norm=s.norm, dtype=s.dtype)
      feature_width = s.fpn_filters
    num_anchors = s.anchor.num_scales * len(s.anchor.aspect_ratios)
    self.rpn_head = rpn_lib.RPNHead(num_anchors=num_anchors, num_filters=feature_width,
                                    norm=s.norm, dtype=s.dtype)
    self.detection_head = roi_heads.DetectionHead(
        num_classes=s.num_classes, num_convs=s.box_head.num_convs,
        num_filters=s.box_head.num_filters, num_fcs=s.box_head.num_fcs,
        fc_dims=s.box_head.fc_dims, norm=s.norm, dtype=s.dtype)
    self.mask_head = mask_heads.MaskHead(
        type=s.mask_head_type, num_filters=s.mask_filters,
        norm=dataclasses.replace(s.norm, min_count=s.mask_bn_min_count),
        hourglass_bn_momentum=s.hourglass_bn_momentum, dtype=s.dtype)

  # -- shared pieces ----------------------------------------------------------------------------

  def anchors(self) -> dict[int, np.ndarray]:
    s = self.settings
    return anchor_ops.multilevel_anchors(s.min_level, s.max_level, s.anchor.num_scales,
                                         s.anchor.aspect_ratios, s.anchor.anchor_size,
                                         (s.image_size, s.image_size))

  def features(self, images: jax.Array, train: bool) -> dict[int, jax.Array]:
    """uint8 [B, S, S, 3] -> {level: [B, S/2^l, S/2^l, C]}."""
    size = self.settings.image_size
    if images.shape[1:] != (size, size, 3):
      raise ValueError(f'images are {images.shape[1:]}; this model (data.image_size={size}) '
                       f'takes [B, {size}, {size}, 3]')
    x = (images.astype(jnp.float32) - jnp.array(MEAN_RGB)) / jnp.array(STDDEV_RGB)
    endpoints = self.backbone(x.astype(self.settings.dtype), train=train)
    if self.decoder is None:
      return endpoints
    return self.decoder(endpoints, train=train)

  def proposals(self, features, image_hw, train: bool):
    """RPN outputs and proposals [B, P, 4] (stop-gradient), with validity [B, P]."""
    s = self.settings
    scores, deltas = self.rpn_head(features, train=train)
    num_props = s.rpn.num_proposals if train else s.rpn.test_num_proposals
    top_k = s.rpn.pre_nms_top_k
    if not train and s.rpn.test_pre_nms_top_k is not None:
      top_k = s.rpn.test_pre_nms_top_k
    select = lambda d, l, h, w: nms_ops.select_proposals(  # noqa: E731
        d, l, self.anchors(), h, w, pre_nms_top_k=top_k, iou_threshold=s.rpn.nms_threshold,
        num_proposals=num_props, keep_degenerate=s.rpn.keep_degenerate)
    boxes, _, valid = jax.vmap(select)(
        jax.lax.stop_gradient({k: v.astype(jnp.float32) for k, v in deltas.items()}),
        jax.lax.stop_gradient({k: v.astype(jnp.float32) for k, v in scores.items()}),
        image_hw[:, 0], image_hw[:, 1])
    return scores, deltas, boxes, valid

  def box_head(self, features, rois, train: bool, valid=None):
    """ROIs [B, R, 4] -> class logits [B, R, K], box deltas [B, R, K, 4]."""
    batch, num_rois = rois.shape[:2]
    crops = roi_align.multilevel_roi_align(features, rois, self.settings.box_head.crop_size)
    crops = crops.reshape((batch * num_rois,) + crops.shape[2:])
    logits, deltas = self.detection_head(
        crops, train=train, mask=None if valid is None else valid.reshape(-1))
    return (logits.reshape(batch, num_rois, -1),
            deltas.reshape(batch, num_rois, deltas.shape[1], 4))

  def mask_logits(self, features, boxes, classes, train: bool, valid=None):
    """Boxes [B, N, 4] -> mask logits [B, N, m, m] (m = 2 * crop size)."""
    batch, num = boxes.shape[:2]
    crops = roi_align.multilevel_roi_align(features, boxes, self.settings.mask_crop_size)
    crops = crops.reshape((batch * num,) + crops.shape[2:])
    logits = self.mask_head(crops, classes.reshape(-1), train=train,
                            mask=None if valid is None else valid.reshape(-1))
    return logits.reshape((batch, num) + logits.shape[1:])

  # -- training ---------------------------------------------------------------------------------

  def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> dict[str, jax.Array]:
    s = self.settings
    features = self.features(batch['image'], train)
    image_hw = _valid_image_hw(batch['image_info'], s.image_size)
    scores, deltas, proposals, proposal_valid = self.proposals(features, image_hw, train)
    gt_boxes, gt_classes = batch['gt_boxes'], batch['gt_classes']
    gt_valid = batch['gt_valid'] & ~batch['gt_is_crowd']
    rng = self.make_rng('sampling')
    rpn_key, roi_key, mask_key = jax.random.split(rng, 3)
    batch_size = gt_boxes.shape[0]

    # RPN targets.
    flat_anchors = jnp.asarray(anchor_ops.flatten_levels(self.anchors()))
    rpn_labels, rpn_targets = jax.vmap(self._rpn_targets, in_axes=(None, 0, 0, 0))(
        flat_anchors, gt_boxes, gt_valid, jax.random.split(rpn_key, batch_size))
    # [B, H, W, A(*4)] per level -> [B, sum H*W*A(, 4)], the order of `flatten_levels`.
    rpn_logits = jnp.concatenate([scores[k].reshape(batch_size, -1) for k in sorted(scores)], 1)
    rpn_deltas = jnp.concatenate(
        [deltas[k].reshape(batch_size, -1, 4) for k in sorted(deltas)], 1)

    # Second stage: sample ROIs among proposals + GT, classify and regress.
    sampled = jax.vmap(lambda p, pv, b, c, v, k: matching.sample_rois(
        p, pv, b, c, v, k, num_samples=s.roi_sampler.samples_per_image,
        fg_fraction=s.roi_sampler.foreground_fraction, fg_iou=s.roi_sampler.foreground_iou,
        bg_iou_hi=s.roi_sampler.foreground_iou))(
            proposals, proposal_valid, gt_boxes, gt_classes, gt_valid,
            jax.random.split(roi_key, batch_size))
    rois = jax.lax.stop_gradient(sampled['rois'])
    class_logits, box_deltas = self.box_head(features, rois, train, sampled['valid'])
    matched_boxes = jnp.take_along_axis(gt_boxes, sampled['matched_gt'][..., None], axis=1)
    box_targets = box_ops.encode(matched_boxes, rois, BOX_WEIGHTS)

    # Mask head on GT boxes (Deep-MARC) or foreground proposals (Mask R-CNN).
    mask_boxes, mask_targets, mask_weights = self._mask_training_inputs(
        batch, sampled, gt_valid, mask_key, image_hw)
    mask_classes = jnp.take_along_axis(gt_classes, mask_targets['gt_index'], axis=1)
    mask_logits = self.mask_logits(features, mask_boxes, mask_classes, train, mask_weights)
    return {
        'rpn_logits': rpn_logits, 'rpn_labels': rpn_labels,
        'rpn_deltas': rpn_deltas, 'rpn_targets': rpn_targets,
        'class_logits': class_logits, 'roi_classes': sampled['classes'],
        'roi_valid': sampled['valid'], 'roi_foreground': sampled['is_fg'],
        'box_deltas': box_deltas, 'box_targets': box_targets,
        'mask_logits': mask_logits, 'mask_targets': mask_targets['masks'],
        'mask_weights': mask_weights,
    }

  def _rpn_targets(self, anchors, gt_boxes, gt_valid, key):
    """One image: anchor labels (1 / 0 / -1 not sampled) [A] and box targets [A, 4]."""
    s = self.settings
    matched, labels = matching.match(box_ops.iou(anchors, gt_boxes), gt_valid, 0.7, 0.3,
                                     allow_low_quality=True)
    index, sampled_labels, sample_valid = matching.sample_balanced(
        labels, key, s.rpn.samples_per_image, s.rpn.positive_fraction)
    num_anchors = anchors.shape[0]
    out = jnp.full([num_anchors], -1, jnp.int32).at[
        jnp.where(sample_valid, index, num_anchors)].set(sampled_labels, mode='drop')
    targets = box_ops.encode(gt_boxes[matched], anchors, RPN_WEIGHTS)
    return out, jnp.where((out == 1)[:, None], targets, 0.0)

  def _mask_training_inputs(self, batch, sampled, gt_valid, key, image_hw):
    """Boxes [B, K, 4], {'masks': targets [B, K, m, m], 'gt_index': [B, K]}, weights [B, K].

    image_hw [B, 2]: each image's valid height and width (jittered GT boxes are clipped to it).
    """
    s = self.settings
    out_size = 2 * s.mask_crop_size
    allowed = gt_valid & batch['gt_mask_allowed']
    k = min(s.max_train_instances, allowed.shape[1] if s.train_crops == 'gt'
            else sampled['rois'].shape[1])
    if s.train_crops == 'gt':
      candidates = allowed
    else:
      matched_allowed = jnp.take_along_axis(allowed, sampled['matched_gt'], axis=1)
      candidates = sampled['is_fg'] & matched_allowed
    # A random subset of the candidates, in fixed-size slots.
    noise = jax.random.uniform(key, candidates.shape)
    _, index = jax.lax.top_k(jnp.where(candidates, noise, -1.0), k)
    weights = jnp.take_along_axis(candidates, index, axis=1)
    if s.train_crops == 'gt':
      gt_index = index
      boxes = jnp.take_along_axis(batch['gt_boxes'], index[..., None], axis=1)
      if s.gt_box_jitter:  # (fold_in: without jitter, the subset's key stays as it was)
        jittered = box_ops.jitter(jax.random.fold_in(key, 1), boxes, s.gt_box_jitter)
        boxes = jax.vmap(box_ops.clip_boxes)(jittered, image_hw[:, 0], image_hw[:, 1])
    else:
      gt_index = jnp.take_along_axis(sampled['matched_gt'], index, axis=1)
      boxes = jnp.take_along_axis(sampled['rois'], index[..., None], axis=1)
    gt_masks = jnp.take_along_axis(batch['gt_masks'], gt_index[..., None, None], axis=1)
    gt_boxes = jnp.take_along_axis(batch['gt_boxes'], gt_index[..., None], axis=1)
    targets = jax.vmap(roi_align.crop_mask_targets, in_axes=(0, 0, 0, None))(
        gt_masks.astype(jnp.float32), gt_boxes, boxes, out_size)
    return (jax.lax.stop_gradient(boxes),
            {'masks': jax.lax.stop_gradient(targets), 'gt_index': gt_index},
            weights.astype(jnp.float32))

  # -- inference --------------------------------------------------------------------------------

  def detect(self, images: jax.Array, image_info: jax.Array | None = None) -> dict[str, jax.Array]:
    """images uint8 [B, S, S, 3] -> top detections per image, boxes in input-image pixels.

    Returns dict of boxes [B, D, 4], scores [B, D], classes [B, D] int32 (0 = none),
    masks [B, D, m, m] probabilities (box-relative), valid [B, D].
    """
    s = self.settings
    features = self.features(images, train=False)
    image_hw = _valid_image_hw(image_info, s.image_size, images.shape[0])
    _, _, proposals, proposal_valid = self.proposals(features, image_hw, train=False)
    class_logits, box_deltas = self.box_head(features, proposals, train=False)
    probs = jax.nn.softmax(class_logits, axis=-1)
    boxes = box_ops.decode(box_deltas, proposals[:, :, None, :], BOX_WEIGHTS)
    boxes = jax.vmap(box_ops.clip_boxes)(boxes, image_hw[:, 0], image_hw[:, 1])
    d = s.detection
    dets = jax.vmap(lambda b, p, v: nms_ops.class_aware_nms(
        b, p, v, score_threshold=d.score_threshold, pre_nms_top_k=d.pre_nms_top_k,
        iou_threshold=d.nms_threshold, max_detections=d.max_detections))(
            boxes, probs, proposal_valid)
    masks = self.mask_logits(features, dets['boxes'], dets['classes'], train=False)
    dets['masks'] = jax.nn.sigmoid(masks.astype(jnp.float32))
    return dets

  def segment_boxes(self, images: jax.Array, boxes: jax.Array,
                    classes: jax.Array | None = None) -> jax.Array:
    """Mask probabilities [B, N, m, m] for user boxes [B, N, 4] (input-image pixels)."""
    features = self.features(images, train=False)
    if classes is None:
      classes = jnp.ones(boxes.shape[:2], jnp.int32)
    return jax.nn.sigmoid(self.mask_logits(features, boxes, classes, train=False)
                          .astype(jnp.float32))


  # -- masks from boxes: the image encoded once, then any number of box sets ---------------------

  def encode(self, images: jax.Array) -> dict[int, jax.Array]:
    """uint8 [B, S, S, 3] -> what `box_mask_logits` reads: the feature pyramid."""
    return self.features(images, train=False)

  def box_mask_logits(self, encoded: dict[int, jax.Array], boxes: jax.Array,
                      classes: jax.Array) -> jax.Array:
    """`encode`'s output, boxes [B, N, 4] input pixels, classes [B, N] -> float32 mask logits
    [B, N, m, m] (box-relative)."""
    return self.mask_logits(encoded, boxes, classes, train=False).astype(jnp.float32)


def _valid_image_hw(image_info, image_size: int, batch_size: int | None = None) -> jax.Array:
  """[B, 2] height/width of the real (unpadded) image region in input pixels."""
  if image_info is None:
    return jnp.full([batch_size, 2], float(image_size))
  return jnp.minimum(image_info[:, :2] * image_info[:, 2:4], float(image_size))


def loss(outputs: dict[str, jax.Array], model_config) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss (Model Garden's weights, all 1) and its parts."""
  parts = {
      'rpn_score_loss': losses.rpn_score_loss(outputs['rpn_logits'], outputs['rpn_labels'],
                                              model_config.rpn.samples_per_image),
      'rpn_box_loss': losses.rpn_box_loss(outputs['rpn_deltas'], outputs['rpn_targets'],
                                          outputs['rpn_labels'] == 1),
      'class_loss': losses.frcnn_class_loss(outputs['class_logits'], outputs['roi_classes'],
                                            outputs['roi_valid']),
      'box_loss': losses.frcnn_box_loss(outputs['box_deltas'], outputs['roi_classes'],
                                        outputs['box_targets'], outputs['roi_foreground']),
      'mask_loss': losses.mask_loss(outputs['mask_logits'], outputs['mask_targets'],
                                    outputs['mask_weights']),
  }
  total = sum(parts.values())
  return total, dict(parts, loss=total)
