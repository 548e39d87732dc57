"""Builds small official Deep-MARC models, randomises them, saves checkpoints and outputs.

The oracle side of tests/test_convert.py (its `official` fixture writes INPUTS_NPZ and runs
this). Runs under .venv-oracle (tf-models-official 2.20; `bash setup.sh` builds it), not .venv:

  .venv-oracle/bin/python oracle/deepmarc_parity.py OUT_DIR INPUTS_NPZ

INPUTS_NPZ holds `spec` (JSON: per model NAME, the official config overrides and, for
'spinenet', its SCALING_MAP row) and, per NAME, `NAME_calibration_images`, `NAME_image` (uint8
[n, size, size, 3]), `NAME_rois` and `NAME_boxes` ([1, n, 4] pixels). For each model NAME in the
spec ('spinenet', 'resnetfpn'): OUT_DIR/NAME/ckpt* (tf.train.Checkpoint(model=...)) and
OUT_DIR/NAME.npz (the evaluation-mode outputs of `outputs`); for 'spinenet' also
OUT_DIR/spinenet_default/ckpt* (same trunk, the 'default' DeepMaskHead) and its npz, and
OUT_DIR/resnetfpn_hourglass100/ckpt* (the ResNet-FPN trunk with the 'hourglass100' head).
"""
import json
import os
import sys
import time

import numpy as np
import tensorflow as tf
import tf_keras

# Before anything can start the TF runtime, which fixes the thread counts; one thread each: the
# tests run beside others on few cores.
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)
from absl import logging as absl_logging  # noqa: E402
absl_logging.set_verbosity(absl_logging.ERROR)
tf.get_logger().setLevel('ERROR')

from official.core import exp_factory  # noqa: E402
from official.projects.deepmac_maskrcnn.common import registry_imports  # noqa: E402,F401
from official.projects.deepmac_maskrcnn.modeling import maskrcnn_model as deep_model  # noqa: E402
from official.projects.deepmac_maskrcnn.modeling.heads import instance_heads as deep_heads  # noqa
from official.projects.deepmac_maskrcnn.tasks import deep_mask_head_rcnn as task_mod  # noqa: E402
from official.vision.modeling.backbones import spinenet  # noqa: E402
from official.vision.ops import anchor  # noqa: E402
from official.vision.ops import preprocess_ops  # noqa: E402

def log(*a):
  print(*a, file=sys.stderr, flush=True)


def build(experiment, overrides):
  config = exp_factory.get_exp_config(experiment)
  config.override({'task': {'model': overrides}}, is_strict=True)
  tf_keras.utils.set_random_seed(0)
  return task_mod.DeepMaskHeadRCNNTask(config.task).build_model(), config.task.model


def unique(variables):
  return list({id(v): v for v in variables}.values())


def randomise(layer, rng):
  """New random kernels (fan-in scaled), biases, gammas and betas; BN statistics come later."""
  for v in unique(layer.weights):
    leaf = v.name.split('/')[-1].split(':')[0]
    shape = v.shape.as_list()
    if leaf == 'kernel':
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(shape[:-1])), shape)
    elif leaf == 'bias':
      value = rng.normal(0.0, 0.2, shape)
    elif leaf == 'beta':
      # Mostly active ReLUs: with beta ~ 0 a random SpineNet amplifies float32 rounding far
      # more than with beta ~ 1, and the parity checks would need looser tolerances.
      value = rng.normal(1.0, 0.2, shape)
    elif leaf == 'gamma':
      value = rng.uniform(0.7, 1.3, shape)
    else:
      continue
    v.assign(value.astype(np.float32))


def batch_norms(layer):
  return [l for l in layer._flatten_layers() if hasattr(l, 'moving_variance')]


def calibrate(layer, call):
  """Moving statistics := this call's batch statistics (momentum 0), so that evaluation-mode
  activations stay O(1) through the deep random networks."""
  norms = batch_norms(layer)
  momenta = [n.momentum for n in norms]
  for n in norms:
    n.momentum = 0.0
  call()
  for n, m in zip(norms, momenta):
    n.momentum = m


def perturb_statistics(layer, rng):
  for n in batch_norms(layer):
    var = n.moving_variance.numpy()
    n.moving_mean.assign((n.moving_mean.numpy() + 0.1 * np.sqrt(var + 1e-3)
                          * rng.standard_normal(var.shape)).astype(np.float32))
    n.moving_variance.assign((var * rng.uniform(0.7, 1.4, var.shape) + 0.05).astype(np.float32))


def normalise(images_uint8):
  # The Model Garden parser: uint8 -> [0, 1] -> (x - MEAN_NORM) / STDDEV_NORM.
  return tf.stack([preprocess_ops.normalize_image(tf.constant(im)) for im in images_uint8])


def randomise_and_calibrate(model, mask_head, images, rois, rng):
  randomise(model, rng)
  rois = tf.tile(rois, [images.shape[0], 1, 1])
  calibrate(model.backbone, lambda: model.backbone(images, training=True))
  if model.decoder is not None:
    calibrate(model.decoder,
              lambda: model.decoder(model.backbone(images, training=False), training=True))
  _, feats = model._get_backbone_and_decoder_features(images)
  calibrate(model.rpn_head, lambda: model.rpn_head(feats, training=True))
  head = model.detection_head[0]
  calibrate(head, lambda: head(model.roi_aligner(feats, rois), training=True))
  calibrate_mask_head(model, mask_head, feats, rois)
  perturb_statistics(model, rng)


def calibrate_mask_head(model, mask_head, feats, rois):
  classes = tf.zeros(rois.shape[:2], tf.int32)
  calibrate(mask_head,
            lambda: mask_head([model.mask_roi_aligner(feats, rois), classes], training=True))


def outputs(model, images, image_size, cfg, rois, boxes):
  """Evaluation-mode outputs of the pieces our parity tests compare, as numpy."""
  out = {}
  backbone_feats, feats = model._get_backbone_and_decoder_features(images)
  for l, f in backbone_feats.items():
    out[f'backbone_{l}'] = f.numpy()
  for l, f in feats.items():
    out[f'features_{l}'] = f.numpy()
  scores, deltas = model.rpn_head(feats)
  anchors = anchor.Anchor(min_level=cfg.min_level, max_level=cfg.max_level,
                          num_scales=cfg.anchor.num_scales,
                          aspect_ratios=cfg.anchor.aspect_ratios,
                          anchor_size=cfg.anchor.anchor_size,
                          image_size=(image_size, image_size)).multilevel_boxes
  for l in scores:
    out[f'rpn_scores_{l}'] = scores[l].numpy()
    out[f'rpn_boxes_{l}'] = deltas[l].numpy()
    out[f'anchors_{l}'] = anchors[l].numpy()
  image_shape = tf.constant([[image_size, image_size]] * images.shape[0], tf.float32)
  batched_anchors = {l: tf.tile(a[None], [images.shape[0], 1, 1, 1]) for l, a in anchors.items()}
  proposals, proposal_scores = model.roi_generator(deltas, scores, batched_anchors, image_shape,
                                                   training=False)
  out['proposals'], out['proposal_scores'] = proposals.numpy(), proposal_scores.numpy()
  # Second stage on fixed ROIs, then the official detection generator.
  class_outputs, box_outputs = model.detection_head[0](model.roi_aligner(feats, rois))
  weights = model._cascade_layer_to_weights[0]
  dets = model.detection_generator(box_outputs, class_outputs, rois, image_shape, weights,
                                   bbox_per_class=True)
  out['box_weights'] = np.array(weights, np.float32)
  out['class_outputs'], out['box_outputs'] = class_outputs.numpy(), box_outputs.numpy()
  for k in ('detection_boxes', 'detection_scores', 'detection_classes', 'num_detections'):
    out[k] = dets[k].numpy()
  out.update(mask_outputs(model, images, feats, boxes))
  return out


def mask_outputs(model, images, feats, boxes):
  classes = tf.zeros(boxes.shape[:2], tf.int32)
  logits, probs = model._features_to_mask_outputs(feats, boxes, classes)
  return {'mask_logits': logits.numpy(), 'mask_probs': probs.numpy(),
          'mask_probs_call': model.call_images_and_boxes(images, boxes)['detection_masks'].numpy()}


def save(model, out_dir, name, out):
  tf.train.Checkpoint(model=model).write(os.path.join(out_dir, name, 'ckpt'))
  np.savez(os.path.join(out_dir, f'{name}.npz'), **out)


def run(out_dir, inputs, name, experiment, overrides):
  t = time.time()
  size = overrides['input_size'][0]
  model, cfg = build(experiment, overrides)
  log(f'{name}: built in {time.time() - t:.1f} s')
  rng = np.random.default_rng(0)
  calib = normalise(inputs[f'{name}_calibration_images'])
  images = normalise(inputs[f'{name}_image'])
  rois = tf.constant(inputs[f'{name}_rois'])
  boxes = tf.constant(inputs[f'{name}_boxes'])
  randomise_and_calibrate(model, model.mask_head, calib, rois, rng)
  save(model, out_dir, name, outputs(model, images, size, cfg, rois, boxes))
  log(f'{name}: done in {time.time() - t:.1f} s')
  return model, cfg, images, boxes, rois, rng


def with_head(model, cfg, images, boxes, rois, rng, convnet_variant):
  """The same trunk with another DeepMaskHead variant (e.g. 'default': 4 x conv + BN + ReLU)."""
  mh, na = cfg.mask_head, cfg.norm_activation
  head = deep_heads.DeepMaskHead(
      num_classes=cfg.num_classes, upsample_factor=mh.upsample_factor, num_convs=mh.num_convs,
      num_filters=mh.num_filters, norm_momentum=na.norm_momentum, norm_epsilon=na.norm_epsilon,
      class_agnostic=mh.class_agnostic, convnet_variant=convnet_variant)
  other = deep_model.DeepMaskRCNNModel(**dict(model.get_config(), mask_head=head))
  _, feats = other._get_backbone_and_decoder_features(images)
  head([other.mask_roi_aligner(feats, rois), tf.zeros(rois.shape[:2], tf.int32)])  # build
  randomise(head, rng)
  calibrate_mask_head(other, head, feats, rois)
  perturb_statistics(head, rng)
  return other, mask_outputs(other, images, feats, boxes)


def main(argv):
  out_dir, inputs = argv[1], np.load(argv[2])
  spec = json.loads(str(inputs['spec']))
  if 'spinenet' in spec:
    # A narrow SpineNet-49 (the catalogue's spinenet49 at width_multiplier w): official
    # SCALING_MAP rows are fixed, so the test registers its own row.
    spinenet.SCALING_MAP['test'] = spec['spinenet']['scaling']
    args = run(out_dir, inputs, 'spinenet', 'deep_mask_head_rcnn_spinenet_coco',
               spec['spinenet']['overrides'])
    other, out = with_head(*args, 'default')
    save(other, out_dir, 'spinenet_default', out)
  if 'resnetfpn' in spec:
    args = run(out_dir, inputs, 'resnetfpn', 'deep_mask_head_rcnn_resnetfpn_coco',
               spec['resnetfpn']['overrides'])
    other, out = with_head(*args, 'hourglass100')  # 6 stages: needs the 32 px crops
    save(other, out_dir, 'resnetfpn_hourglass100', out)


if __name__ == '__main__':
  main(sys.argv)
