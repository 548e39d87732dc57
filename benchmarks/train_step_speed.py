r"""Train-step and `detect` cost on the default device: compile time, step time, memory, FLOP/s.

  .venv/bin/python benchmarks/train_step_speed.py \
      [--cases=deepmarc,plain,plain_2fc,demo,demo_resnet,detect,deepmac] [--repeats=3] \
      [--breakdown] \
      [--dtype=float32]

Cases (float32 unless --dtype, synthetic batches, the real trainer's jitted `train_step`):
  deepmarc  R50-FPN (levels 2-6) + hourglass52 mask head, 512x512, batch 2, GT crops of
            5 instances per image (crop 32 -> 64x64 logits), 512 sampled box ROIs per image,
            1000 proposals: the paper's Mask R-CNN recipe at 512.
  plain     the same Mask R-CNN with the default 4-conv mask head on proposal crops (crop 14 ->
            28x28, up to 128 foreground ROIs per image, Model Garden's mask sampler).
  plain_2fc plain with the box head of He et al.'s Mask R-CNN (two 1024-wide fc layers, no
            convs), as torchvision's `maskrcnn_resnet50_fpn` and Model Garden's default Mask
            R-CNN have it; the cases above keep Deep-MARC's 4 convs + 1 fc. This is the plain
            Mask R-CNN that torchvision's step, the target in docs/benchmarks.md, timed.
  demo      `experiments/deepmarc_spinenet.py:demo` (quarter-width SpineNet-49, levels 2-6,
            128 px, batch 8): the CPU demo's step.
  demo_resnet  the same with a narrow R50-FPN (64 filters) as backbone.
  detect    `detect` (1000 proposals, top 100, hourglass52 masks) at 512, batch 1, s/image.
  deepmac   Deep-MAC's 512 recipe (`experiments/deepmac_centernet.py:512`: Hourglass-104,
            hourglass52 mask network on the last stack), batch 2, the mask network on the GT
            boxes of 5 instances per image; oracle/official_deepmac_speed.py times the official
            step on the same batch.

Printed per case: compile seconds (trace + lower + XLA compile; for train steps also trace +
lower alone), step seconds (min and median of --repeats after one warm-up), XLA's static peak
memory estimate (arguments + temporaries + outputs - aliased, from `compiled.memory_analysis()`),
XLA-counted FLOPs per step (`compiled.cost_analysis()`) and the FLOP rate they imply.
`--breakdown` also times the forward+backward of the step's parts in isolation (backbone+FPN, RPN
head, box head on the sampled ROIs, mask head on its crops, ROIAlign of both): where the time
goes.
Printed, not asserted: results and targets are in docs/benchmarks.md. With
JAX_COMPILATION_CACHE_DIR=DIR in the environment, a second run loads the compiled steps from JAX's
persistent cache (compile = trace + lower + load): what a restarted run.py pays.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'experiments'))
import deepmac_centernet  # noqa: E402  pylint: disable=g-import-not-at-top
import deepmarc_spinenet  # noqa: E402  pylint: disable=g-import-not-at-top

from deepmarc_jax import config_lib  # noqa: E402
from deepmarc_jax import optimizers  # noqa: E402
from deepmarc_jax import sharding  # noqa: E402
from deepmarc_jax import experiment  # noqa: E402
from deepmarc_jax import train  # noqa: E402
from deepmarc_jax.models import mask_rcnn  # noqa: E402
from deepmarc_jax.models import meta_archs  # noqa: E402
from deepmarc_jax.ops import roi_align  # noqa: E402

GiB = 2.0 ** 30


def maskrcnn_512(head: str):
  """R50-FPN Mask R-CNN at 512x512, batch 2; `head` 'deepmarc' (HG-52, GT), 'plain' or
  'plain_2fc' (the default mask head on proposal crops; the latter with a 2-fc box head)."""
  config = config_lib.base_config()
  config.data.image_size = 512
  config.data.max_instances = 5
  config.train.batch_size = 2
  mask_head = config.model.mask_head
  if head == 'deepmarc':
    mask_head.update(type='hourglass52', train_crops='gt', crop_size=32, max_train_instances=5)
  else:
    mask_head.update(type='default', train_crops='proposals', crop_size=14,
                     max_train_instances=128)
  if head == 'plain_2fc':
    config.model.box_head.update(num_convs=0, num_fcs=2, fc_dims=1024)
  return config


def demo_config(backbone: str = 'spinenet49'):
  """The CPU demo; `backbone='resnet50'` puts a narrow R50-FPN (64 filters) in place of its
  quarter-width SpineNet-49, everything else equal."""
  config = deepmarc_spinenet.get_config('demo')
  if backbone != config.model.backbone.type:
    config.model.backbone.type = backbone
    config.model.fpn_filters = 64
  return config


def deepmac_512():
  """Deep-MAC's 512 recipe (Hourglass-104 + hourglass52 on the last stack), batch 2."""
  config = deepmac_centernet.get_config('512')
  config.data.max_instances = 5
  config.model.mask_head.max_train_instances = 5
  config.train.batch_size = 2
  return config


def synthetic_batch(config, num_instances: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random image and `num_instances` boxes (sides 1/16..1/2 of the image) with ellipse masks."""
  rng = np.random.default_rng(seed)
  b, s = config.train.batch_size, config.data.image_size
  n, m = config.data.max_instances, config.data.mask_size
  yy, xx = (np.mgrid[:m, :m] + 0.5) / m - 0.5
  batch = {
      'image': rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8),
      'image_info': np.tile([[s, s, 1.0, 1.0]], (b, 1)).astype(np.float32),
      'gt_boxes': np.zeros((b, n, 4), np.float32),
      'gt_classes': np.zeros((b, n), np.int32),
      'gt_valid': np.zeros((b, n), bool),
      'gt_is_crowd': np.zeros((b, n), bool),
      'gt_mask_allowed': np.zeros((b, n), bool),
      'gt_masks': np.zeros((b, n, m, m), np.float32),
  }
  for i in range(b):
    for k in range(min(num_instances, n)):
      h, w = np.exp(rng.uniform(np.log(s / 16), np.log(s / 2), 2))
      y, x = rng.uniform(0, s - h), rng.uniform(0, s - w)
      batch['gt_boxes'][i, k] = [y, x, y + h, x + w]
      batch['gt_classes'][i, k] = rng.integers(1, config.model.num_classes)
      batch['gt_valid'][i, k] = batch['gt_mask_allowed'][i, k] = True
      batch['gt_masks'][i, k] = (yy / 0.45) ** 2 + (xx / 0.45) ** 2 <= 1.0
  return batch


def make_experiment(config) -> experiment.Experiment:
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh)
  tx = optimizers.make_optimizer(config.train.optimizer, config.train.total_steps)
  return experiment.Experiment(config, mesh, None, meta_archs.model_from_config(config), tx, {})


def compiled_stats(compiled) -> tuple[float, float]:
  """(XLA-counted FLOPs, static peak bytes) of a compiled executable (nan when unavailable)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', np.nan)) if cost else np.nan
  mem = compiled.memory_analysis()
  peak = np.nan
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes)
  return flops, peak


def run_timed(fn, args_fn, repeats: int) -> tuple[float, float]:
  """min and median seconds of `fn(*args_fn())` over `repeats` calls after one warm-up."""
  jax.block_until_ready(fn(*args_fn()))
  times = []
  for _ in range(repeats):
    args = args_fn()
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times), float(np.median(times))


def report(name: str, compile_s: float, step: tuple[float, float], flops: float, peak: float,
           per: str = 'step', lower_s: float | None = None) -> None:
  split = '' if lower_s is None else f' (trace+lower {lower_s:5.1f})'
  print(f'{name:<10s} compile {compile_s:6.1f} s{split} | {per} {step[0]:7.3f} s '
        f'(median {step[1]:7.3f}) | XLA peak {peak / GiB:6.2f} GiB | {flops / 1e9:8.1f} GFLOP/{per} = '
        f'{flops / 1e9 / step[0]:6.1f} GFLOP/s | max RSS so far '
        f'{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:5.2f} GiB', flush=True)


def bench_train_step(name: str, config, num_instances: int, repeats: int) -> experiment.Experiment:
  exp = make_experiment(config)
  batch = sharding.global_batch(synthetic_batch(config, num_instances), exp.mesh)
  rng = jax.random.key(0)
  step = train.make_train_step(exp)
  state = experiment.init_state(exp, rng)
  start = time.perf_counter()
  lowered = step.lower(state, batch, rng)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops, peak = compiled_stats(compiled)
  holder = {'state': state}

  def call(state, batch, rng):  # the state is donated: keep the new one for the next call
    holder['state'], metrics = compiled(state, batch, rng)
    return metrics
  timing = run_timed(call, lambda: (holder['state'], batch, rng), repeats)
  report(name, compile_s, timing, flops, peak, lower_s=lower_s)
  return exp


def bench_detect(config, repeats: int) -> None:
  config.train.batch_size = 1
  exp = make_experiment(config)
  state = experiment.init_state(exp, jax.random.key(0))
  images = jnp.asarray(synthetic_batch(config, 0)['image'])
  detect = experiment.make_detect(exp)
  start = time.perf_counter()
  compiled = detect.lower(state, images).compile()
  compile_s = time.perf_counter() - start
  flops, peak = compiled_stats(compiled)
  report('detect', compile_s, run_timed(compiled, lambda: (state, images), repeats), flops,
         peak, per='image')


def breakdown(config, num_instances: int, repeats: int) -> None:
  """Forward+backward of the step's parts in isolation, on the same shapes."""
  exp = make_experiment(config)
  model, s = exp.model, exp.model.settings
  batch = synthetic_batch(config, num_instances)
  variables = jax.jit(lambda r: model.init({'params': r, 'sampling': r}, batch, train=True))(
      jax.random.key(0))
  rng = np.random.default_rng(1)
  b = config.train.batch_size

  def boxes(num):
    side = np.exp(rng.uniform(np.log(16), np.log(s.image_size / 2), (b, num, 2)))
    corner = rng.uniform(0, s.image_size - side)
    return jnp.asarray(np.concatenate([corner, corner + side], -1), jnp.float32)

  def grad_of(method):
    """jit(grad of sum(method's outputs) w.r.t. params), BatchNorm in train mode."""
    def loss(params, *args):
      out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, *args,
                           method=method, mutable=['batch_stats'])
      return sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(out))
    return jax.jit(jax.grad(loss))

  images = jnp.asarray(batch['image'])
  features = jax.jit(lambda v, x: model.apply(v, x, False, method=mask_rcnn.MaskRCNN.features))(
      variables, images)
  rois, mask_boxes = boxes(s.roi_sampler.samples_per_image), boxes(min(s.max_train_instances, 128))
  mask_classes = jnp.ones(mask_boxes.shape[:2], jnp.int32)
  parts = {
      'backbone+FPN': (lambda m, x: m.features(x, True), (images,)),
      'RPN head': (lambda m, f: m.rpn_head(f, train=True), (features,)),
      f'box head ({rois.shape[1]} ROIs/img)': (lambda m, f, r: m.box_head(f, r, True),
                                                (features, rois)),
      f'mask head ({mask_boxes.shape[1]} crops/img)': (
          lambda m, f, r, c: m.mask_logits(f, r, c, True), (features, mask_boxes, mask_classes)),
  }
  print(f'breakdown of {config.model.mask_head.type} / {config.model.mask_head.train_crops} '
        '(forward+backward w.r.t. params, isolated):')
  for name, (method, args) in parts.items():
    fn = grad_of(method)
    start = time.perf_counter()
    compiled = fn.lower(variables['params'], *args).compile()
    compile_s = time.perf_counter() - start
    flops, _ = compiled_stats(compiled)
    best, median = run_timed(compiled, lambda args=args: (variables['params'], *args), repeats)
    print(f'  {name:<28s} {best:7.3f} s (median {median:7.3f}) | {flops / 1e9:8.1f} GFLOP = '
          f'{flops / 1e9 / best:6.1f} GFLOP/s | compile {compile_s:5.1f} s', flush=True)
  for name, size, box in (('ROIAlign box crops', s.box_head.crop_size, rois),
                          ('ROIAlign mask crops', s.mask_crop_size, mask_boxes)):
    channels = jax.tree.leaves(features)[0].shape[-1]  # SpineNet: not fpn_filters
    cot = jnp.ones(box.shape[:2] + (size, size, channels), jnp.float32)
    fn = jax.jit(jax.grad(lambda f, b, g, size=size: jnp.sum(
        roi_align.multilevel_roi_align(f, b, size) * g)))
    best, median = run_timed(fn, lambda box=box, cot=cot: (features, box, cot), repeats)
    print(f'  {name:<28s} {best:7.3f} s (median {median:7.3f}) fwd+bwd', flush=True)


CASES = ('deepmarc', 'plain', 'plain_2fc', 'demo', 'demo_resnet', 'detect', 'deepmac')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--cases', default=','.join(CASES))
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--breakdown', action='store_true')
  parser.add_argument('--dtype', default='float32', choices=config_lib.DTYPES)
  args = parser.parse_args()
  cases = args.cases.split(',')
  unknown = set(cases) - set(CASES)
  if unknown:
    parser.error(f'unknown cases {sorted(unknown)}; choose from {CASES}')
  print(f'device {jax.devices()[0].device_kind} x{jax.device_count()}, {os.cpu_count()} cpus, '
        f'jax {jax.__version__}, {args.dtype}, min (median) of {args.repeats} after warm-up, '
        f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')

  def configured(config):
    config.model.compute_dtype = args.dtype
    return config

  for case in cases:
    if case in ('deepmarc', 'plain', 'plain_2fc'):
      config = configured(maskrcnn_512(case))
      bench_train_step(case, config, num_instances=5, repeats=args.repeats)
      if args.breakdown:
        breakdown(config, num_instances=5, repeats=args.repeats)
    elif case in ('demo', 'demo_resnet'):
      config = configured(demo_config('resnet50' if case == 'demo_resnet' else 'spinenet49'))
      bench_train_step(case, config, num_instances=5, repeats=args.repeats)
      if args.breakdown:
        breakdown(config, num_instances=5, repeats=args.repeats)
    elif case == 'deepmac':
      bench_train_step(case, configured(deepmac_512()), num_instances=5, repeats=args.repeats)
    else:
      bench_detect(configured(maskrcnn_512('deepmarc')), args.repeats)


if __name__ == '__main__':
  main()
