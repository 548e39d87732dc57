r"""Entry point: `python run.py --config=experiments/FILE.py[:variants] --workdir=DIR --mode=MODE`.

Every config field can be overridden: `--config.model.mask_head.type=hourglass100`. The config
is validated before any data is read; the resolved config is written to the workdir.
"""
import contextlib
import errno
import logging as logging_std
import os
import sys

from deepmarc_jax import xla_cpu  # noqa: E402  (imports nothing heavy)

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. experiments/deepmarc_spinenet.py:demo.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where results, checkpoints and logs go.')
_MODE = flags.DEFINE_enum(
    'mode', 'train_and_eval', ['train_and_eval', 'eval', 'prepare'],
    'train_and_eval: train (resuming from the workdir), evaluate, write prediction overlays. '
    'eval: evaluate the workdir\'s latest checkpoint (or --step\'s). prepare: build the dataset, '
    'check the input pipeline (speed, preview PNG) and score the oracle AP of the batch masks.')
_STEP = flags.DEFINE_integer(
    'step', None, 'With --mode=eval: the checkpoint step to evaluate (default: the latest kept).')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(message: str) -> None:
  sys.stderr.write(f'FATAL: {message}\n')
  sys.exit(2)


def _parse_flags(argv):
  """absl flag parsing, with config override errors (unknown field, bad type) as one line."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if 'Traceback' in message:  # an exception inside the config file: its last line says it
      message = message.split('\n', 1)[0] + ' ' + message.strip().splitlines()[-1]
    _fail(f'flag parsing error: {message}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections reports an unknown field as AttributeError("'typo'\nDid you mean ...").
    detail = str(e).strip('"\'').replace('\\n', ' ').replace('\n', ' ').replace("\\'", "'")
    overrides = [a for a in argv if a.startswith('--config.')]
    _fail(f'unknown config field in {overrides}: {detail}')


class _QuietTfdsDeprecations(logging_std.Filter):
  """TFDS 4.9.10 warns about its own internal `TensorInfo.dtype` use once per feature."""

  def filter(self, record):
    return 'TensorInfo.dtype` is deprecated' not in record.getMessage()


def main(argv):
  if len(argv) > 1:
    _fail(f'unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietTfdsDeprecations())
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], 'GPU')  # TF only feeds data; keep accelerators for JAX

  from deepmarc_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    _fail(str(e))

  import jax  # pylint: disable=g-import-not-at-top
  from deepmarc_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if jax_distributed_needed():
    jax.distributed.initialize()
  workdir = _WORKDIR.value
  is_main = jax.process_index() == 0
  with contextlib.ExitStack() as stack:
    if _MODE.value == 'train_and_eval':
      # Before anything is written: a second run on a workdir in training stops here (every
      # process of it: process 0 holds the lock and says whether it got it).
      refusal = ''
      if is_main:
        try:
          stack.enter_context(checkpoint.WorkdirLock(workdir))
        except checkpoint.WorkdirInUseError as e:
          refusal = str(e)
      if jax.process_count() > 1:
        import numpy as np  # pylint: disable=g-import-not-at-top
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        refused = multihost_utils.broadcast_one_to_all(np.asarray(bool(refusal)))
        refusal = refusal or (f'{workdir} is in use by another run' if refused else '')
      if refusal:
        _fail(refusal)
    previous = checkpoint.read_run_config_text(workdir)
    if is_main:  # one writer of the workdir's files
      try:
        checkpoint.write_run_config(config, workdir)
      except OSError as e:
        _fail(f'cannot write the run config: {e}')
    changed = config_lib.changed_fields(previous, config)
    if changed and checkpoint.kept_steps(workdir):
      logging.warning('this workdir\'s checkpoints were written with another config; changed: %s',
                      '; '.join(changed))
    logging.info('config:\n%s', config)
    _run_mode(config, workdir, previous, changed)


def _run_mode(config, workdir: str, previous: str | None, changed: list[str]) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from deepmarc_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from deepmarc_jax import train  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.data import coco_format  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.evaluation import loop as eval_loop  # pylint: disable=g-import-not-at-top
  try:
    if _MODE.value == 'prepare':
      from deepmarc_jax import prepare  # pylint: disable=g-import-not-at-top
      prepare.run(config, workdir)
    elif _MODE.value == 'eval':
      try:
        eval_loop.evaluate_checkpoint(config, workdir, _STEP.value)
      except FileNotFoundError as e:  # no checkpoint, or not of that step
        _fail(str(e))
    else:
      train.train_and_evaluate(config, workdir)
  except checkpoint.CheckpointMismatchError as e:
    if previous is not None and jax.process_index() == 0:  # the workdir keeps its checkpoints' config
      checkpoint.write_run_config_text(previous, workdir)
    hint = (f' The config differs from the one this workdir ran with in: {"; ".join(changed)}.'
            if changed else '')
    _fail(f'{e}{hint}')
  except (train.NonFiniteLossError, checkpoint.DamagedCheckpointsError,
          checkpoint.CheckpointWriteError, coco_format.BadInputError) as e:
    _fail(str(e))
  except OSError as e:  # e.g. a full disk while building the data or writing an evaluation
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
      kept = (f' The checkpoints in {workdir}/checkpoints are intact.'
              if _MODE.value == 'train_and_eval' else '')
      _fail(f'{e}.{kept} Free the space (or fix the permissions) and run the same command '
            'again.')
    raise


def jax_distributed_needed() -> bool:
  """Multi-process runs (e.g. TPU pods, SLURM) set these; one process needs no coordinator."""
  if int(os.environ.get('SLURM_NTASKS', '1') or '1') > 1:  # one task: a plain process
    return True
  return any(os.environ.get(v) for v in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES',
                                         'MEGASCALE_COORDINATOR_ADDRESS'))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
