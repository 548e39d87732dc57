"""checkpoint.Checkpointer: save and restore through orbax."""
import jax.numpy as jnp
import numpy as np

from deepmarc_jax import checkpoint


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
