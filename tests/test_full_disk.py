"""A full disk while saving a checkpoint, writing an evaluation or building the dataset: an
error naming the path, and what was there before intact (docs/reliability.md).

Each test fills a small tmpfs; mounting one needs root, so elsewhere they are skipped with the
reason.
"""
import errno
import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest

from deepmarc_jax import checkpoint
from deepmarc_jax.evaluation import coco as coco_eval


@pytest.fixture
def small_tmpfs(tmp_path):
  """A 4 MiB tmpfs."""
  mount = tmp_path / 'tmpfs'
  mount.mkdir()
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=4m', 'tmpfs', str(mount)],
                          capture_output=True, text=True, check=False)
  if result.returncode:
    pytest.skip(f'cannot mount a small tmpfs to fill: {result.stderr.strip()}')
  yield mount
  subprocess.run(['umount', '-l', str(mount)], check=False)


def _fill(mount, leave_bytes=0):
  """Takes all of the tmpfs's free space but `leave_bytes` (fallocate: instant)."""
  free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
  with open(mount / 'filler', 'wb') as f:
    os.posix_fallocate(f.fileno(), 0, max(free - leave_bytes, 1))


def _state(seed: int, size: int):
  """Random values: incompressible, so `size` floats take 4 * size bytes on disk."""
  return {'w': jnp.asarray(np.random.default_rng(seed).random(size), jnp.float32),
          'step': jnp.asarray(seed, jnp.int32)}


def test_saving_a_checkpoint_names_the_folder_and_keeps_the_last_one(small_tmpfs):
  directory = small_tmpfs / 'checkpoints'
  ckpt = checkpoint.Checkpointer(str(directory), save_every_steps=1, writer=True)
  assert ckpt.save(1, _state(1, 1000))
  ckpt.wait()
  with pytest.raises(checkpoint.CheckpointWriteError) as error:
    ckpt.save(2, _state(2, 1_500_000))  # 6 MB on a 4 MiB disk
    ckpt.wait()
  ckpt.close()
  message = str(error.value)
  assert str(directory) in message and 'No space left on device' in message
  assert f'The checkpoint of step 1 ({directory / "1"}) is intact' in message
  # The next run (a new Checkpointer that trains) clears the unfinished folder and resumes 1.
  reopened = checkpoint.Checkpointer(str(directory), save_every_steps=1, writer=True)
  state, step = reopened.restore_latest_intact(checkpoint.abstract(_state(0, 1000)))
  reopened.close()
  assert step == 1
  np.testing.assert_array_equal(state['w'], _state(1, 1000)['w'])
  assert sorted(p.name for p in directory.iterdir()) == ['1']


def test_writing_an_evaluation_names_the_file_and_leaves_no_half_file(small_tmpfs):
  path = small_tmpfs / 'eval_10.json'
  results = {'bbox': {'AP': 0.5, 'per_category': {str(i): 0.25 for i in range(5000)}}}
  _fill(small_tmpfs, leave_bytes=4096)
  with pytest.raises(OSError) as error:
    coco_eval.write_json(results, path)
  assert error.value.errno == errno.ENOSPC and str(path) in str(error.value)
  assert sorted(p.name for p in small_tmpfs.iterdir()) == ['filler']


def test_building_the_dataset_names_the_folder(small_tmpfs, coco_mini_seg_dir):
  from deepmarc_jax import config_lib  # pylint: disable=g-import-not-at-top
  from deepmarc_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = config_lib.base_config().data
  data.update(tfds_name='coco_instances/coco_mini_seg', manual_dir=str(coco_mini_seg_dir),
              data_dir=str(small_tmpfs / 'tfds'))
  with pytest.raises(OSError) as error:
    pipeline.get_builder(data)
  assert error.value.errno == errno.ENOSPC
  assert 'No space left on device while building coco_instances/coco_mini_seg in ' in str(
      error.value)
  assert str(small_tmpfs / 'tfds' / 'coco_instances' / 'coco_mini_seg') in str(error.value)
  # Nothing that a later build would take for a prepared dataset.
  assert not list((small_tmpfs / 'tfds').rglob('dataset_info.json'))
