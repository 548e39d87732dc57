r"""ROIAlign wall time (forward, forward+backward) after compile, float32, on the default device.

  .venv/bin/python benchmarks/roi_align_speed.py [--rois=512] [--repeats=5] [--einsum]

Cases: 512 RoIs at 14x14 and 32x32 on a [1, 128, 128, 256] single-level map, and the same on
an FPN-like pyramid (levels 2-6 of a 1024 image, 256 channels). Backward is jax.grad of
sum(output * cotangent) w.r.t. the features. `--einsum` also times a one-hot/einsum variant of
the single-level case (scenic's method) for comparison (slow: it contracts the whole map for
every ROI). Printed, not asserted; results in docs/benchmarks.md.
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

from deepmarc_jax.ops import roi_align as ra  # noqa: E402


def random_boxes(rng, num, image_size, min_side, max_side):
  """[1, num, 4] boxes with log-uniform sides, mostly inside the image."""
  side = np.exp(rng.uniform(np.log(min_side), np.log(max_side), (num, 2)))
  corner = rng.uniform(0, image_size - side)
  return jnp.asarray(np.concatenate([corner, corner + side], -1)[None], jnp.float32)


def einsum_roi_align(features, boxes, output_size, sample_offset=0.5):
  """One-hot/einsum single-level ROIAlign with the same semantics (comparison only)."""
  _, height, width, _ = features.shape
  boxes = jax.lax.stop_gradient(boxes)

  def axis_weights(start, extent, size):
    (lo, hi), (w_lo, w_hi) = ra._axis_neighbours(  # pylint: disable=protected-access
        start, extent, jnp.full(start.shape, size - 1.0), output_size, sample_offset)
    return (jax.nn.one_hot(lo, size) * w_lo[..., None]
            + jax.nn.one_hot(hi, size) * w_hi[..., None])  # [B, N, S, size]

  wy = axis_weights(boxes[..., 0], boxes[..., 2] - boxes[..., 0], height)
  wx = axis_weights(boxes[..., 1], boxes[..., 3] - boxes[..., 1], width)
  return jnp.einsum('bhwc,bnih,bnjw->bnijc', features, wy, wx)


def timeit(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times), float(np.median(times))


def bench(name, align, features, boxes, output_size, repeats):
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(
      (*boxes.shape[:2], output_size, output_size, jax.tree.leaves(features)[0].shape[-1])),
      jnp.float32)
  fwd = jax.jit(lambda f, b: align(f, b, output_size))
  # The cotangent is an argument: closed over, it becomes an HLO constant (slow compiles).
  grad = jax.jit(jax.grad(lambda f, b, g: jnp.sum(align(f, b, output_size) * g)))
  fwd_min, fwd_med = timeit(fwd, features, boxes, repeats=repeats)
  bwd_min, bwd_med = timeit(grad, features, boxes, cotangent, repeats=repeats)
  print(f'{name:<34s} S={output_size:<3d} fwd {fwd_min:6.3f} s (median {fwd_med:6.3f})   '
        f'fwd+bwd {bwd_min:6.3f} s (median {bwd_med:6.3f})', flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--rois', type=int, default=512)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--einsum', action='store_true')
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(f'device {jax.devices()[0]}, cpus {os.cpu_count()}, {args.rois} RoIs, float32, '
        f'min (median) of {args.repeats} runs after compile')

  single = jnp.asarray(rng.standard_normal((1, 128, 128, 256)), jnp.float32)
  single_boxes = random_boxes(rng, args.rois, 128, 2, 96)
  pyramid = {l: jnp.asarray(rng.standard_normal((1, 1024 >> l, 1024 >> l, 256)), jnp.float32)
             for l in range(2, 7)}
  pyramid_boxes = random_boxes(rng, args.rois, 1024, 16, 800)
  for size in (14, 32):
    bench('single level [1,128,128,256]', ra.roi_align, single, single_boxes, size, args.repeats)
    if args.einsum:
      bench('  one-hot einsum (comparison)', einsum_roi_align, single, single_boxes, size,
            args.repeats)
    bench('FPN levels 2-6 of 1024, C=256', ra.multilevel_roi_align, pyramid, pyramid_boxes,
          size, args.repeats)


if __name__ == '__main__':
  main()
