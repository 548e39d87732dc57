"""run.py, stopped by a test at a chosen moment: hung after a step, or killed (SIGKILL, no
handler runs) by itself inside the save of one checkpoint (tests/test_train.py).

  HANG_AFTER_STEP=N python -m tests.kill_inside_save RUN_PY_ARGS
      After step N's metrics are written, the main thread blocks (the background checkpoint
      writes go on) until the test kills the process: a kill -9 between steps, on cue.
  KILL_INSIDE_SAVE_OF_STEP=N KILL_AT=start|commit python -m tests.kill_inside_save RUN_PY_ARGS
      start: just after orbax created step N's temporary folder, before any array is written.
      commit: every array of step N written, just before the rename that commits the step.

What a kill -9, an OOM kill or a lost VM leaves at those moments.
"""
import os
import runpy
import signal
import sys
import time

from orbax.checkpoint._src.path import atomicity

from deepmarc_jax import train
from tests.conftest import REPO

_TemporaryPath = atomicity.AtomicRenameTemporaryPath


def _killing(method, moment, after):
  """`method`, with a SIGKILL before it (after=False) or after it, at step N's folder (not at
  its items')."""
  async def wrapped(self, *args, **kwargs):
    due = (moment == os.environ.get('KILL_AT')
           and self.get_final().name == os.environ.get('KILL_INSIDE_SAVE_OF_STEP'))
    if due and not after:
      os.kill(os.getpid(), signal.SIGKILL)
    result = await method(self, *args, **kwargs)
    if due:
      os.kill(os.getpid(), signal.SIGKILL)
    return result
  return wrapped


def _hanging(append_metrics):
  def wrapped(workdir, record):
    append_metrics(workdir, record)
    if str(record['step']) == os.environ.get('HANG_AFTER_STEP'):
      print(f'hanging after step {record["step"]}', flush=True)
      time.sleep(3600)
  return wrapped


_TemporaryPath.create = _killing(_TemporaryPath.create, 'start', after=True)
_TemporaryPath.finalize = _killing(_TemporaryPath.finalize, 'commit', after=False)
train._append_metrics = _hanging(train._append_metrics)  # pylint: disable=protected-access

if __name__ == '__main__':
  sys.argv = [str(REPO / 'run.py')] + sys.argv[1:]
  runpy.run_path(str(REPO / 'run.py'), run_name='__main__')
