r"""Mask-head gradient norms at initialisation against the number of instances in BatchNorm.

  .venv/bin/python -m deepmarc_jax.tools.mask_head_gradients \
      [--heads=default,hourglass20,hourglass52] [--instances=2,8,24] [--num_filters=16] \
      [--crop_size=32] [--bn_min_counts=0,64]

The mask head alone (as in the mask-head sweep: 16 filters, 32 px crops), on random ROI features
[24, crop, crop, 64] and random binary targets, in training mode. The first n of the 24 slots are
real: only they enter the masked BatchNorm statistics and the loss (mean sigmoid cross entropy
per instance, averaged over the real ones), as in Mask R-CNN training. Prints the global norm of
the parameter gradient and of the gradient reaching the ROI features (what the backbone gets).

Why: hourglass52 has six stages, so 32 px crops reach 1x1 at its bottom, where BatchNorm
normalises only n values per channel. With few instances its gradients explode, and a
detector trained with it does not learn (the mask-head sweep's hourglass52 cells,
docs/findings.md).
`--bn_min_counts` compares floors on the values per channel BatchNorm statistics rest on
(`model.mask_head.bn_min_count`; the initial running averages, mean 0 and variance 1, make up
the shortfall). Printed, not asserted.
"""
from __future__ import annotations

import argparse

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from deepmarc_jax.models import layers, mask_heads  # noqa: E402

SLOTS, CHANNELS = 24, 64


def gradient_norms(head: str, real: int, num_filters: int, crop_size: int,
                   bn_min_count: float = 0.0, seed: int = 0) -> tuple[float, float]:
  """Returns (parameter-gradient norm, ROI-feature-gradient norm) with `real` of SLOTS slots."""
  rng = np.random.default_rng(seed)
  features = jnp.asarray(rng.normal(size=(SLOTS, crop_size, crop_size, CHANNELS)), jnp.float32)
  targets = jnp.asarray(rng.random((SLOTS, 2 * crop_size, 2 * crop_size)) > 0.5, jnp.float32)
  model = mask_heads.MaskHead(head, num_filters=num_filters,
                              norm=layers.NormConfig(min_count=bn_min_count))
  variables = model.init(jax.random.key(seed), features, None, train=False)
  valid = jnp.arange(SLOTS) < real

  def loss_fn(params, features):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                            features, None, train=True, mask=valid, mutable=['batch_stats'])
    per_instance = optax.sigmoid_binary_cross_entropy(logits, targets).mean((1, 2))
    return jnp.sum(jnp.where(valid, per_instance, 0.0)) / real

  param_grads, feature_grads = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(
      variables['params'], features)
  return float(optax.global_norm(param_grads)), float(optax.global_norm(feature_grads))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--heads', default='default,hourglass20,hourglass52')
  parser.add_argument('--instances', default='2,8,24')
  parser.add_argument('--num_filters', type=int, default=16)
  parser.add_argument('--crop_size', type=int, default=32)
  parser.add_argument('--bn_min_counts', default='0,64')
  args = parser.parse_args()
  counts = [int(n) for n in args.instances.split(',')]
  floors = [float(f) for f in args.bn_min_counts.split(',')]
  if any(not 1 <= n <= SLOTS for n in counts):
    parser.error(f'--instances: each count must be in [1, {SLOTS}]')
  print(f'{"head":14s} {"bn floor":>8s} {"instances":>9s} {"param grad":>12s} '
        f'{"feature grad":>13s}')
  for head in args.heads.split(','):
    for floor in floors:
      for n in counts:
        params, features = gradient_norms(head, n, args.num_filters, args.crop_size, floor)
        print(f'{head:14s} {floor:8g} {n:9d} {params:12.2f} {features:13.4f}', flush=True)


if __name__ == '__main__':
  main()
