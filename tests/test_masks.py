"""ops/masks.py against hand-worked values and scipy's independent bilinear sampler."""
import numpy as np
from scipy import ndimage

from deepmarc_jax.ops import masks


def test_crop_matches_scipy_bilinear_at_cell_centres():
  rng = np.random.default_rng(0)
  image = rng.random((40, 50))
  box, m = (3.2, 7.5, 31.0, 44.1), 9
  ys = box[0] + (np.arange(m) + 0.5) * (box[2] - box[0]) / m - 0.5
  xs = box[1] + (np.arange(m) + 0.5) * (box[3] - box[1]) / m - 0.5
  yy, xx = np.meshgrid(ys, xs, indexing='ij')
  expected = ndimage.map_coordinates(image, [yy, xx], order=1, mode='nearest')
  np.testing.assert_allclose(masks.crop_mask_to_box(image, box, m), expected, atol=1e-6)


def test_crop_hand_worked():
  # A 2x2 box over a 4x4 ramp, 2x2 output: cell centres are the pixel centres themselves.
  ramp = np.arange(16, dtype=np.float64).reshape(4, 4)
  np.testing.assert_allclose(masks.crop_mask_to_box(ramp, (1, 1, 3, 3), 2), [[5, 6], [9, 10]])
  # Clamping at the border: a 1x1 output of the whole image samples its centre (1.5, 1.5).
  np.testing.assert_allclose(masks.crop_mask_to_box(ramp, (0, 0, 4, 4), 1), [[7.5]])


def test_paste_hand_worked_and_zero_outside_box():
  box_mask = np.array([[1.0, 0.0], [0.0, 1.0]])
  out = masks.paste_box_mask(box_mask, (2, 2, 6, 6), 8, 8)
  assert out[:2].sum() == 0 and out[6:].sum() == 0 and out[:, :2].sum() == 0
  # Pixel (2,2) centre (2.5,2.5) maps to mask position (-0.25,-0.25) -> clamped to cell (0,0).
  assert out[2, 2] == 1.0 and out[5, 5] == 1.0 and out[2, 5] == 0.0
  # Pixel (3,3) maps to (0.25, 0.25): bilinear 0.75*0.75*1 + 0.25*0.25*1.
  np.testing.assert_allclose(out[3, 3], 0.625)


def test_paste_of_crop_recovers_the_mask():
  mask = np.zeros((60, 80))
  yy, xx = np.mgrid[:60, :80]
  mask[((yy - 30) / 20) ** 2 + ((xx - 40) / 30) ** 2 <= 1] = 1
  box = (10, 10, 51, 71)  # tight box
  crop = masks.crop_mask_to_box(mask, box, 56)
  pasted = masks.paste_box_mask(crop, box, 60, 80) >= 0.5
  assert masks.mask_iou(pasted, mask) > 0.97


def test_mask_iou():
  a = np.zeros((4, 4), bool)
  b = np.zeros((4, 4), bool)
  a[:2] = True
  b[1:3] = True
  assert masks.mask_iou(a, b) == 4 / 12
  assert masks.mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0
