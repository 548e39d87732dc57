"""Shared test setup: quiet TF, no GPUs for TF, paths to shared test data, the oracle tier.

Tests marked `oracle` run the official TF Model Garden code (oracle/*.py) in its own venv,
ORACLE_PYTHON. Without that venv they are skipped, or fail where DEEPMARC_REQUIRE_ORACLE=1
(CI: a parity test must not pass silently by skipping).
"""
import os
import pathlib

os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.configure_process()  # before JAX and TF start (quiet TF logs, run.py's XLA:CPU flags)

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI_SEG = REPO.parent / 'shared' / 'data' / 'coco_mini_seg'
# The official TF Model Garden in its own venv: setup.sh builds it (from shared/oracle).
ORACLE_PYTHON = pathlib.Path(os.environ.get(
    'DEEPMARC_ORACLE_PYTHON', REPO / '.venv-oracle' / 'bin' / 'python'))


def oracle_missing() -> str | None:
  """Why the oracle tests cannot run (the missing interpreter, the fix), or None if they can."""
  if ORACLE_PYTHON.exists():
    return None
  return (f'official-model venv not found: {ORACLE_PYTHON} does not exist; `bash setup.sh` '
          '(without --no-oracle) builds .venv-oracle from ../shared/oracle/setup_venv.sh, or set '
          'DEEPMARC_ORACLE_PYTHON to its python')


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  # Before the fixtures' setup (tryfirst), so that the oracle fixtures are never started.
  if item.get_closest_marker('oracle') is None:
    return
  reason = oracle_missing()
  if reason is None:
    return
  if os.environ.get('DEEPMARC_REQUIRE_ORACLE') == '1':
    pytest.fail(f'DEEPMARC_REQUIRE_ORACLE=1: {reason}', pytrace=False)
  pytest.skip(reason)


@pytest.fixture(scope='session')
def coco_mini_seg_dir() -> pathlib.Path:
  assert COCO_MINI_SEG.is_dir(), f'test data missing: {COCO_MINI_SEG}'
  return COCO_MINI_SEG


@pytest.fixture(scope='session')
def coco_mini_seg_builder(tmp_path_factory, coco_mini_seg_dir):
  """coco_instances/coco_mini_seg built offline once per session."""
  import tensorflow_datasets as tfds
  from deepmarc_jax.data.coco_instances import CocoInstances
  builder = CocoInstances(config='coco_mini_seg', data_dir=str(tmp_path_factory.mktemp('tfds')))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(coco_mini_seg_dir), try_download_gcs=False))
  return builder
