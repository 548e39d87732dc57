r"""`segment` latency on the default device: one image with one box, and each extra box.

  .venv/bin/python benchmarks/segment_speed.py [--cases=demo,paper] [--counts=1,4,16]
      [--repeats=5] [--demo_repeats=50] [--dtype=float32] [--image_size=N] [--official]

Cases (random initialisation, batch 1):
  demo   `experiments/deepmarc_spinenet.py:demo`: quarter-width SpineNet-49, levels 2-6, 128 px,
         hourglass20 mask head (16 filters, crop 16 -> 32x32 masks).
  paper  `experiments/deepmarc_spinenet.py`: SpineNet-143, levels 3-7, 1280 px, hourglass52 mask
         head (64 filters, crop 32 -> 64x64 masks); float32 unless --dtype (the config's own
         compute dtype is bfloat16, which the official side does not run).
  deepmac `experiments/deepmac_centernet.py:512`: Deep-MAC's Hourglass-104 + hourglass52 mask
         network (32x32 masks) at 512 px; not in the default --cases. Its official side is
         oracle/official_deepmac_speed.py (in .venv-oracle-deepmac), run on its own; --official
         runs the Deep-MARC cases only.
`--image_size` replaces a case's input size (a multiple of 128; for quick checks).

What is timed is the masks-from-boxes tool's `Segmenter` (deepmarc_jax/masks_from_boxes/
segmenter.py), whose variables here come from `MaskRCNN.init` through `segment_boxes` (the
backbone and mask head; the detector heads are not needed): `encode(image)` preprocesses the
uint8 image and runs the backbone once, `box_masks(encoded, boxes)` runs ROIAlign, the mask head
and the sigmoid on the boxes. A call with N boxes is `encode` + `box_masks` of N boxes; the
boxes' masks are not pasted into the image (the official call does not paste either).
`box_masks` pads the box count to a power of two (segmenter.MIN_BOX_BUCKET), each bucket
compiling once; the default counts (1, 4, 16) are powers of two, so no padded slot is timed.

Inputs: a uniform random uint8 image of the model's input size (seed 0) and 16 boxes (seed 1,
sides log-uniform in 1/16..1/2 of the image); a run with N boxes takes the first N.
oracle/official_segment_speed.py makes the same ones (both print a checksum).

Printed per case: the first call (trace + compile + one run, for `encode` and for `box_masks` of
the first box count) and the first call with each new box count, then the median and min of
--repeats (demo: --demo_repeats) calls per box count (box counts interleaved), `box_masks` alone
on the encoded image, the per-extra-box slope between the smallest and largest count, and one
`RESULT {json}` line. With --official, the official Deep-MARC's `call_images_and_boxes`
(oracle/official_segment_speed.py, in .venv-oracle) runs next on the same cases and inputs, one
after the other, and a table of both sides follows. Printed, not asserted: results in
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import deepmac_centernet  # noqa: E402  pylint: disable=g-import-not-at-top
import deepmarc_spinenet  # noqa: E402  pylint: disable=g-import-not-at-top
# The official programs' side shares these (oracle/bench_inputs.py: plain numpy).
sys.path.insert(0, os.path.join(REPO, 'oracle'))
from bench_inputs import NUM_BOXES, checksum, cpu_line  # noqa: E402
from bench_inputs import segment_inputs as inputs  # noqa: E402

import tensorflow as tf  # noqa: E402  (after configure_process: quiet logs)

from deepmarc_jax import config_lib  # noqa: E402
from deepmarc_jax.masks_from_boxes import segmenter as segmenter_lib  # noqa: E402
from deepmarc_jax.models import meta_archs  # noqa: E402

GiB = 2.0 ** 30
CASES = ('demo', 'paper', 'deepmac')
ORACLE_PYTHON = os.environ.get('DEEPMARC_ORACLE_PYTHON',
                               os.path.join(REPO, '.venv-oracle', 'bin', 'python'))








def case_config(case: str, dtype: str, image_size: int):
  if case == 'deepmac':
    config = deepmac_centernet.get_config('512')
  else:
    config = deepmarc_spinenet.get_config('demo' if case == 'demo' else None)
  config.model.compute_dtype = dtype
  if image_size:
    config.data.image_size = image_size
  config_lib.validate(config)
  return config


def random_variables(config) -> dict:
  """Backbone and mask-head variables, randomly initialised as training starts them."""
  model = meta_archs.model_from_config(config)
  size = config.data.image_size
  images = jnp.zeros((1, size, size, 3), jnp.uint8)
  boxes = jnp.asarray([[[0.0, 0.0, size / 2, size / 2]]], jnp.float32)
  init = jax.jit(lambda rng: model.init({'params': rng}, images, boxes,
                                        method='segment_boxes'))
  return jax.block_until_ready(init(jax.random.key(0)))


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def params_of(variables: dict, part: str) -> int:
  if part == 'mask_head' and 'mask_net' in variables['params']:  # Deep-MAC's name for it
    part = 'mask_net'
  return sum(count(v.get(part, {})) for v in variables.values())


def bucket(num: int) -> int:
  return max(segmenter_lib.MIN_BOX_BUCKET, 1 << max(num - 1, 0).bit_length())


def bench(case: str, args, counts: list[int]) -> dict:
  config = case_config(case, args.dtype, args.image_size)
  size = config.data.image_size
  image, boxes = inputs(size)
  print(f'{case}: {config.model.backbone.type} (width x{config.model.width_multiplier}) + '
        f'{config.model.mask_head.type} at {size}, {config.model.compute_dtype}, '
        f'{checksum(image, boxes)}', flush=True)
  start = time.perf_counter()
  variables = random_variables(config)
  init_s = time.perf_counter() - start
  seg = segmenter_lib.Segmenter(config, variables)

  def call(num: int) -> float:
    """encode + box_masks of the first `num` boxes: one image's masks."""
    start = time.perf_counter()
    seg.box_masks(seg.encode(image), boxes[:num])
    return time.perf_counter() - start

  start = time.perf_counter()
  encoded = seg.encode(image)
  jax.block_until_ready(encoded.features)
  first_encode = time.perf_counter() - start
  first_masks = {}
  for n in counts:
    start = time.perf_counter()
    seg.box_masks(encoded, boxes[:n])
    first_masks[n] = time.perf_counter() - start
  def preprocess() -> float:
    """encode's TF preprocessing alone (its traced pipeline.preprocess_image)."""
    start = time.perf_counter()
    seg._preprocess(tf.constant(image))[0].numpy()  # pylint: disable=protected-access
    return time.perf_counter() - start

  preprocess()
  call(counts[0])  # one warm-up of the whole call
  whole = {n: [] for n in counts}
  masks = {n: [] for n in counts}
  prep = []
  for _ in range(args.demo_repeats if case == 'demo' else args.repeats):
    prep.append(preprocess())
    for n in counts:
      whole[n].append(call(n))
      start = time.perf_counter()
      seg.box_masks(encoded, boxes[:n])
      masks[n].append(time.perf_counter() - start)
  med = {n: statistics.median(t) for n, t in whole.items()}
  med_masks = {n: statistics.median(t) for n, t in masks.items()}
  lo, hi = counts[0], counts[-1]
  slope = (med[hi] - med[lo]) / (hi - lo) if hi > lo else float('nan')
  slope_masks = (med_masks[hi] - med_masks[lo]) / (hi - lo) if hi > lo else float('nan')
  first = first_encode + first_masks[lo]
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB
  print(f'  init {init_s:.1f} s (backbone {params_of(variables, "backbone"):,} + mask head '
        f'{params_of(variables, "mask_head"):,} params), first call {first:.2f} s (encode '
        f'{first_encode:.2f} + box_masks {first_masks[lo]:.2f}; compile ~ first - median '
        f'{first - med[lo]:.2f} s), max RSS so far {peak:.2f} GiB', flush=True)
  print(f'  encode (derived: encode + box_masks - box_masks) median '
        f'{med[lo] - med_masks[lo]:.4f} s, of which TF preprocessing '
        f'{statistics.median(prep):.4f} s', flush=True)
  for n in counts:
    print(f'  {n:3d} boxes ({bucket(n):2d} slots): encode + box_masks median {med[n]:8.4f} s '
          f'(min {min(whole[n]):8.4f}, first box_masks {first_masks[n]:6.2f}) | box_masks median '
          f'{med_masks[n]:8.4f} s (min {min(masks[n]):8.4f})', flush=True)
  print(f'  per extra box: {slope:.4f} s (whole call), {slope_masks:.4f} s (box_masks)',
        flush=True)
  result = {
      'case': case, 'size': size, 'checksum': checksum(image, boxes), 'init_s': init_s,
      'first_s': first, 'first_encode_s': first_encode, 'first_box_masks_s': first_masks,
      'median_s': med, 'min_s': {n: min(t) for n, t in whole.items()},
      'box_masks_median_s': med_masks, 'per_box_s': slope, 'per_box_box_masks_s': slope_masks,
      'preprocess_median_s': statistics.median(prep),
      'buckets': {n: bucket(n) for n in counts},
      'backbone_params': params_of(variables, 'backbone'),
      'mask_head_params': params_of(variables, 'mask_head'), 'max_rss_gib': peak}
  print('RESULT ' + json.dumps(result), flush=True)
  return result


def run_official(args) -> dict[str, dict]:
  """oracle/official_segment_speed.py with the same arguments; its output streams through."""
  command = [ORACLE_PYTHON, os.path.join(REPO, 'oracle', 'official_segment_speed.py'),
             f'--cases={",".join(c for c in args.cases.split(",") if c != "deepmac")}',
             f'--counts={args.counts}', f'--repeats={args.repeats}',
             f'--demo_repeats={args.demo_repeats}', f'--image_size={args.image_size}']
  print('$ ' + ' '.join(command), flush=True)
  env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  env.pop('XLA_FLAGS', None)
  results = {}
  with subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO) as proc:
    for line in proc.stdout:
      print('  | ' + line.rstrip(), flush=True)
      if line.startswith('RESULT '):
        result = json.loads(line[len('RESULT '):])
        results[result['case']] = result
  if proc.returncode:
    print(f'official program exited with {proc.returncode}', flush=True)
  return results


def table(ours: dict[str, dict], official: dict[str, dict], counts: list[int]) -> None:
  lo, hi = str(counts[0]), str(counts[-1])
  print('\n| case | what | ours (ms) | official (ms) | ours / official |\n|---|---|---|---|---|')
  for case, mine in ours.items():
    theirs = official.get(case)
    if theirs is None:
      continue
    assert mine['checksum'] == theirs['checksum'], (mine['checksum'], theirs['checksum'])
    name = f'{case} ({mine["size"]} px)'
    rows = [
        (f'per image, {lo} box', mine['median_s'][lo], theirs['median_s'][lo]),
        (f'per image, {hi} boxes', mine['median_s'][hi], theirs['median_s'][hi]),
        (f'per extra box, mask branch ({lo} -> {hi} boxes)', mine['per_box_box_masks_s'],
         theirs['per_box_mask_branch_s']),
        (f'per extra box, whole call ({lo} -> {hi} boxes)', mine['per_box_s'],
         theirs['per_box_s']),
        ('first call (compile / trace + one run)', mine['first_s'], theirs['first_s']),
    ]
    for what, a, b in rows:
      ratio = a / b if b > 0 else float('nan')
      print(f'| {name} | {what} | {a * 1e3:.2f} | {b * 1e3:.2f} | {ratio:.2f} |')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--cases', default='demo,paper')
  parser.add_argument('--counts', default='1,4,16')
  parser.add_argument('--repeats', type=int, default=5, help='timed calls per box count')
  parser.add_argument('--demo_repeats', type=int, default=50, help='--repeats of the demo case')
  parser.add_argument('--dtype', default='float32', choices=config_lib.DTYPES)
  parser.add_argument('--image_size', type=int, default=0,
                      help="replaces each case's input size (0 keeps it)")
  parser.add_argument('--official', action='store_true',
                      help='then run oracle/official_segment_speed.py and print both sides')
  args = parser.parse_args()
  cases = args.cases.split(',')
  unknown = set(cases) - set(CASES)
  if unknown:
    parser.error(f'unknown cases {sorted(unknown)}; choose from {CASES}')
  counts = sorted({int(c) for c in args.counts.split(',')})
  if not counts or counts[0] < 1 or counts[-1] > NUM_BOXES:
    parser.error(f'box counts must lie in 1..{NUM_BOXES}')
  print(f'ours: device {jax.devices()[0].device_kind} x{jax.device_count()}, jax '
        f'{jax.__version__}, box counts {counts}, median of {args.repeats} (demo '
        f'{args.demo_repeats}) after warm-up, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}',
        flush=True)
  print(cpu_line(), f'| load average {" ".join(f"{x:.2f}" for x in os.getloadavg())}',
        flush=True)
  start = time.perf_counter()
  ours = {case: bench(case, args, counts) for case in cases}
  if args.official:
    official = run_official(args)
    table({case: json.loads(json.dumps(r)) for case, r in ours.items()}, official, counts)
  print(f'total {time.perf_counter() - start:.0f} s, load average '
        f'{" ".join(f"{x:.2f}" for x in os.getloadavg())}', flush=True)


if __name__ == '__main__':
  main()
