r"""The official Deep-MAC's train step and masks-from-boxes call, timed on this machine.

The side-by-side reference for the `deepmac` cases of benchmarks/train_step_speed.py and
benchmarks/segment_speed.py. Runs under the Deep-MAC oracle venv, not .venv:

  .venv-oracle-deepmac/bin/python oracle/official_deepmac_speed.py [--repeats=3] \
      [--counts=1,16] [--image_size=512]

The model: the voc_only config's model block at the 512 recipe's settings (Hourglass-104,
hourglass52 mask network, `use_only_last_stage`), with every class allowed (the mask network
runs on every GT box either way), built by the OD API's `model_builder` (deepmac_official.py).

* Train step: the OD API's eager_train_step in a `tf.function` (Keras learning phase 1,
  `provide_groundtruth`, predict, loss, gradients, Adam with epsilon 1e-7), on batch 2 of the
  same synthetic batch as benchmarks/train_step_speed.synthetic_batch (same seed and draws; the
  masks are the same ellipses, drawn in the full image). First call (trace + run) and the min
  and median of --repeats after it.
* Masks from boxes: `DetectionFromImageAndBoxModule` (the Colab's SavedModel function) on one
  image with the first N of 16 boxes (benchmarks/segment_speed.inputs' draws), traced once with
  the box count dynamic; first call and the median of --repeats per count.

Prints the CPU line and one `RESULT {json}` line. Printed, not asserted: docs/benchmarks.md.
"""
import argparse
import json
import statistics
import time

import deepmac_official  # noqa: F401  (first: sets up TensorFlow)
import numpy as np
import tensorflow as tf
from bench_inputs import cpu_line, segment_inputs
from deepmac_official import log
from object_detection import exporter_lib_v2

NUM_CLASSES = 90




def synthetic_batch(size: int, batch: int = 2, num: int = 5, seed: int = 0):
  """benchmarks/train_step_speed.synthetic_batch's draws: images uint8 [B, S, S, 3], boxes
  [B, num, 4] normalised, classes [B, num] ids 1..90, full-image ellipse masks [B, num, S, S]."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
  boxes = np.zeros((batch, num, 4), np.float32)
  classes = np.zeros((batch, num), np.int32)
  masks = np.zeros((batch, num, size, size), np.float32)
  yy, xx = np.mgrid[:size, :size] + 0.5
  for i in range(batch):
    for k in range(num):
      h, w = np.exp(rng.uniform(np.log(size / 16), np.log(size / 2), 2))
      y, x = rng.uniform(0, size - h), rng.uniform(0, size - w)
      boxes[i, k] = np.array([y, x, y + h, x + w]) / size
      classes[i, k] = rng.integers(1, NUM_CLASSES + 1)
      masks[i, k] = (((yy - y - h / 2) / (0.45 * h)) ** 2
                     + ((xx - x - w / 2) / (0.45 * w)) ** 2) <= 1.0
  return images, boxes, classes, masks


def prompt_inputs(size: int):
  """benchmarks/segment_speed's image and its 16 boxes, the boxes normalised (y1, x1, y2, x2)."""
  image, boxes = segment_inputs(size)
  return image, boxes / size


def provide(model, boxes, classes, masks):
  onehot = tf.one_hot(classes - 1, NUM_CLASSES)
  model.provide_groundtruth(
      groundtruth_boxes_list=tf.unstack(boxes), groundtruth_classes_list=tf.unstack(onehot),
      groundtruth_masks_list=tf.unstack(masks),
      groundtruth_weights_list=[tf.ones(tf.shape(b)[0]) for b in tf.unstack(boxes)])


def timed(fn, repeats):
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return first, min(times), statistics.median(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--counts', default='1,16')
  parser.add_argument('--image_size', type=int, default=512)
  args = parser.parse_args()
  size = args.image_size
  print(cpu_line(), flush=True)
  start = time.perf_counter()
  model = deepmac_official.build(
      num_classes=NUM_CLASSES, input_size=size, allowed_ids=range(1, NUM_CLASSES + 1),
      feature_extractor='hourglass_104', network_type='hourglass52', num_init_channels=64,
      use_only_last_stage=True)
  images, boxes, classes, masks = synthetic_batch(size)
  images_f = tf.constant(images, tf.float32)
  boxes_t, classes_t, masks_t = (tf.constant(boxes), tf.constant(classes),
                                 tf.constant(masks))
  tf.keras.backend.set_learning_phase(1)
  provide(model, boxes_t, classes_t, masks_t)
  pre, shapes = model.preprocess(images_f)
  model.loss(model.predict(pre, shapes), shapes)  # builds every layer
  params = int(sum(np.prod(v.shape) for v in model.trainable_variables))
  build_s = time.perf_counter() - start
  log(f'built ({params:,} trainable parameters) in {build_s:.1f} s')
  optimizer = tf.keras.optimizers.Adam(1e-3, epsilon=1e-7)

  @tf.function
  def train_step(images, boxes, classes, masks):
    provide(model, boxes, classes, masks)
    with tf.GradientTape() as tape:
      pre, shapes = model.preprocess(images)
      losses = model.loss(model.predict(pre, shapes), shapes)
      total = tf.add_n(list(losses.values()))
    grads = tape.gradient(total, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return total

  step = timed(lambda: train_step(images_f, boxes_t, classes_t, masks_t).numpy(), args.repeats)
  log(f'train step: first {step[0]:.1f} s, min {step[1]:.2f} s, median {step[2]:.2f} s')

  tf.keras.backend.set_learning_phase(0)
  model._groundtruth_lists = {}  # pylint: disable=protected-access
  module = exporter_lib_v2.DetectionFromImageAndBoxModule(model)
  function = tf.function(lambda image, boxes: module(image, boxes)['detection_masks'],
                         input_signature=[tf.TensorSpec([1, None, None, 3], tf.uint8),
                                          tf.TensorSpec([1, None, 4], tf.float32)])
  image, prompts = prompt_inputs(size)
  segment = {}
  for n in [int(c) for c in args.counts.split(',')]:
    call = lambda n=n: function(tf.constant(image[None]), tf.constant(prompts[None, :n])).numpy()
    segment[n] = timed(call, args.repeats)
    log(f'masks for {n} boxes: first {segment[n][0]:.2f} s, median {segment[n][2]:.3f} s')
  print('RESULT ' + json.dumps({
      'image_size': size, 'params': params, 'build_s': build_s,
      'train_step_first_s': step[0], 'train_step_min_s': step[1], 'train_step_median_s': step[2],
      'segment_first_s': {n: t[0] for n, t in segment.items()},
      'segment_median_s': {n: t[2] for n, t in segment.items()},
      'checksum': f'images sum {int(images.sum())}, boxes sum {float(boxes.sum()):.4f}'}),
      flush=True)


if __name__ == '__main__':
  main()
