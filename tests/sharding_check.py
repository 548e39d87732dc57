"""One train step of the tiny model on 1 device and on 8 (virtual CPU) devices.

Run as `python -m tests.sharding_check` (the device count must be set before jax starts);
prints JSON with both losses and how much the two parameter updates differ.

The loss must agree to float precision. The updated parameters cannot be compared with a
fixed tolerance: at initialisation this step is ill-conditioned (discrete choices such as
top-k, NMS and IoU thresholds sit on near-ties), so perturbing the parameters by 1e-6
(relative) on ONE device already moves the update by a few percent. The check therefore also
reports that perturbation's effect, the float-noise scale the 8-device update is held to.
"""
import os

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from deepmarc_jax import optimizers  # noqa: E402
from deepmarc_jax import sharding  # noqa: E402
from deepmarc_jax import experiment  # noqa: E402
from deepmarc_jax import train  # noqa: E402
from deepmarc_jax.models import mask_rcnn  # noqa: E402
from tests import tiny  # noqa: E402


def one_step(devices, noise: float = 0.0):
  config = tiny.config()
  config.train.batch_size = 8
  mesh = sharding.make_mesh([('data', -1)], devices=devices)
  exp = experiment.Experiment(config, mesh, None, mask_rcnn.MaskRCNN.from_config(config),
                         optimizers.make_optimizer(config.train.optimizer, 10),
                         {'seen': [1, 2], 'unseen': [8, 10]})
  state = experiment.init_state(exp, jax.random.key(0))
  initial = jax.device_get(state.params)
  if noise:
    state = state.replace(params=jax.tree_util.tree_map(
        lambda p: p * (1 + noise * jax.random.normal(jax.random.key(9), p.shape)),
        state.params))
  batch = tiny.batch(batch_size=8, num_instances=5)
  batch['gt_mask_allowed'][:] = batch['gt_valid']
  state, metrics = train.make_train_step(exp)(state, sharding.global_batch(batch, mesh),
                                               jax.random.key(1))
  return (jax.device_get(metrics), initial, jax.device_get(state.params),
          len(state.step.devices()))


def main():
  assert jax.device_count() == 8, jax.devices()
  m1, p0, p1, n1 = one_step(jax.devices()[:1])
  m8, p0_8, p8, n8 = one_step(jax.devices())
  _, _, p1_noisy, _ = one_step(jax.devices()[:1], noise=1e-6)
  flat = lambda tree: np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(tree)])  # noqa: E731
  update1, update8 = flat(p1) - flat(p0), flat(p8) - flat(p0_8)
  print(json.dumps({
      'devices': [n1, n8], 'loss': [float(m1['loss']), float(m8['loss'])],
      'parts': {k: [float(m1[k]), float(m8[k])] for k in m1},
      'same_init': bool(np.array_equal(flat(p0), flat(p0_8))),
      'update_rel_diff': float(np.linalg.norm(update1 - update8) / np.linalg.norm(update1)),
      'noise_update_rel_diff': float(np.linalg.norm(update1 - (flat(p1_noisy) - flat(p0)))
                                     / np.linalg.norm(update1)),
  }))


if __name__ == '__main__':
  main()
