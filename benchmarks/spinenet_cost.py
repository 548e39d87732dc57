r"""SpineNet backbones at their paper input sizes: parameters vs the official counts, XLA FLOPs.

  .venv/bin/python benchmarks/spinenet_cost.py [--names=spinenet49s,spinenet49,...] [--compile]

For each SpineNet (min_level 3, max_level 7, batch 1, float32, inference mode) prints trainable
parameters and BN statistics beside those of Model Garden's SpineNet
(`official/vision/modeling/backbones/spinenet.py` with SCALING_MAP[id], tf-models-official 2.20),
and the forward FLOPs per image that XLA counts on the lowered (unoptimised) HLO; with
--compile, on the compiled executable instead (slow at 1280 px on a CPU). Printed, not
asserted; the exact-count assertions live in tests/test_spinenet.py; results in
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import functools
import time

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from deepmarc_jax.models import spinenet  # noqa: E402
from deepmarc_jax.models.layers import count_params  # noqa: E402

# name: (paper input size, official trainable, official BN statistics)
OFFICIAL = {
    'spinenet49s': (640, 9_089_215, 57_136),
    'spinenet49': (640, 21_831_488, 88_704),
    'spinenet96': (1024, 36_262_976, 122_752),
    'spinenet143': (1280, 60_247_616, 166_272),
    'spinenet190': (1280, 126_587_664, 261_552),
}


def flops(fn, *args, compile_: bool) -> float:
  lowered = jax.jit(fn).lower(*args)
  analysis = lowered.compile().cost_analysis() if compile_ else lowered.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax: one dict per computation
    analysis = analysis[0]
  return float(analysis.get('flops', float('nan')))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--names', default=','.join(OFFICIAL))
  parser.add_argument('--compile', action='store_true')
  args = parser.parse_args()
  print(f'{"model":<12s} {"input":>5s} {"params (ours / official)":>27s} '
        f'{"BN stats (ours / official)":>27s} {"GFLOP/image":>12s} {"s":>6s}')
  for name in args.names.split(','):
    size, trainable, stats = OFFICIAL[name]
    model = spinenet.spinenet_from_name(name)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                               images)
    ours = count_params(variables['params']), count_params(variables['batch_stats'])
    start = time.perf_counter()
    gflop = flops(lambda v, x: model.apply(v, x, train=False), variables, images,
                  compile_=args.compile) / 1e9
    print(f'{name:<12s} {size:5d} {ours[0]:>13,d} / {trainable:>11,d} '
          f'{ours[1]:>13,d} / {stats:>11,d} {gflop:12.1f} {time.perf_counter() - start:6.1f}',
          flush=True)


if __name__ == '__main__':
  main()
