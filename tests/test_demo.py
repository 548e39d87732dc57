"""Command 1 of the README, run as written: it must show the project's finding.

The demo trains from scratch on the synthetic shapes with masks for the seen half only; at its
end the masks predicted from ground-truth boxes must be good for the unseen half too (issue 23's
targets: unseen mask AP from GT boxes >= 40, box AP >= 20), and it must leave the picture and
the plain log lines a user reads. Slow: command 1 trains for minutes.
"""
import json

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
def test_command_one_segments_the_unseen_shapes(demo_workdir):
  (final,) = sorted(demo_workdir.glob('eval_*.json'))
  results = json.loads(final.read_text())
  box_ap = results['bbox']['AP']
  from_gt = results['segm_gt_boxes']
  assert box_ap >= 0.20, box_ap
  assert from_gt['unseen']['AP'] >= 0.40, from_gt
  assert from_gt['seen']['AP'] >= 0.40, from_gt
  log = (demo_workdir / 'command.log').read_text()
  # Not a terminal: plain log lines, not a progress bar, and the final table with both rows.
  assert 'step 50:' in log and '\r' not in log
  assert 'segm@GT' in log
  picture = np.asarray(Image.open(demo_workdir / 'predictions.png'))
  assert picture.ndim == 3 and picture.shape[0] > 128 and picture.std() > 10
