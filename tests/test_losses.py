"""Losses against plain numpy transcriptions of Model Garden's formulas."""
import numpy as np

from deepmarc_jax import losses

rng = np.random.default_rng(0)


def _bce(logits, targets):
  p = 1 / (1 + np.exp(-logits))
  return -(targets * np.log(p) + (1 - targets) * np.log(1 - p))


def _huber(x, d):
  return np.where(np.abs(x) <= d, 0.5 * x * x, d * (np.abs(x) - 0.5 * d))


def test_huber_hand_worked():
  np.testing.assert_allclose(losses.huber(np.array([0.5, -2.0]), 1.0), [0.125, 1.5])


def test_rpn_score_loss():
  logits = rng.normal(size=(2, 50)).astype(np.float32)
  labels = rng.integers(-1, 2, size=(2, 50))
  expected = (_bce(logits, labels == 1) * (labels >= 0)).sum() / (2 * 256)
  np.testing.assert_allclose(losses.rpn_score_loss(logits, labels, 256), expected, rtol=1e-5)


def test_rpn_and_frcnn_box_losses():
  deltas = rng.normal(size=(2, 30, 4)).astype(np.float32)
  targets = rng.normal(size=(2, 30, 4)).astype(np.float32)
  positive = rng.random((2, 30)) < 0.3
  expected = (_huber(deltas - targets, 1 / 9) * positive[..., None]).sum() / (
      4 * positive.sum() + 0.01)
  np.testing.assert_allclose(losses.rpn_box_loss(deltas, targets, positive), expected, rtol=1e-5)

  class_deltas = rng.normal(size=(2, 30, 5, 4)).astype(np.float32)
  classes = rng.integers(0, 5, size=(2, 30))
  fg = classes > 0
  picked = class_deltas[np.arange(2)[:, None], np.arange(30)[None], classes]
  expected = (_huber(picked - targets, 1.0) * fg[..., None]).sum() / (4 * fg.sum() + 0.01)
  np.testing.assert_allclose(losses.frcnn_box_loss(class_deltas, classes, targets, fg), expected,
                             rtol=1e-5)
  agnostic = class_deltas[:, :, :1]
  expected = (_huber(agnostic[:, :, 0] - targets, 1.0) * fg[..., None]).sum() / (
      4 * fg.sum() + 0.01)
  np.testing.assert_allclose(losses.frcnn_box_loss(agnostic, classes, targets, fg), expected,
                             rtol=1e-5)


def test_frcnn_class_loss_ignores_invalid_rois():
  logits = rng.normal(size=(2, 8, 4)).astype(np.float32)
  classes = rng.integers(0, 4, size=(2, 8))
  valid = np.ones((2, 8), bool)
  valid[1, 5:] = False
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, classes[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.frcnn_class_loss(logits, classes, valid),
                             ce[valid].mean(), rtol=1e-5)


def test_mask_loss_counts_only_weighted_pixels():
  logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
  targets = rng.random((2, 3, 4, 4)).astype(np.float32)
  weights = np.array([[1, 0, 1], [0, 0, 1]], np.float32)
  expected = (_bce(logits, targets) * weights[..., None, None]).sum() / (3 * 16 + 0.01)
  np.testing.assert_allclose(losses.mask_loss(logits, targets, weights), expected, rtol=1e-5)
  # Garbage in unweighted slots changes nothing.
  logits2 = logits.copy()
  logits2[0, 1] = 1e3
  np.testing.assert_allclose(losses.mask_loss(logits2, targets, weights), expected, rtol=1e-5)
