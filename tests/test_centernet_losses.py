"""CenterNet / Deep-MAC targets (ops/heatmaps.py) and losses (models/centernet_losses.py).

Oracle-free tests check properties against numpy (heatmap peaks, the CenterNet Gaussian radius,
an independent numpy loss, padding rows, the padded image region). The `oracle` tests run
oracle/centernet_targets_parity.py in the Deep-MAC oracle venv (the official TF Object
Detection API; shared/oracle/setup_deepmac_venv.sh builds it), which computes the official
targets and calls the official DeepMACMetaArch.loss() on the same GT and head outputs; ours must
agree to 1e-4 relative. Output grid 32 x 32 (input 128), 20 classes, for speed.
"""
import json
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deepmarc_jax.models import centernet_losses as cl
from deepmarc_jax.ops import heatmaps
from tests.conftest import DEEPMAC_ORACLE_PYTHON, REPO

SIZE = 128  # padded input; output grid 32 x 32
STRIDE = 4
OUT = SIZE // STRIDE
NUM_CLASSES = 20
ALLOWED = [1, 2, 3, 5, 9, 16]  # mask-allowed COCO ids (a VOC-like subset within 20 classes)
MASK = 32


# ---------------------------------------------------------------------------------------------
# Random GT and head outputs.

def _center_logits(rng, shape):
  # Mostly moderate logits; 5% far out (|logit| up to ~30), where the focal loss's sigmoid clip
  # to [1e-4, 1 - 1e-4] decides the value.
  logits = rng.normal(-2, 2, shape)
  far = rng.uniform(size=shape) < 0.05
  return np.where(far, rng.normal(0, 12, shape), logits).astype(np.float32)


def _case(rng, batch, num, real, true_hw, *, mask_stacks=2, extra=None):
  """One batch: `real[b]` random boxes per image, the rest padding rows (zeros, class 0,
  weight 0). `extra(b, boxes, classes, weights)` may edit image b's rows in place."""
  boxes = np.zeros((batch, num, 4), np.float32)
  classes = np.zeros((batch, num), np.int32)
  weights = np.zeros((batch, num), np.float32)
  for b in range(batch):
    for i in range(real[b]):
      h, w = true_hw[b]
      y1, x1 = rng.uniform(0, h - 2), rng.uniform(0, w - 2)
      bh = rng.uniform(1.0, h - y1) if rng.uniform() < 0.7 else rng.uniform(0.2, 6.0)
      bw = rng.uniform(1.0, w - x1) if rng.uniform() < 0.7 else rng.uniform(0.2, 6.0)
      boxes[b, i] = [y1, x1, min(y1 + bh, h), min(x1 + bw, w)]
      classes[b, i] = rng.integers(1, NUM_CLASSES + 1)
      weights[b, i] = 1.0
    if extra is not None:
      extra(b, boxes[b], classes[b], weights[b])
  return {
      'boxes': boxes, 'classes': classes, 'weights': weights,
      'true_image_shapes': np.array([[h, w, 3] for h, w in true_hw], np.int32),
      'masks': rng.uniform(0, 1, (batch, num, 40, 40)).astype(np.float32),
      'center': [_center_logits(rng, (batch, OUT, OUT, NUM_CLASSES)) for _ in range(2)],
      'box_scale': [rng.uniform(0, 20, (batch, OUT, OUT, 2)).astype(np.float32)
                    for _ in range(2)],
      'box_offset': [rng.uniform(0, 1, (batch, OUT, OUT, 2)).astype(np.float32)
                     for _ in range(2)],
      'mask_logits': [rng.normal(0, 3, (batch, num, MASK, MASK)).astype(np.float32)
                      for _ in range(mask_stacks)],
  }


def _cases():
  rng = np.random.default_rng(0)

  def crowd_like(b, boxes, classes, weights):
    if b == 0:  # a fractional weight: scales its Gaussian (no positive), counts as one box
      classes[1], weights[1] = 1, 0.5
    if b == 1:  # a real box and class with weight 0 (e.g. a crowd box the caller excluded)
      boxes[3] = [10.0, 20.0, 60.0, 90.0]
      classes[3] = 2

  def same_class(b, boxes, classes, weights):
    # Overlapping boxes of one class (max merge), a tiny box (radius 0), a box on the border.
    boxes[:4] = [[10, 10, 70, 60], [14, 16, 80, 66], [40, 40, 41.5, 41], [100, 0, 128, 30]]
    classes[:4] = [3, 3, 3, 5]
    weights[:4] = 1.0

  def no_allowed(b, boxes, classes, weights):
    if b == 1:
      boxes[:2] = [[5, 5, 50, 50], [30, 60, 90, 120]]
      classes[:2] = [4, 20]  # not in ALLOWED: mask normaliser max(0, 1)
      weights[:2] = 1.0

  return {
      'mixed': _case(rng, 2, 8, [5, 3], [(128, 128), (77, 128)], extra=crowd_like),
      'overlap_last_stage': _case(rng, 3, 6, [0, 2, 4], [(128, 90), (96, 128), (128, 128)],
                                  mask_stacks=1, extra=same_class),
      'empty_and_unallowed': _case(rng, 2, 4, [0, 0], [(128, 128), (64, 128)],
                                   extra=no_allowed),
      'all_padding': _case(rng, 2, 3, [0, 0], [(128, 128), (128, 100)]),
  }


def _ours(case):
  """Our targets and losses for one case (boxes in input pixels, as the batch contract)."""
  valid_hw = jnp.asarray(case['true_image_shapes'][:, :2], jnp.float32)
  fn = jax.vmap(lambda b, c, w, v: heatmaps.center_net_targets(
      b, c, w, v, input_hw=(SIZE, SIZE), num_classes=NUM_CLASSES, stride=STRIDE))
  targets = jax.jit(fn)(case['boxes'], case['classes'], case['weights'], valid_hw)
  return targets


def _outputs(case):
  outputs = [{'center': c, 'box_scale': s, 'box_offset': o}
             for c, s, o in zip(case['center'], case['box_scale'], case['box_offset'])]
  # Mask logits on the last stacks (one mask stack = use_only_last_stage).
  for out, logits in zip(outputs[len(outputs) - len(case['mask_logits']):],
                         case['mask_logits']):
    out['mask_logits'] = logits
  return outputs


def _mask_weights(case):
  return case['weights'] * np.isin(case['classes'], ALLOWED)


# ---------------------------------------------------------------------------------------------
# Oracle-free tests.

def _centernet_radius_np(height, width, min_overlap=0.7):
  """`gaussian_radius` of github.com/xingyizhou/CenterNet (src/lib/utils/image.py), verbatim:
  the formula the official OD API keeps (roots divided by 2, not 2a)."""
  a1, b1 = 1, height + width
  c1 = width * height * (1 - min_overlap) / (1 + min_overlap)
  r1 = (b1 + np.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
  a2, b2 = 4, 2 * (height + width)
  c2 = (1 - min_overlap) * width * height
  r2 = (b2 + np.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
  a3, b3 = 4 * min_overlap, -2 * min_overlap * (height + width)
  c3 = (min_overlap - 1) * width * height
  r3 = (b3 + np.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
  return np.minimum(np.minimum(r1, r2), r3)


def test_gaussian_radius_and_sigma_match_centernet_formula():
  rng = np.random.default_rng(1)
  h, w = rng.uniform(0, 300, 500), rng.uniform(0, 300, 500)
  h[:3], w[:3] = 0.0, [0.0, 5.0, 0.5]
  ours = np.asarray(heatmaps.gaussian_radius(h, w, 0.7))
  ref = _centernet_radius_np(h.astype(np.float64), w.astype(np.float64))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
  sigma = np.asarray(heatmaps.gaussian_sigma(h, w, 0.7))
  # Where float32 and float64 agree on floor(radius).
  same = np.floor(ours) == np.floor(ref)
  np.testing.assert_allclose(sigma[same], ((2 * np.maximum(np.floor(ref), 0) + 1) / 6)[same],
                             rtol=1e-6)
  # A 10 x 10 box at IoU 0.7: the "GT inside the detection" case is the smallest,
  # a = 2.8, b = -28, c = -30: (28 + sqrt(28^2 + 4 * 2.8 * 30)) / 2, and not / (2 a).
  r3 = (-28 + math.sqrt(28 ** 2 + 4 * 2.8 * 30)) / 2
  assert float(heatmaps.gaussian_radius(10.0, 10.0)) == pytest.approx(r3, rel=1e-6)
  assert float(heatmaps.gaussian_sigma(10.0, 10.0)) == pytest.approx(5 / 6, rel=1e-6)


def test_heatmap_peaks_are_one_at_each_floored_centre_and_max_merged():
  boxes = np.array([[8.0, 8.0, 40.0, 72.0],    # centre (24, 40) -> output (6, 10)
                    [10.0, 10.0, 46.0, 76.0],  # same class, centre (28, 43) -> (7, 10.75)
                    [60.0, 3.0, 61.0, 5.0],    # tiny: sigma 1/6
                    [0.0, 0.0, 0.0, 0.0]],     # padding
                   np.float32)
  classes = np.array([3, 3, 7, 0])
  weights = np.array([1.0, 1.0, 1.0, 0.0], np.float32)
  t = heatmaps.center_net_targets(boxes, classes, weights, jnp.array([128.0, 128.0]),
                                  input_hw=(SIZE, SIZE), num_classes=NUM_CLASSES)
  hm = np.asarray(t.heatmap)
  assert hm.shape == (OUT, OUT, NUM_CLASSES)
  np.testing.assert_array_equal(np.asarray(t.indices)[:3], [[6, 10], [7, 10], [15, 1]])
  np.testing.assert_allclose(np.asarray(t.offsets)[:3], [[0, 0], [0, 0.75], [0.125, 0]],
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(t.box_hw)[:3], [[8, 16], [9, 16.5], [0.25, 0.5]])
  assert hm[6, 10, 2] == 1.0 and hm[7, 10, 2] == 1.0 and hm[15, 1, 6] == 1.0
  assert np.sum(hm == 1.0) == 3 and hm.max() <= 1.0 and hm.min() >= 0.0
  # Only channels 2 (id 3) and 6 (id 7) are lit; the padding row (class 0) lights nothing.
  assert set(np.nonzero(hm.reshape(-1, NUM_CLASSES).max(0))[0]) == {2, 6}
  # Max, not sum, of the two same-class Gaussians, each evaluated in numpy over the whole grid.
  yy, xx = np.mgrid[:OUT, :OUT].astype(np.float64)
  gauss = []
  for (y1, x1, y2, x2) in boxes[:2] / STRIDE:
    sigma = (2 * np.floor(_centernet_radius_np(y2 - y1, x2 - x1)) + 1) / 6
    cy, cx = np.floor(y1 + (y2 - y1) / 2), np.floor(x1 + (x2 - x1) / 2)
    gauss.append(np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2)))
  np.testing.assert_allclose(hm[..., 2], np.maximum(*gauss), rtol=1e-5, atol=1e-7)


def test_weight_zero_rows_change_no_target_and_no_loss():
  """Padding rows with garbage boxes and classes (weight 0) leave targets and losses as they
  are; a real box given weight 0 disappears from the heatmap, the L1 terms and the counts."""
  case = _cases()['mixed']
  base = _ours(case)
  mask_targets = np.random.default_rng(3).uniform(0, 1, case['mask_logits'][0].shape)
  losses = cl.centernet_losses(_outputs(case), base, mask_targets, _mask_weights(case))
  noisy = dict(case)
  rng = np.random.default_rng(4)
  pad = case['weights'] == 0
  noisy['boxes'] = np.where(pad[..., None], rng.uniform(0, 128, case['boxes'].shape),
                            case['boxes']).astype(np.float32)
  noisy['classes'] = np.where(pad, rng.integers(1, NUM_CLASSES + 1, pad.shape), case['classes'])
  noisy['mask_logits'] = [np.where(pad[..., None, None], 1e3, m) for m in case['mask_logits']]
  changed = _ours(noisy)
  np.testing.assert_array_equal(changed.heatmap, base.heatmap)
  losses2 = cl.centernet_losses(_outputs(noisy), changed, mask_targets,
                                noisy['weights'] * np.isin(noisy['classes'], ALLOWED))
  for k in losses:
    np.testing.assert_allclose(losses2[k], losses[k], rtol=1e-6, err_msg=k)
  # Dropping the weight-0 rows (fewer slots) gives the same losses too.
  keep = [0, 1, 2, 3, 4]  # image 0's 5 real boxes; image 1's real ones are 0..2 (+ row 3 w=0)
  small = {k: (v[:, keep] if k in ('boxes', 'classes', 'weights') else v)
           for k, v in case.items()}
  small['mask_logits'] = [m[:, keep] for m in case['mask_logits']]
  losses3 = cl.centernet_losses(_outputs(small), _ours(small), mask_targets[:, keep],
                                _mask_weights(small))
  for k in losses:
    np.testing.assert_allclose(losses3[k], losses[k], rtol=1e-5, err_msg=k)


def test_padded_image_region_does_not_enter_the_center_loss():
  case = _cases()['mixed']  # image 1 is 77 rows high: output rows >= ceil(77 / 4) = 20 padded
  targets = _ours(case)
  pw = np.asarray(targets.pixel_weights)
  assert pw[0].all() and pw[1, :20].all() and not pw[1, 20:].any()
  base = cl.centernet_losses(_outputs(case), targets)['center_loss']
  moved = dict(case)
  moved['center'] = [c.copy() for c in case['center']]
  for c in moved['center']:
    c[1, 20:] = 50.0
  assert cl.centernet_losses(_outputs(moved), targets)['center_loss'] == base
  moved['center'][0][1, 19] = 50.0
  assert cl.centernet_losses(_outputs(moved), targets)['center_loss'] != base


def _numpy_losses(case, heatmap, pixel_weights, mask_targets, mask_weights):
  """An independent float64 numpy version of the official loss() on given targets."""
  boxes = case['boxes'].astype(np.float64) / STRIDE
  weights = case['weights'].astype(np.float64)
  n_boxes = max(np.count_nonzero(weights), 1)
  center = scale = offset = 0.0
  for c, s, o in zip(case['center'], case['box_scale'], case['box_offset']):
    p = np.clip(1 / (1 + np.exp(-c.astype(np.float64))), 1e-4, 1 - 1e-4)
    pos = (1 - p) ** 2 * np.log(p)
    neg = (1 - heatmap) ** 4 * p ** 2 * np.log(1 - p)
    center += -np.sum(np.where(heatmap == 1.0, pos, neg) * pixel_weights[..., None])
    for b in range(boxes.shape[0]):
      for i in range(boxes.shape[1]):
        y1, x1, y2, x2 = boxes[b, i]
        cy, cx = y1 + (y2 - y1) / 2, x1 + (x2 - x1) / 2
        r, q = min(int(np.floor(cy)), OUT - 1), min(int(np.floor(cx)), OUT - 1)
        scale += weights[b, i] * np.sum(np.abs(s[b, r, q] - [y2 - y1, x2 - x1]))
        offset += weights[b, i] * np.sum(np.abs(o[b, r, q] - [cy - np.floor(cy),
                                                               cx - np.floor(cx)]))
  k = len(case['center'])
  mask = 0.0
  for logits in case['mask_logits']:
    x = logits.astype(np.float64)
    ce = np.maximum(x, 0) - x * mask_targets + np.log1p(np.exp(-np.abs(x)))
    mask += np.sum(ce.mean(axis=(2, 3)) * mask_weights) / max(np.sum(mask_weights), 1.0)
  return {'center_loss': center / (k * n_boxes), 'box_scale_loss': 0.1 * scale / (k * n_boxes),
          'box_offset_loss': offset / (k * n_boxes),
          'mask_loss': 5.0 * mask / len(case['mask_logits'])}


@pytest.mark.parametrize('name', ['mixed', 'overlap_last_stage', 'empty_and_unallowed'])
def test_losses_match_an_independent_numpy_version(name):
  case = _cases()[name]
  targets = _ours(case)
  mask_targets = np.random.default_rng(5).uniform(0, 1, case['mask_logits'][0].shape)
  ours = jax.jit(cl.centernet_losses)(_outputs(case), targets, mask_targets,
                                      _mask_weights(case))
  ref = _numpy_losses(case, np.asarray(targets.heatmap, np.float64),
                      np.asarray(targets.pixel_weights), mask_targets, _mask_weights(case))
  assert set(ours) == set(ref)
  for k in ref:
    np.testing.assert_allclose(ours[k], ref[k], rtol=2e-5, err_msg=k)


def test_losses_are_differentiable_with_finite_gradients():
  case = _cases()['mixed']
  targets = _ours(case)
  mask_targets = np.full(case['mask_logits'][0].shape, 0.5, np.float32)

  def total(outputs):
    return sum(cl.centernet_losses(outputs, targets, mask_targets, _mask_weights(case)).values())

  grads = jax.jit(jax.grad(total))(_outputs(case))
  for g in jax.tree_util.tree_leaves(grads):
    assert np.all(np.isfinite(g))
  # Gradients reach the box heads only at the (weighted) centre pixels.
  g = np.asarray(grads[0]['box_scale'])
  assert np.count_nonzero(np.abs(g).sum(-1)) <= int(np.count_nonzero(case['weights']))


def test_batch_targets_reads_the_valid_region_from_image_info():
  info = np.array([[480.0, 640.0, 0.2, 0.2], [640.0, 300.0, 0.2, 0.2],
                   [900.0, 900.0, 0.2, 0.2]], np.float32)  # last: larger than S, cropped
  t = heatmaps.batch_targets(np.zeros((3, 2, 4), np.float32), np.zeros((3, 2), np.int32),
                             np.zeros((3, 2), bool), info, input_hw=(SIZE, SIZE),
                             num_classes=NUM_CLASSES)
  rows = np.asarray(t.pixel_weights).max(axis=2).sum(axis=1)
  cols = np.asarray(t.pixel_weights).max(axis=1).sum(axis=1)
  # 96 x 128, 128 x 60, 128 x 128 (180 cropped to 128) input pixels -> ceil(/ 4).
  np.testing.assert_array_equal(rows, [24, 32, 32])
  np.testing.assert_array_equal(cols, [32, 15, 32])
  assert t.heatmap.shape == (3, OUT, OUT, NUM_CLASSES) and not np.asarray(t.heatmap).any()


# ---------------------------------------------------------------------------------------------
# Parity with the official Object Detection API (oracle tier).

@pytest.fixture(scope='module')
def official(tmp_path_factory):
  """Runs the oracle once on all cases: (cases, {key: official array})."""
  cases = _cases()
  tmp = tmp_path_factory.mktemp('centernet_oracle')
  arrays = {'spec': np.array(json.dumps({'input_size': SIZE, 'num_classes': NUM_CLASSES,
                                         'allowed_ids': ALLOWED, 'cases': list(cases)}))}
  for name, case in cases.items():
    for key, value in case.items():
      if isinstance(value, list):
        for s, v in enumerate(value):
          arrays[f'{name}/{key}/{s}'] = v
      elif key == 'boxes':  # the official takes boxes normalised to the padded input
        arrays[f'{name}/boxes'] = value / np.float32(SIZE)
      else:
        arrays[f'{name}/{key}'] = value
  np.savez(tmp / 'inputs.npz', **arrays)
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', CUDA_VISIBLE_DEVICES='')
  start = time.time()
  result = subprocess.run(
      [str(DEEPMAC_ORACLE_PYTHON), str(REPO / 'oracle' / 'centernet_targets_parity.py'),
       str(tmp / 'inputs.npz'), str(tmp / 'out.npz')],
      cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, f'oracle failed:\n{result.stderr[-6000:]}'
  print(f'oracle: {time.time() - start:.1f} s', file=sys.stderr)
  return cases, dict(np.load(tmp / 'out.npz'))


NAMES = list(_cases())


@pytest.mark.oracle
@pytest.mark.parametrize('name', NAMES)
def test_targets_match_official_assigners(official, name):
  cases, out = official
  case = cases[name]
  t = _ours(case)
  batch, num = case['classes'].shape
  np.testing.assert_allclose(t.heatmap, out[f'{name}/heatmap'], rtol=1e-4, atol=1e-7)
  assert np.sum(np.asarray(t.heatmap) == 1.0) == np.sum(out[f'{name}/heatmap'] == 1.0)
  batch_index = np.repeat(np.arange(batch), num)[:, None]
  np.testing.assert_array_equal(
      np.concatenate([batch_index, np.asarray(t.indices).reshape(-1, 2)], 1),
      out[f'{name}/indices'])
  np.testing.assert_allclose(np.asarray(t.box_hw).reshape(-1, 2), out[f'{name}/box_hw'],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(t.offsets).reshape(-1, 2), out[f'{name}/offsets'],
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(t.weights).reshape(-1), out[f'{name}/box_weights'])
  np.testing.assert_array_equal(np.asarray(t.pixel_weights).reshape(batch, -1),
                                out[f'{name}/pixel_weights'])
  y1, x1, y2, x2 = np.moveaxis(case['boxes'] / STRIDE, -1, 0)
  np.testing.assert_allclose(heatmaps.gaussian_sigma(y2 - y1, x2 - x1), out[f'{name}/sigma'],
                             rtol=1e-6)
  np.testing.assert_array_equal(_mask_weights(case), out[f'{name}/mask_weights'])


@pytest.mark.oracle
@pytest.mark.parametrize('name', NAMES)
def test_losses_match_official_loss(official, name):
  cases, out = official
  case = cases[name]
  ours = cl.centernet_losses(_outputs(case), _ours(case), out[f'{name}/mask_targets'],
                             _mask_weights(case))
  official_names = {'center_loss': 'Loss/object_center', 'box_scale_loss': 'Loss/box/scale',
                    'box_offset_loss': 'Loss/box/offset',
                    'mask_loss': 'Loss/deep_mask_estimation'}
  assert {f'{name}/loss/{v}' for v in official_names.values()} == {
      k for k in out if k.startswith(f'{name}/loss/')}
  for ours_name, official_name in official_names.items():
    np.testing.assert_allclose(ours[ours_name], out[f'{name}/loss/{official_name}'], rtol=1e-4,
                               err_msg=f'{name}: {ours_name}')
