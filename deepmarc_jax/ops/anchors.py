"""Multilevel anchors, Model Garden's `official/vision/ops/anchor.py` `Anchor` semantics (numpy).

Anchors are static: computed with numpy at trace time from the (static) image size.

Level l has a feature map of H_l = ceil(H / 2^l) by W_l = ceil(W / 2^l) cells with stride
H / H_l (= 2^l when it divides H); cell (i, j) is centred at ((i + 0.5) stride_y,
(j + 0.5) stride_x). Each location has A = num_scales * len(aspect_ratios) anchors, ordered
scale-major: for scale s in range(num_scales), for ratio r in aspect_ratios. Anchor (s, r) has
base size anchor_size * 2^l * 2^(s / num_scales), width base * sqrt(r), height base / sqrt(r)
(r = width / height). Boxes are (y1, x1, y2, x2) pixels, not clipped to the image.

The flat order used everywhere (RPN outputs, matching, proposals) is level ascending, then
row-major (y, x, anchor): `flatten_levels` of per-level [H_l, W_l, A, ...] arrays.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np


def level_anchors(level: int, num_scales: int, aspect_ratios: Sequence[float],
                  anchor_size: float, image_size: Sequence[int]) -> np.ndarray:
  """Anchors of one level: [H_l, W_l, A, 4] float32."""
  height, width = image_size
  feat_h, feat_w = math.ceil(height / 2**level), math.ceil(width / 2**level)
  stride_y, stride_x = height / feat_h, width / feat_w
  cy = (np.arange(feat_h) + 0.5) * stride_y
  cx = (np.arange(feat_w) + 0.5) * stride_x
  half_h, half_w = [], []
  for scale in range(num_scales):
    base = anchor_size * 2**level * 2**(scale / num_scales)
    for ratio in aspect_ratios:
      half_h.append(0.5 * base / math.sqrt(ratio))
      half_w.append(0.5 * base * math.sqrt(ratio))
  cy, cx = cy[:, None, None], cx[None, :, None]
  half_h, half_w = np.array(half_h)[None, None], np.array(half_w)[None, None]
  y1, x1 = np.broadcast_arrays(cy - half_h, cx - half_w)
  y2, x2 = np.broadcast_arrays(cy + half_h, cx + half_w)
  return np.stack([y1, x1, y2, x2], -1).astype(np.float32)


def multilevel_anchors(min_level: int, max_level: int, num_scales: int,
                       aspect_ratios: Sequence[float], anchor_size: float,
                       image_size: Sequence[int]) -> dict[int, np.ndarray]:
  """{level: [H_l, W_l, A, 4] float32 anchors} for levels min_level..max_level."""
  return {level: level_anchors(level, num_scales, aspect_ratios, anchor_size, image_size)
          for level in range(min_level, max_level + 1)}


def flatten_levels(per_level: Mapping[int, np.ndarray]) -> np.ndarray:
  """{level: [H_l, W_l, A, *rest]} -> [sum_l H_l W_l A, *rest], levels ascending.

  numpy in, numpy out (static anchors); jax arrays (e.g. per-level predictions) give a jax array.
  """
  arrays = [per_level[level] for level in sorted(per_level)]
  xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp
  return xp.concatenate([xp.reshape(a, (-1,) + a.shape[3:]) for a in arrays])
