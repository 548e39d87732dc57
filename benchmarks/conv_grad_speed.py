r"""Conv forward+backward: XLA's own gradient vs ops/conv.py's im2col kernel gradient.

  .venv/bin/python benchmarks/conv_grad_speed.py [--repeats=3]

Shapes from the models: ROI-head convs (7x7, 14x14), hourglass crops (32x32), backbone maps
(16x16 .. 128x128), 1x1 bottleneck convs. Prints seconds (min of --repeats after compile) and
the speed-up; `ops/conv.py`'s dispatch policy is chosen from these figures and the whole-step
ones of train_step_speed.py. Printed, not asserted; results in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import time

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from deepmarc_jax.ops import conv  # noqa: E402

CASES = (  # (input NHWC, kernel HWIO)
    ((1024, 7, 7, 256), (3, 3, 256, 256)),   # box head, 512 ROIs x 2 images
    ((256, 14, 14, 256), (3, 3, 256, 256)),  # default mask head, 128 ROIs x 2 images
    ((10, 32, 32, 128), (3, 3, 128, 128)),   # hourglass on 32x32 crops
    ((10, 32, 32, 128), (1, 1, 128, 128)),
    ((2, 16, 16, 512), (3, 3, 512, 512)),    # R50 level 5 at 512
    ((2, 32, 32, 256), (3, 3, 256, 256)),    # R50 level 4 at 512
    ((2, 32, 32, 1024), (1, 1, 1024, 256)),
    ((2, 128, 128, 64), (3, 3, 64, 64)),     # R50 level 2 at 512
    ((2, 128, 128, 64), (1, 1, 64, 256)),
)


def seconds(fn, x, w, repeats):
  jax.block_until_ready(fn(x, w))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(x, w))
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  print(f'device {jax.devices()[0].device_kind}, {os.cpu_count()} cpus, float32, fwd+bwd '
        f'(grads of input and kernel), min of {args.repeats} after compile')
  rng = np.random.default_rng(0)
  for x_shape, w_shape in CASES:
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape) * 0.02, jnp.float32)
    pad = ((w_shape[0] // 2,) * 2, (w_shape[1] // 2,) * 2)
    grad = lambda f: jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) ** 2), (0, 1)))  # noqa: E731
    xla = seconds(grad(lambda a, b: lax.conv_general_dilated(
        a, b, (1, 1), pad, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))), x, w, args.repeats)
    ours = seconds(grad(lambda a, b: conv.im2col_grad_conv(a, b, pad)), x, w, args.repeats)
    flops = 6 * np.prod(x_shape[:3]) * np.prod(w_shape)
    chosen = conv.uses_im2col_grad(w_shape[:2])
    print(f'{str(x_shape):<20s} {str(w_shape):<20s} XLA {xla:7.3f} s ({flops / xla / 1e9:5.1f} '
          f'GFLOP/s)  im2col {ours:7.3f} s ({flops / ours / 1e9:5.1f})  x{xla / ours:4.2f}'
          f'{"  <- used" if chosen else ""}', flush=True)


if __name__ == '__main__':
  main()
