r"""Mask AP from GT boxes of a run's checkpoints: as saved, and with BatchNorm statistics
re-estimated from training batches.

  .venv/bin/python -m deepmarc_jax.tools.bn_statistics --workdir=sweeps/mask_head_sweep/CELL \
      [--steps=2000,2500,3000] [--batches=60] [--hourglass_bn_momentum=0.9]

For each checkpoint step: the evaluation split's mask AP from ground-truth boxes (seen / unseen,
as `eval.gt_box_masks`), first with the checkpoint's moving averages, then after `--batches`
training-mode forward passes of the same parameters on the training batches that follow that
step (only the BatchNorm moving averages change; the model is built from the workdir's
config.json with `model.mask_head.hourglass_bn_momentum` set to `--hourglass_bn_momentum`).

Why: evaluation uses BatchNorm's moving averages. The hourglass heads' reference momentum, 0.1
(Keras semantics), makes them the last training batch's statistics, and a CPU batch gives the
mask head only ~8-24 crops; if AP as saved swings between checkpoints while the re-estimated
AP rises steadily, the swing is the statistics', not the parameters'. Printed, not asserted.
Needs the workdir's checkpoints (`checkpoints/<step>`; a run keeps its last three).
"""
from __future__ import annotations


from absl import app
from absl import flags

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

import jax  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from deepmarc_jax import checkpoint  # noqa: E402
from deepmarc_jax import experiment  # noqa: E402
from deepmarc_jax import sharding  # noqa: E402
from deepmarc_jax.evaluation import loop as eval_loop  # noqa: E402
from deepmarc_jax.data import pipeline  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'a run.py workdir with config.json and '
                               'checkpoints/', required=True)
_STEPS = flags.DEFINE_list('steps', None, 'checkpoint steps (default: all kept)')
_BATCHES = flags.DEFINE_integer('batches', 60, 'training batches to re-estimate the statistics')
_MOMENTUM = flags.DEFINE_float('hourglass_bn_momentum', 0.9,
                               'the hourglass BatchNorms\' momentum while re-estimating')


def main(argv):
  del argv
  workdir = _WORKDIR.value
  config = checkpoint.read_run_config(workdir)
  config.model.mask_head.hourglass_bn_momentum = _MOMENTUM.value
  exp = experiment.setup(config)
  steps = [int(s) for s in _STEPS.value] if _STEPS.value else checkpoint.kept_steps(workdir)
  if not steps:
    raise SystemExit(f'no checkpoints in {workdir}/checkpoints')
  segment = experiment.make_segment_boxes(exp)
  eval_batches = list(tfds.as_numpy(pipeline.eval_dataset(
      config.data, exp.builder, batch_size=config.eval.batch_size)))

  @jax.jit
  def refresh(state, batch, rng):
    _, updates = exp.model.apply(
        {'params': state.params, 'batch_stats': state.batch_stats}, batch, train=True,
        mutable=['batch_stats'], rngs={'sampling': rng, 'dropout': jax.random.fold_in(rng, 1)})
    return state.replace(batch_stats=updates['batch_stats'])

  def line(step, how, stats):
    print(f'step {step:>6} {how:<44} seen {100 * stats["seen"]["AP"]:5.1f}  '
          f'unseen {100 * stats["unseen"]["AP"]:5.1f}', flush=True)

  print(f'{workdir}: mask AP from GT boxes (%)')
  for step in sorted(steps):
    state = experiment.restore_checkpoint(exp, workdir, step)
    line(step, 'as saved', eval_loop.gt_box_mask_ap(exp, state, segment, eval_batches))
    batches = iter(tfds.as_numpy(pipeline.train_dataset(
        config.data, exp.builder, batch_size=config.train.batch_size, seed=config.seed,
        start_step=step)))
    for i in range(_BATCHES.value):
      batch = sharding.global_batch(next(batches), exp.mesh)
      state = refresh(state, batch, jax.random.fold_in(jax.random.key(config.seed), i))
    line(step, f'statistics re-estimated over {_BATCHES.value} batches',
         eval_loop.gt_box_mask_ap(exp, state, segment, eval_batches))


if __name__ == '__main__':
  app.run(main)
