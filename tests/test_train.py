"""The trainer: sharding, resume after a kill, non-finite losses, and the end-to-end run."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_train_step_on_8_devices_matches_1_device():
  result = subprocess.run([sys.executable, '-m', 'tests.sharding_check'], capture_output=True,
                          text=True, cwd=REPO, timeout=900,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2'))
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out['devices'] == [1, 8] and out['same_init']
  loss1, loss8 = out['loss']
  assert abs(loss1 - loss8) <= 1e-5 * abs(loss1)
  for name, (a, b) in out['parts'].items():
    if name != 'grad_norm':  # a function of the update, checked below
      assert abs(a - b) <= 1e-4 * max(abs(a), 1e-3), name
  # Within the step's own float-noise scale (a 1e-6 parameter perturbation on one device).
  assert out['update_rel_diff'] <= 2 * out['noise_update_rel_diff'] + 1e-4


def _run(workdir, data_dir, *overrides):
  return subprocess.Popen(
      [sys.executable, str(REPO / 'run.py'),
       f'--config={REPO / "experiments" / "deepmarc_spinenet.py"}:demo,tiny',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *overrides],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES=''))


def _losses(workdir):
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  return {m['step']: m['loss'] for m in map(json.loads, lines)}


@pytest.fixture(scope='module')
def shapes_data_dir(tmp_path_factory):
  from deepmarc_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tests import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.config()
  config.data.data_dir = str(tmp_path_factory.mktemp('tfds'))
  pipeline.get_builder(config.data)
  return config.data.data_dir


@pytest.mark.slow
def test_sigterm_then_resume_continues_exactly(tmp_path, shapes_data_dir):
  """Uninterrupted 6 steps vs SIGTERM mid-run + resume: identical losses after the restart."""
  full = _run(tmp_path / 'full', shapes_data_dir)
  out, _ = full.communicate(timeout=900)
  assert full.returncode == 0, out[-3000:]
  reference = _losses(tmp_path / 'full')
  assert sorted(reference) == [1, 2, 3, 4, 5, 6]

  work = tmp_path / 'killed'
  killed = _run(work, shapes_data_dir)
  deadline = time.time() + 600
  while time.time() < deadline and killed.poll() is None:
    if (work / 'metrics.jsonl').exists() and len(_losses(work)) >= 2:
      killed.send_signal(signal.SIGTERM)
      break
    time.sleep(0.2)
  out, _ = killed.communicate(timeout=600)
  assert killed.returncode == 0, out[-3000:]
  stopped_at = max(_losses(work))
  assert stopped_at < 6, 'the run finished before SIGTERM arrived'
  assert (work / 'checkpoints' / str(stopped_at)).exists()

  resumed = _run(work, shapes_data_dir)
  out, _ = resumed.communicate(timeout=900)
  assert resumed.returncode == 0, out[-3000:]
  assert f'resumed from step {stopped_at}' in out
  after = _losses(work)
  for step in range(stopped_at + 1, 7):
    np.testing.assert_allclose(after[step], reference[step], rtol=1e-6)


@pytest.mark.slow
def test_non_finite_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(
    tmp_path, shapes_data_dir):
  run = _run(tmp_path, shapes_data_dir, '--config.train.optimizer.learning_rate=1e30',
             '--config.train.optimizer.warmup_steps=0', '--config.train.total_steps=20')
  out, _ = run.communicate(timeout=900)
  assert run.returncode == 2, out[-3000:]
  assert 'FATAL: non-finite loss' in out and 'last good' in out
  from deepmarc_jax import checkpoint  # pylint: disable=g-import-not-at-top
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'), save_every_steps=2)
  latest = ckpt.latest_step()
  assert latest is not None
  restored = ckpt.restore(None)
  leaves = [np.asarray(x) for x in jax_leaves(restored)]
  assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == 'f')


def jax_leaves(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_leaves(tree)
