"""Shared test setup: quiet TF, no GPUs for TF, paths to shared test data."""
import os
import pathlib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('CUDA_VISIBLE_DEVICES', '')

from deepmarc_jax import xla_cpu  # noqa: E402

xla_cpu.add_default_flags()  # the tests run the kernels run.py runs

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
COCO_MINI_SEG = REPO.parent / 'shared' / 'data' / 'coco_mini_seg'


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
