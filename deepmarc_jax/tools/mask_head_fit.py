r"""Does a mask head fit its training masks? Mask AP from GT boxes, training vs eval images.

  .venv/bin/python -m deepmarc_jax.tools.mask_head_fit --workdir=sweeps/mask_head_sweep/CELL \
      [--step=3000] [--images=200]

For a run's checkpoint (default its latest), the mask AP (seen / unseen, %) of masks predicted
from the ground-truth boxes (as `eval.gt_box_masks`) on the first `--images` images of the
training split (no augmentation, the eval preprocessing) and of the eval split. Seen classes'
training masks are what the head was trained on: seen AP on training images well below 100
means the head underfits them, and a head that underfits seen classes on its own training
images cannot be expected to match a deeper head's seen AP at evaluation. Unseen AP on training
images shows generalisation to classes never trained on, on images the detector saw. Needs the
workdir's config.json and checkpoints (not committed: on the machine that ran the cell).
Printed, not asserted.
"""
from __future__ import annotations

import itertools

from absl import app
from absl import flags

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

import tensorflow_datasets as tfds  # noqa: E402

from deepmarc_jax import checkpoint  # noqa: E402
from deepmarc_jax import experiment  # noqa: E402
from deepmarc_jax.evaluation import loop as eval_loop  # noqa: E402
from deepmarc_jax.data import pipeline  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'a run.py workdir with config.json and '
                               'checkpoints/', required=True)
_STEP = flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)')
_IMAGES = flags.DEFINE_integer('images', 200, 'images of each split to score')


def main(argv):
  del argv
  workdir = _WORKDIR.value
  config = checkpoint.read_run_config(workdir)
  exp = experiment.setup(config)
  state = experiment.restore_checkpoint(exp, workdir, _STEP.value)
  step = int(state.step)
  segment = experiment.make_segment_boxes(exp)
  batch_size = config.eval.batch_size
  print(f'{workdir}, step {step}: mask AP from GT boxes (%), first {_IMAGES.value} images')
  for split in (config.data.train_split, config.data.eval_split):
    ds = pipeline.eval_dataset(config.data, exp.builder, batch_size=batch_size, split=split)
    batches = itertools.islice(tfds.as_numpy(ds), -(-_IMAGES.value // batch_size))
    stats = eval_loop.gt_box_mask_ap(exp, state, segment, batches, split=split)
    print(f'{split:<12} seen {100 * stats["seen"]["AP"]:5.1f}  unseen '
          f'{100 * stats["unseen"]["AP"]:5.1f}', flush=True)


if __name__ == '__main__':
  app.run(main)
