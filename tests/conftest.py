"""Shared test setup: quiet TF, no GPUs for TF, paths to shared test data, the oracle tier.

Tests marked `oracle` run the official code (oracle/*.py) in its own venvs: TF Model Garden's
Deep-MARC in ORACLE_PYTHON, the TF Object Detection API's Deep-MAC in DEEPMAC_ORACLE_PYTHON.
Without them they are skipped, or fail where DEEPMARC_REQUIRE_ORACLE=1 (CI: a parity test must
not pass silently by skipping).
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
# The official TF Object Detection API (Deep-MAC) in its own venv, also built by setup.sh.
DEEPMAC_ORACLE_PYTHON = pathlib.Path(os.environ.get(
    'DEEPMARC_DEEPMAC_ORACLE_PYTHON', REPO / '.venv-oracle-deepmac' / 'bin' / 'python'))


# Chromium and its driver from the OS packages (`apt-get install chromium chromium-driver`).
CHROMIUM = pathlib.Path(os.environ.get('DEEPMARC_CHROMIUM', '/usr/bin/chromium'))
CHROMEDRIVER = pathlib.Path(os.environ.get('DEEPMARC_CHROMEDRIVER', '/usr/bin/chromedriver'))


def browser_missing() -> str | None:
  """Why the browser tests cannot run, or None if they can."""
  missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
  if not missing:
    return None
  return (f'headless browser not found: {", ".join(missing)}; `apt-get install -y chromium '
          'chromium-driver` installs them (or set DEEPMARC_CHROMIUM / DEEPMARC_CHROMEDRIVER)')


def oracle_missing() -> str | None:
  """Why the oracle tests cannot run (the missing interpreters, the fix), or None if they can."""
  missing = [f'{path} ({variable})' for path, variable in (
      (ORACLE_PYTHON, 'DEEPMARC_ORACLE_PYTHON'),
      (DEEPMAC_ORACLE_PYTHON, 'DEEPMARC_DEEPMAC_ORACLE_PYTHON')) if not path.exists()]
  if not missing:
    return None
  return (f'official-model venv(s) not found: {", ".join(missing)}; `bash setup.sh` (without '
          '--no-oracle) builds .venv-oracle and .venv-oracle-deepmac from ../shared/oracle, or '
          'set the variable to its python')


# marker: (why it cannot run, the variable that makes that a failure instead of a skip)
_TIERS = {'oracle': (oracle_missing, 'DEEPMARC_REQUIRE_ORACLE'),
          'browser': (browser_missing, 'DEEPMARC_REQUIRE_BROWSER')}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  # Before the fixtures' setup (tryfirst), so that their fixtures are never started.
  for marker, (missing, require) in _TIERS.items():
    if item.get_closest_marker(marker) is None:
      continue
    reason = missing()
    if reason is None:
      continue
    if os.environ.get(require) == '1':
      pytest.fail(f'{require}=1: {reason}', pytrace=False)
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


@pytest.fixture(scope='session')
def tiny_workdir(tmp_path_factory):
  """A run.py workdir of the `demo,tiny` Deep-MARC: config.json and a step-1 checkpoint of
  random weights (noise added: the mask head's last layer starts at zero) whose BatchNorm
  statistics are moved off their initial values."""
  from tests import tiny
  return _random_workdir(tmp_path_factory.mktemp('workdir'), tiny.config())


@pytest.fixture(scope='session')
def deepmac_tiny_workdir(tmp_path_factory):
  """The same for Deep-MAC's `demo,tiny` (experiments/deepmac_centernet.py)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      'deepmac_centernet', REPO / 'experiments' / 'deepmac_centernet.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return _random_workdir(tmp_path_factory.mktemp('deepmac_workdir'),
                         module.get_config('demo,tiny'), calibrate=True)


def _random_workdir(workdir, config, calibrate=False):
  """`calibrate`: BatchNorm statistics from three training-mode passes over a random batch,
  params as initialised (two random hourglass stacks with noise added, or with their initial
  statistics, saturate every mask probability)."""
  import jax
  import numpy as np
  from deepmarc_jax import checkpoint
  from deepmarc_jax import experiment
  from tests import tiny
  (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
  exp = experiment.for_inference(config)
  state = experiment.init_state(exp, jax.random.key(0))
  rng = np.random.default_rng(0)
  if calibrate:
    batch = tiny.batch(num_instances=3, max_instances=config.data.max_instances,
                       size=config.data.image_size)
    stats = state.batch_stats
    for _ in range(3):
      _, updates = exp.model.apply({'params': state.params, 'batch_stats': stats}, batch,
                                   train=True, mutable=['batch_stats'],
                                   rngs={'sampling': jax.random.key(1)})
      stats = updates['batch_stats']
    state = state.replace(batch_stats=stats)
  else:
    state = state.replace(
        params=jax.tree_util.tree_map(
            lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), state.params),
        batch_stats=jax.tree_util.tree_map(
            lambda x: x + rng.uniform(0.1, 0.5, x.shape).astype(x.dtype), state.batch_stats))
  ckpt = checkpoint.for_workdir(str(workdir))
  ckpt.save(1, state, force=True)
  ckpt.wait()
  ckpt.close()
  return workdir


def readme_command_one() -> list[str]:
  """Command 1 of the README (the main job), as argv after `setup.sh &&`, python first."""
  import shlex
  lines = [line for line in (REPO / 'README.md').read_text().splitlines()
           if line.startswith('bash setup.sh') and ' run.py ' in line]
  assert len(lines) == 1, f'expected one command-1 line in README.md, found {lines}'
  return shlex.split(lines[0].split('&&', 1)[1])


@pytest.fixture(scope='session')
def demo_workdir(tmp_path_factory):
  """The workdir of the README's command 1, run as written (only the workdir moved here).

  Command 1 trains for minutes: only slow tests may use it. Its TFDS data dir is the command's
  own default, so a machine that already built the shapes dataset reuses it, as a user's would.
  DEEPMARC_DEMO_WORKDIR=DIR (a finished command 1's workdir with its command.log) skips the run
  while iterating on these tests; CI never sets it.
  """
  import subprocess
  import sys
  if os.environ.get('DEEPMARC_DEMO_WORKDIR'):
    return pathlib.Path(os.environ['DEEPMARC_DEMO_WORKDIR'])
  workdir = tmp_path_factory.mktemp('demo')
  argv = readme_command_one()
  assert argv[0] == '.venv/bin/python' and argv[1] == 'run.py', argv
  argv = [sys.executable] + [f'--workdir={workdir}' if a.startswith('--workdir=') else a
                             for a in argv[1:]]
  result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
  (workdir / 'command.log').write_text(result.stdout + result.stderr)
  assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
  return workdir
