r"""The official TF Model Garden Deep-MARC's masks-from-boxes path (`call_images_and_boxes`), timed
where it runs: the side-by-side reference for `benchmarks/segment_speed.py` (results:
docs/benchmarks.md).

Runs in the oracle venv (`setup.sh` builds it; it holds tf-models-official 2.20.0, see
oracle/README.md), not in .venv:

  .venv-oracle/bin/python oracle/official_segment_speed.py [--cases=demo,paper]
      [--counts=1,4,16] [--repeats=5] [--demo_repeats=50] [--threads=0] [--image_size=N]

`benchmarks/segment_speed.py --official` runs this program itself and prints both sides together.

Cases (float32, random initialisation, batch 1, the models built by the task's own
`build_model()`):
  demo   the counterpart of ours `experiments/deepmarc_spinenet.py:demo`: SpineNet-49 with a
         quarter of its width (filter_size_scale 0.25, 64 endpoint filters; added to
         `spinenet.SCALING_MAP` as '49Q', since Model Garden has no such entry), levels 2-6,
         128x128, hourglass20 mask head with 16 filters, class-agnostic, crop 16 -> 32x32 masks.
  paper  the paper's model: SpineNet-143 (levels 3-7), 1280x1280, hourglass52 mask head with 64
         filters, class-agnostic, crop 32 -> 64x64 masks.
`--image_size` replaces a case's input size (a multiple of 128; for quick checks).

Inputs, the same as benchmarks/segment_speed.py makes them (same generators, same seeds; both
print a checksum of them): a uniform random uint8 image of the model's input size (seed 0) and
16 boxes (seed 1, sides log-uniform in 1/16..1/2 of the image); a run with N boxes takes the
first N.

What is timed is the official serving function for boxes:
`DetectionModule.inference_for_tflite_image_and_boxes` (official/projects/deepmac_maskrcnn/
serving/detection.py), a `tf.function` that preprocesses the uint8 image (normalise, resize to
the input size), turns the normalised boxes into input pixels and calls
`DeepMaskRCNNModel.call_images_and_boxes` (backbone, then ROIAlign + mask head on the boxes,
sigmoid). It is traced once, as its export signature does it: images [1, None, None, 3] uint8,
boxes [1, None, 4], so no box count retraces it. Separately, "mask branch" times the part of
that call after the backbone (`_features_to_mask_outputs` on the image's features, in its own
`tf.function`): what each extra box costs, without the backbone's noise.

Printed per case: the build, the first call (trace + graph optimisation + one run) and the first
call with each new box count, then the median and min of --repeats (demo: --demo_repeats) calls
per box count (box counts interleaved), the per-extra-box slope between the smallest and largest
count, and one `RESULT {json}` line that benchmarks/segment_speed.py reads. Printed, not
asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

from bench_inputs import NUM_BOXES, checksum, cpu_line
from bench_inputs import segment_inputs as inputs

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

CASES = ('demo', 'paper')


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--counts', default='1,4,16')
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per box count')
  parser.add_argument('--demo_repeats', type=int, default=50, help='--repeats of the demo case')
  parser.add_argument('--threads', type=int, default=0,
                      help="TF intra- and inter-op threads; 0 leaves TF's default (all cores)")
  parser.add_argument('--image_size', type=int, default=0,
                      help="replaces each case's input size (0 keeps it)")
  args = parser.parse_args()
  cases = args.cases.split(',')
  unknown = set(cases) - set(CASES)
  if unknown:
    parser.error(f'unknown cases {sorted(unknown)}; choose from {CASES}')
  counts = sorted({int(c) for c in args.counts.split(',')})
  if not counts or counts[0] < 1 or counts[-1] > NUM_BOXES:
    parser.error(f'box counts must lie in 1..{NUM_BOXES}')
  return args, cases, counts


ARGS, SELECTED, COUNTS = _parse_args()

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

absl_logging.set_verbosity(absl_logging.ERROR)
tf.get_logger().setLevel('ERROR')
if ARGS.threads:
  tf.config.threading.set_intra_op_parallelism_threads(ARGS.threads)
  tf.config.threading.set_inter_op_parallelism_threads(ARGS.threads)

# pylint: disable=g-import-not-at-top,unused-import
from official.core import exp_factory  # noqa: E402
from official.projects.deepmac_maskrcnn.common import registry_imports  # noqa: E402,F401
from official.projects.deepmac_maskrcnn.serving import detection  # noqa: E402
from official.projects.deepmac_maskrcnn.tasks import deep_mask_head_rcnn  # noqa: E402
from official.vision.modeling.backbones import spinenet  # noqa: E402
# pylint: enable=g-import-not-at-top,unused-import

GiB = 2.0 ** 30

# Our demo's backbone: SpineNet-49 at a quarter of its width (mask_rcnn.py's width_multiplier
# scales filter_size_scale and endpoints_num_filters).
spinenet.SCALING_MAP.setdefault('49Q', {'endpoints_num_filters': 64, 'filter_size_scale': 0.25,
                                        'resample_alpha': 0.5, 'block_repeats': 1})

SETTINGS = {
    'demo': dict(model_id='49Q', size=128, levels=(2, 6), head='hourglass20', filters=16,
                 crop=16),
    'paper': dict(model_id='143', size=1280, levels=(3, 7), head='hourglass52', filters=64,
                  crop=32),
}








def experiment(case: str):
  s = SETTINGS[case]
  size = ARGS.image_size or s['size']
  config = exp_factory.get_exp_config('deep_mask_head_rcnn_spinenet_coco')
  config.override({'task': {'model': {
      'input_size': [size, size, 3],
      'min_level': s['levels'][0], 'max_level': s['levels'][1],
      'backbone': {'type': 'spinenet', 'spinenet': {
          'model_id': s['model_id'], 'min_level': s['levels'][0], 'max_level': s['levels'][1]}},
      'mask_head': {'class_agnostic': True, 'convnet_variant': s['head'],
                    'num_filters': s['filters']},
      'mask_roi_aligner': {'crop_size': s['crop']},
      'use_gt_boxes_for_masks': True}}}, is_strict=True)
  return config, size


def params_of(layer) -> int:
  return int(sum(int(np.prod(w.shape.as_list())) for w in layer.weights))


def run(fn, *args) -> float:
  start = time.perf_counter()
  tf.nest.map_structure(lambda x: x.numpy(), fn(*args))
  return time.perf_counter() - start


def bench(case: str) -> None:
  config, size = experiment(case)
  image, boxes = inputs(size)
  print(f'{case}: {SETTINGS[case]["model_id"]} + {SETTINGS[case]["head"]} at {size}, '
        f'{checksum(image, boxes)}', flush=True)
  tf_keras.backend.clear_session()
  tf_keras.utils.set_random_seed(0)
  start = time.perf_counter()
  model = deep_mask_head_rcnn.DeepMaskHeadRCNNTask(config.task).build_model()
  build_s = time.perf_counter() - start
  module = detection.DetectionModule(config, batch_size=1, input_image_size=[size, size],
                                     model=model)
  images = tf.constant(image[None])
  normalised = {n: tf.constant(boxes[None, :n] / size) for n in COUNTS}
  pixels = {n: tf.constant(boxes[None, :n]) for n in COUNTS}

  start = time.perf_counter()
  serve = module.inference_for_tflite_image_and_boxes.get_concrete_function(
      tf.TensorSpec([1, None, None, 3], tf.uint8), tf.TensorSpec([1, None, 4], tf.float32))
  trace_s = time.perf_counter() - start
  first = {}
  for n in COUNTS:
    first[n] = run(serve, images, normalised[n]) + (trace_s if n == COUNTS[0] else 0.0)

  # The mask branch alone: call_images_and_boxes after the backbone, on this image's features.
  _, features = model._get_backbone_and_decoder_features(  # pylint: disable=protected-access
      module.preprocess(tf.cast(images, tf.uint8))[0])

  @tf.function(input_signature=[tf.TensorSpec([1, None, 4], tf.float32)])
  def mask_branch(b):
    classes = tf.zeros(tf.shape(b)[:2], tf.int32)
    # pylint: disable-next=protected-access
    return model._features_to_mask_outputs(features, b, classes)[1]

  for n in COUNTS:
    run(mask_branch, pixels[n])
  whole = {n: [] for n in COUNTS}
  branch = {n: [] for n in COUNTS}
  for _ in range(ARGS.demo_repeats if case == 'demo' else ARGS.repeats):
    for n in COUNTS:
      whole[n].append(run(serve, images, normalised[n]))
      branch[n].append(run(mask_branch, pixels[n]))
  med = {n: statistics.median(t) for n, t in whole.items()}
  med_branch = {n: statistics.median(t) for n, t in branch.items()}
  lo, hi = COUNTS[0], COUNTS[-1]
  slope = (med[hi] - med[lo]) / (hi - lo) if hi > lo else float('nan')
  slope_branch = (med_branch[hi] - med_branch[lo]) / (hi - lo) if hi > lo else float('nan')
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB
  print(f'  build {build_s:.1f} s (backbone {params_of(model.backbone):,} + mask head '
        f'{params_of(model.mask_head):,} params), first call {first[lo]:.2f} s '
        f'(trace {trace_s:.2f} s), peak RSS so far {peak:.2f} GiB', flush=True)
  for n in COUNTS:
    print(f'  {n:3d} boxes: call_images_and_boxes median {med[n]:8.4f} s (min {min(whole[n]):8.4f},'
          f' first {first[n]:7.2f}) | mask branch median {med_branch[n]:8.4f} s '
          f'(min {min(branch[n]):8.4f})', flush=True)
  print(f'  per extra box: {slope:.4f} s (whole call), {slope_branch:.4f} s (mask branch)',
        flush=True)
  result = {
      'case': case, 'size': size, 'checksum': checksum(image, boxes), 'build_s': build_s,
      'first_s': first[lo], 'first_s_per_count': first, 'median_s': med, 'min_s':
      {n: min(t) for n, t in whole.items()}, 'mask_branch_median_s': med_branch,
      'per_box_s': slope, 'per_box_mask_branch_s': slope_branch,
      'backbone_params': params_of(model.backbone), 'mask_head_params': params_of(model.mask_head),
      'peak_rss_gib': peak}
  print('RESULT ' + json.dumps(result), flush=True)
  tf_keras.backend.clear_session()


def main():
  print(f'official Deep-MARC (tf-models-official), tensorflow {tf.__version__}, threads '
        f'{ARGS.threads or "default"}, float32, box counts {COUNTS}, median of {ARGS.repeats} '
        f'(demo {ARGS.demo_repeats}) after one warm-up call each', flush=True)
  print(cpu_line(), flush=True)
  for case in SELECTED:
    bench(case)


if __name__ == '__main__':
  main()
