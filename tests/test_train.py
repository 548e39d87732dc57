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
    assert abs(a - b) <= 1e-4 * max(abs(a), 1e-3), name
  # Within the step's own float-noise scale (a 1e-6 parameter perturbation on one device).
  assert out['update_rel_diff'] <= 2 * out['noise_update_rel_diff'] + 1e-4
