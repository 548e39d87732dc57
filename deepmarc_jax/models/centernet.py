"""Deep-MAC: CenterNet (Hourglass backbone) with an embedding-based mask branch trained on
ground-truth boxes only (the TF Object Detection API's `DeepMACMetaArch`).

`DeepMAC` (flax.linen) has the same three entry points as `mask_rcnn.MaskRCNN`, so the trainer,
the evaluator, the masks-from-boxes tool and the sweeps take either:
  * `__call__(batch, train=True)`: the training forward; one prediction per hourglass stack
    and the targets `centernet_losses.loss` needs (built on device from the padded batch);
  * `detect(images, image_info)`: CenterNet's top-k peak decoding with masks for those boxes;
  * `segment_boxes(images, boxes)`: mask probabilities for boxes a user gives (the Colab path,
    `predict_masks_from_boxes`).

Per hourglass stack s (features F_s [B, S/4, S/4, 256]) five heads, each conv + ReLU + 1x1 conv
(`make_prediction_net`): 'center' [B, h, w, num_classes - 1] logits (3x3 conv, bias initialised
to `center_bias_init`), 'box_scale' [B, h, w, 2] box (height, width) and 'box_offset' [B, h, w, 2]
sub-cell centre offset, in output-stride units (3x3 conv), and the two embeddings Deep-MAC adds,
'instance_embedding' [B, h, w, 32] and 'pixel_embedding' [B, h, w, 16], whose first conv is
1x3: `deepmac_meta_arch` calls `make_prediction_net(dim)` with its default
`unit_height_conv=True`. Heatmap channel c is COCO category id c + 1.

Mask branch, per box (y1, x1, y2, x2 normalized by the padded input side S):
  pixel embedding cropped to m x m (`crop_and_resize`: bilinear, endpoint-aligned) with y and x
  coordinate channels linspace(-1, 1) in front, then the instance embedding read at the box
  centre (feature cell int(centre * h)) tiled over the crop: [m, m, 2 + 16 + 32]
  -> a mask convnet by name (catalogue.MASK_HEADS; no input downsampling) -> 1x1 conv (bias)
  -> [m, m] logits, box-relative. Training runs it on ground-truth boxes only, on every stack
  (or the last, `use_only_last_stage`); inference on the last stack's embeddings.

Images are uint8 RGB; the official preprocessing flips them to BGR and normalises with
CenterNet's means and standard deviations.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from deepmarc_jax.models import catalogue
from deepmarc_jax.models import centernet_losses
from deepmarc_jax.models import hourglass
from deepmarc_jax.models import layers
from deepmarc_jax.models import mask_heads
from deepmarc_jax.ops import crop_and_resize as crop_ops
from deepmarc_jax.ops import heatmaps
from deepmarc_jax.ops import peaks

# CenterNet's Hourglass preprocessing (BGR order): configs/tf2/center_net_deepmac_*.config.
MEAN_BGR = (104.01362025, 114.03422265, 119.9165958)
STDDEV_BGR = (73.6027665, 69.89082075, 70.9150767)
OUTPUT_STRIDE = 4

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static numbers of a Deep-MAC model, resolved from `config.model` and `config.data` by
  `DeepMAC.from_config` (config_lib holds every default)."""
  image_size: int
  num_classes: int  # including background: the heatmap has num_classes - 1 channels
  backbone: str  # a catalogue.HOURGLASS_BACKBONES name
  head_filters: int  # width of every prediction head's first conv (official: 256)
  center_bias_init: float
  instance_embedding_dim: int
  pixel_embedding_dim: int
  mask_size: int
  use_xy: bool
  use_instance_embedding: bool
  use_only_last_stage: bool
  mask_head_type: str
  mask_filters: int  # the mask convnet's nc (num_init_channels)
  min_box_overlap_iou: float
  max_train_instances: int
  max_detections: int
  peak_pool_size: int
  norm: layers.NormConfig
  dtype: Any
  mask_bn_min_count: float = 0.0
  hourglass_bn_momentum: float = 0.1
  crowd_boxes_as_objects: bool = True  # crowd boxes get centre / size / offset targets


class PredictionHead(nn.Module):
  """`make_prediction_net`: conv (kernel_size, `filters`, bias) + ReLU -> 1x1 conv to
  `num_outputs` (bias = `bias_init`). [B, h, w, C] -> [B, h, w, num_outputs] float32."""
  num_outputs: int
  filters: int = 256
  kernel_size: tuple[int, int] = (3, 3)
  bias_init: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(layers.Conv(self.filters, self.kernel_size, padding='SAME',
                            kernel_init=layers.glorot_uniform, dtype=self.dtype,
                            name='conv')(x))
    return layers.Conv(self.num_outputs, (1, 1), kernel_init=layers.glorot_uniform,
                       bias_init=nn.initializers.constant(self.bias_init), dtype=self.dtype,
                       name='out')(x).astype(jnp.float32)


class MaskNet(nn.Module):
  """Deep-MAC's `MaskHeadNetwork`: [R, m, m, C_in] mask inputs -> convnet -> 1x1 conv (bias)
  -> [R, m, m] float32 logits."""
  type: str
  num_filters: int = 64
  norm: layers.NormConfig = hourglass.HOURGLASS_NORM
  hourglass_bn_momentum: float = hourglass.HOURGLASS_NORM.momentum
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
    x = mask_heads.convnet(self.type, self.num_filters, self.norm, self.hourglass_bn_momentum,
                           self.dtype)(x, train, mask)
    logits = layers.Conv(1, (1, 1), kernel_init=layers.glorot_uniform, dtype=self.dtype,
                         name='project_out')(x)
    return logits[..., 0].astype(jnp.float32)


class DeepMAC(nn.Module):
  settings: Settings

  @classmethod
  def from_config(cls, config) -> DeepMAC:
    m, d = config.model, config.model.deepmac
    return cls(Settings(
        image_size=config.data.image_size, num_classes=m.num_classes, backbone=m.backbone.type,
        head_filters=d.head_filters, center_bias_init=d.center_bias_init,
        instance_embedding_dim=d.instance_embedding_dim,
        pixel_embedding_dim=d.pixel_embedding_dim, mask_size=d.mask_size, use_xy=d.use_xy,
        use_instance_embedding=d.use_instance_embedding,
        use_only_last_stage=d.use_only_last_stage, mask_head_type=m.mask_head.type,
        mask_filters=m.mask_head.num_filters, min_box_overlap_iou=d.min_box_overlap_iou,
        max_train_instances=m.mask_head.max_train_instances,
        max_detections=m.detection.max_detections, peak_pool_size=d.peak_pool_size,
        norm=layers.NormConfig(m.backbone.bn_momentum, m.backbone.bn_epsilon),
        dtype=_DTYPES[m.compute_dtype],
        mask_bn_min_count=m.mask_head.get('bn_min_count', 0.0),
        hourglass_bn_momentum=m.mask_head.get('hourglass_bn_momentum', 0.1),
        crowd_boxes_as_objects=d.crowd_boxes_as_objects))

  def setup(self):
    s = self.settings
    if s.backbone not in catalogue.HOURGLASS_BACKBONES:
      raise ValueError(f'unknown Deep-MAC backbone {s.backbone!r}; allowed: '
                       f'{sorted(catalogue.HOURGLASS_BACKBONES)}')
    spec = catalogue.HOURGLASS_BACKBONES[s.backbone]
    self.backbone = hourglass.StackedHourglass(spec, norm=s.norm, dtype=s.dtype)
    unit_height = (1, 3)
    head = lambda n, k, bias=0.0: [  # noqa: E731  one head per stack
        PredictionHead(n, s.head_filters, k, bias, s.dtype) for _ in range(spec.num_stacks)]
    self.heads = {
        'center': head(s.num_classes - 1, (3, 3), s.center_bias_init),
        'box_scale': head(2, (3, 3)),
        'box_offset': head(2, (3, 3)),
        'instance_embedding': head(s.instance_embedding_dim, unit_height),
        'pixel_embedding': head(s.pixel_embedding_dim, unit_height),
    }
    norm = dataclasses.replace(hourglass.HOURGLASS_NORM, axis_name=s.norm.axis_name,
                               min_count=s.mask_bn_min_count)
    self.mask_net = MaskNet(s.mask_head_type, s.mask_filters, norm, s.hourglass_bn_momentum,
                            s.dtype)

  # -- shared pieces ----------------------------------------------------------------------------

  def features(self, images: jax.Array, train: bool) -> list[jax.Array]:
    """uint8 [B, S, S, 3] -> per stack [B, S/4, S/4, C] backbone features."""
    size = self.settings.image_size
    if images.shape[1:] != (size, size, 3):
      raise ValueError(f'images are {images.shape[1:]}; this model (data.image_size={size}) '
                       f'takes [B, {size}, {size}, 3]')
    x = (images[..., ::-1].astype(jnp.float32) - jnp.array(MEAN_BGR)) / jnp.array(STDDEV_BGR)
    return self.backbone(x.astype(self.settings.dtype), train=train)

  def predict(self, images: jax.Array, train: bool) -> list[dict[str, jax.Array]]:
    """uint8 [B, S, S, 3] -> per stack {head name: [B, S/4, S/4, channels] float32}."""
    return [{name: heads[i](f) for name, heads in self.heads.items()}
            for i, f in enumerate(self.features(images, train))]

  def mask_logits(self, prediction: dict[str, jax.Array], boxes: jax.Array, train: bool,
                  valid: jax.Array | None = None) -> jax.Array:
    """One stack's embeddings, boxes [B, N, 4] input pixels -> logits [B, N, m, m].

    valid: optional [B, N] bool, the boxes whose crops enter the mask net's BatchNorm
    statistics (padding slots then change nothing for the real ones).
    """
    s = self.settings
    batch, num = boxes.shape[:2]
    normalized = boxes.astype(jnp.float32) / s.image_size
    pixel = prediction['pixel_embedding']
    crops = jax.vmap(crop_ops.crop_and_resize, in_axes=(0, 0, None))(
        pixel, normalized, s.mask_size)  # [B, N, m, m, P]
    parts = []
    if s.use_xy:
      grid = jnp.linspace(-1.0, 1.0, s.mask_size)
      yx = jnp.stack(jnp.meshgrid(grid, grid, indexing='ij'), axis=-1)
      parts.append(jnp.broadcast_to(yx, (batch, num) + yx.shape))
    parts.append(crops)
    if s.use_instance_embedding:
      embedding = prediction['instance_embedding']
      height, width = embedding.shape[1:3]
      # The official truncates the centre in feature cells (a cast to int); clipped here
      # because a gather out of range is an error on some backends.
      cy = jnp.clip(((normalized[..., 0] + normalized[..., 2]) * height / 2).astype(jnp.int32),
                    0, height - 1)
      cx = jnp.clip(((normalized[..., 1] + normalized[..., 3]) * width / 2).astype(jnp.int32),
                    0, width - 1)
      centre = jax.vmap(lambda e, y, x: e[y, x])(embedding, cy, cx)  # [B, N, D]
      parts.append(jnp.broadcast_to(centre[:, :, None, None, :],
                                    (batch, num, s.mask_size, s.mask_size, centre.shape[-1])))
    inputs = jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)
    inputs = inputs.reshape((batch * num,) + inputs.shape[2:]).astype(s.dtype)
    logits = self.mask_net(inputs, train=train,
                           mask=None if valid is None else valid.reshape(-1))
    return logits.reshape(batch, num, s.mask_size, s.mask_size)

  # -- training ---------------------------------------------------------------------------------

  def __call__(self, batch: dict[str, jax.Array], train: bool = True) -> dict[str, Any]:
    """The training forward: per-stack predictions, the mask logits of GT boxes on each stack
    used for the mask loss, and every target: what `loss` below reads."""
    s = self.settings
    predictions = self.predict(batch['image'], train)
    gt_valid = batch['gt_valid'] & ~batch['gt_is_crowd']
    # The OD API's input pipeline keeps crowd boxes, so its CenterNet learns them as objects;
    # Mask R-CNN (Model Garden) never matches them. The mask branch never trains on them.
    object_valid = batch['gt_valid'] if s.crowd_boxes_as_objects else gt_valid
    targets = heatmaps.batch_targets(
        batch['gt_boxes'], batch['gt_classes'], object_valid, batch['image_info'],
        input_hw=(s.image_size, s.image_size), num_classes=s.num_classes - 1,
        stride=OUTPUT_STRIDE, min_overlap=s.min_box_overlap_iou)

    # The mask branch on (a random subset of at most max_train_instances) mask-allowed GT
    # boxes: Deep-MAC never trains it on predicted boxes.
    allowed = gt_valid & batch['gt_mask_allowed']
    k = min(s.max_train_instances, allowed.shape[1])
    noise = jax.random.uniform(self.make_rng('sampling'), allowed.shape)
    _, index = jax.lax.top_k(jnp.where(allowed, noise, -1.0), k)
    index = jnp.sort(index, axis=1)  # GT order: with k = N the slots are the batch's own
    weights = jnp.take_along_axis(allowed, index, axis=1)
    boxes = jnp.take_along_axis(batch['gt_boxes'], index[..., None], axis=1)
    gt_masks = jnp.take_along_axis(batch['gt_masks'], index[..., None, None], axis=1)
    mask_targets = endpoint_mask_targets(gt_masks.astype(jnp.float32), boxes, s.mask_size,
                                         s.image_size)
    first_masked = len(predictions) - 1 if s.use_only_last_stage else 0
    stacks = []
    for i, p in enumerate(predictions):
      stack = {k: p[k] for k in ('center', 'box_scale', 'box_offset')}
      if i >= first_masked:
        stack['mask_logits'] = self.mask_logits(p, boxes, train, weights)
      stacks.append(stack)
    return {
        'stacks': stacks,
        'targets': targets,
        'mask_targets': jax.lax.stop_gradient(mask_targets),
        'mask_weights': weights.astype(jnp.float32),
    }

  # -- inference --------------------------------------------------------------------------------

  def detect(self, images: jax.Array, image_info: jax.Array | None = None) -> dict[str, jax.Array]:
    """images uint8 [B, S, S, 3] -> top detections per image, boxes in input-image pixels.

    Returns dict of boxes [B, D, 4], scores [B, D], classes [B, D] int32 (COCO ids),
    masks [B, D, m, m] probabilities (box-relative), valid [B, D] (score > 0).
    """
    s = self.settings
    last = self.predict(images, train=False)[-1]
    valid_hw = _valid_image_hw(image_info, s.image_size, images.shape[0])
    dets = jax.vmap(lambda c, sc, o, hw: peaks.decode(
        c, sc, o, hw, OUTPUT_STRIDE, s.max_detections, s.peak_pool_size))(
            last['center'], last['box_scale'], last['box_offset'], valid_hw)
    dets['masks'] = jax.nn.sigmoid(self.mask_logits(last, dets['boxes'], train=False))
    return dets

  def segment_boxes(self, images: jax.Array, boxes: jax.Array,
                    classes: jax.Array | None = None) -> jax.Array:
    """Mask probabilities [B, N, m, m] for user boxes [B, N, 4] (input-image pixels), from the
    last stack's embeddings. Class-agnostic: `classes` is accepted for Mask R-CNN's signature."""
    del classes
    last = self.predict(images, train=False)[-1]
    return jax.nn.sigmoid(self.mask_logits(last, boxes, train=False))


  # -- masks from boxes: the image encoded once, then any number of box sets ---------------------

  def encode(self, images: jax.Array) -> dict[str, jax.Array]:
    """uint8 [B, S, S, 3] -> what `box_mask_logits` reads: the last stack's two embeddings."""
    last = self.features(images, train=False)[-1]
    return {k: self.heads[k][-1](last) for k in ('instance_embedding', 'pixel_embedding')}

  def box_mask_logits(self, encoded: dict[str, jax.Array], boxes: jax.Array,
                      classes: jax.Array | None = None) -> jax.Array:
    """`encode`'s output, boxes [B, N, 4] input pixels -> float32 mask logits [B, N, m, m]
    (box-relative; class-agnostic)."""
    del classes
    return self.mask_logits(encoded, boxes, train=False)


def endpoint_mask_targets(gt_masks: jax.Array, boxes: jax.Array, size: int,
                          image_size: int) -> jax.Array:
  """Deep-MAC's m x m mask targets from the batch's box-cropped GT masks.

  The official crops the full-image mask with the GT box by `crop_and_resize`: sample t of
  [0, 1] lies at pixel index (y1 + t (y2 - y1)) (S - 1) / S, pixels being points at their index
  (the same samples its crop of the pixel embedding takes). Our batch holds each mask resampled
  at the M x M cell centres of its box (ops/masks.py), so the same continuous positions are
  read from there, bilinearly (0 beyond the box's cells, where a tight box's mask is 0).

  Args:
    gt_masks: [B, K, M, M] box-relative soft masks; boxes: [B, K, 4] their GT boxes, input
      pixels; size: m; image_size: S, the padded input side.
  Returns:
    [B, K, m, m] float32 soft targets.
  """
  cells = gt_masks.shape[-1]
  boxes = boxes.astype(jnp.float32)
  shrink = (image_size - 1) / image_size

  def axis(start, end):
    # Edge-coordinate position of sample t (pixel r spans [r, r + 1)): index + 0.5.
    extent = jnp.maximum(end - start, 1e-6)
    first = (start * shrink + 0.5 - start) / extent * cells - 0.5
    last = (end * shrink + 0.5 - start) / extent * cells - 0.5
    return first / (cells - 1), last / (cells - 1)  # crop_and_resize's normalisation

  y1, y2 = axis(boxes[..., 0], boxes[..., 2])
  x1, x2 = axis(boxes[..., 1], boxes[..., 3])
  normalized = jnp.stack([y1, x1, y2, x2], axis=-1)
  crop = jax.vmap(jax.vmap(lambda m, b: crop_ops.crop_and_resize(m[..., None], b[None], size)))
  return crop(gt_masks, normalized)[:, :, 0, :, :, 0]


def _valid_image_hw(image_info, image_size: int, batch_size: int) -> jax.Array:
  """[B, 2] height/width of the real (unpadded) image region in input pixels."""
  if image_info is None:
    return jnp.full([batch_size, 2], float(image_size))
  return jnp.minimum(image_info[:, :2] * image_info[:, 2:4], float(image_size))


def loss(outputs: dict[str, Any], model_config) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total loss (the official weights, config.model.deepmac) and its parts."""
  d = model_config.deepmac
  weights = centernet_losses.CenterNetLossConfig(
      center_weight=d.center_loss_weight, scale_weight=d.box_scale_loss_weight,
      offset_weight=d.box_offset_loss_weight, mask_weight=d.mask_loss_weight)
  parts = centernet_losses.centernet_losses(outputs['stacks'], outputs['targets'],
                                            outputs['mask_targets'], outputs['mask_weights'],
                                            weights)
  total = sum(parts.values())
  return total, dict(parts, loss=total)
