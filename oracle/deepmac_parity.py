"""A small official Deep-MAC, randomised: its checkpoint and every output our port must match.

The oracle side of tests/test_deepmac_parity.py. Runs under the Deep-MAC oracle venv
(`.venv-oracle-deepmac`), not .venv:

  .venv-oracle-deepmac/bin/python oracle/deepmac_parity.py INPUTS_NPZ OUT_DIR

INPUTS_NPZ: `spec` (JSON: input_size, num_classes, allowed_ids, network_type,
num_init_channels, use_only_last_stage, max_detections), `calibration_images` uint8
[C, S, S, 3], `images` uint8 [B, S, S, 3], `boxes` [B, N, 4] normalised y1, x1, y2, x2,
`classes` [B, N] int COCO ids, `masks` [B, N, S, S] full-image masks, `prompt_boxes` [1, K, 4]
normalised (for the first image).

The model: `deepmac_official.build` (the voc_only model block, the tiny Hourglass-104-layout
backbone). Its kernels, biases and BatchNorm scales/offsets are redrawn (fan-in-scaled normal
kernels; the official initialisers leave most logits saturated), and its BatchNorm moving
statistics set by three Keras-training-mode passes over the calibration images (momentum 0.1:
each pass keeps 90% of the batch's statistics), so inference-mode activations stay in range.

OUT_DIR/ckpt* is `tf.train.Checkpoint(model=model)` (what the OD API's trainer saves under
'model'); OUT_DIR/outputs.npz holds, for the batch, with BatchNorm in inference mode:
  pred/<key>/<stack> for extracted_features, object_center, box/scale, box/offset,
  INSTANCE_EMBEDDING, PIXEL_EMBEDDING, MASK_LOGITS_GT_BOXES (the official predict dict);
  loss/<name> (the official `loss()`, weighted), mask_targets [B, N, 32, 32];
  det/boxes (normalised), det/scores, det/classes (0-based channels), det/masks (the official
  `postprocess`: top-k peaks and their masks);
  prompt/masks [1, K, 32, 32] (`DetectionFromImageAndBoxModule`, the Colab's path, on images[:1]);
and with BatchNorm in training mode (Keras learning phase 1, last: it moves the statistics):
  train/loss/<name>, train/MASK_LOGITS_GT_BOXES/<stack>.
"""
import json
import os
import sys
import time

import deepmac_official  # noqa: F401  (first: sets up TensorFlow, registers the tiny backbone)
import numpy as np
import tensorflow as tf
from deepmac_official import log
from object_detection import exporter_lib_v2
from object_detection.meta_architectures import deepmac_meta_arch

CALIBRATION_PASSES = 3


def randomise(model, rng):
  """New random kernels (fan-in scaled), biases, gammas and betas."""
  for v in {id(v): v for v in model.trainable_weights}.values():
    leaf = v.name.split('/')[-1].split(':')[0]
    shape = v.shape.as_list()
    if leaf == 'kernel':
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    elif leaf == 'bias':
      value = rng.normal(0.0, 0.2, shape)
    elif leaf == 'beta':
      value = rng.normal(0.5, 0.2, shape)
    elif leaf == 'gamma':
      value = rng.uniform(0.7, 1.3, shape)
    else:
      continue
    v.assign(value.astype(np.float32))


def provide(model, boxes, classes, masks, num_classes):
  onehot = np.zeros(classes.shape + (num_classes,), np.float32)
  for index in np.ndindex(classes.shape):
    if 1 <= classes[index] <= num_classes:
      onehot[index + (classes[index] - 1,)] = 1.0
  model.provide_groundtruth(
      groundtruth_boxes_list=[tf.constant(b, tf.float32) for b in boxes],
      groundtruth_classes_list=[tf.constant(c) for c in onehot],
      groundtruth_masks_list=[tf.constant(m, tf.float32) for m in masks],
      groundtruth_weights_list=[tf.ones(len(b), tf.float32) for b in boxes])


def stacked(out, prefix, prediction):
  for key, value in prediction.items():
    if isinstance(value, list):
      for i, x in enumerate(value):
        out[f'{prefix}/{key}/{i}'] = x.numpy()


def main():
  inputs_path, out_dir = sys.argv[1], sys.argv[2]
  inputs = dict(np.load(inputs_path))
  spec = json.loads(str(inputs['spec']))
  start = time.time()
  model = deepmac_official.build(
      num_classes=spec['num_classes'], input_size=spec['input_size'],
      allowed_ids=spec['allowed_ids'], network_type=spec['network_type'],
      num_init_channels=spec['num_init_channels'],
      use_only_last_stage=spec['use_only_last_stage'], max_detections=spec['max_detections'])
  num_classes = spec['num_classes']
  images = inputs['images'].astype(np.float32)
  boxes, classes, masks = inputs['boxes'], inputs['classes'], inputs['masks']

  # Build every layer (the mask network only exists once GT boxes were seen), then randomise.
  tf.keras.backend.set_learning_phase(0)
  pre, true_shapes = model.preprocess(tf.constant(images))
  provide(model, boxes, classes, masks, num_classes)
  model.predict(pre, true_shapes)
  randomise(model, np.random.default_rng(0))
  calibration = inputs['calibration_images'].astype(np.float32)
  cal_pre, cal_shapes = model.preprocess(tf.constant(calibration))
  tf.keras.backend.set_learning_phase(1)
  for _ in range(CALIBRATION_PASSES):
    provide(model, np.repeat(boxes[:1], len(calibration), 0),
            np.repeat(classes[:1], len(calibration), 0),
            np.repeat(masks[:1], len(calibration), 0), num_classes)
    model.predict(cal_pre, cal_shapes)
  tf.keras.backend.set_learning_phase(0)
  os.makedirs(out_dir, exist_ok=True)
  tf.train.Checkpoint(model=model).write(os.path.join(out_dir, 'ckpt'))
  log(f'built, randomised, calibrated and saved in {time.time() - start:.1f} s')

  out = {}
  provide(model, boxes, classes, masks, num_classes)
  prediction = model.predict(pre, true_shapes)
  stacked(out, 'pred', prediction)
  for name, value in model.loss(prediction, true_shapes).items():
    out[f'loss/{name}'] = np.float32(value)
  out['mask_targets'] = model._get_groundtruth_mask_output(  # pylint: disable=protected-access
      tf.constant(boxes, tf.float32), tf.constant(masks, tf.float32)).numpy()
  detections = model.postprocess(prediction, true_shapes)
  out['det/boxes'] = detections['detection_boxes'].numpy()
  out['det/scores'] = detections['detection_scores'].numpy()
  out['det/classes'] = detections['detection_classes'].numpy()
  out['det/masks'] = detections['detection_masks'].numpy()

  model._groundtruth_lists = {}  # pylint: disable=protected-access
  module = exporter_lib_v2.DetectionFromImageAndBoxModule(model)
  prompted = module(tf.constant(inputs['images'][:1].astype(np.uint8)),
                    tf.constant(inputs['prompt_boxes'], tf.float32))
  out['prompt/masks'] = prompted['detection_masks'].numpy()

  tf.keras.backend.set_learning_phase(1)
  provide(model, boxes, classes, masks, num_classes)
  prediction = model.predict(pre, true_shapes)
  for name, value in model.loss(prediction, true_shapes).items():
    out[f'train/loss/{name}'] = np.float32(value)
  for i, x in enumerate(prediction[deepmac_meta_arch.MASK_LOGITS_GT_BOXES]):
    out[f'train/MASK_LOGITS_GT_BOXES/{i}'] = x.numpy()
  tf.keras.backend.set_learning_phase(0)
  np.savez(os.path.join(out_dir, 'outputs.npz'), **out)
  log(f'done in {time.time() - start:.1f} s')


if __name__ == '__main__':
  main()
