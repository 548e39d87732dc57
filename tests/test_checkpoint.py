"""checkpoint.Checkpointer: save and restore through orbax, and its faults (damaged
checkpoints, a checkpoint of another config) and the workdir lock. A full disk: tests/test_full_disk.py."""
import logging
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from deepmarc_jax import checkpoint
from tests.conftest import REPO


def test_a_relative_directory_saves_and_restores(tmp_path, monkeypatch):
  """run.py's --workdir may be relative (the README's commands use workdirs/...); orbax restores
  only from absolute paths, so resuming or `--mode=eval` there failed."""
  monkeypatch.chdir(tmp_path)
  state = {'w': jnp.arange(6.0).reshape(2, 3), 'step': jnp.asarray(7)}
  ckpt = checkpoint.Checkpointer('workdir/checkpoints', save_every_steps=1)
  assert ckpt.save(7, state)
  ckpt.close()
  reopened = checkpoint.Checkpointer('workdir/checkpoints', save_every_steps=1)
  assert reopened.latest_step() == 7
  restored = reopened.restore(checkpoint.abstract(state))
  reopened.close()
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert int(restored['step']) == 7
  assert (tmp_path / 'workdir' / 'checkpoints' / '7').is_dir()


# -- faults: damaged checkpoints, another config, two runs on one workdir ----------

def _weights(value: float, size: int = 1000):
  """Incompressible: the array's data file is the step's largest."""
  return np.random.default_rng(int(value)).random(size).astype(np.float32) + value


def _state(value: float, size: int = 1000):
  return {'w': jnp.asarray(_weights(value, size)), 'b': {'c': jnp.arange(12.0) + value},
          'step': jnp.asarray(int(value), jnp.int32)}


def _checkpoints(directory, steps, size=1000):
  ckpt = checkpoint.Checkpointer(str(directory), save_every_steps=1, max_to_keep=10)
  for step in steps:
    assert ckpt.save(step, _state(float(step), size))
  ckpt.wait()
  ckpt.close()


def _data_files(step_folder):
  """The array data files orbax (OCDBT) wrote for one step, largest first."""
  files = [p for p in step_folder.rglob('*') if p.is_file() and p.parent.name == 'd']
  return sorted(files, key=lambda p: p.stat().st_size, reverse=True)


def _truncate(folder):
  largest = _data_files(folder)[0]
  largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])


def _delete_arrays(folder):
  for path in _data_files(folder):
    path.unlink()


def _half_written(folder):
  """What a writer that does not rename atomically (or a copy) leaves: the folder and its
  metadata files, no arrays."""
  for path in folder.rglob('*'):
    if path.is_file() and path.parent.name == 'd':
      path.unlink()
  (folder / 'default' / '_METADATA').unlink()


@pytest.mark.parametrize('damage', [_truncate, _delete_arrays, _half_written])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, damage,
                                                                           caplog):
  directory = tmp_path / 'checkpoints'
  _checkpoints(directory, [1, 2, 3])
  damage(directory / '3')
  ckpt = checkpoint.Checkpointer(str(directory), save_every_steps=1, max_to_keep=3)
  with caplog.at_level(logging.WARNING):
    state, step = ckpt.restore_latest_intact(checkpoint.abstract(_state(0.0)))
  assert step == 2
  np.testing.assert_array_equal(state['w'], _weights(2.0))
  assert any(str(directory / '3') in r.getMessage() and 'damaged' in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  # Moved aside, not deleted; the good ones stay where they were.
  assert (tmp_path / 'checkpoints_damaged' / '3').is_dir()
  assert sorted(p.name for p in directory.iterdir()) == ['1', '2']
  # Training on saves step 3 again (orbax would refuse to while a damaged 3 is in place) and
  # 4; max_to_keep=3 then keeps 2, 3 and 4.
  assert ckpt.save(3, _state(3.0)) and ckpt.save(4, _state(4.0))
  ckpt.wait()
  assert ckpt.kept_steps() == [2, 3, 4]
  ckpt.close()


def test_when_no_checkpoint_restores_the_run_stops_and_moves_nothing(tmp_path):
  directory = tmp_path / 'checkpoints'
  _checkpoints(directory, [1, 2])
  _delete_arrays(directory / '1')
  _truncate(directory / '2')
  ckpt = checkpoint.Checkpointer(str(directory), save_every_steps=1)
  with pytest.raises(checkpoint.DamagedCheckpointsError) as error:
    ckpt.restore_latest_intact(checkpoint.abstract(_state(0.0)))
  ckpt.close()
  assert str(directory / '1') in str(error.value) and str(directory / '2') in str(error.value)
  assert sorted(p.name for p in directory.iterdir()) == ['1', '2']
  assert not (tmp_path / 'checkpoints_damaged').exists()


def test_a_checkpoint_of_another_config_stops_with_the_folder_and_the_arrays(tmp_path):
  directory = tmp_path / 'checkpoints'
  _checkpoints(directory, [1, 2])
  other = {'w': jnp.zeros((999,)), 'b': {'d': jnp.zeros(12)}, 'step': jnp.asarray(0)}
  ckpt = checkpoint.Checkpointer(str(directory), save_every_steps=1)
  with pytest.raises(checkpoint.CheckpointMismatchError) as error:
    ckpt.restore_latest_intact(checkpoint.abstract(other))
  ckpt.close()
  message = str(error.value)
  assert str(directory / '2') in message
  assert 'w (1000,) float32 in the checkpoint, (999,) float32 in this config' in message
  assert 'b.d is missing from the checkpoint' in message
  assert 'b.c is in the checkpoint, not in this config' in message
  assert sorted(p.name for p in directory.iterdir()) == ['1', '2']  # nothing moved or deleted


def test_an_empty_directory_restores_nothing(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), save_every_steps=1)
  assert ckpt.restore_latest_intact(checkpoint.abstract(_state(0.0))) == (None, None)
  ckpt.close()


_HOLD_LOCK = '''
import sys, time
from deepmarc_jax import checkpoint
with checkpoint.WorkdirLock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
'''


def test_a_second_run_on_a_workdir_stops_and_a_killed_runs_lock_is_free(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, str(tmp_path)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(checkpoint.WorkdirInUseError) as error:
      with checkpoint.WorkdirLock(str(tmp_path)):
        pass
    message = str(error.value)
    assert str(tmp_path) in message and f'process {holder.pid} on ' in message
  finally:
    holder.kill()  # SIGKILL: no handler runs, the lock file stays
    holder.wait()
  assert (tmp_path / checkpoint.RUN_LOCK).exists()
  with checkpoint.WorkdirLock(str(tmp_path)):
    assert f'process {os.getpid()} ' in (tmp_path / checkpoint.RUN_LOCK).read_text()
