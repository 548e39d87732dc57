r"""The official TF Model Garden Deep-MARC's train step and inference, timed where it runs: the
side-by-side reference for `benchmarks/train_step_speed.py` (results and targets:
docs/benchmarks.md).

Runs in the oracle venv (`setup.sh` builds it; it holds tf-models-official 2.20.0, see
oracle/README.md), not in .venv:

  .venv-oracle/bin/python oracle/official_step_speed.py [--cases=deepmarc,plain,plain_2fc,detect]
      [--repeats=3] [--threads=0]
  .venv-oracle/bin/python oracle/official_step_speed.py --cases=convs

Cases, with the settings of train_step_speed.py's cases of the same name (float32, synthetic
inputs, random initialisation):
  deepmarc   `deep_mask_head_rcnn_resnetfpn_coco` (R50-FPN, levels 2-6, 91 classes, 4-conv + fc box
             head) at 512x512, batch 2, hourglass52 mask head (64 filters, class-agnostic, crop 32
             -> 64x64 logits) on the ground-truth boxes (`use_gt_boxes_for_masks`), 5 instances per
             image, 512 sampled box ROIs per image, 1000 proposals.
  plain      the same with the standard mask head (4 convs of 256, class-specific, crop 14 ->
             28x28) on up to 128 foreground proposals per image.
  plain_2fc  plain with He et al.'s box head (no convs, two 1024-wide fc layers).
  detect     the deepmarc model's inference call (100 detections, masks) at 512, batch 1, s/image.
  convs      TF's conv forward + backward (gradients of input and kernel of sum(conv(x, w)^2)) on
             the shapes of benchmarks/conv_grad_speed.py, whose "XLA" column is ours.

A train step is the task's own `train_step` (forward, the task's losses with the L2 term, backward,
SGD with momentum 0.9) inside one `tf.function`, as Model Garden's trainer runs it; the labels
come from the task's own parser (`maskrcnn_input.Parser`: anchors, RPN targets, 112x112 mask
crops), made once before timing. The parser pads instances to `--max_num_instances` (default 5,
the instances there are) and the official mask head runs on every padded slot: Model Garden's
default of 100 would time 100 crops per image, not the 5 ours trains on.

Printed per case: the first call (trace + graph optimisation + one run), then min and median of
--repeats more, and the process's peak RSS so far. Printed, not asserted.
"""
from __future__ import annotations

import argparse
import ast
import os
import resource
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

CASES = ('deepmarc', 'plain', 'plain_2fc', 'detect', 'convs')


def _parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cases', default=','.join(CASES[:4]))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--threads', type=int, default=0,
                      help="TF intra- and inter-op threads; 0 leaves TF's default (all cores)")
  parser.add_argument('--image_size', type=int, default=512)
  parser.add_argument('--batch_size', type=int, default=2)
  parser.add_argument('--max_num_instances', type=int, default=5)
  args = parser.parse_args()
  cases = args.cases.split(',')
  unknown = set(cases) - set(CASES)
  if unknown:
    parser.error(f'unknown cases {sorted(unknown)}; choose from {CASES}')
  return args, cases


ARGS, SELECTED = _parse_args()

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
from official.projects.deepmac_maskrcnn.tasks import deep_mask_head_rcnn  # noqa: E402
from official.vision.dataloaders import maskrcnn_input  # noqa: E402
# pylint: enable=g-import-not-at-top,unused-import

GiB = 2.0 ** 30


def experiment(case: str):
  """The Model Garden experiment config of `case` (see the module docstring)."""
  config = exp_factory.get_exp_config('deep_mask_head_rcnn_resnetfpn_coco')
  size = ARGS.image_size
  model = {'input_size': [size, size, 3]}
  if case in ('deepmarc', 'detect'):
    model.update(mask_head={'class_agnostic': True, 'convnet_variant': 'hourglass52',
                            'num_filters': 64},
                 mask_roi_aligner={'crop_size': 32}, use_gt_boxes_for_masks=True)
  if case == 'plain_2fc':
    model['detection_head'] = {'num_convs': 0, 'num_fcs': 2, 'fc_dims': 1024}
  config.override({'task': {'model': model,
                            'train_data': {'parser': {'max_num_instances':
                                                      ARGS.max_num_instances}}}},
                  is_strict=True)
  return config


def synthetic_example(size: int, num_instances: int, rng: np.random.Generator) -> dict:
  """A decoded example as the parser takes it: a random image and `num_instances` boxes (sides
  1/16..1/2 of the image, as train_step_speed.synthetic_batch) with ellipse masks."""
  masks = np.zeros((num_instances, size, size), np.float32)
  boxes = np.zeros((num_instances, 4), np.float32)
  yy, xx = np.mgrid[:size, :size] + 0.5
  for k in range(num_instances):
    h, w = rng.uniform(size / 16, size / 2, 2)
    y1, x1 = rng.uniform(0, size - h), rng.uniform(0, size - w)
    boxes[k] = np.array([y1, x1, y1 + h, x1 + w]) / size  # normalised, as decoded
    cy, cx = y1 + h / 2, x1 + w / 2
    masks[k] = ((yy - cy) / (h / 2)) ** 2 + ((xx - cx) / (w / 2)) ** 2 <= 1
  return {
      'image': tf.constant(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
      'groundtruth_classes': tf.constant(rng.integers(1, 91, num_instances), tf.int64),
      'groundtruth_boxes': tf.constant(boxes),
      'groundtruth_instance_masks': tf.constant(masks),
      'groundtruth_is_crowd': tf.zeros([num_instances], tf.bool),
  }


def training_batch(config) -> tuple:
  """(images, labels) of `--batch_size` examples through the task's training parser."""
  model, params = config.task.model, config.task.train_data.parser
  parser = maskrcnn_input.Parser(
      output_size=model.input_size[:2], min_level=model.min_level, max_level=model.max_level,
      num_scales=model.anchor.num_scales, aspect_ratios=model.anchor.aspect_ratios,
      anchor_size=model.anchor.anchor_size, rpn_match_threshold=params.rpn_match_threshold,
      rpn_unmatched_threshold=params.rpn_unmatched_threshold,
      rpn_batch_size_per_im=params.rpn_batch_size_per_im,
      rpn_fg_fraction=params.rpn_fg_fraction, aug_rand_hflip=False,
      aug_scale_min=1.0, aug_scale_max=1.0,
      skip_crowd_during_training=params.skip_crowd_during_training,
      max_num_instances=params.max_num_instances, include_mask=model.include_mask,
      outer_boxes_scale=model.outer_boxes_scale, mask_crop_size=params.mask_crop_size)
  rng = np.random.default_rng(0)
  parsed = [parser._parse_train_data(  # pylint: disable=protected-access
      synthetic_example(ARGS.image_size, ARGS.max_num_instances, rng))
            for _ in range(ARGS.batch_size)]
  return tf.nest.map_structure(lambda *xs: tf.stack(xs), *parsed)


def timed(fn, repeats: int) -> tuple[float, list[float]]:
  """(seconds of the first call, seconds of each of `repeats` more)."""
  start = time.perf_counter()
  tf.nest.map_structure(lambda x: x.numpy(), fn())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    tf.nest.map_structure(lambda x: x.numpy(), fn())
    times.append(time.perf_counter() - start)
  return first, times


def report(name: str, first: float, times: list[float], unit: str = 'step') -> None:
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux: KiB
  print(f'{name:<10} first call {first:7.1f} s   {unit} min {min(times):7.2f} s   median '
        f'{statistics.median(times):7.2f} s   peak RSS so far {peak:5.2f} GiB', flush=True)


def build(config):
  tf_keras.backend.clear_session()
  tf_keras.utils.set_random_seed(0)
  task = deep_mask_head_rcnn.DeepMaskHeadRCNNTask(config.task)
  return task, task.build_model()


def bench_train_step(case: str) -> None:
  config = experiment(case)
  task, model = build(config)
  images, labels = training_batch(config)
  optimizer = tf_keras.optimizers.SGD(learning_rate=1e-3, momentum=0.9)

  @tf.function
  def step():
    return task.train_step((images, labels), model, optimizer)

  first, times = timed(step, ARGS.repeats)
  report(case, first, times)


def bench_detect() -> None:
  config = experiment('detect')
  _, model = build(config)
  images, labels = training_batch(config)
  images, image_shape = images[:1], labels['image_info'][:1, 1, :]
  anchors = tf.nest.map_structure(lambda x: x[:1], labels['anchor_boxes'])

  @tf.function
  def detect():
    outputs = model(images, image_shape, anchors, training=False)
    return {k: outputs[k] for k in ('detection_boxes', 'detection_masks')}

  first, times = timed(detect, ARGS.repeats)
  report('detect', first, times, unit='image')


def conv_shapes() -> list:
  """benchmarks/conv_grad_speed.CASES, read from its source (this venv has no JAX to import it
  with)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = os.path.join(repo, 'benchmarks', 'conv_grad_speed.py')
  with open(path) as f:
    tree = ast.parse(f.read())
  for node in tree.body:
    if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ['CASES']:
      return ast.literal_eval(node.value)
  raise ValueError(f'no CASES in {path}')


def bench_convs() -> None:
  rng = np.random.default_rng(0)
  for x_shape, w_shape in conv_shapes():
    x = tf.constant(rng.standard_normal(x_shape), tf.float32)
    w = tf.constant(rng.standard_normal(w_shape) * 0.02, tf.float32)

    @tf.function
    def grads(x=x, w=w):
      with tf.GradientTape() as tape:
        tape.watch([x, w])
        loss = tf.reduce_sum(tf.nn.conv2d(x, w, 1, 'SAME') ** 2)
      return tape.gradient(loss, [x, w])

    _, times = timed(grads, ARGS.repeats)
    flops = 6 * np.prod(x_shape[:3]) * np.prod(w_shape)
    print(f'{str(x_shape):<20s} {str(w_shape):<20s} TF {min(times):7.3f} s '
          f'({flops / min(times) / 1e9:5.1f} GFLOP/s)', flush=True)


def main():
  print(f'tensorflow {tf.__version__}, threads {ARGS.threads or "default"}, '
        f'{ARGS.image_size}x{ARGS.image_size}, batch {ARGS.batch_size}, '
        f'{ARGS.max_num_instances} instances per image', flush=True)
  for case in SELECTED:
    if case == 'detect':
      bench_detect()
    elif case == 'convs':
      bench_convs()
    else:
      bench_train_step(case)


if __name__ == '__main__':
  main()
