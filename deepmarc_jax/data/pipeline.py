"""The tf.data pipeline: TFDS `coco_instances` examples -> padded batches of the batch contract.

Batch (per process; B = global batch / process count, S = image_size, N = max_instances,
M = mask_size):

| key | shape / dtype | meaning |
|---|---|---|
| image | [B,S,S,3] uint8 | resized + padded image (normalise on device) |
| image_info | [B,4] f32 | original h, original w, scale y, scale x (input px per original px) |
| gt_boxes | [B,N,4] f32 | y1, x1, y2, x2 in input-image pixels |
| gt_classes | [B,N] int32 | category id (COCO 1..90), 0 for padding |
| gt_valid, gt_is_crowd, gt_mask_allowed | [B,N] bool | real / crowd / mask may train |
| gt_masks | [B,N,M,M] f32 | soft mask cropped to its GT box (ops/masks.py convention) |
| image_id | [B] int32 | COCO image id (-1 for eval padding examples) |
| example_valid | [B] bool | False for eval padding examples |
| num_dropped_instances | [B] int32 | valid instances beyond max_instances, dropped |

Augmentation (train): horizontal flip, then Model Garden scale jitter: a random target size
S * U(scale_min, scale_max), aspect-preserving resize to fit it, a random S x S crop when
larger, zero padding when smaller. Boxes are clipped to the visible region; instances left
with no area are dropped. Masks are never resized at full image resolution: each instance's
final box is mapped back to the original image and the mask cropped there (then flipped),
which is exact because the crop is a bilinear sample at cell centres.

Randomness is stateless: each example's seed is (config seed, example index), so a run is
reproducible for a given seed, process count and batch size.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from deepmarc_jax.data import class_splits
from deepmarc_jax.data import coco_instances  # registers the builder  # noqa: F401


@dataclasses.dataclass(frozen=True)
class PreprocessSpec:
  """Static preprocessing settings (resolved from `config.data`)."""
  image_size: int
  max_instances: int
  mask_size: int
  allowed_mask_ids: tuple[int, ...]
  train: bool
  hflip: bool = True
  scale_range: tuple[float, float] = (1.0, 1.0)
  color_jitter: bool = False


# ---------------------------------------------------------------------------------------------
# Geometry helpers.


def resample_boxes(images: tf.Tensor, boxes: tf.Tensor, out_h, out_w) -> tf.Tensor:
  """Bilinear samples of `boxes` regions at output-cell centres (ops/masks.py convention).

  Args:
    images: [K, H, W, C] any real dtype.
    boxes: [K, 4] (y1, x1, y2, x2) in source pixel coordinates; box k samples images[k].
    out_h, out_w: output size (may be dynamic).
  Returns:
    [K, out_h, out_w, C] float32. Samples are clamped to the image (border replication).
  """
  height = tf.cast(tf.shape(images)[1], tf.float32)
  width = tf.cast(tf.shape(images)[2], tf.float32)
  # One replicated border pixel turns crop_and_resize's "zero outside" into clamping for the
  # half-pixel margins that cell-centre sampling reaches.
  padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode='SYMMETRIC')
  y1, x1, y2, x2 = tf.unstack(tf.cast(boxes, tf.float32), axis=-1)
  oh, ow = tf.cast(out_h, tf.float32), tf.cast(out_w, tf.float32)
  # crop_and_resize samples y1n*(Hp-1) + i*(y2n-y1n)*(Hp-1)/(out-1); we want the centre of
  # cell i, y1 + (i+0.5)*h/out, in index space (-0.5) of the padded image (+1).
  start_y = (y1 + 0.5 * (y2 - y1) / oh + 0.5) / (height + 1.0)
  start_x = (x1 + 0.5 * (x2 - x1) / ow + 0.5) / (width + 1.0)
  span_y = (y2 - y1) * (oh - 1.0) / (oh * (height + 1.0))
  span_x = (x2 - x1) * (ow - 1.0) / (ow * (width + 1.0))
  norm_boxes = tf.stack([start_y, start_x, start_y + span_y, start_x + span_x], axis=-1)
  return tf.image.crop_and_resize(
      padded, norm_boxes, tf.range(tf.shape(boxes)[0]), tf.stack([out_h, out_w]))


def decode_masks(rle: tf.RaggedTensor, height, width) -> tf.Tensor:
  """[K, None] ragged uncompressed COCO run lengths -> [K, H, W] uint8 masks.

  Each row's runs sum to H*W, so a cumulative sum over all runs gives every run's start in the
  concatenated [K*H*W] buffer. Ones-runs (odd positions) add +1 at their start and -1 at their
  end; a cumulative sum of those marks is the mask: O(K*H*W) work, where `tf.repeat` would
  materialise [num_runs, longest_run].
  """
  counts = tf.cast(rle.flat_values, tf.int64)
  ends = tf.cumsum(counts)
  starts = ends - counts
  is_one = tf.ragged.range(rle.row_lengths()).flat_values % 2 == 1
  total = tf.cast(tf.shape(rle.row_lengths())[0], tf.int64) * tf.cast(height * width, tf.int64)
  marks = tf.math.unsorted_segment_sum(
      tf.concat([tf.ones_like(starts[is_one], tf.int32),
                 -tf.ones_like(ends[is_one], tf.int32)], 0),
      tf.concat([starts[is_one], ends[is_one]], 0), total + 1)
  flat = tf.cast(tf.cumsum(marks[:-1]), tf.uint8)
  return tf.transpose(tf.reshape(flat, [-1, width, height]), [0, 2, 1])  # RLE is column-major


def _scale_and_offset(height, width, spec: PreprocessSpec, seed):
  """Scale factor (input px per original px), crop offset (y, x) and visible size (h, w)."""
  size = tf.cast(spec.image_size, tf.float32)
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  if spec.train and spec.scale_range != (1.0, 1.0):
    lo, hi = spec.scale_range
    target = tf.round(size * tf.random.stateless_uniform([], seed, lo, hi))
  else:
    target = size
  scale = tf.minimum(target / h, target / w)
  scaled = tf.round(tf.stack([h, w]) * scale)
  max_offset = tf.maximum(scaled - size, 0.0)
  if spec.train:
    u = tf.random.stateless_uniform([2], seed + 1)
    offset = tf.floor(max_offset * u)
  else:
    offset = tf.zeros([2])
  visible = tf.minimum(scaled - offset, size)
  return scale, offset, visible


# ---------------------------------------------------------------------------------------------
# Per-example preprocessing.


def color_jitter(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """The TF Object Detection API's random_adjust_hue, _contrast, _saturation, _brightness with
  their default ranges, in the Deep-MAC recipe's order: [H, W, 3] uint8 -> uint8.

  Hue by U(-0.02, 0.02) of the colour circle, contrast and saturation by factors U(0.8, 1.25),
  brightness by U(-0.2, 0.2) of the range, each clipped to [0, 1] as the official clips to
  [0, 255]; per image, from a stateless seed.
  """
  x = tf.image.convert_image_dtype(image, tf.float32)
  seeds = tf.random.experimental.stateless_split(seed, 4)
  x = tf.clip_by_value(tf.image.stateless_random_hue(x, 0.02, seeds[0]), 0.0, 1.0)
  x = tf.clip_by_value(tf.image.stateless_random_contrast(x, 0.8, 1.25, seeds[1]), 0.0, 1.0)
  x = tf.clip_by_value(tf.image.stateless_random_saturation(x, 0.8, 1.25, seeds[2]), 0.0, 1.0)
  x = tf.clip_by_value(tf.image.stateless_random_brightness(x, 0.2, seeds[3]), 0.0, 1.0)
  return tf.image.convert_image_dtype(x, tf.uint8, saturate=True)


def preprocess(example: dict, spec: PreprocessSpec, seed: tf.Tensor) -> dict[str, tf.Tensor]:
  """One TFDS example -> one batch-contract example (see the module docstring)."""
  image = example['image']
  if spec.train and spec.color_jitter:
    image = color_jitter(image, seed + 3)
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  h_f, w_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  objects = example['objects']
  boxes = objects['bbox'] * tf.stack([h_f, w_f, h_f, w_f])  # original pixels
  classes = tf.cast(objects['category_id'], tf.int32)

  flip = tf.constant(False)
  if spec.train and spec.hflip:
    flip = tf.random.stateless_uniform([], seed + 2) < 0.5
  scale, offset, visible = _scale_and_offset(height, width, spec, seed)

  # Boxes in the (possibly flipped) original frame, then in input pixels, clipped.
  y1, x1, y2, x2 = tf.unstack(boxes, axis=-1)
  x1, x2 = tf.where(flip, w_f - x2, x1), tf.where(flip, w_f - x1, x2)
  out = tf.stack([y1, x1, y2, x2], -1) * scale - tf.tile(offset, [2])
  out = tf.clip_by_value(out, 0.0, tf.tile(visible, [2]))
  keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
  kept = tf.where(keep)[:, 0]
  num_dropped = tf.maximum(tf.size(kept) - spec.max_instances, 0)
  kept = kept[:spec.max_instances]
  out = tf.gather(out, kept)
  classes = tf.gather(classes, kept)
  is_crowd = tf.gather(objects['is_crowd'], kept)

  masks = _crop_masks(tf.gather(objects['mask_rle'], kept), out, flip, scale, offset,
                      height, width, spec.mask_size)
  allowed = tf.reduce_any(classes[:, None] == tf.constant(
      list(spec.allowed_mask_ids) or [-1], tf.int32)[None, :], axis=1) & ~is_crowd

  image = _transform_image(image, flip, scale, offset, visible, spec.image_size)
  n = tf.shape(out)[0]
  pad = spec.max_instances - n
  return {
      'image': image,
      'image_info': tf.stack([h_f, w_f, scale, scale]),
      'gt_boxes': tf.pad(out, [[0, pad], [0, 0]]),
      'gt_classes': tf.pad(classes, [[0, pad]]),
      'gt_valid': tf.pad(tf.ones([n], tf.bool), [[0, pad]]),
      'gt_is_crowd': tf.pad(is_crowd, [[0, pad]]),
      'gt_mask_allowed': tf.pad(allowed, [[0, pad]]),
      'gt_masks': tf.pad(masks, [[0, pad], [0, 0], [0, 0]]),
      'image_id': tf.cast(example['image/id'], tf.int32),
      'example_valid': tf.constant(True),
      'num_dropped_instances': tf.cast(num_dropped, tf.int32),
  }


def preprocess_image(image: tf.Tensor, image_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """One image [H, W, 3] uint8 exactly as the eval pipeline feeds it to a model.

  Returns (input image [S, S, 3] uint8: aspect-preserving resize so that the longer side is
  S = image_size, zero padding below and right; scale: input pixels per original pixel).
  """
  spec = PreprocessSpec(image_size=image_size, max_instances=1, mask_size=1,
                        allowed_mask_ids=(), train=False)
  scale, offset, visible = _scale_and_offset(tf.shape(image)[0], tf.shape(image)[1], spec, None)
  return _transform_image(image, tf.constant(False), scale, offset, visible, image_size), scale


def _crop_masks(rle, out_boxes, flip, scale, offset, height, width, mask_size):
  """[K,M,M] masks of the final boxes, cropped from the original-resolution masks."""
  y1, x1, y2, x2 = tf.unstack((out_boxes + tf.tile(offset, [2])) / scale, axis=-1)
  w_f = tf.cast(width, tf.float32)
  x1, x2 = tf.where(flip, w_f - x2, x1), tf.where(flip, w_f - x1, x2)
  full = decode_masks(rle, height, width)[..., None]
  crops = resample_boxes(full, tf.stack([y1, x1, y2, x2], -1), mask_size, mask_size)[..., 0]
  return tf.where(flip, tf.reverse(crops, [2]), crops)


def _transform_image(image, flip, scale, offset, visible, size):
  """Flip, resample the visible window to its input size, zero-pad to size x size (uint8)."""
  image = tf.cast(tf.where(flip, tf.reverse(image, [1]), image), tf.float32)  # f32 resamples faster
  vis = tf.cast(visible, tf.int32)
  window = tf.concat([offset, offset + visible], 0) / scale
  resized = resample_boxes(image[None], window[None], vis[0], vis[1])[0]
  resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  return tf.image.pad_to_bounding_box(resized, 0, 0, size, size)


def padding_example(spec: PreprocessSpec) -> dict[str, tf.Tensor]:
  """An all-zero example with `example_valid=False` (fills the last eval batch)."""
  n, m, s = spec.max_instances, spec.mask_size, spec.image_size
  return {
      'image': tf.zeros([s, s, 3], tf.uint8),
      'image_info': tf.constant([1.0, 1.0, 1.0, 1.0]),
      'gt_boxes': tf.zeros([n, 4]), 'gt_classes': tf.zeros([n], tf.int32),
      'gt_valid': tf.zeros([n], tf.bool), 'gt_is_crowd': tf.zeros([n], tf.bool),
      'gt_mask_allowed': tf.zeros([n], tf.bool), 'gt_masks': tf.zeros([n, m, m]),
      'image_id': tf.constant(-1, tf.int32), 'example_valid': tf.constant(False),
      'num_dropped_instances': tf.constant(0, tf.int32),
  }


def dummy_batch(spec: PreprocessSpec, batch_size: int) -> dict[str, np.ndarray]:
  """A batch of `padding_example`s as numpy (shapes/dtypes for model init and tracing)."""
  example = {k: v.numpy() for k, v in padding_example(spec).items()}
  return {k: np.repeat(v[None], batch_size, axis=0) for k, v in example.items()}


# ---------------------------------------------------------------------------------------------
# Datasets.


def get_builder(data_config) -> tfds.core.DatasetBuilder:
  """The TFDS builder named by `data_config.tfds_name`, prepared if it is not yet.

  Synthetic data is generated on first use; real data needs `data_config.manual_dir`.
  """
  kwargs = {'on_bad_input': data_config.on_bad_input}
  if data_config.get('max_json_mb'):
    kwargs['max_json_mb'] = data_config.max_json_mb
  if data_config.get('data_dir'):
    kwargs['data_dir'] = os.path.expanduser(data_config.data_dir)
  builder = tfds.builder(data_config.tfds_name, **kwargs)
  if builder.is_prepared():
    _warn_of_skipped_records(builder)
    return builder
  # Processes that start together (sweep cells, one per core) would each generate the data and
  # all but the first fail to move theirs into place; one prepares, the others wait and read it.
  with _preparation_lock(os.fspath(builder.data_dir)):
    builder = tfds.builder(data_config.tfds_name, **kwargs)
    if not builder.is_prepared():
      manual_dir = data_config.get('manual_dir')
      try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=os.path.expanduser(manual_dir) if manual_dir else None,
            try_download_gcs=False))
      except Exception as e:  # pylint: disable=broad-except
        # TFDS reports a full disk as a RuntimeError; callers (run.py) answer OSErrors.
        if 'No space left on device' not in str(e):
          raise
        raise OSError(errno.ENOSPC, f'No space left on device while building '
                      f'{data_config.tfds_name} in {builder.data_dir} ({str(e)[:300]}); TFDS '
                      'removed the unfinished files', os.fspath(builder.data_dir)) from e
  return builder


def _warn_of_skipped_records(builder) -> None:
  """The build logged what it skipped; a run that reuses the dataset says it again, once per
  split, so that nobody trains on a silently thinned dataset."""
  stats = builder.info.metadata.get('read_stats', {}) if builder.info.metadata else {}
  for split, split_stats in stats.items():
    skipped = split_stats.get('skipped') or {}
    if skipped or split_stats.get('annotations_of_skipped_images'):
      reasons = ', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items()))
      logging.warning('%s, split %s, was built skipping bad input (data.on_bad_input=skip): '
                      '%s; see read_stats in %s/dataset_info.json', builder.name, split,
                      reasons, builder.data_dir)


@contextlib.contextmanager
def _preparation_lock(data_path: str):
  """Holds an exclusive lock on `<data_path>.lock` (local folders; a no-op for remote ones)."""
  if '://' in data_path:
    yield
    return
  os.makedirs(os.path.dirname(data_path), exist_ok=True)
  with open(f'{data_path}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def make_spec(data_config, builder: tfds.core.DatasetBuilder, *, train: bool) -> PreprocessSpec:
  return PreprocessSpec(
      image_size=data_config.image_size,
      max_instances=data_config.max_instances,
      mask_size=data_config.mask_size,
      allowed_mask_ids=class_splits.resolve_mask_classes(data_config.mask_classes,
                                                      category_ids(builder)),
      train=train,
      hflip=data_config.hflip,
      scale_range=tuple(data_config.scale_jitter),
      color_jitter=data_config.get('color_jitter', False))


def train_dataset(data_config, builder: tfds.core.DatasetBuilder, *, batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> tf.data.Dataset:
  """Infinite, shuffled, augmented batches of this process's shard of the train split.

  The stream is a pure function of (seed, process, step): batch s is the same whether training
  started at step 0 or resumed at step s. Epoch e is the shard in its stored order shuffled
  with a buffer seeded by (seed, e); resuming skips the records already used in the current
  epoch before they are decoded, so it costs a TFRecord scan, not a decode.

  Args:
    batch_size: the per-process batch (global batch / process_count).
    start_step: the first step this stream feeds (the restored checkpoint's step).
  """
  spec = make_spec(data_config, builder, train=True)
  shard = tfds.even_splits(data_config.train_split, process_count, drop_remainder=True)[
      process_index]
  num_examples = builder.info.splits[shard].num_examples
  if num_examples == 0:
    raise ValueError(f'{data_config.tfds_name} split {data_config.train_split!r} has no '
                     f'examples for process {process_index} of {process_count}')
  consumed = start_step * batch_size
  first_epoch, offset = divmod(consumed, num_examples)
  records = builder.as_dataset(split=shard, shuffle_files=False,
                               decoders={'image': tfds.decode.SkipDecoding()})
  process_seed = seed * 1_000_003 + process_index
  ds = tf.data.Dataset.counter(first_epoch).flat_map(
      lambda epoch: records.shuffle(data_config.shuffle_buffer,
                                    seed=process_seed * 100_003 + epoch))
  ds = ds.skip(offset).enumerate(start=consumed)
  decode_image = builder.info.features['image'].decode_example

  def augment(index, example):
    example = dict(example, image=decode_image(example['image']))
    return preprocess(example, spec, _example_seed(process_seed, index))

  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def eval_dataset(data_config, builder: tfds.core.DatasetBuilder, *, batch_size: int,
                 split: str | None = None, process_index: int = 0,
                 process_count: int = 1) -> tf.data.Dataset:
  """One pass over this process's shard, padded so every process yields the same batches."""
  spec = make_spec(data_config, builder, train=False)
  split = split or data_config.eval_split
  shards = tfds.even_splits(split, process_count, drop_remainder=False)
  num_examples = builder.info.splits[split].num_examples
  per_process = -(-num_examples // process_count)
  num_batches = -(-per_process // batch_size)
  ds = builder.as_dataset(split=shards[process_index], shuffle_files=False)
  zero_seed = tf.zeros([2], tf.int64)
  ds = ds.map(lambda ex: preprocess(ex, spec, zero_seed), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding_example(spec)).repeat())
  ds = ds.take(num_batches * batch_size).batch(batch_size, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _example_seed(seed: int, index: tf.Tensor) -> tf.Tensor:
  return tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def category_ids(builder: tfds.core.DatasetBuilder) -> Sequence[int]:
  """The dataset's category ids (from the builder's metadata), ascending."""
  return [c['id'] for c in builder.info.metadata['categories']]
