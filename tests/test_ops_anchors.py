"""ops/anchors.py against hand-worked anchors (Model Garden `Anchor` semantics).

The implementation was also compared once with Model Garden's `Anchor` (levels 2-6 at
256x192 and 100x130, SpineNet's levels 3-7 with 3 scales at 640x640): equal to 6e-5 px.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from deepmarc_jax.ops import anchors

S2 = math.sqrt(2.0)


def test_hand_worked_single_scale():
  out = anchors.multilevel_anchors(2, 3, 1, [0.5, 1.0, 2.0], 8.0, (16, 16))
  assert sorted(out) == [2, 3]
  assert out[2].shape == (4, 4, 3, 4) and out[3].shape == (2, 2, 3, 4)
  assert out[2].dtype == np.float32
  # Level 2: stride 4, first centre (2, 2), base size 8 * 4 = 32. Ratio r: w * sqrt(r), h / sqrt(r).
  np.testing.assert_allclose(out[2][0, 0, 1], [-14, -14, 18, 18])
  np.testing.assert_allclose(out[2][0, 0, 0], [2 - 16 * S2, 2 - 16 / S2, 2 + 16 * S2, 2 + 16 / S2],
                             rtol=1e-6)
  np.testing.assert_allclose(out[2][0, 0, 2], [2 - 16 / S2, 2 - 16 * S2, 2 + 16 / S2, 2 + 16 * S2],
                             rtol=1e-6)
  # Row 1, column 2 is centred at (6, 10).
  np.testing.assert_allclose(out[2][1, 2, 1], [6 - 16, 10 - 16, 6 + 16, 10 + 16])
  # Level 3: stride 8, base 64.
  np.testing.assert_allclose(out[3][1, 0, 1], [12 - 32, 4 - 32, 12 + 32, 4 + 32])


def test_scale_major_order_within_a_location():
  out = anchors.multilevel_anchors(3, 3, 2, [1.0, 2.0], 4.0, (8, 8))[3]
  sizes = out[0, 0, :, 2:] - out[0, 0, :, :2]  # (h, w) per anchor
  base = 4.0 * 8
  np.testing.assert_allclose(sizes, [[base, base], [base / S2, base * S2],
                                     [base * S2, base * S2], [base, base * 2]], rtol=1e-6)


def test_non_divisible_image_uses_ceil_grid_and_fractional_stride():
  out = anchors.multilevel_anchors(2, 2, 1, [1.0], 8.0, (100, 130))[2]
  assert out.shape == (25, 33, 1, 4)
  centres_x = (out[0, :, 0, 1] + out[0, :, 0, 3]) / 2
  np.testing.assert_allclose(centres_x, (np.arange(33) + 0.5) * 130 / 33, rtol=1e-6)


def test_flatten_levels_order():
  per_level = anchors.multilevel_anchors(2, 4, 1, [0.5, 1.0, 2.0], 8.0, (32, 32))
  flat = anchors.flatten_levels(per_level)
  assert isinstance(flat, np.ndarray) and flat.shape == ((64 + 16 + 4) * 3, 4)
  np.testing.assert_array_equal(flat[:3], per_level[2][0, 0])
  np.testing.assert_array_equal(flat[3:6], per_level[2][0, 1])   # row-major: x varies first
  np.testing.assert_array_equal(flat[8 * 3:9 * 3], per_level[2][1, 0])
  np.testing.assert_array_equal(flat[64 * 3], per_level[3][0, 0, 0])
  # Per-level predictions [H, W, A, k] (jax arrays) flatten the same way.
  scores = {level: jnp.asarray(a[..., :1]) for level, a in per_level.items()}
  np.testing.assert_array_equal(anchors.flatten_levels(scores)[:, 0], flat[:, 0])
