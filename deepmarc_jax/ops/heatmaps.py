"""CenterNet training targets (object centre heatmap, box size and offset), as the official TF
Object Detection API builds them for Deep-MAC.

Official code: `object_detection/core/target_assigner.py` (CenterNetCenterHeatmapTargetAssigner.
assign_center_targets_from_boxes, CenterNetBoxTargetAssigner.assign_size_and_offset_targets,
max_distance_for_overlap, _compute_std_dev_from_box_size), `utils/target_assigner_utils.py`
(_coordinates_to_heatmap_dense, compute_floor_offsets_with_indices) and
`meta_architectures/center_net_meta_arch.py` (loss(): get_valid_anchor_weights_in_flattened_image
on ceil(true_image_shape / stride)). Checked against them by tests/test_centernet_losses.py
through oracle/centernet_targets_parity.py.

Coordinates:
  * Input: boxes (y1, x1, y2, x2) in input-image pixels of the padded S x S (or H x W) model
    input, as in the batch contract (docs/design.md). The official code gets boxes normalised
    to the padded input (its input pipeline renormalises them after padding); we normalise by
    the input size and scale to the output grid exactly as it does:
    `y_out = (y / H) * (H // stride)`, so an input pixel maps to 1 / stride output pixels when
    the stride divides the input size.
  * Output grid: `h = max(H // stride, 1)`, `w = max(W // stride, 1)`; output pixel (r, c) sits at
    the integer coordinate (r, c) (the official `image_shape_to_grids`: no half-pixel shift).
  * A box's centre `(y1 + h_box / 2, x1 + w_box / 2)` in output coordinates is truncated with
    `floor` to the integer index of its heatmap peak and of the pixel where its size and offset
    are regressed; the offset target is centre - floor(centre) in [0, 1). Size targets are the
    box height and width in output pixels (not logs).

Heatmap: one channel per class, channel = COCO id - 1 (the official one-hot classes of a
90-class label map with label id offset 1; id 0 is padding and has no channel). Each box splats
an unnormalised Gaussian exp(-d^2 / (2 sigma^2)) over the *whole* grid (no truncation at the
radius), centred at its floored centre and multiplied by its weight; boxes of one class are
merged by an elementwise max (not a sum), and the result is clipped below at 0. sigma comes from
the CenterNet ("Objects as Points") `gaussian_radius` of the box size at `min_overlap` IoU:
`sigma = (2 * max(floor(radius), 0) + 1) / 6`. The official code keeps the original CenterNet
radius formula, which divides two of its three quadratic roots by 2 instead of 2a (a TODO there
notes the CornerNet fix and keeps the old form); we keep it too, for parity.

Weights: a box's weight (the official `groundtruth_weights`; 1 for real instances, 0 for
padding rows) multiplies its Gaussian, so weight-0 rows leave the heatmap unchanged, and
becomes the weight of its size/offset regression. The loss normalisers count boxes with
nonzero weight (`count_nonzero`), so weights other than 0 and 1 scale the targets but count as
one box each.

Valid-pixel weights: 1 where the output pixel lies inside `ceil(valid_hw / stride)` (the
official `ceil(true_image_shape / stride)`, with `x < ceil(...)`), 0 in the padding.

Everything is a pure jnp function of one image's padded GT with static shapes (vmap over the
batch with `batch_targets`); targets carry no gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

OUTPUT_STRIDE = 4
MIN_BOX_OVERLAP_IOU = 0.7


class CenterNetTargets(NamedTuple):
  """CenterNet targets of one image (leading batch axis B added by `batch_targets`).

  heatmap: [(B,) h, w, num_classes] f32 in [0, 1]; exactly 1 at the peak of each weight-1 box
    with a class channel (and nowhere else).
  indices: [(B,) N, 2] int32 (row, col) = floor(centre) in output pixels; may fall outside the
    grid for boxes whose centre is outside it (the loss gathers with clipped indices).
  box_hw: [(B,) N, 2] f32 (height, width) of each box in output pixels.
  offsets: [(B,) N, 2] f32 (dy, dx) = centre - floor(centre), in output pixels.
  weights: [(B,) N] f32 box weights (0 for padding rows).
  pixel_weights: [(B,) h, w] f32, 1 inside the valid (unpadded) image region, else 0.
  """
  heatmap: jax.Array
  indices: jax.Array
  box_hw: jax.Array
  offsets: jax.Array
  weights: jax.Array
  pixel_weights: jax.Array


def output_size(input_size: int, stride: int = OUTPUT_STRIDE) -> int:
  """Output-grid size of one spatial axis: max(input_size // stride, 1), as the official."""
  return max(int(input_size) // stride, 1)


def gaussian_radius(height: jax.Array, width: jax.Array,
                    min_overlap: float = MIN_BOX_OVERLAP_IOU) -> jax.Array:
  """The official `max_distance_for_overlap` (CenterNet's `gaussian_radius`), elementwise.

  Args:
    height, width: [...] box sizes in output pixels (>= 0).
    min_overlap: the IoU a box displaced by the radius keeps at least (0.7 in Deep-MAC).

  Returns:
    [...] radius: min over three cases of (-b + sqrt(b^2 - 4 a c)) / 2 (sic: / 2, not / 2a).
  """
  height = jnp.asarray(height, jnp.float32)
  width = jnp.asarray(width, jnp.float32)

  def root(a, b, c):
    return (-b + jnp.sqrt(b ** 2 - 4 * a * c)) / 2.0

  # Detection offset from the GT, neither containing the other.
  offset = root(1.0, -(height + width), width * height * ((1 - min_overlap) / (1 + min_overlap)))
  # Detection inside the GT.
  inside = root(4.0, -2 * (height + width), (1 - min_overlap) * width * height)
  # GT inside the detection.
  around = root(4 * min_overlap, (2 * min_overlap) * (width + height),
                (min_overlap - 1) * width * height)
  return jnp.minimum(jnp.minimum(offset, around), inside)


def gaussian_sigma(height: jax.Array, width: jax.Array,
                   min_overlap: float = MIN_BOX_OVERLAP_IOU) -> jax.Array:
  """Official `_compute_std_dev_from_box_size`: (2 * max(floor(radius), 0) + 1) / 6."""
  radius = gaussian_radius(height, width, min_overlap)
  return (2 * jnp.maximum(jnp.floor(radius), 0.0) + 1) / 6.0


def valid_input_hw(image_info: jax.Array, image_size: int | Sequence[int]) -> jax.Array:
  """[..., 4] batch-contract image_info -> [..., 2] f32 valid (h, w) in input pixels.

  The valid region is the resized image, orig * scale, rounded to whole pixels (our pipeline
  rounds the scaled size; the official true_image_shape is an integer) and limited to the input
  size (a scale-jittered image larger than the input is cropped to it).
  """
  size = jnp.broadcast_to(jnp.asarray(image_size, jnp.float32), (2,))
  hw = jnp.round(image_info[..., :2] * image_info[..., 2:4])
  return jnp.minimum(hw, size)


def center_net_targets(boxes: jax.Array, classes: jax.Array, weights: jax.Array,
                       valid_hw: jax.Array, *, input_hw: Sequence[int], num_classes: int,
                       stride: int = OUTPUT_STRIDE,
                       min_overlap: float = MIN_BOX_OVERLAP_IOU) -> CenterNetTargets:
  """CenterNet targets of one image (see the module docstring for every convention).

  Args:
    boxes: [N, 4] f32 (y1, x1, y2, x2) in input pixels of the padded input.
    classes: [N] int COCO category ids (1..num_classes); 0 (padding) or > num_classes splat no
      heatmap (the official one-hot row would be all zeros) but still regress size and offset
      with their weight.
    weights: [N] f32 (or bool) box weights; 0 for padding rows (whose boxes may be anything
      finite). Boxes with weight != 0 must have y2 >= y1 and x2 >= x1.
    valid_hw: [2] valid (h, w) region of the input in pixels (`valid_input_hw`).
    input_hw: static (H, W) of the padded model input.
    num_classes: heatmap channels (90 for COCO ids).
    stride: output stride (4 for Hourglass-104).
    min_overlap: IoU for the Gaussian radius.

  Returns:
    CenterNetTargets with h = max(H // stride, 1), w = max(W // stride, 1).
  """
  in_h, in_w = (int(s) for s in input_hw)
  out_h, out_w = output_size(in_h, stride), output_size(in_w, stride)
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, jnp.float32))
  weights = jax.lax.stop_gradient(jnp.asarray(weights, jnp.float32))
  classes = jnp.asarray(classes, jnp.int32)

  # Normalise to the padded input, then scale to the output grid: the official
  # to_absolute_coordinates(normalised boxes, H // stride, W // stride), same float ops.
  y1 = (boxes[:, 0] / in_h) * out_h
  x1 = (boxes[:, 1] / in_w) * out_w
  y2 = (boxes[:, 2] / in_h) * out_h
  x2 = (boxes[:, 3] / in_w) * out_w
  box_h, box_w = y2 - y1, x2 - x1
  cy, cx = y1 + box_h / 2.0, x1 + box_w / 2.0
  peak_y, peak_x = jnp.floor(cy), jnp.floor(cx)

  # Heatmap: [N, h, w] Gaussians (weighted), max-merged into their class channel. A scatter-max
  # instead of the official dense [h, w, N, C] product (same values, N * h * w memory).
  sigma = gaussian_sigma(box_h, box_w, min_overlap)
  grid_y = jnp.arange(out_h, dtype=jnp.float32)
  grid_x = jnp.arange(out_w, dtype=jnp.float32)
  squared = ((grid_x[None, None, :] - peak_x[:, None, None]) ** 2
             + (grid_y[None, :, None] - peak_y[:, None, None]) ** 2)
  gaussian = jnp.exp(-squared / (2 * sigma * sigma)[:, None, None]) * weights[:, None, None]
  # Weight-0 rows splat exactly nothing, even with garbage boxes (an inverted box can make
  # sigma NaN, and NaN * 0 is NaN); for rows with weight != 0 this changes nothing.
  gaussian = jnp.where((weights != 0)[:, None, None], gaussian, 0.0)
  has_channel = (classes >= 1) & (classes <= num_classes)
  # Out-of-range channel (num_classes) + mode='drop': no splat (a negative index would wrap).
  channel = jnp.where(has_channel, classes - 1, num_classes)
  heatmap = jnp.zeros((num_classes, out_h, out_w), jnp.float32)
  heatmap = heatmap.at[channel].max(gaussian, mode='drop')
  heatmap = jnp.maximum(jnp.transpose(heatmap, (1, 2, 0)), 0.0)

  indices = jnp.stack([peak_y, peak_x], axis=-1).astype(jnp.int32)
  offsets = jnp.stack([cy - peak_y, cx - peak_x], axis=-1)
  box_hw = jnp.stack([box_h, box_w], axis=-1)

  valid_out = jnp.ceil(jnp.asarray(valid_hw, jnp.float32) / stride)
  pixel_weights = ((grid_y[:, None] < valid_out[0]) & (grid_x[None, :] < valid_out[1]))
  return CenterNetTargets(heatmap=jax.lax.stop_gradient(heatmap), indices=indices,
                          box_hw=jax.lax.stop_gradient(box_hw),
                          offsets=jax.lax.stop_gradient(offsets), weights=weights,
                          pixel_weights=pixel_weights.astype(jnp.float32))


def batch_targets(gt_boxes: jax.Array, gt_classes: jax.Array, gt_weights: jax.Array,
                  image_info: jax.Array, *, input_hw: Sequence[int], num_classes: int,
                  stride: int = OUTPUT_STRIDE,
                  min_overlap: float = MIN_BOX_OVERLAP_IOU) -> CenterNetTargets:
  """`center_net_targets` over a batch-contract batch.

  Args:
    gt_boxes: [B, N, 4] f32 input pixels; gt_classes: [B, N] int32 COCO ids (0 padding);
    gt_weights: [B, N] f32 or bool, the official groundtruth_weights (e.g. gt_valid: the
      official training input does not drop crowd boxes, so whether to pass
      gt_valid & ~gt_is_crowd is the caller's choice).
    image_info: [B, 4] (orig h, orig w, scale y, scale x).
    input_hw: static (H, W) of the padded input: (S, S), S = data.image_size.

  Returns:
    CenterNetTargets with a leading batch axis.
  """
  valid_hw = valid_input_hw(image_info, input_hw)
  fn = lambda b, c, w, v: center_net_targets(  # noqa: E731
      b, c, w, v, input_hw=input_hw, num_classes=num_classes, stride=stride,
      min_overlap=min_overlap)
  return jax.vmap(fn)(gt_boxes, gt_classes, jnp.asarray(gt_weights, jnp.float32), valid_hw)
